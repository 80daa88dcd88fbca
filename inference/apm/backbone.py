"""ResNet-50 backbone with frozen BatchNorm and a 1-channel stem (torchvision's key layout).

Our own implementation (no torchvision): the authors' checkpoint keys are
``backbone.0.body.{conv1,bn1,layer1..4}.*``; each bottleneck has ``conv1/bn1`` (1x1),
``conv2/bn2`` (3x3, carries the stride), ``conv3/bn3`` (1x1, x4 expansion) and a
``downsample.0`` conv / ``downsample.1`` BN on the first block of each stage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from inference.apm.config import APMConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers.

    eps 1e-5 sits inside the rsqrt, as in DETR; there is no ``num_batches_tracked`` buffer.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` so that ``bn(x) = x * scale + shift``; each [C]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, eps: float) -> tuple[nn.Conv2d, FrozenBatchNorm2d]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, FrozenBatchNorm2d(out_ch, eps)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv): [B, C_in, H, W] -> [B, 4*width, H/s, W/s]."""

    def __init__(self, in_ch: int, width: int, stride: int, expansion: int, eps: float) -> None:
        super().__init__()
        out_ch = width * expansion
        self.conv1, self.bn1 = conv_bn(in_ch, width, 1, 1, eps)
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride, eps)
        self.conv3, self.bn3 = conv_bn(width, out_ch, 1, 1, eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride, eps))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBody(nn.Module):
    """Stem + 4 stages; returns layer4 only: [B, 1, H, W] -> [B, 2048, H/32, W/32]."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        eps = config.bn_eps
        stem = config.stem_width
        self.conv1 = nn.Conv2d(config.in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem, eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = stem
        for index, count in enumerate(config.blocks):
            width = stem * (2**index)
            stride = 1 if index == 0 else 2
            blocks = []
            for block in range(count):
                blocks.append(Bottleneck(in_ch, width, stride if block == 0 else 1, config.expansion, eps))
                in_ch = width * config.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class Backbone(nn.Module):
    """Holds the ResNet as ``body`` so keys read ``backbone.0.body.*`` inside :class:`BackboneJoiner`."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.body = ResNetBody(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BackboneJoiner(nn.Sequential):
    """``backbone.0`` is the CNN (the reference's slot 1, the position embedding, has no weights)."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__(Backbone(config))

    def forward(self, x: Tensor) -> Tensor:
        """images [B, 1, H, W] -> features [B, 2048, H/32, W/32]."""
        return self[0](x)


def fold_conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to ``bn(conv(x))``. The folded weights are computed in float64 and
    rounded once to the conv's dtype; the result still differs from conv-then-BN by the rounding of a
    different order of operations, which deep stacks amplify (see ``TorchAPMRunner``)."""
    scale = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
    shift = bn.bias.double() - bn.running_mean.double() * scale
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=True,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(shift if conv.bias is None else conv.bias.double() * scale + shift)
    return fused.requires_grad_(False)


def fold_frozen_batchnorm(body: ResNetBody) -> ResNetBody:
    """Fold every FrozenBatchNorm into the preceding conv, in place (inference speed: one pass over
    each activation instead of three). The state-dict keys change, so do this on a runner's copy,
    never on a module that will be saved or compared by key."""
    pairs = [(body, "conv1", "bn1")]
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in stage:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2"), (block, "conv3", "bn3")]
            if block.downsample is not None:
                block.downsample[0] = fold_conv_bn(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    for owner, conv_name, bn_name in pairs:
        setattr(owner, conv_name, fold_conv_bn(getattr(owner, conv_name), getattr(owner, bn_name)))
        setattr(owner, bn_name, nn.Identity())
    return body
