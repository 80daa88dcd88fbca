"""Deterministic demo weights for the APM and the retrieval DB, in the authors' file formats.

Demo weights are random (seeded) with a few touches so that they behave plausibly: the frozen-BN
statistics keep activations bounded through the 16 bottlenecks; the image enters the transformer
scaled down and the first encoder layer writes each token's position into the memory, so a query's
decoded vector depends mainly on the query, not on the image; each query attends around its
region's typical box; and the box head's last layer is solved (ridge least squares) so that query i
lands on region i's typical box in a PA chest radiograph (:data:`DEMO_REGION_BOXES`), within a few
percent of the image whatever the image. The boxes are a fixed prior, not a detection: everything
produced with demo weights must be flagged demo by the caller.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from inference.apm.config import APMConfig
from inference.apm.model import AnatomyPerceptionModule
from inference.apm.position import interleave_sin_cos
from inference.preprocess import images_to_tensor, prepare_array
from inference.result import REGION_NAMES

#: Typical normalised (x1, y1, x2, y2) of each region in a letterboxed PA chest image (image left =
#: patient right). Used only to make demo boxes plausible.
DEMO_REGION_BOXES: tuple[tuple[float, float, float, float], ...] = (
    (0.15, 0.72, 0.85, 0.98),
    (0.50, 0.25, 0.62, 0.35),
    (0.55, 0.12, 0.82, 0.25),
    (0.18, 0.12, 0.45, 0.25),
    (0.38, 0.42, 0.72, 0.72),
    (0.50, 0.30, 0.60, 0.70),
    (0.55, 0.35, 0.68, 0.50),
    (0.32, 0.35, 0.45, 0.50),
    (0.52, 0.15, 0.85, 0.25),
    (0.55, 0.65, 0.88, 0.75),
    (0.55, 0.52, 0.88, 0.72),
    (0.52, 0.12, 0.88, 0.72),
    (0.55, 0.35, 0.86, 0.52),
    (0.55, 0.12, 0.84, 0.35),
    (0.40, 0.20, 0.62, 0.70),
    (0.35, 0.50, 0.48, 0.68),
    (0.33, 0.48, 0.42, 0.68),
    (0.15, 0.15, 0.48, 0.25),
    (0.12, 0.62, 0.45, 0.72),
    (0.12, 0.50, 0.45, 0.70),
    (0.12, 0.12, 0.48, 0.70),
    (0.14, 0.35, 0.45, 0.50),
    (0.16, 0.12, 0.45, 0.35),
    (0.45, 0.33, 0.55, 0.40),
    (0.60, 0.45, 0.74, 0.70),
    (0.55, 0.72, 0.88, 0.95),
    (0.12, 0.70, 0.45, 0.95),
    (0.42, 0.18, 0.58, 0.35),
    (0.40, 0.22, 0.48, 0.42),
    (0.44, 0.10, 0.56, 0.40),
    (0.45, 0.05, 0.55, 0.95),
    (0.38, 0.40, 0.46, 0.48),
    (0.62, 0.62, 0.72, 0.72),
    (0.80, 0.62, 0.90, 0.75),
    (0.33, 0.60, 0.43, 0.70),
    (0.10, 0.60, 0.20, 0.72),
)
assert len(DEMO_REGION_BOXES) == len(REGION_NAMES)

#: Findings used to write template sentences in the demo retrieval DB.
DEMO_FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "consolidation",
    "opacity",
    "effusion",
    "edema",
    "a nodule",
    "scarring",
    "pneumothorax",
    "calcification",
    "enlargement",
    "a support device",
    "linear atelectasis",
)


def demo_raw_region_names() -> list[str]:
    """Chest ImaGenome-like raw names whose Python-sorted order is ``REGION_NAMES``' order.

    The raw names of the two costodiaphragmatic recesses are lower case (as in Chest ImaGenome), which
    is what puts them after "cavoatrial" when sorted.
    """
    names = list(REGION_NAMES)
    for index in (33, 35):
        names[index] = names[index].lower()
    assert sorted(names) == names, "demo raw region names must sort into REGION_NAMES order"
    return names


def synthetic_chest_radiograph(rows: int = 1024, columns: int = 1024, seed: int = 0) -> np.ndarray:
    """A deterministic chest-like uint16 image [rows, columns]: bright body, two dark lung fields,
    a bright mediastinum and spine, plus mild noise. Larger values are brighter (MONOCHROME2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    v, u = y / rows, x / columns
    body = np.exp(-(((u - 0.5) / 0.42) ** 6 + ((v - 0.55) / 0.5) ** 6))
    lungs = sum(np.exp(-(((u - cx) / 0.15) ** 2 + ((v - 0.42) / 0.26) ** 2) * 2.5) for cx in (0.31, 0.69))
    spine = np.exp(-(((u - 0.5) / 0.05) ** 2))
    image = 2600 * body - 1500 * lungs + 700 * spine * body + rng.normal(0, 40, (rows, columns)) + 400
    return np.clip(image, 0, 4095).astype(np.uint16)


def build_demo_apm(config: APMConfig, seed: int) -> AnatomyPerceptionModule:
    """Random APM (deterministic from ``seed``) with bounded activations and a fitted box head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = AnatomyPerceptionModule(config)
        initialise_backbone(module)
        initialise_transformer(module)
        initialise_positional_memory(module)
        initialise_spatial_queries(module)
    fit_box_head(module)
    return module.eval().requires_grad_(False)


def initialise_backbone(module: AnatomyPerceptionModule) -> None:
    """Kaiming convs; frozen BN near identity, with the last BN of each bottleneck scaled down (as
    zero-init-residual does) so activations neither explode nor vanish through 16 blocks."""
    for name, child in module.backbone.named_modules():
        if isinstance(child, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        elif child.__class__.__name__ == "FrozenBatchNorm2d":
            channels = child.weight.shape[0]
            gain = 0.2 if name.endswith("bn3") else 1.0
            child.weight.copy_(gain * (1.0 + 0.1 * torch.randn(channels)))
            child.bias.copy_(0.01 * torch.randn(channels))
            child.running_mean.copy_(0.01 * torch.randn(channels))
            child.running_var.copy_(1.0 + 0.1 * torch.rand(channels))


def initialise_transformer(module: AnatomyPerceptionModule) -> None:
    """Xavier for matrices (as DETR does); query embeddings stay N(0, 1) so regions differ."""
    for name, parameter in module.named_parameters():
        if name.startswith("backbone") or name == "query_embed.weight":
            continue
        if parameter.dim() > 1:
            torch.nn.init.xavier_uniform_(parameter)


@torch.no_grad()
def initialise_positional_memory(module: AnatomyPerceptionModule, image_gain: float = 0.01, cls_scale: float = 10.0) -> None:
    """Give the encoder memory an image-independent code of each token's position.

    In this architecture a query's identity reaches its decoded vector only through attention
    weights, and attention values are image memory, so with random weights the boxes follow image
    content, not the query. Two changes make the memory carry position instead: the image enters
    the encoder scaled down (``image_gain``: it only jitters the outputs), and in the first encoder
    layer each head splits every token's attention between the CLS token and the rest by a smooth
    function of the token's position (low-frequency sine of y or x at two phases), so the CLS value
    is mixed in by position. Later encoder layers mostly pass tokens through.
    """
    config = module.config
    d, heads = config.d_model, config.num_heads
    head_dim = d // heads
    module.input_proj.weight.mul_(image_gain)
    module.input_proj.bias.zero_()
    transformer = module.transformer
    direction = torch.zeros(d)
    direction[2] = 1.0  # a y channel of mid frequency: the CLS key lives here, spatial keys barely do
    transformer.cls_pos.copy_(cls_scale * direction[None, None])
    transformer.cls_token[0, 0, 2] = 0.0
    attention = transformer.encoder.layers[0].self_attn
    w_q, w_k = torch.zeros(d, d), torch.zeros(d, d)
    b_q = torch.zeros(d)
    half = d // 2
    # logit(p -> CLS) = cls_scale * (amplitude * wave_h(p) + offset) / sqrt(head_dim): around log(1024)
    # so the CLS share moves through its sigmoid's useful range as the wave goes from -1 to 1.
    amplitude = 4.0 * math.sqrt(head_dim) / cls_scale
    offset = math.log(config.num_memory_tokens) * math.sqrt(head_dim) / cls_scale
    for head in range(heads):
        row = head * head_dim
        axis = 0 if head % 2 == 0 else half  # y for even heads, x for odd heads
        phase = (head // 2) * math.pi / 2 + 0.3
        w_q[row, axis] = amplitude * math.cos(phase)  # sin(angle) channel
        w_q[row, axis + 1] = amplitude * math.sin(phase)  # cos(angle) channel
        b_q[row] = offset
        w_k[row] = direction
    attention.in_proj_weight[:d] = w_q
    attention.in_proj_weight[d : 2 * d] = w_k
    attention.in_proj_bias[: 2 * d] = torch.cat([b_q, torch.zeros(d)])
    for layer in transformer.encoder.layers[1:]:
        layer.self_attn.out_proj.weight.mul_(0.1)


@torch.no_grad()
def initialise_spatial_queries(module: AnatomyPerceptionModule, sharpness: float = 8.0) -> None:
    """Make query i look at the corners and the centre of region i's typical box.

    Each cross-attention head h of the decoder compares a slice of the query embedding with the key
    position code: query i's slice h holds the low-frequency sine code of one point of its box
    (top-left, bottom-right, centre, centre), so head h attends around that point. With the encoder
    memory carrying position (see :func:`initialise_positional_memory`), the decoded vector of query
    i then encodes where its box's corners are, mostly independently of the image.
    """
    config = module.config
    d, heads = config.d_model, config.num_heads
    head_dim = d // heads
    half = d // 2
    pairs = head_dim // 4  # frequency pairs per axis in one head's slice (sin and cos for y and x)
    gain = math.sqrt(sharpness * math.sqrt(head_dim))
    w_q, w_k = torch.zeros(d, d), torch.zeros(d, d)
    for head in range(heads):
        base = head * head_dim
        for f in range(pairs):
            for axis_offset, slot in ((0, 0), (half, 2 * pairs)):
                for trig in range(2):  # sin, cos
                    dim = base + slot + 2 * f + trig
                    w_q[dim, dim] = gain
                    w_k[dim, axis_offset + 2 * f + trig] = gain
    for index, (x1, y1, x2, y2) in enumerate(DEMO_REGION_BOXES[: config.num_queries]):
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        points = ((x1, y1), (x2, y2), centre, centre)
        module.query_embed.weight[index] = torch.cat([point_code(*points[head % len(points)], pairs, half, config.feature_size) for head in range(heads)])
    for layer in module.transformer.decoder.layers:
        attention = layer.multihead_attn
        attention.in_proj_weight[:d] = w_q
        attention.in_proj_weight[d : 2 * d] = w_k
        attention.in_proj_bias[: 2 * d] = 0.0


def point_code(x: float, y: float, pairs: int, half: int, size: int) -> torch.Tensor:
    """Sine code [4 * pairs] of a normalised point: the y then x channels of the lowest ``pairs``
    frequencies of the key position code (``half`` channels per axis, ``size`` tokens per side)."""
    dim_t = 10000.0 ** (2 * torch.arange(pairs).float() / half)
    codes = []
    for value in (y, x):
        angle = (value * size + 0.5) / size * 2 * math.pi  # token centre -> DETR's normalised angle
        codes.append(interleave_sin_cos(torch.stack([angle / dim_t, angle / dim_t], 1).reshape(1, -1)).reshape(-1))
    return torch.cat(codes)


@torch.no_grad()
def fit_box_head(module: AnatomyPerceptionModule, ridge: float = 1e-4) -> None:
    """Fit ``bbox_embed.layers[-1]`` so that, on the synthetic radiograph, query i predicts region
    i's typical box (ridge least squares in logit space; bias absorbs the mean)."""
    size = module.config.image_size
    # Varied shapes and contents, so the fit follows what the queries share across images (image
    # content only jitters the decoded vectors; see initialise_positional_memory).
    shapes = ((size, size), (size + size // 4, size - size // 8))
    images = [prepare_array(synthetic_chest_radiograph(rows, columns, seed=index)) for index, (rows, columns) in enumerate(shapes)]
    noise = np.random.default_rng(len(shapes)).integers(0, 4096, (size - size // 4, size), dtype=np.uint16)
    images.append(prepare_array(noise))
    hs, _, _ = module.encode_decode(images_to_tensor(images))
    hidden = module.bbox_embed.hidden(hs).double().reshape(-1, hs.shape[-1])  # [N * Q, D]
    xyxy = torch.tensor(DEMO_REGION_BOXES, dtype=torch.float64)[: hs.shape[1]].repeat(len(images), 1)
    cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2, xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1)
    target = torch.logit(cxcywh)
    h_mean, t_mean = hidden.mean(0, keepdim=True), target.mean(0, keepdim=True)
    hc, tc = hidden - h_mean, target - t_mean
    gram = hc.T @ hc
    weight = torch.linalg.solve(gram + ridge * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype), hc.T @ tc)
    last = module.bbox_embed.layers[-1]
    last.weight.copy_(weight.T.float())
    last.bias.copy_((t_mean - h_mean @ weight)[0].float())


def write_demo_apm_checkpoint(path: str | Path, config: APMConfig, seed: int) -> None:
    """Write an APM ``.pth`` in the authors' layout: ``model`` (``vis_model.*`` + a few
    ``text_model.*``), optimizer/scheduler states, ``epoch``, ``args`` (a Namespace holding a
    PosixPath) and ``best_loss``."""
    module = build_demo_apm(config, seed)
    model: OrderedDict[str, torch.Tensor] = OrderedDict((f"vis_model.{key}", value.detach().clone().contiguous()) for key, value in module.state_dict().items())
    generator = torch.Generator().manual_seed(seed + 1)
    for key, shape in (
        ("text_model.projection_head.0.weight", (512, 768)),
        ("text_model.projection_head.0.bias", (512,)),
        ("text_model.projection_head.2.weight", (config.token_dim, 512)),
        ("text_model.projection_head.2.bias", (config.token_dim,)),
    ):
        model[key] = torch.randn(shape, generator=generator) * 0.02
    args = argparse.Namespace(
        model=argparse.Namespace(
            hidden_dim=config.d_model,
            nheads=config.num_heads,
            enc_layers=config.encoder_layers,
            dec_layers=config.decoder_layers,
            dim_feedforward=config.ffn_dim,
            num_queries=config.num_queries,
            proj_dim=config.token_dim,
            pre_norm=False,
        ),
        output_dir=pathlib.PosixPath("outputs/apm_demo"),
        demo=True,
        seed=seed,
    )
    checkpoint = {
        "model": model,
        "vis_optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 1e-4, "params": []}]},
        "text_optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 1e-4, "params": []}]},
        "lr_scheduler": {"step_size": 30, "gamma": 0.1, "last_epoch": 0},
        "epoch": 0,
        "args": args,
        "best_loss": math.inf,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def write_demo_retrieval_db(path: str | Path, seed: int, sentences_per_region: int = 8, token_dim: int = 16) -> None:
    """Write a retrieval DB in the authors' format: ``{raw_region: {sentence: Tensor[1, token_dim]}}``,
    36 regions, each region's sentences unique and sorted, vectors deterministic from ``seed``."""
    if sentences_per_region < 1:
        raise ValueError("sentences_per_region must be at least 1")
    rng = np.random.default_rng(seed)
    db: OrderedDict[str, OrderedDict[str, torch.Tensor]] = OrderedDict()
    for raw_name in demo_raw_region_names():
        sentences = sorted(demo_sentences(raw_name, sentences_per_region))
        vectors = rng.standard_normal((len(sentences), token_dim)).astype(np.float32)
        db[raw_name] = OrderedDict((s, torch.from_numpy(v[None].copy())) for s, v in zip(sentences, vectors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(db, path)


def demo_sentences(raw_name: str, count: int) -> set[str]:
    """``count`` unique template sentences for one region."""
    region = raw_name[0].upper() + raw_name[1:]
    sentences = {f"{region} is healthy."}
    pairs = [(a, b) for a in DEMO_FINDINGS for b in DEMO_FINDINGS if a != b]
    index = 0
    while len(sentences) < count:
        if index < len(pairs):
            first, second = pairs[index]
            sentences.add(f"{region} shows {first} and {second}.")
        else:
            first, second = pairs[index % len(pairs)]
            sentences.add(f"{region} shows {first} and {second} ({index // len(pairs)}).")
        index += 1
    return sentences
