"""DCMTK command-line peers (Debian package dcmtk): senders, a reference receiver, transcoders.

Always the Debian binaries in /usr/bin: the virtual environment also has pynetdicom's Python
``storescu``/``storescp`` apps on PATH, which are different programs. ``TCP_NODELAY=1`` is set for
every call (without it DCMTK stalls ~44 ms per message on loopback).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_process

DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        raise RuntimeError(f"DCMTK tool {tool} is missing: install the Debian package dcmtk (make peers)")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk(tool), *args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check)


def echoscu(port: int, calling: str, called: str) -> subprocess.CompletedProcess:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), timeout=60)


def dcmsend(port: int, files: list[Path], calling: str, called: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """dcmsend picks the presentation context per file, so one call can carry mixed transfer syntaxes."""
    return run_dcmtk(
        "dcmsend", "-aet", calling, "-aec", called, "--max-pdu", "131072", *extra, "127.0.0.1", str(port),
        *[str(f) for f in files], timeout=timeout,
    )


def storescu(port: int, files: list[Path], calling: str, called: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_dcmtk(
        "storescu", "-aet", calling, "-aec", called, "--max-pdu", "131072", *extra, "127.0.0.1", str(port),
        *[str(f) for f in files], timeout=timeout,
    )


def transcode(tool: str, source: Path, target: Path, *options: str) -> Path:
    """Re-encode ``source`` with a DCMTK tool (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle)."""
    result = run_dcmtk(tool, *options, str(source), str(target), timeout=300)
    if result.returncode != 0 or not target.exists():
        raise RuntimeError(f"{tool} {' '.join(options)} failed on {source.name}: {result.stderr.strip()[-500:]}")
    return target


@dataclass
class StoreScp:
    """DCMTK storescp as a reference receiver (benchmarks, oracle for 'what was sent')."""

    output_dir: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    def start(self) -> StoreScp:
        if shutil.which(dcmtk("storescp")) is None:
            raise RuntimeError("storescp missing")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", self.ae_title, "--max-pdu", "131072", "+xa", "-od", str(self.output_dir), *self.extra, str(self.port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        self.process = None
