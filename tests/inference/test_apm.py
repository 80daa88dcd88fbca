"""The APM: exact shapes of the published model (on meta), and numerics against an independent
re-statement of the reference architecture built from torch.nn.MultiheadAttention (sequence-first,
as the reference uses it) and DETR's cumulative-sum position code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference.apm import APM_OUTPUT_KEYS, APMConfig, boxes_to_xyxy_model, build_apm
from inference.apm.backbone import FrozenBatchNorm2d
from inference.apm.position import sine_position_embedding
from inference.demo_apm import build_demo_apm, synthetic_chest_radiograph
from inference.preprocess import images_to_tensor, prepare_array


@pytest.fixture(scope="module")
def tiny_apm():
    return build_demo_apm(APMConfig.tiny(), seed=3)


@pytest.fixture(scope="module")
def chest_batch():
    images = [
        prepare_array(synthetic_chest_radiograph(1100, 900, seed=1)),
        prepare_array(synthetic_chest_radiograph(800, 1000, seed=2)),
        prepare_array(synthetic_chest_radiograph(1024, 1024, seed=3)),
    ]
    return images_to_tensor(images)


def test_full_shape_parameter_and_buffer_counts_on_meta():
    module = build_apm(APMConfig.full(), device="meta")
    assert sum(p.numel() for p in module.parameters()) == 31_759_714
    assert sum(b.numel() for b in module.buffers()) == 106_240
    keys = set(module.state_dict())
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    for key in (
        "backbone.0.body.conv1.weight",
        "backbone.0.body.layer1.0.downsample.0.weight",
        "backbone.0.body.layer4.2.bn3.running_var",
        "input_proj.weight",
        "transformer.cls_token",
        "transformer.cls_pos",
        "transformer.encoder.layers.3.self_attn.in_proj_weight",
        "transformer.decoder.layers.3.multihead_attn.out_proj.bias",
        "transformer.decoder.norm.weight",
        "query_embed.weight",
        "bbox_embed.layers.2.bias",
        "anat_obj_embs.mha.in_proj_weight",
        "anat_obj_embs.linear.weight",
        "image_class_embed.weight",
    ):
        assert key in keys, key
    assert tuple(module.state_dict()["backbone.0.body.conv1.weight"].shape) == (64, 1, 7, 7)
    assert tuple(module.state_dict()["query_embed.weight"].shape) == (36, 256)
    assert tuple(module.state_dict()["anat_obj_embs.linear.weight"].shape) == (16, 256)
    assert "backbone.0.body.fc.weight" not in keys


def test_tiny_has_the_same_keys_as_full():
    full = build_apm(APMConfig.full(), device="meta").state_dict().keys()
    tiny = build_apm(APMConfig.tiny(), device="meta").state_dict().keys()
    assert list(full) == list(tiny)


def test_forward_shapes_and_ranges(tiny_apm, chest_batch):
    with torch.no_grad():
        out = tiny_apm(chest_batch)
    d = APMConfig.tiny().d_model
    assert tuple(out) == APM_OUTPUT_KEYS
    assert tuple(out["boxes"].shape) == (3, 36, 4)
    assert tuple(out["anatomy_tokens"].shape) == (3, 36, 16)
    assert tuple(out["cls"].shape) == (3, d)
    assert tuple(out["memory"].shape) == (3, 1024, d)
    assert tuple(out["image_logits"].shape) == (3, 14)
    assert float(out["boxes"].min()) > 0 and float(out["boxes"].max()) < 1
    for value in out.values():
        assert torch.isfinite(value).all()


def test_demo_boxes_differ_by_region_and_lie_in_the_image(tiny_apm, chest_batch):
    with torch.no_grad():
        boxes = tiny_apm(chest_batch)["boxes"]
    xyxy = boxes_to_xyxy_model(boxes)
    assert len({tuple(b) for b in xyxy[0].tolist()}) == 36
    centres = boxes[..., :2]
    assert float(centres.min()) > 0.05 and float(centres.max()) < 0.95
    # left lung (11) lies to the image right of the right lung (20) in a PA view
    assert (boxes[:, 11, 0] > boxes[:, 20, 0]).all()


def test_frozen_batchnorm_matches_torch_batch_norm():
    bn = FrozenBatchNorm2d(8)
    generator = torch.Generator().manual_seed(0)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(8, generator=generator))
    bn.running_var.copy_(torch.rand(8, generator=generator) * 1e-4)  # small var: eps placement matters
    x = torch.randn(2, 8, 5, 5, generator=generator)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-5)
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)


def detr_sine_position(height: int, width: int, d_model: int) -> torch.Tensor:
    """DETR's PositionEmbeddingSine(normalize=True) written from its definition: cumsum over an
    all-valid mask. Returns [d_model, H, W]."""
    not_mask = torch.ones(1, height, width)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    feats = d_model // 2
    dim_t = torch.arange(feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)[0]


def test_position_embedding_matches_detr_definition():
    ours = sine_position_embedding(32, 32, 256)  # [HW, D] row-major
    reference = detr_sine_position(32, 32, 256).flatten(1).T
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def torch_mha(ours, heads: int, batch_first: bool = False) -> nn.MultiheadAttention:
    """A torch.nn.MultiheadAttention carrying our attention's weights (same key names)."""
    mha = nn.MultiheadAttention(ours.embed_dim, heads, batch_first=batch_first).eval()
    mha.load_state_dict(ours.state_dict())
    return mha


def reference_style_forward(module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's computation restated independently: sequence-first tensors, nn.MultiheadAttention,
    DETR cumsum position code, decoder norm on the last layer, heads as in the paper's model."""
    cfg = module.config
    features = module.input_proj(module.backbone(images))  # [B, D, h, w]
    batch, d, h, w = features.shape
    pos = detr_sine_position(h, w, d).flatten(1).permute(1, 0)[:, None, :].expand(h * w, batch, d)
    src = features.flatten(2).permute(2, 0, 1)  # [HW, B, D]
    t = module.transformer
    src = torch.cat([t.cls_token.expand(-1, batch, -1), src])
    full_pos = torch.cat([t.cls_pos.expand(-1, batch, -1), pos])
    for layer in t.encoder.layers:
        mha = torch_mha(layer.self_attn, cfg.num_heads)
        q = k = src + full_pos
        src = layer.norm1(src + mha(q, k, value=src)[0])
        src = layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))
    cls, memory = src[0], src[1:]
    query_pos = module.query_embed.weight[:, None, :].repeat(1, batch, 1)
    tgt = torch.zeros_like(query_pos)
    for layer in t.decoder.layers:
        self_attn = torch_mha(layer.self_attn, cfg.num_heads)
        cross_attn = torch_mha(layer.multihead_attn, cfg.num_heads)
        q = k = tgt + query_pos
        tgt = layer.norm1(tgt + self_attn(q, k, value=tgt)[0])
        tgt = layer.norm2(tgt + cross_attn(query=tgt + query_pos, key=memory + pos, value=memory)[0])
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    hs = t.decoder.norm(tgt).transpose(0, 1)  # [B, Q, D]
    memory_bf = memory.permute(1, 2, 0).reshape(batch, d, h, w).reshape(batch, d, -1).permute(0, 2, 1)
    token_mha = torch_mha(module.anat_obj_embs.mha, cfg.token_heads, batch_first=True)
    layers = module.bbox_embed.layers
    boxes = layers[2](F.relu(layers[1](F.relu(layers[0](hs))))).sigmoid()
    return {
        "boxes": boxes,
        "anatomy_tokens": module.anat_obj_embs.linear(token_mha(hs, memory_bf, memory_bf)[0]),
        "cls": cls,
        "memory": memory_bf,
        "image_logits": module.image_class_embed(cls),
    }


def test_forward_matches_reference_style_computation(tiny_apm, chest_batch):
    with torch.no_grad():
        ours = tiny_apm(chest_batch[:2])
        reference = reference_style_forward(tiny_apm, chest_batch[:2])
    for key in APM_OUTPUT_KEYS:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-4, msg=key)


def test_memory_is_row_major(tiny_apm, chest_batch):
    """Memory token y*32+x must come from feature cell (y, x): flip the image left-right and the
    memory grid's columns follow (approximately, the conv stack is not exactly flip-equivariant, so
    check that the row-major interpretation beats the column-major one by a wide margin)."""
    with torch.no_grad():
        memory = tiny_apm(chest_batch[:1])["memory"][0].reshape(32, 32, -1)
        features = tiny_apm.input_proj(tiny_apm.backbone(chest_batch[:1]))[0]  # [D, 32, 32]
    row_major = F.cosine_similarity(memory.permute(2, 0, 1).flatten(1), features.flatten(1), dim=0).mean()
    col_major = F.cosine_similarity(memory.permute(2, 1, 0).flatten(1), features.flatten(1), dim=0).mean()
    assert row_major > col_major


def test_batch_equals_single_calls(tiny_apm, chest_batch):
    with torch.no_grad():
        batched = tiny_apm(chest_batch)
        singles = [tiny_apm(chest_batch[i : i + 1]) for i in range(chest_batch.shape[0])]
    for key in APM_OUTPUT_KEYS:
        stacked = torch.cat([single[key] for single in singles])
        torch.testing.assert_close(batched[key], stacked, rtol=1e-5, atol=1e-5, msg=key)


def test_same_seed_same_weights_and_outputs(chest_batch):
    a = build_demo_apm(APMConfig.tiny(), seed=11)
    b = build_demo_apm(APMConfig.tiny(), seed=11)
    c = build_demo_apm(APMConfig.tiny(), seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with torch.no_grad():
        out_a, out_b = a(chest_batch[:1]), b(chest_batch[:1])
    for key in APM_OUTPUT_KEYS:
        assert torch.equal(out_a[key], out_b[key]), key


def test_boxes_to_xyxy_model_truncates_toward_zero():
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.001, 0.01, 0.01, 0.03], [0.9995, 0.5, 0.01, 0.2]]])
    xyxy = boxes_to_xyxy_model(boxes)
    assert xyxy.dtype == np.int64 and xyxy.shape == (1, 3, 4)
    assert xyxy[0, 0].tolist() == [384, 256, 640, 768]
    # x1 = (0.001 - 0.005) * 1024 = -4.096 -> -4 (toward zero, not floor, no clamping)
    assert xyxy[0, 1].tolist() == [-4, -5, 6, 25]
    assert xyxy[0, 2, 2] == 1028  # beyond the frame, not clamped
