"""APM backends: torch, ONNX export + onnxruntime, TensorRT (import-guarded), CUDA autocast."""

from __future__ import annotations

import sys

import pytest
import torch

from inference.apm import APM_OUTPUT_KEYS, APMConfig, build_apm
from inference.backends import (
    BackendUnavailableError,
    OnnxAPMRunner,
    TorchAPMRunner,
    export_apm_onnx,
    make_apm_runner,
    module_digest,
)
from inference.demo_apm import (
    build_demo_apm,
    initialise_backbone,
    initialise_spatial_queries,
    initialise_transformer,
    synthetic_chest_radiograph,
)
from inference.preprocess import images_to_tensor, prepare_array


@pytest.fixture(scope="module")
def tiny_apm():
    return build_demo_apm(APMConfig.tiny(), seed=7)


@pytest.fixture(scope="module")
def chest_batch():
    shapes = [(1100, 900), (900, 1100), (1024, 1024)]
    return images_to_tensor([prepare_array(synthetic_chest_radiograph(r, c, seed=i)) for i, (r, c) in enumerate(shapes)])


def assert_outputs_close(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(APM_OUTPUT_KEYS)
    for key in APM_OUTPUT_KEYS:
        a, e = actual[key].detach().cpu().float(), expected[key].detach().cpu().float()
        assert a.shape == e.shape, key
        diff = float((a - e).abs().max())
        assert diff <= atol, f"{key}: max abs difference {diff:.2e} > {atol:.0e}"


def calibrated_apm(images: torch.Tensor, seed: int = 3):
    """The tiny demo APM with realistic BatchNorm statistics: each BN's running mean/var set to the
    per-channel statistics of its own input on ``images`` (as training leaves them), affine weights
    in [0.3, 1.8] and biases ~N(0, 0.3). Identity BN (random init) hides folding errors."""
    from inference.apm.backbone import FrozenBatchNorm2d

    module = build_demo_apm(APMConfig.tiny(), seed=7).eval()
    generator = torch.Generator().manual_seed(seed)

    def calibrate(bn, args):
        features = args[0]
        bn.running_mean.copy_(features.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(features.var(dim=(0, 2, 3)))
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) * 1.5 + 0.3)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.3)

    hooks = [m.register_forward_pre_hook(calibrate) for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        module(images)
    for hook in hooks:
        hook.remove()
    return module


def test_torch_runner_cpu_fp32_matches_unfolded_module_with_realistic_batchnorm(chest_batch):
    module = calibrated_apm(chest_batch)
    keys_before = list(module.state_dict())
    with torch.no_grad():
        expected = module(chest_batch[:2])
    assert float(expected["memory"].std()) > 0.3  # the statistics are input-sensitive, not identity
    runner = TorchAPMRunner(module, device="cpu")  # the default CPU fp32 runner
    assert not runner.fold_batchnorm
    actual = runner.run(chest_batch[:2])
    assert list(module.state_dict()) == keys_before
    assert_outputs_close(actual, expected, atol=1e-4)
    for key in APM_OUTPUT_KEYS:
        assert torch.equal(actual[key], expected[key]), key
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        runner.run(chest_batch[0])


def test_folded_batchnorm_is_float64_folded_and_only_the_default_off_fp32(chest_batch):
    """The fold itself (an explicit opt-in on CPU) is exact algebra computed in float64; what it
    cannot remove is fp32's different rounding order, which is why fp32 runs unfolded."""
    from inference.apm.backbone import fold_conv_bn

    module = calibrated_apm(chest_batch)
    body = module.backbone[0].body
    fused = fold_conv_bn(body.conv1, body.bn1)
    scale = body.bn1.weight.double() * (body.bn1.running_var.double() + body.bn1.eps).rsqrt()
    assert torch.equal(fused.weight, (body.conv1.weight.double() * scale.reshape(-1, 1, 1, 1)).float())
    with torch.no_grad():
        probe = torch.randn(1, 1, 64, 64, dtype=torch.float64)
        exact = body.bn1.double()(body.conv1.double()(probe))
        body.float()
    assert float((fused.double()(probe) - exact).abs().max()) < 1e-5
    folded = TorchAPMRunner(module, device="cpu", fold_batchnorm=True)
    assert folded.fold_batchnorm
    with torch.no_grad():
        expected = module(chest_batch[:1])
    assert_outputs_close(folded.run(chest_batch[:1]), expected, atol=5e-2)
    assert TorchAPMRunner(module, device="cpu", dtype=torch.bfloat16).fold_batchnorm


def test_onnx_matches_torch_with_dynamic_batch(tiny_apm, chest_batch, tmp_path):
    path = export_apm_onnx(tiny_apm, tmp_path / "apm.onnx", batch_dynamic=True)
    runner = OnnxAPMRunner(path)
    for batch in (chest_batch[:1], chest_batch):  # exported with batch 2: other sizes must work
        with torch.no_grad():
            expected = tiny_apm(batch)
        assert_outputs_close(runner.run(batch), expected, atol=1e-4)


@pytest.mark.slow
def test_onnx_full_size_matches_torch(tmp_path):
    """One full-shape check (ResNet-50 + 256-d transformer): export, run under onnxruntime, compare."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build_apm(APMConfig.full())
        with torch.no_grad():
            initialise_backbone(module)
            initialise_transformer(module)
            initialise_spatial_queries(module)
    image = images_to_tensor([prepare_array(synthetic_chest_radiograph(1200, 1000, seed=4))])
    path = export_apm_onnx(module, tmp_path / "apm_full.onnx")
    actual = OnnxAPMRunner(path).run(image)
    with torch.no_grad():
        expected = module(image)
    assert_outputs_close(actual, expected, atol=1e-4)


def test_make_apm_runner_caches_the_export(tiny_apm, chest_batch, tmp_path):
    torch_runner = make_apm_runner("torch", tiny_apm, device="cpu")
    assert isinstance(torch_runner, TorchAPMRunner)
    onnx_runner = make_apm_runner("onnxruntime", tiny_apm, device="cpu", cache_dir=tmp_path)
    exported = list(tmp_path.glob("apm-*.onnx"))
    assert len(exported) == 1 and module_digest(tiny_apm)[:16] in exported[0].name
    mtime = exported[0].stat().st_mtime_ns
    make_apm_runner("onnxruntime", tiny_apm, device="cpu", cache_dir=tmp_path)
    assert exported[0].stat().st_mtime_ns == mtime  # reused, not re-exported
    assert_outputs_close(onnx_runner.run(chest_batch[:1]), torch_runner.run(chest_batch[:1]), atol=1e-4)
    with pytest.raises(ValueError, match="unknown APM backend 'tflite'; choose one of torch, onnxruntime, tensorrt"):
        make_apm_runner("tflite", tiny_apm)


def test_tensorrt_missing_gives_a_clear_error(tiny_apm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailableError, match="needs NVIDIA TensorRT.*configure the 'torch' or 'onnxruntime'"):
        make_apm_runner("tensorrt", tiny_apm, device="cuda", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.onnx"))  # failed fast, before exporting


def cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False on this host")


def tensorrt_or_skip() -> None:
    cuda_or_skip()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed on this host (python package 'tensorrt')")


@pytest.mark.gpu
def test_tensorrt_engine_matches_torch(tiny_apm, chest_batch, tmp_path):
    tensorrt_or_skip()
    runner = make_apm_runner("tensorrt", tiny_apm, device="cuda", cache_dir=tmp_path)
    with torch.no_grad():
        expected = tiny_apm.to("cpu")(chest_batch)
    actual = runner.run(chest_batch.cuda())
    torch.testing.assert_close(actual["boxes"].cpu(), expected["boxes"], atol=2e-2, rtol=0)
    torch.testing.assert_close(actual["anatomy_tokens"].cpu(), expected["anatomy_tokens"], atol=5e-2, rtol=5e-2)
    assert list(tmp_path.glob("*.engine"))  # cached for the next start


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_autocast_matches_cpu(chest_batch, dtype):
    cuda_or_skip()
    cpu_module = build_demo_apm(APMConfig.tiny(), seed=7)
    with torch.no_grad():
        expected = cpu_module(chest_batch)
    runner = TorchAPMRunner(build_demo_apm(APMConfig.tiny(), seed=7), device="cuda", dtype=dtype)
    assert runner.channels_last
    actual = runner.run(chest_batch)
    tolerance = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    # Boxes: the demo box head amplifies reduced-precision rounding (see the CPU bf16 test): mean only.
    box_error = float((actual["boxes"].cpu() - expected["boxes"]).abs().mean())
    assert box_error < {torch.float32: 1e-3, torch.float16: 0.03, torch.bfloat16: 0.15}[dtype], box_error
    torch.testing.assert_close(actual["anatomy_tokens"].cpu(), expected["anatomy_tokens"], atol=4 * tolerance, rtol=4 * tolerance)
    single = torch.cat([runner.run(chest_batch[i : i + 1])["boxes"] for i in range(chest_batch.shape[0])])
    assert float((single - actual["boxes"]).abs().mean()) < tolerance


def test_gpu_settings_bf16_autocast_and_channels_last_on_cpu(chest_batch):
    """The CUDA runner's recipe (bf16 autocast, channels_last backbone, folded BatchNorm) run on
    CPU, where it is available too: same outputs as plain fp32 within bf16 rounding. The real CUDA
    kernels are checked by the GPU test above where a device exists."""
    module = build_demo_apm(APMConfig.tiny(), seed=7)
    with torch.no_grad():
        expected = module(chest_batch)
    runner = TorchAPMRunner(build_demo_apm(APMConfig.tiny(), seed=7), device="cpu", dtype=torch.bfloat16, channels_last=True)
    assert runner.channels_last and runner.dtype == torch.bfloat16
    actual = runner.run(chest_batch)
    assert set(actual) == set(expected) and all(v.dtype == torch.float32 for v in actual.values())
    # Measured here (bf16): anatomy tokens, CLS, memory and logits differ by < 0.04 at most, ~0.005 on
    # average. Boxes differ more (max 0.40, mean 0.08 normalised; fp16: mean 0.014) because the demo
    # box head is a ridge fit with weights up to ~90 that amplify the decoder's rounding; they are
    # held to their mean and to validity only. Trained weights must be checked on the GPU host.
    for key in ("anatomy_tokens", "cls", "memory", "image_logits"):
        difference = (actual[key] - expected[key]).abs()
        assert float(difference.max()) < 0.06 and float(difference.mean()) < 0.01, (key, float(difference.max()))
    boxes = actual["boxes"]
    assert float(boxes.min()) > 0 and float(boxes.max()) < 1 and torch.isfinite(boxes).all()
    assert float((boxes - expected["boxes"]).abs().mean()) < 0.15
    assert not torch.equal(actual["memory"], expected["memory"])  # bf16 really ran
