"""Commands of the analysis pipeline: ``worker``, ``analyze`` (offline), ``resend``, ``reanalyze``, ``demo``.

Also :func:`start_node_pipeline`, which ``serve`` calls: the dispatch loop, and in embedded mode
(no broker configured) the node's own worker processes (``anatomix-node worker`` subprocesses).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.cli.processes import node_command
from dicom_node.ops.errors import UserError
from dicom_node.ops.studies import ACTIONABLE_STATES
from dicom_node.settings import Settings, load_settings

LOG = logging.getLogger(__name__)
#: How the study selection's messages name each option of ``resend``/``reanalyze``.
SELECTION_LABELS = {"uid": "STUDY_UID", "states": "--state", "since": "--since", "undelivered": "--undelivered"}


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run a Celery worker for the analyze and/or deliver queues")
    worker.add_argument("--config", help="anatomix-node.toml (default: ./anatomix-node.toml, then defaults)")
    worker.add_argument("--queues", default="analyze,deliver", help="comma separated: analyze, deliver (default both)")
    worker.add_argument("--device", help="cpu, cuda or cuda:N (default: model.device)")
    worker.add_argument("--demo-weights", action="store_true", help="generate (once, cached) and use tiny demo weights")
    worker.add_argument("--concurrency", type=int, default=1, help="deliver-only workers: parallel deliveries (default 1)")
    worker.add_argument("--name", help="worker name (default: a unique one from host and pid)")
    worker.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)  # started by serve, which speaks for it
    remote = worker.add_argument_group("a worker on another host, over HTTP (no shared data_dir, no database)")
    remote.add_argument("--api-url", metavar="URL", help="the node's HTTP service, e.g. https://node.example.org:8080 (analyze only)")
    remote.add_argument("--token-file", metavar="FILE", help="file holding a worker token (anatomix-node worker-token add NAME)")
    remote.add_argument("--ca-file", metavar="FILE", help="CA certificates to verify the node's HTTPS certificate (default: the system's)")
    remote.add_argument("--broker-url", metavar="URL", help="the node's broker, e.g. redis://node.example.org:6379/0 (default: queue.broker_url)")
    worker.set_defaults(func=cmd_worker)

    analyze = subparsers.add_parser("analyze", help="analyse DICOM files offline and write the result objects")
    analyze.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    analyze.add_argument("--out", required=True, help="output folder (created)")
    analyze.add_argument("--config", help="anatomix-node.toml for output/model settings")
    source = analyze.add_mutually_exclusive_group()
    source.add_argument("--model", help="model directory (default: model.dir from settings)")
    source.add_argument("--demo-weights", action="store_true", help="use tiny demo weights (generated once, cached)")
    analyze.add_argument("--profile", help="output profile (default: output.default_profile)")
    analyze.add_argument("--device", help="cpu, cuda or cuda:N")
    analyze.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per task")
    analyze.set_defaults(func=cmd_analyze)

    resend = subparsers.add_parser("resend", help="send results again (same UIDs: the PACS keeps one copy); one study or many")
    resend.add_argument("study_instance_uid", metavar="STUDY_UID", nargs="?", help="one study (or select many with the options below)")
    resend.add_argument("--to", dest="destination", help="destination name (default: the study's usual destinations)")
    resend.add_argument("--state", action="append", choices=ACTIONABLE_STATES, help="every study in this state (repeatable)")
    resend.add_argument(
        "--undelivered", action="store_true", help="every study with a failed or dead-lettered delivery, or whose results went to no destination"
    )
    resend.add_argument("--since", help="with --state/--undelivered: only studies changed since this UTC time (2026-11-30 or 2026-11-30T08:00)")
    resend.add_argument("--config", help="anatomix-node.toml")
    resend.set_defaults(func=cmd_resend)

    reanalyze = subparsers.add_parser("reanalyze", help="analyse a study again (e.g. received before a model was configured)")
    reanalyze.add_argument("study_instance_uid", metavar="STUDY_UID", nargs="?", help="one study (or select many with --state)")
    reanalyze.add_argument("--state", action="append", choices=ACTIONABLE_STATES, help="every study in this state (repeatable)")
    reanalyze.add_argument("--since", help="with --state: only studies changed since this UTC time (2026-11-30 or 2026-11-30T08:00)")
    reanalyze.add_argument("--new-version", action="store_true",
                           help="also studies that already have results: analysed again as a new version (new result UIDs)")  # fmt: skip
    reanalyze.add_argument("--config", help="anatomix-node.toml")
    reanalyze.set_defaults(func=cmd_reanalyze)

    demo = subparsers.add_parser("demo", help="run the whole loop once on a real chest CR with demo weights")
    demo.add_argument("--out", help="folder for the results and the preview (default: a new temporary folder)")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="cap on generated tokens (default 48, keeps it quick)")
    demo.add_argument("--timeout", type=float, default=170.0, help="give up after this many seconds")
    demo.set_defaults(func=cmd_demo)


def _settings_with(args: argparse.Namespace, **model: object) -> Settings:
    settings = load_settings(getattr(args, "config", None))
    values = {k: v for k, v in model.items() if v not in (None, False)}
    return settings.with_overrides(model=values) if values else settings


# ---- worker -----------------------------------------------------------------------------------------


def parse_queues(text: str) -> list[str]:
    from dicom_node.pipeline.queue import QUEUES

    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if not names or unknown:
        raise UserError(f"--queues {text!r}: use analyze, deliver or analyze,deliver")
    return names


def check_device(device: str) -> None:
    """Refuse a device this host does not have, in one line (before any model file is read).

    ``torch.cuda.device_count()`` asks NVML and does not initialise CUDA, so the pool processes
    forked later can still use the GPU.
    """
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise UserError(f"device {device!r}: CUDA is not available on this host; use --device cpu "
                       "(or model.device = \"cpu\")", code=1)  # fmt: skip
    if index >= count:
        raise UserError(f"device {device!r}: this host has {count} CUDA device(s), cuda:0 to cuda:{count - 1}", code=1)


def check_model_usable(settings: Settings, device: str) -> str:
    """What an analyze worker will load, checked before it takes any task; UserError (exit 1) if unusable.

    Cheap checks only (the weights load in the pool process, after the fork): the device exists and
    the model directory holds every file. Returns a description for the start-up line.
    """
    from dicom_node.pipeline.dispatch import NO_MODEL_ERROR, model_configured

    if not model_configured(settings):
        raise UserError(f"this worker would take analyze tasks but the model is missing: {NO_MODEL_ERROR}; "
                       "or start it with --queues deliver")  # fmt: skip
    check_device(device)
    if settings.model.dir is None:
        return f"demo weights on {device}"
    from inference.model_dir import ModelDir, ModelDirError

    try:
        directory = ModelDir.open(settings.model.dir)
    except ModelDirError as exc:
        raise UserError(f"model.dir: {exc}", code=1) from None
    return f"{directory.name} {directory.version} from {directory.root} on {device}" + (" [DEMO WEIGHTS]" if directory.demo else "")


def _stop_when_the_model_is_unusable(context: Any) -> Path:
    """An analyze worker whose model passes the start-up check but does not load (a corrupt
    checkpoint) must not run on, healthy-looking and analysing nothing: the pool process that finds
    it writes the reason to a file and asks the worker's main process to stop; ``worker`` then exits
    1 with that reason in one line."""
    import tempfile

    handle, name = tempfile.mkstemp(prefix="anatomix-worker-", suffix=".unusable")
    os.close(handle)
    path, parent = Path(name), os.getpid()

    def report(reason: str) -> None:
        path.write_text(reason, encoding="utf-8")
        os.kill(parent, signal.SIGTERM)  # warm shutdown of the main process (no task was taken)

    context.on_unusable = report
    return path


def cmd_worker(args: argparse.Namespace) -> int:

    from dicom_node.logging_setup import configure_logging, quiet_root_warning, quiet_worker_console
    from dicom_node.pipeline.queue import ANALYZE_QUEUE, create_app
    from dicom_node.pipeline.tasks import WorkerContext, register_tasks
    from dicom_node.store import open_store

    settings = _settings_with(args, demo_weights=args.demo_weights, device=args.device)
    if args.broker_url:
        settings = settings.with_overrides(queue={"broker_url": args.broker_url})
    level = args.log_level or settings.logging.level
    configure_logging(level)
    queues = parse_queues(args.queues)
    node = connect_to_node(args, settings, queues) if args.api_url or args.token_file else None
    model = check_model_usable(settings, args.device or settings.model.device) if ANALYZE_QUEUE in queues else None
    if node is None:
        open_store(settings.database_url).close()  # fail fast on a bad database, and migrate it once
    app = create_app(settings)
    context = WorkerContext(settings, args.device, node=node)
    unusable = _stop_when_the_model_is_unusable(context) if ANALYZE_QUEUE in queues else None
    register_tasks(app, context, warm_up=ANALYZE_QUEUE in queues)
    # analyze: a prefork pool of one process per worker (one per GPU): the model loads in the child,
    # after the fork, and time limits are enforced. deliver-only: a solo pool or threads for fan-out.
    if ANALYZE_QUEUE in queues:
        pool = ["--pool=prefork", "--concurrency=1"]
    elif args.concurrency > 1:
        pool = ["--pool=threads", f"--concurrency={args.concurrency}"]
    else:
        pool = ["--pool=solo"]
    # Expanded here (Celery would expand %h itself, but our own log line would show it raw).
    name = (args.name or f"{'+'.join(queues)}-{os.getpid()}@%h").replace("%h", socket.gethostname())
    from dicom_node.pipeline.worker_report import attach_worker_reporter  # /readyz, /api/status and metrics read it

    attach_worker_reporter(app, context, name, tuple(queues), analyze=ANALYZE_QUEUE in queues)
    quiet = [] if level.upper() == "DEBUG" else ["--quiet"]  # no banner in an admin's log
    argv = [*quiet, "worker", f"--queues={','.join(queues)}", *pool, f"--hostname={name}",
            f"--loglevel={level.upper()}", "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
    quiet_root_warning(announce=not args.embedded)
    quiet_worker_console(level)
    LOG.info("worker %s for %s on %s%s%s", name, ",".join(queues), settings.queue.broker_url or "the embedded broker",
             f"; model {model}" if model else "", f"; node {args.api_url} over HTTP" if node else "")  # fmt: skip
    reason = ""
    try:
        app.worker_main(argv)
    except SystemExit:
        reason = unusable.read_text(encoding="utf-8") if unusable is not None else ""
        if not reason:
            raise
    finally:
        sys.stderr = sys.__stderr__  # Celery redirected it into its logger; our one-line error goes to the terminal
        if unusable is not None:
            reason = reason or unusable.read_text(encoding="utf-8")
            unusable.unlink(missing_ok=True)
    if reason:
        raise UserError(f"model unusable, this worker stopped without taking a task: {reason}", code=1)
    return 0


def connect_to_node(args: argparse.Namespace, settings: Settings, queues: list[str]) -> Any:
    """A worker on another host: check its options and reach the node with its token, or one line saying why not."""
    import requests

    from dicom_node.pipeline.remote_worker import NodeClient

    if not (args.api_url and args.token_file):
        raise UserError("a worker on another host needs both --api-url and --token-file")
    if queues != ["analyze"]:
        raise UserError("a worker over HTTP takes only the analyze queue (--queues analyze); delivery runs beside the node")
    if settings.embedded or settings.queue.broker_url.startswith("filesystem://"):
        raise UserError("a worker over HTTP needs the node's broker: --broker-url redis://NODE:6379/0 (or queue.broker_url)")
    try:
        node = NodeClient.from_token_file(args.api_url, Path(args.token_file), Path(args.ca_file) if args.ca_file else None)
    except (OSError, ValueError) as exc:
        raise UserError(f"--token-file: {exc}") from None
    try:
        name = node.whoami()
    except (requests.RequestException, RuntimeError) as exc:
        raise UserError(f"the node at {args.api_url} cannot be used: {exc}", code=1) from None
    LOG.info("reaching the node at %s as worker token %s", args.api_url, name)
    return node


# ---- the node's side: dispatch loop and embedded workers ---------------------------------------------


@dataclass
class NodePipeline:
    """What ``serve`` starts besides the SCP; ``stop()`` ends it all."""

    dispatcher: object
    workers: list[subprocess.Popen] = field(default_factory=list)

    def wake(self, *args: object, **kwargs: object) -> None:
        """Run a dispatch pass now (pass as ``on_stable`` to the assembly loop)."""
        self.dispatcher.wake()  # type: ignore[attr-defined]

    def check_workers(self) -> list[str]:
        """Problems with the embedded workers (exited ones), for serve's log."""
        return [f"embedded worker pid {p.pid} exited with status {p.returncode}" for p in self.workers if p.poll() is not None]

    def stop(self, timeout_s: float = 20.0) -> None:
        self.dispatcher.stop()  # type: ignore[attr-defined]
        running = [process for process in self.workers if process.poll() is None]
        if running:
            LOG.info("stopping: waiting for embedded worker(s) %s to finish the running task (up to %.0f s)",
                     ", ".join(f"pid {p.pid}" for p in running), timeout_s)  # fmt: skip
        for process in running:
            process.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes or is re-queued
        for process in self.workers:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def worker_command(settings: Settings, queues: str, config_path: str | None, demo_weights: bool) -> list[str]:
    command = node_command("worker", "--queues", queues, "--embedded")
    if config_path:
        command += ["--config", config_path]
    if demo_weights or settings.model.demo_weights:
        command.append("--demo-weights")
    return command


def start_node_pipeline(settings: Settings, config_path: str | None = None, embedded_workers: bool | None = None) -> NodePipeline:
    """Start the dispatch loop; with the embedded broker (or when asked) also the node's own workers.

    Embedded: one analyze worker (only when a model is configured) and one deliver worker, as child
    processes sharing ``data_dir``. Production (Redis): workers run separately (``anatomix-node worker``).
    """
    from dicom_node.pipeline.dispatch import Dispatcher, model_configured
    from dicom_node.store import open_store

    dispatcher = Dispatcher(lambda: open_store(settings.database_url), settings).start()
    pipeline = NodePipeline(dispatcher)
    if embedded_workers if embedded_workers is not None else settings.embedded:
        queues = ["deliver"] + (["analyze"] if model_configured(settings) else [])
        if "analyze" not in queues:
            LOG.warning("no model configured: the node receives and stores but does not analyse "
                        "(set model.dir, or start with --demo-weights)")  # fmt: skip
        env = {**os.environ}
        for queue_name in queues:
            command = worker_command(settings, queue_name, config_path, settings.model.demo_weights)
            pipeline.workers.append(subprocess.Popen(command, env=env))
    return pipeline


def stable_study_handler(settings: Settings, store: object):
    """Assembly's ``on_stable`` for ``serve``: queue the analysis (or refuse it: no model)."""
    from dicom_node.pipeline.dispatch import queue_study
    from dicom_node.pipeline.queue import create_app

    app = create_app(settings)
    return lambda study_instance_uid, version: queue_study(store, app, settings, study_instance_uid, version)  # type: ignore[arg-type]


def run_node_pipeline(settings: Settings, stop_event: object) -> None:
    """``serve``'s pipeline loop: dispatch + embedded workers until ``stop_event`` is set.

    An embedded worker that exits is started again (its unfinished work comes back through the lease).
    """
    config_path = settings.source if settings.source != "defaults" else None
    pipeline = start_node_pipeline(settings, config_path)
    try:
        while not stop_event.wait(2.0):  # type: ignore[attr-defined]
            for index, process in enumerate(pipeline.workers):
                if process.poll() is not None:
                    LOG.error("embedded worker pid %d exited with status %s: starting it again", process.pid, process.returncode)
                    pipeline.workers[index] = subprocess.Popen(process.args)
    finally:
        pipeline.stop()


# ---- analyze (offline) ------------------------------------------------------------------------------


def collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{item}: no such file or folder")
    return files


def cmd_analyze(args: argparse.Namespace) -> int:
    from dicom_node.pipeline.analysis import ImageUnusable, NoModelConfigured, analyze_datasets, load_engine, read_source, write_result_objects
    from dicom_node.pipeline.selection import select_instance

    settings = _settings_with(args, dir=args.model, demo_weights=args.demo_weights, device=args.device,
                              max_new_tokens=args.max_new_tokens)  # fmt: skip
    check_device(args.device or settings.model.device)  # before demo weights are generated or inputs read
    if args.demo_weights and settings.storage.data_dir == Path("var"):
        settings = settings.with_overrides(storage={"data_dir": Path(args.out) / ".cache"})
    kinds = settings.output.profile(args.profile or settings.output.default_profile)
    files = collect_inputs(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = []
    for path in files:
        try:
            ds = read_source(path)
        except ImageUnusable as exc:
            print(f"skipped {path}: {exc}")
            continue
        decision = select_instance(ds, settings.output.uid_root)
        if not decision.selected:
            print(f"skipped {path}: {decision.reason}")
            continue
        chosen.append((path, ds))
    if not chosen:
        print("nothing to analyse")
        return 1
    from inference.engine import ModelLoadError

    try:
        engine = load_engine(settings, args.device)
    except NoModelConfigured as exc:
        raise UserError(f"{exc}; or pass --model DIR") from None
    except ModelLoadError as exc:
        raise UserError(str(exc), code=1) from None
    failures = 0
    for path, ds in chosen:
        [outcome] = analyze_datasets(engine, [ds], settings.model.tasks)
        if outcome.result is None:
            failures += 1
            print(f"failed  {path}: {outcome.error}")
            continue
        folder = out / outcome.sop_instance_uid
        written = write_result_objects(ds, outcome.result, kinds, settings, 1, folder)
        (folder / "result.json").write_text(json.dumps(outcome.result.to_dict(), indent=2, ensure_ascii=False))
        print(f"analysed {path}: {len(outcome.result.findings)} findings -> {folder} "
              f"({', '.join(w.kind for w in written)}, result.json)")  # fmt: skip
    return 1 if failures else 0


# ---- resend and reanalyze -------------------------------------------------------------------------


def parse_since(text: str | None) -> datetime | None:
    """``--since`` as an aware UTC time (a date means its midnight UTC), or a one-line error."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--since {text!r}: use a UTC date or time, e.g. 2026-11-30 or 2026-11-30T08:00") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def cmd_resend(args: argparse.Namespace) -> int:
    from dicom_node.audit.trail import open_audit_trail
    from dicom_node.ops.studies import acting_user, resend_study, select_studies
    from dicom_node.pipeline.queue import create_app
    from dicom_node.store import open_store

    settings = load_settings(args.config)
    store = open_store(settings.database_url)
    try:
        studies = select_studies(store, args.study_instance_uid, args.state, parse_since(args.since), args.undelivered, SELECTION_LABELS)
        if not studies:
            print("no study matches")
            return 0
        target = None
        if args.destination:
            target = store.get_remote_node(args.destination)
            if target is None or not target.is_destination:
                raise UserError(f"{args.destination!r} is not a configured destination (see `anatomix-node ae list`)")
        app = create_app(settings)
        trail, user = open_audit_trail(store, settings.logging.audit_file), acting_user()
        failures = 0
        for study in studies:
            try:
                result = resend_study(store, settings, app, trail, study, target, bulk=len(studies) > 1 or not args.study_instance_uid,
                                      user=user, via="cli")  # fmt: skip
            except UserError as exc:
                if args.study_instance_uid:
                    raise
                print(f"skipped {study.study_instance_uid}: {exc}")
                continue
            for line in result.lines:
                print(f"{study.study_instance_uid}  {line}")
            failures += not result.ok
        return 1 if failures else 0
    finally:
        store.close()


def cmd_reanalyze(args: argparse.Namespace) -> int:
    from dicom_node.audit.trail import open_audit_trail
    from dicom_node.ops.studies import acting_user, reanalyze_study, select_studies
    from dicom_node.pipeline.dispatch import NO_MODEL_ERROR, model_configured
    from dicom_node.pipeline.queue import create_app
    from dicom_node.store import open_store

    settings = load_settings(args.config)
    if not model_configured(settings):
        raise UserError(f"nothing can be analysed: {NO_MODEL_ERROR}")
    store = open_store(settings.database_url)
    try:
        studies = select_studies(store, args.study_instance_uid, args.state, parse_since(args.since), labels=SELECTION_LABELS)
        app = create_app(settings)
        trail, user = open_audit_trail(store, settings.logging.audit_file), acting_user()
        for study in studies:
            result = reanalyze_study(store, app, trail, study, new_version=args.new_version, user=user, via="cli")
            if result.ok:
                print(f"{study.study_instance_uid}: {result.message}")
            elif args.study_instance_uid:
                raise UserError(result.message)
            else:
                print(f"skipped {study.study_instance_uid}: {result.message}")
        if not studies:
            print("no study matches")
        return 0
    finally:
        store.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.cli.demo import run_demo

    return run_demo(Path(args.out) if args.out else None, max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
