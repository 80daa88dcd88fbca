"""The engine end to end on tiny demo weights: one result per image, batched == single, parse-safe."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from inference.demo_apm import synthetic_chest_radiograph
from inference.engine import Engine, EngineOptions, ModelLoadError
from inference.preprocess import prepare_array
from inference.result import REGION_NAMES, AnalysisResult

TASKS = ["report", "anatomy_grounding", "anatomy_grounding_lm:Right lung", "vqa:Is there an effusion? [yes/no]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir(1)


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir, EngineOptions(max_new_tokens=16))


@pytest.fixture(scope="module")
def images():
    return [
        prepare_array(synthetic_chest_radiograph(900, 700, seed=1), "1.2.826.0.1.3680043.10.1431.1"),
        prepare_array(synthetic_chest_radiograph(600, 1000, seed=2), "1.2.826.0.1.3680043.10.1431.2"),
        prepare_array(synthetic_chest_radiograph(512, 512, seed=3), "1.2.826.0.1.3680043.10.1431.3"),
    ]


def without_timings(result: AnalysisResult) -> dict:
    data = result.to_dict()
    data.pop("timings")
    return data


@pytest.fixture(scope="module")
def batch_results(engine, images):
    return engine.analyze(images, TASKS)


def test_one_complete_result_per_image(batch_results, images, engine) -> None:
    assert len(batch_results) == 3
    for result, image in zip(batch_results, images):
        assert result.sop_instance_uid == image.sop_instance_uid
        assert (result.rows, result.columns) == (image.letterbox.source_rows, image.letterbox.source_columns)
        assert [r.name for r in result.regions] == list(REGION_NAMES)
        for region in result.regions:
            assert region.retrieved_sentence
            if region.box is not None:
                assert 0 <= region.box.x1 < region.box.x2 <= result.columns
                assert 0 <= region.box.y1 < region.box.y2 <= result.rows
        assert sum(r.box is not None for r in result.regions) >= 30
        assert len(result.image_labels) == 14 and all(0 <= p <= 1 for p in result.image_labels.values())
        assert [a.task for a in result.answers] == ["report", "anatomy_grounding_lm", "vqa"]
        assert all(0 < a.generated_tokens <= 16 for a in result.answers)
        assert result.report is not None and result.report.raw_text == result.answers[0].raw_text
        assert result.model == engine.identity and result.model.demo
        for stage in ("preprocess", "apm", "retrieval", "prefill", "decode", "total"):
            assert result.timings[stage] > 0
        assert AnalysisResult.from_json(result.to_json()) == result


def test_batch_equals_single_calls(engine, images, batch_results) -> None:
    for image, batched in zip(images, batch_results):
        (single,) = engine.analyze([image], TASKS)
        assert without_timings(single) == without_timings(batched)


def test_identity_comes_from_the_files(engine, model_dir) -> None:
    identity = engine.identity
    assert len(identity.weights_digest) == 64 and identity.device_uid.startswith("2.25.")
    assert identity.version == "demo-tiny-seed1" and identity.backend == "torch" and identity.device == "cpu"
    assert engine.lm_report.missing == [] and engine.lm_report.unexpected == []


def test_tasks_needing_input_are_skipped_with_a_warning(engine, images) -> None:
    (result,) = engine.analyze(images[:1], ["vqa", "grounded_captioning"])
    assert result.answers == ()
    assert any(w.startswith("vqa: skipped") for w in result.warnings)
    assert any(w.startswith("grounded_captioning: skipped") for w in result.warnings)


def test_grounded_diagnosis_reports_the_boxes_it_asked_about(engine, images) -> None:
    (result,) = engine.analyze(images[2:], ["grounded_diagnosis:100,200,300,400"])
    (finding,) = result.findings
    assert finding.task == "grounded_diagnosis" and finding.label
    (box,) = finding.boxes
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((50, 100, 150, 200))  # 512 px source: half scale


def test_analyze_dataset_from_dicom(engine) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    result = engine.analyze_dataset(ds, ["report"])
    assert result.sop_instance_uid == ds.SOPInstanceUID
    assert (result.rows, result.columns) == (ds.Rows, ds.Columns)
    assert result.report is not None and result.timings["preprocess"] > 0
    json.loads(result.to_json())


def test_reference_mode_decodes_max_new_tokens(model_dir, images) -> None:
    engine = Engine.load(model_dir, EngineOptions(max_new_tokens=6, stop_at_end_of_turn=False))
    (result,) = engine.analyze(images[:1], ["report"])
    assert result.answers[0].generated_tokens == 6


def test_incomplete_model_dir_is_refused_with_what_is_missing(tmp_path, model_dir) -> None:
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "lm.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"missing: lm \(lm.pt\)"):
        Engine.load(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise ModelLoadError("CUDA is not available (forced on a GPU host)")
        Engine.load(model_dir, EngineOptions(device="cuda"))


def test_system_prompt_setting_reaches_the_prompt(model_dir, engine, images, monkeypatch) -> None:
    from dataclasses import replace

    import inference.engine as engine_module
    from dicom_node.pipeline.analysis import load_engine
    from dicom_node.settings import Settings
    from inference.prompt import TRAINING_SYSTEM_PROMPT

    assert engine.options.system_prompt == ""  # the paper's evaluation setting is the default
    settings = Settings()
    trained = load_engine(replace(settings, model=replace(settings.model, dir=model_dir, system_prompt="training", max_new_tokens=4)))
    assert trained.options.system_prompt == TRAINING_SYSTEM_PROMPT
    seen = []
    build = engine_module.build_prompt_text

    def recording_build(*args, **kwargs):
        seen.append(build(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(engine_module, "build_prompt_text", recording_build)
    trained.analyze(images[:1], ["report"])
    engine.analyze(images[:1], ["report"])
    assert seen[0].startswith(f"<bos><start_of_turn>user\n{TRAINING_SYSTEM_PROMPT}\n\nImage:")
    assert seen[1].startswith("<bos><start_of_turn>user\n\n\nImage:")


def test_the_decode_strategy_is_an_explicit_option(model_dir, engine, images) -> None:
    """None picks by device (row by row on the CPU); an explicit choice is used, by the engine and
    by the continuous batcher alike."""
    from inference.batching import ContinuousBatcher
    from inference.lm.decoding import DecodeStrategy

    assert engine.options.decode is None and engine.decode_step.strategy is DecodeStrategy.ROW_BY_ROW
    batched = Engine.load(model_dir, EngineOptions(max_new_tokens=4, decode=DecodeStrategy.BATCHED))
    assert batched.decode_step.strategy is DecodeStrategy.BATCHED and not batched.decode_step.static_cache
    batcher = ContinuousBatcher(batched, ["report"], slots=2)
    for index, image in enumerate(images[:2]):
        batcher.submit(index, image)
    done = {}
    while not batcher.idle:
        done.update(batcher.step())
    assert batcher.peak_rows == 2 and set(done) == {0, 1}
    # the same images, each alone through analyze with that strategy: the tokens agree
    alone = [batched.analyze([image], ["report"])[0] for image in images[:2]]
    assert [r.answers[0].generated_tokens for r in alone] == [done[i].answers[0].generated_tokens for i in (0, 1)]


def test_stage_timing_never_synchronises_cuda_for_a_cpu_engine(engine, images, monkeypatch) -> None:
    """A CPU engine on a host that also has a GPU (faked here: only the two probes) must not wait for
    that GPU's queue after every stage."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    (result,) = engine.analyze(images[:1], ["anatomy_grounding"])
    assert result.timings["apm"] > 0 and result.timings["retrieval"] >= 0
    assert calls == []


def test_the_engine_names_no_task_the_task_table_holds_the_flags() -> None:
    """Task knowledge lives in inference.tasks.LM_TASKS: the engine tests flags, never names."""
    import inference.engine as engine_module
    from inference.result import TASKS
    from inference.tasks import ANSWER_KINDS, LM_TASKS

    source = Path(engine_module.__file__).read_text()
    kinds = {flags.answer for flags in LM_TASKS.values()}  # "report" is an answer kind too
    named = [task for task in TASKS if task not in kinds and (f'"{task}"' in source or f"'{task}'" in source)]
    assert named == []
    assert set(LM_TASKS) <= set(TASKS) and ANSWER_KINDS == {t: f.answer for t, f in LM_TASKS.items()}
    assert {t for t, f in LM_TASKS.items() if f.labels_asked_boxes} == {"grounded_diagnosis", "grounded_captioning"}
    assert [t for t, f in LM_TASKS.items() if f.region_answer] == ["anatomy_grounding_lm"]


def test_load_takes_the_options_object(model_dir) -> None:
    options = EngineOptions(max_new_tokens=3, stop_at_end_of_turn=False)
    loaded = Engine.load(model_dir, options)
    assert loaded.options is options


def test_decoding_logs_progress_and_one_line_per_task(engine, images, caplog, monkeypatch) -> None:
    with caplog.at_level(logging.INFO, logger="inference.engine"):
        engine.analyze(images[:2], ["report"])  # a short task with the default interval: only its end
        ended = [r.getMessage() for r in caplog.records if r.name == "inference.engine"]
        assert len(ended) == 1 and ended[0].startswith("report: ") and " tokens for 2 image(s) in " in ended[0], ended
        caplog.clear()
        monkeypatch.setattr(engine, "progress_interval_s", 0.0)  # a line at every check (every 8 steps)
        engine.analyze(images[:2], ["report"])
    lines = [r.getMessage() for r in caplog.records if r.name == "inference.engine" and r.levelno == logging.INFO]
    assert lines[0].startswith("report: ") and "tokens so far for 2 image(s)" in lines[0] and "tokens/s" in lines[0], lines
    assert lines[-1].split(" in ")[0] == ended[0].split(" in ")[0]  # then the same end line: "report: N tokens for 2 image(s)"
