"""Demo weights: deterministic from the seed, authors' formats, generated once under races."""

from __future__ import annotations

import multiprocessing
import pickle
import zipfile

import torch

from inference.demo_weights import ensure_demo_weights, write_demo_model_dir
from inference.lm.layout import PEFT_EMBED
from inference.model_dir import ModelDir


def test_same_seed_same_digest_other_seed_other_digest(tmp_path) -> None:
    a = ModelDir.open(write_demo_model_dir(tmp_path / "a", "tiny", seed=7)).weights_digest()
    b = ModelDir.open(write_demo_model_dir(tmp_path / "b", "tiny", seed=7)).weights_digest()
    c = ModelDir.open(write_demo_model_dir(tmp_path / "c", "tiny", seed=8)).weights_digest()
    assert a == b and a != c


def test_lm_checkpoint_is_in_the_authors_format(tmp_path) -> None:
    root = write_demo_model_dir(tmp_path / "m", "tiny", seed=0)
    assert zipfile.is_zipfile(root / "lm.pt")  # torch.save format, readable with weights_only=True
    checkpoint = torch.load(root / "lm.pt", weights_only=True)
    assert set(checkpoint) == {"apm", "LM"} and checkpoint["apm"] is None
    assert set(checkpoint["LM"]) == {"core_model", "wrapper"}
    core, wrapper = checkpoint["LM"]["core_model"], checkpoint["LM"]["wrapper"]
    assert len(wrapper) == 12 and all(t.dtype == torch.float32 for t in wrapper.values())
    assert len(core) == 6 * 14 + 4
    assert core[PEFT_EMBED].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for k, t in core.items() if ".lora_" in k)
    apm = torch.load(root / "apm.pth", map_location="cpu", weights_only=False)
    assert set(apm) == {"model", "vis_optimizer", "text_optimizer", "lr_scheduler", "epoch", "args", "best_loss"}


def _ensure(cache_dir: str) -> str:
    torch.set_num_threads(1)
    return str(ensure_demo_weights(cache_dir, "tiny", seed=2))


def test_two_processes_racing_get_one_complete_directory(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        first, second = pool.map(_ensure, [str(tmp_path)] * 2)
    assert first == second
    assert [p.name for p in tmp_path.iterdir()] == ["anatomix-demo-tiny-seed2"]
    directory = ModelDir.open(tmp_path / "anatomix-demo-tiny-seed2")
    again = ensure_demo_weights(tmp_path, "tiny", seed=2)
    assert again == directory.root and directory.demo
    pickle.dumps(directory)  # plain data
