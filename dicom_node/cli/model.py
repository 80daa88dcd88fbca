"""Model commands: ``model demo-weights`` (write a demo model directory) and ``model info`` (check one).

``model info`` checks a directory without loading the weights into memory: the APM checkpoint is
read (31 M parameters), the LM files are matched on names and shapes only (memory-mapped), so it
is quick even for the full-size model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dicom_node.ops.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="AnatomiX model directories: demo weights, inspection")
    model.set_defaults(func=_missing_action)
    actions = model.add_subparsers(dest="model_command", metavar="ACTION")

    demo = actions.add_parser("demo-weights", help="write a complete demo model directory (random, deterministic weights)")
    demo.add_argument("--out", required=True, type=Path, help="new (or empty) directory to write")
    demo.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny: seconds on CPU; full: real shapes, about 8 GB")
    demo.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    demo.set_defaults(func=run_demo_weights)

    info = actions.add_parser("info", help="print a model directory's identity, digest, demo flag and load report")
    info.add_argument("dir", type=Path, help="the model directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=run_info)

    current = actions.add_parser("current", help="which model `serve` and its workers use with these settings, and whether it loads")
    current.add_argument("--config", default=None, metavar="FILE", help="settings file (default: ./anatomix-node.toml if present)")
    current.set_defaults(func=run_current)


def _missing_action(args: argparse.Namespace) -> int:
    raise UserError("model: choose an action: demo-weights, info or current (see anatomix-node model --help)")


def run_demo_weights(args: argparse.Namespace) -> int:
    from inference.demo_weights import write_demo_model_dir

    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: use a non-negative integer")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"{args.out} exists and is not an empty directory: choose a new --out")
    start = time.perf_counter()
    write_demo_model_dir(args.out, args.size, args.seed)
    print(f"wrote {args.size} demo weights (seed {args.seed}) to {args.out} in {time.perf_counter() - start:.1f} s")
    print("these are random weights: every result made with them is flagged demo")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from inference.apm.checkpoint import CheckpointError, load_apm
    from inference.lm.config import LMConfigError
    from inference.lm.loader import LMCheckpointError, inspect_lm_checkpoint
    from inference.model_dir import ModelDir, ModelDirError, device_uid_from_digest
    from inference.retrieval import RetrievalDB, RetrievalDBError
    from inference.tokens import TokenIds, TokenizerError, load_tokenizer

    def step(what: str) -> None:  # the full-size model takes seconds per step: say what is going on
        if not args.json:
            print(f"  ... {what}", file=sys.stderr, flush=True)

    try:
        step(f"opening {args.dir}")
        directory = ModelDir.open(args.dir)
        step("hashing the weight files (cached after the first time)")
        digest = directory.weights_digest()
        step("reading the tokenizer")
        token_ids = TokenIds.from_tokenizer(load_tokenizer(directory.base))
        step(f"reading the APM checkpoint {directory.apm.name}")
        _, apm_report = load_apm(directory.apm)
        step(f"matching the LM tensors of {directory.lm.name} (names and shapes only)")
        lm_report = inspect_lm_checkpoint(directory.base, directory.lm)
        step(f"reading the retrieval DB {directory.retrieval_db.name}")
        retrieval = RetrievalDB.load(directory.retrieval_db)
    except (ModelDirError, TokenizerError, CheckpointError, LMCheckpointError, LMConfigError, RetrievalDBError) as exc:
        raise UserError(str(exc)) from None
    info = {
        "dir": str(directory.root),
        "name": directory.name,
        "version": directory.version,
        "demo": directory.demo,
        "weights_digest": digest,
        "device_uid": device_uid_from_digest(digest),
        "added_token_ids": [token_ids.image, token_ids.ref_end],
        "apm": {
            "file": directory.apm.name,
            "missing": list(apm_report.missing),
            "unexpected": list(apm_report.unexpected),
            "ignored_text_model_tensors": apm_report.ignored,
            "d_model": apm_report.config.d_model,
        },
        "lm": {
            "file": directory.lm.name,
            "core_tensors": lm_report.core_tensors,
            "wrapper_tensors": lm_report.wrapper_tensors,
            "lora_pairs": lm_report.lora_pairs,
            "missing": lm_report.missing,
            "unexpected": lm_report.unexpected,
            "mismatched": lm_report.mismatched,
            "ignored": lm_report.ignored,
        },
        "retrieval_db": {"file": directory.retrieval_db.name, "regions": len(retrieval.regions), "token_dim": retrieval.token_dim},
    }
    ok = lm_report.ok and not apm_report.missing
    if args.json:
        print(json.dumps({**info, "ok": ok}, indent=2))
    else:
        print(f"{info['name']} {info['version']}{'  [DEMO WEIGHTS]' if info['demo'] else ''}")
        print(f"  weights digest  {digest}")
        print(f"  device UID      {info['device_uid']}")
        print(f"  <image>..</ref> token ids {token_ids.image}..{token_ids.ref_end}")
        print(
            f"  APM {directory.apm.name}: missing {len(apm_report.missing)}, unexpected {len(apm_report.unexpected)}, "
            f"text_model tensors ignored {apm_report.ignored}"
        )
        print(f"  LM  {directory.lm.name}: {lm_report.summary()}")
        for key in lm_report.missing + lm_report.mismatched:
            print(f"    problem: {key}")
        for key in lm_report.unexpected:
            print(f"    unexpected: {key}")
        print(f"  retrieval DB {directory.retrieval_db.name}: {len(retrieval.regions)} regions, {retrieval.token_dim}-d")
    if not ok:
        raise UserError(f"{args.dir}: the model cannot be loaded (see the problems above)", code=1)
    return 0


def run_current(args: argparse.Namespace) -> int:
    """One line: the model `serve` would load with these settings, or why it would analyse nothing."""
    from dicom_node.cli.pipeline import check_model_usable
    from dicom_node.pipeline.dispatch import model_configured
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    model = settings.model
    origin = settings.source
    if not model_configured(settings):
        print(f"no model configured ({origin}): serve receives and stores studies but does not analyse them; "
              "set model.dir, or start serve with --demo-weights")  # fmt: skip
        return 0
    what = check_model_usable(settings, model.device)  # UserError (one line) if it cannot be used
    print(f"serve uses {what} (backend {model.backend}, tasks {', '.join(model.tasks)}; {origin})")
    return 0
