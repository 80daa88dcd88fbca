"""Settings check each value with the rule of the code that uses it, never a restatement of it:
object kinds (sr_writer.kinds), the UID root (sr_writer.uids), APM backends, task syntax (the
engine's own parser) and the final study states."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.ops.studies import stage_durations
from dicom_node.settings import RETENTION_STATES, Settings, SettingsError, validate
from dicom_node.store.base import FINAL_STUDY_STATES, STUDY_STATES
from inference.result import APM_BACKENDS
from inference.tasks import TaskError, TaskRequest
from sr_writer.uids import check_uid_root

REPO = Path(__file__).resolve().parents[2]


def model_settings(**values: object) -> Settings:
    return Settings().with_overrides(model=values)


@pytest.mark.parametrize("task", [
    "report", "vqa:Is there a pleural effusion?", "anatomy_grounding_lm:Right lung", "anatomy_grounding_lm:4",
    "grounded_diagnosis:10,20,30,40;1,2,3,4", "grounded_captioning", "dance", "anatomy_grounding_lm:Nowhere",
    "grounded_diagnosis:1,2,3", "grounded_captioning:a,b,c,d", ":report",
])  # fmt: skip
def test_settings_accept_exactly_the_tasks_the_engine_accepts(task: str) -> None:
    try:
        TaskRequest.parse(task)
        engine_accepts = True
    except TaskError:
        engine_accepts = False
    try:
        model_settings(tasks=[task])
        settings_accept = True
    except SettingsError as exc:
        assert "model.tasks" in str(exc) and repr(task) in str(exc)
        settings_accept = False
    assert settings_accept == engine_accepts
    assert engine_accepts == (task in ("report", "vqa:Is there a pleural effusion?", "anatomy_grounding_lm:Right lung",
                                       "anatomy_grounding_lm:4", "grounded_diagnosis:10,20,30,40;1,2,3,4", "grounded_captioning"))  # fmt: skip


def test_the_task_parser_loads_without_the_model_stack() -> None:
    code = "import sys, dicom_node.settings; print(sorted(m for m in ('torch', 'transformers', 'highdicom') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env={"PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", [*APM_BACKENDS, "tensorflow", "TORCH"])
def test_settings_accept_exactly_the_apm_backends(backend: str) -> None:
    if backend in APM_BACKENDS:
        assert model_settings(backend=backend).model.backend == backend
    else:
        with pytest.raises(SettingsError, match="model.backend"):
            model_settings(backend=backend)


def test_the_apm_backend_names_are_defined_once() -> None:
    import inference.backends

    assert inference.backends.APM_BACKENDS is APM_BACKENDS


@pytest.mark.parametrize("root", [
    "1.2.826.0.1.3680043.10.1431.", "1.2.3", "1.02.3.", "0.1.", "1.2.abc.", "1." + "2." * 19, "1." + "2." * 20,
])  # fmt: skip
def test_settings_and_the_writer_apply_one_uid_root_rule(root: str) -> None:
    try:
        check_uid_root(root)
        writer_accepts = True
    except ValueError:
        writer_accepts = False
    try:
        Settings().with_overrides(output={"uid_root": root})
        settings_accept = True
    except SettingsError as exc:
        assert "output.uid_root" in str(exc)
        settings_accept = False
    assert settings_accept == writer_accepts


def test_final_states_include_purged_everywhere() -> None:
    assert set(FINAL_STUDY_STATES) <= set(STUDY_STATES) and "purged" in FINAL_STUDY_STATES
    assert set(RETENTION_STATES) == set(FINAL_STUDY_STATES) - {"purged"}
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    for final in FINAL_STUDY_STATES:
        history = {"receiving": now - timedelta(hours=2), final: now - timedelta(hours=1)}
        stages = stage_durations(history, final, now)
        assert stages[-1] == {"state": final, "entered_at": history[final].isoformat(), "seconds": None}, final
    running = stage_durations({"receiving": now - timedelta(seconds=30)}, "receiving", now)
    assert running[-1]["seconds"] == 30.0


def test_defaults_validate() -> None:
    validate(Settings())
