"""DCMTK command-line peers (Debian package dcmtk): senders, a reference receiver, transcoders.

Always the Debian binaries in /usr/bin: the virtual environment also has pynetdicom's Python
``storescu``/``storescp`` apps on PATH, which are different programs. ``TCP_NODELAY=1`` is set for
every call (without it DCMTK stalls ~44 ms per message on loopback).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import free_port
from tests.support.processes import stop_process

DCMTK_BIN = Path("/usr/bin")
#: The repository (tests scan tests/ and benchmarks/ for how DCMTK servers are started).
REPO_ROOT_FOR_SCAN = Path(__file__).resolve().parents[2]


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        raise RuntimeError(f"DCMTK tool {tool} is missing: install the Debian package dcmtk (make peers)")
    return str(path)


#: DCMTK servers and the option that stops them looking up each caller's host name. Without it a
#: server resolves the peer address of every association, and for an address not in /etc/hosts
#: (127.0.0.2 and up) that is a DNS query off the machine; tests talk to nothing beyond loopback.
NO_HOST_LOOKUP = {"storescp": "-dhl", "dcmqrscp": "-dhl", "wlmscpfs": "-dhl", "dcmrecv": "-dhl"}


def server_command(tool: str, *args: str) -> list[str]:
    """The argument list that starts DCMTK server ``tool`` with ``args``; never with host-name lookups."""
    if tool not in NO_HOST_LOOKUP:
        raise ValueError(f"{tool} is not a DCMTK server known to tests.support.dcmtk (add its no-lookup option to NO_HOST_LOOKUP)")
    return [dcmtk(tool), NO_HOST_LOOKUP[tool], *args]


def storescp_command(port: int, output_dir: Path, ae_title: str, *extra: str, syntaxes: tuple[str, ...] = ("+xa",)) -> list[str]:
    """DCMTK storescp as the tests and benchmarks start it: 128 KiB PDUs, no DNS; any transfer syntax unless
    ``syntaxes`` says otherwise (``()``: storescp's defaults, the uncompressed ones only)."""
    return server_command("storescp", "--aetitle", ae_title, "--max-pdu", "131072", *syntaxes, "-od", str(output_dir), *extra, str(port))


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk(tool), *args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check)


def echoscu(port: int, calling: str, called: str) -> subprocess.CompletedProcess:
    return run_dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), timeout=60)


def dcmsend(port: int, files: list[Path], calling: str, called: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """dcmsend picks the presentation context per file, so one call can carry mixed transfer syntaxes."""
    return _send("dcmsend", port, files, calling, called, *extra, timeout=timeout)


def storescu(port: int, files: list[Path], calling: str, called: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return _send("storescu", port, files, calling, called, *extra, timeout=timeout)


def _send(tool: str, port: int, files: list[Path], calling: str, called: str, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    """``tool`` (a DCMTK sender) from ``calling`` to ``called`` at 127.0.0.1:``port``, 128 KiB PDUs."""
    addressing = ("-aet", calling, "-aec", called, "--max-pdu", "131072")
    return run_dcmtk(tool, *addressing, *extra, "127.0.0.1", str(port), *[str(f) for f in files], timeout=timeout)


def transcode(tool: str, source: Path, target: Path, *options: str) -> Path:
    """Re-encode ``source`` with a DCMTK tool (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle)."""
    result = run_dcmtk(tool, *options, str(source), str(target), timeout=300)
    if result.returncode != 0 or not target.exists():
        raise RuntimeError(f"{tool} {' '.join(options)} failed on {source.name}: {result.stderr.strip()[-500:]}")
    return target


#: TCP state LISTEN in /proc/net/tcp.
_TCP_LISTEN = "0A"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` itself listens on (its own sockets, from /proc; Linux only)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        return set()  # the process is gone
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_until_listening(process: subprocess.Popen, port: int, what: str, log: Path | None = None, timeout: float = 300) -> None:
    """Block until ``process`` itself listens on ``port``; raise at once if it exits instead.

    Ready means the process's own socket is in LISTEN state, not "something answers on the port"
    (another test's server may have taken a port between free_port() and our bind). Each outcome
    is seen as soon as it happens, so a loaded machine only makes this slower, never wrong; the
    timeout is a safety net for a process that hangs before binding.
    """
    deadline = time.monotonic() + timeout
    while port not in listening_ports(process.pid):
        if process.poll() is not None:
            detail = log.read_text(errors="replace").strip()[-1000:] if log is not None and log.exists() else ""
            raise PortNotBound(f"{what} exited with {process.returncode} before listening on port {port}: {detail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (pid {process.pid}) did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.02)


class PortNotBound(RuntimeError):
    """The peer process ended before it listened (a port taken meanwhile, a bad option)."""


@dataclass
class StoreScp:
    """DCMTK storescp as a reference receiver (benchmarks, oracle for 'what was sent').

    ``start`` returns once storescp itself listens (see :func:`wait_until_listening`); if its port
    was taken meanwhile it exits, and ``start`` tries again on another free port.
    """

    output_dir: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    #: Transfer syntax options: "+xa" accepts all; () keeps storescp's defaults (uncompressed only).
    syntaxes: tuple[str, ...] = ("+xa",)
    process: subprocess.Popen | None = None

    def start(self, attempts: int = 3) -> StoreScp:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = self.output_dir.parent / f"storescp-{self.ae_title}.log"
        for attempt in range(attempts):
            with open(log, "wb") as log_handle:  # storescp logs its bind failure on stderr
                self.process = subprocess.Popen(
                    storescp_command(self.port, self.output_dir, self.ae_title, *self.extra, syntaxes=self.syntaxes),
                    env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=log_handle,
                )  # fmt: skip
            try:
                wait_until_listening(self.process, self.port, "storescp", log)
                return self
            except PortNotBound:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        self.process = None
