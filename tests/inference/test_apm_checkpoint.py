"""Loading APM checkpoints in the authors' format: safe unpickling, strict keys, named failures."""

from __future__ import annotations

import argparse
import hashlib
import pathlib
from collections import OrderedDict

import pytest
import torch

from inference.apm import APM_OUTPUT_KEYS, APMConfig
from inference.apm.checkpoint import CheckpointError, load_apm
from inference.demo_apm import build_demo_apm, write_demo_apm_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("apm") / "apm_tiny.pth"
    write_demo_apm_checkpoint(path, APMConfig.tiny(), seed=5)
    return path


def rewrite(source: pathlib.Path, target: pathlib.Path, edit) -> pathlib.Path:
    with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath]):
        raw = torch.load(source, weights_only=True)
    edit(raw)
    torch.save(raw, target)
    return target


def test_authors_layout_is_written(tiny_checkpoint):
    with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath]):
        raw = torch.load(tiny_checkpoint, weights_only=True)
    assert set(raw) == {"model", "vis_optimizer", "text_optimizer", "lr_scheduler", "epoch", "args", "best_loss"}
    assert isinstance(raw["args"], argparse.Namespace)
    assert isinstance(raw["args"].output_dir, pathlib.PosixPath)
    keys = list(raw["model"])
    assert all(k.startswith(("vis_model.", "text_model.")) for k in keys)
    assert any(k.startswith("text_model.") for k in keys)
    assert "vis_model.backbone.0.body.conv1.weight" in keys


def test_tiny_checkpoint_loads_clean_and_reproduces_the_demo_module(tiny_checkpoint):
    module, report = load_apm(tiny_checkpoint)
    assert report.missing == () and report.unexpected == ()
    assert report.ignored == 4  # the text_model.* tensors
    assert report.config == APMConfig.tiny()
    assert report.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert not module.training
    reference = build_demo_apm(APMConfig.tiny(), seed=5)
    images = torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, expected = module(images), reference(images)
    for key in APM_OUTPUT_KEYS:
        assert torch.equal(ours[key], expected[key]), key


def test_full_shape_demo_checkpoint_loads_with_zero_missing_and_unexpected(tmp_path):
    path = tmp_path / "apm_full.pth"
    write_demo_apm_checkpoint(path, APMConfig.full(), seed=0)
    size_mb = path.stat().st_size / 1e6
    assert 120 < size_mb < 140, size_mb  # ~31.9 M fp32 values
    module, report = load_apm(path)
    assert report.missing == () and report.unexpected == ()
    assert report.config == APMConfig.full()
    assert sum(p.numel() for p in module.parameters()) == 31_759_714
    # Corrupt one tensor's shape in the full-size file: the loader names exactly that key.
    bad = rewrite(
        path, tmp_path / "bad.pth", lambda raw: raw["model"].__setitem__("vis_model.transformer.encoder.layers.0.linear1.weight", torch.zeros(1000, 256))
    )
    path.unlink()
    with pytest.raises(CheckpointError, match=r"transformer\.encoder\.layers\.0\.linear1\.weight \(file \(1000, 256\)"):
        load_apm(bad)


@pytest.mark.parametrize(
    "key",
    [
        "vis_model.backbone.0.body.layer3.5.bn2.running_var",
        "vis_model.query_embed.weight",
        "vis_model.backbone.0.body.conv1.weight",
        "vis_model.anat_obj_embs.linear.bias",
    ],
)
def test_dropping_one_key_names_it(tiny_checkpoint, tmp_path, key):
    bad = rewrite(tiny_checkpoint, tmp_path / "dropped.pth", lambda raw: raw["model"].pop(key))
    with pytest.raises(CheckpointError, match="missing") as error:
        load_apm(bad)
    assert key.removeprefix("vis_model.") in str(error.value)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("vis_model.input_proj.weight", (64, 256, 1, 2)),
        ("vis_model.backbone.0.body.conv1.weight", (8, 3, 7, 7)),
        ("vis_model.bbox_embed.layers.2.weight", (5, 64)),
    ],
)
def test_wrong_shape_names_the_key(tiny_checkpoint, tmp_path, key, shape):
    bad = rewrite(tiny_checkpoint, tmp_path / "shape.pth", lambda raw: raw["model"].__setitem__(key, torch.zeros(shape)))
    with pytest.raises(CheckpointError, match="wrong shape") as error:
        load_apm(bad)
    message = str(error.value)
    assert key.removeprefix("vis_model.") in message
    assert message.count("(file") == 1, message  # only the corrupted key is blamed


def test_unexpected_key_is_reported_not_fatal(tiny_checkpoint, tmp_path):
    extra = rewrite(tiny_checkpoint, tmp_path / "extra.pth", lambda raw: raw["model"].__setitem__("vis_model.class_embed.weight", torch.zeros(3, 64)))
    _, report = load_apm(extra)
    assert report.unexpected == ("class_embed.weight",)
    assert report.missing == ()


def test_num_batches_tracked_is_dropped(tiny_checkpoint, tmp_path):
    path = rewrite(
        tiny_checkpoint, tmp_path / "nbt.pth", lambda raw: raw["model"].__setitem__("vis_model.backbone.0.body.bn1.num_batches_tracked", torch.tensor(7))
    )
    _, report = load_apm(path)
    assert report.dropped_num_batches_tracked == 1 and report.unexpected == ()


def test_bare_state_dict_without_prefix_loads(tmp_path):
    module = build_demo_apm(APMConfig.tiny(), seed=2)
    path = tmp_path / "bare.pt"
    torch.save(OrderedDict(module.state_dict()), path)
    _, report = load_apm(path)
    assert report.missing == () and report.config == APMConfig.tiny()


class NotAllowed:
    """A class the loader must refuse to unpickle."""


def test_arbitrary_pickled_objects_are_refused(tiny_checkpoint, tmp_path):
    path = rewrite(tiny_checkpoint, tmp_path / "evil.pth", lambda raw: raw.__setitem__("extra", NotAllowed()))
    with pytest.raises(CheckpointError, match="cannot read APM checkpoint"):
        load_apm(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_apm(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_apm(garbage)
    text_only = tmp_path / "text.pth"
    torch.save({"model": {"text_model.x": torch.zeros(2)}}, text_only)
    with pytest.raises(CheckpointError, match="no vis_model"):
        load_apm(text_only)
