"""Typed configuration of the anatomy perception module (APM)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class APMConfig:
    """Shapes of the APM. ``full()`` is the published model; ``tiny()`` keeps every key name.

    ``tiny`` has the same blocks, layers, queries and heads (so the state-dict keys are identical) with
    small widths, and still takes a 1024x1024 input, so its memory is 32 x 32 = 1024 tokens.
    """

    in_channels: int = 1
    stem_width: int = 64  # ResNet-50: 64; layer widths are stem_width * (1, 2, 4, 8)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    expansion: int = 4
    d_model: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    num_queries: int = 36
    token_dim: int = 16
    token_heads: int = 2
    num_labels: int = 14
    image_size: int = 1024
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads or self.d_model % self.token_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by num_heads {self.num_heads} and token_heads {self.token_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even (sine position embedding: half per axis)")
        if self.image_size % 32:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 32 (ResNet stride)")

    @classmethod
    def full(cls) -> APMConfig:
        """The published AnatomiX APM (31,759,714 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> APMConfig:
        """Same structure and key names, small widths: fast on CPU for tests and demos."""
        return cls(stem_width=8, d_model=64, ffn_dim=128)

    @property
    def backbone_channels(self) -> int:
        """Channels of the layer4 output (2048 for ResNet-50)."""
        return self.stem_width * 8 * self.expansion

    @property
    def feature_size(self) -> int:
        """Side of the layer4 feature map (32 for a 1024 input)."""
        return self.image_size // 32

    @property
    def num_memory_tokens(self) -> int:
        return self.feature_size * self.feature_size
