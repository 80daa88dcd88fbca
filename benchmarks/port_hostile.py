"""Hostile and broken clients against our DICOM port and against DCMTK ``storescp --fork`` (issue 16).

    .venv/bin/python benchmarks/port_hostile.py [--idle 30] [--idle-seconds 10] [--unknown 1000]

Loopback only. Attackers are raw sockets bound to other 127.x addresses; the known source is
127.0.0.1 (a configured source of the node; storescp accepts anyone). Scenarios:

- flood: 50 half-sent A-ASSOCIATE-RQs (50 hosts) and 200 connect-then-close connections while the
  known source does a C-ECHO and a 10-instance push: their times, and the longest time until a
  stalled socket was closed (node: ``limits.establish_timeout_s`` = 4; storescp: ``--acse-timeout 4
  --socket-timeout 4``).
- oversize: an A-ASSOCIATE-RQ declaring 256 MiB and a P-DATA-TF declaring 128 MiB (after a good
  association), each pushed for real by 5 clients at once: the most bytes a client got out before the
  server closed, and the server's RSS growth (node: the SCP process; storescp: parent + children, peak).
- unknown AE: ``--unknown`` associations with an unknown calling AE (a third with control characters):
  wall time, log bytes written, audit rows (node).
- idle: ``--idle`` open, silent associations held ``--idle-seconds``: CPU seconds per second the
  server spends (node default ``idle_poll_s`` 0.05, and 0.001 which is pynetdicom's own 1 ms polling).
- refresher (issue 26): 70 idle sockets from the known source's own address (127.0.0.1), each
  re-opened as soon as the server closes it, for ``--refresher-seconds``, while the source alternates
  a C-ECHO and a one-instance C-STORE, each its own association, every 0.25 s: requests answered,
  the slowest and the median, re-opens per second, and the server's CPU meanwhile.

Prints one Markdown table; docs/measured-figures.md, "Hostile clients on the DICOM port", quotes a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification  # noqa: E402

from dicom_node.store import open_store  # noqa: E402
from tests.support.corpus import write_synthetic_set  # noqa: E402
from tests.support.dcmtk import dcmtk_env, server_command  # noqa: E402
from tests.support.net import free_port, wait_for_port  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402
from tests.support.processes import stop_process  # noqa: E402
from tests.support.raw_pdu import Refresher, associate_rq, child_pids, connect_from, pdu_header, read_pdu, vm_rss_bytes, wait_closed  # noqa: E402

DEADLINE_S = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Target:
    name: str
    port: int
    called: str

    def pids(self) -> list[int]: ...
    def log_bytes(self) -> int: ...
    def stop(self) -> None: ...
    def audit_rows(self) -> int | None:
        return None


class NodeTarget(Target):
    def __init__(self, workdir: Path, idle_poll_s: float = 0.05) -> None:
        self.name = "node" if idle_poll_s == 0.05 else f"node, idle_poll_s={idle_poll_s}"
        self.node = NodeProcess(workdir, settings={"limits": {"establish_timeout_s": DEADLINE_S, "idle_poll_s": idle_poll_s}})
        self.node.add_source("pacs", "PACS")
        self.node.start()
        self.port, self.called = self.node.port, "ANATOMIX"
        parent = Path(f"/proc/{self.node.process.pid}/cmdline").read_bytes()
        deadline = time.monotonic() + 30
        self.scp_pid = 0
        while not self.scp_pid and time.monotonic() < deadline:
            self.scp_pid = next((p for p in child_pids(self.node.process.pid) if Path(f"/proc/{p}/cmdline").read_bytes() == parent), 0)
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return [self.scp_pid]

    def log_bytes(self) -> int:
        return self.node.log_path.stat().st_size

    def audit_rows(self) -> int | None:
        store = open_store(self.node.url)
        try:
            return len(store.list_audit_events(limit=1_000_000))
        finally:
            store.close()

    def stop(self) -> None:
        self.node.stop()


class StoreScpTarget(Target):
    def __init__(self, workdir: Path) -> None:
        self.name = "storescp --fork"
        self.port, self.called = free_port(), "ANATOMIX"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "storescp.log"
        self.log = open(self.log_path, "wb")
        self.process = __import__("subprocess").Popen(
            server_command(
                "storescp", "--fork", "--aetitle", self.called, "--max-pdu", "131072",
                "--acse-timeout", str(DEADLINE_S), "--socket-timeout", str(DEADLINE_S), "-od", str(workdir), str(self.port),
            ),
            env=dcmtk_env(),
            stdout=self.log,
            stderr=self.log,
        )  # fmt: skip
        wait_for_port(self.port, timeout=30)

    def pids(self) -> list[int]:
        return [self.process.pid, *child_pids(self.process.pid)]

    def log_bytes(self) -> int:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.stat().st_size

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        self.log.close()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, IndexError):
            continue
    return total / CLOCK_TICKS


def rss_total(target: Target) -> int:
    total = 0
    for pid in target.pids():
        try:
            total += vm_rss_bytes(pid)
        except (FileNotFoundError, RuntimeError):
            continue
    return total


def known_ae() -> AE:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def timed(target: Target, files: list[Path] | None) -> float:
    start = time.monotonic()
    assoc = known_ae().associate("127.0.0.1", target.port, ae_title=target.called)
    if not assoc.is_established:
        return float("nan")
    try:
        ok = assoc.send_c_echo().Status == 0 if files is None else all(assoc.send_c_store(f).Status == 0 for f in files)
    finally:
        assoc.release()
    return time.monotonic() - start if ok else float("nan")


def scenario_flood(target: Target, files: list[Path]) -> dict[str, str]:
    partial = associate_rq("PACS", target.called)[:40]
    half = []
    for index in range(50):
        sock = connect_from(f"127.0.1.{index + 1}", target.port)
        try:
            sock.sendall(partial)
        except OSError:
            pass
        half.append((sock, time.monotonic()))

    def flood() -> None:
        for _ in range(200):
            try:
                connect_from("127.0.0.2", target.port).close()
            except OSError:
                pass
            time.sleep(0.01)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    echo_s, push_s = timed(target, None), timed(target, files)
    flooder.join(60)
    closed = []
    for sock, opened in half:
        left = wait_closed(sock, max(opened + 60 - time.monotonic(), 0.01))
        closed.append(time.monotonic() - opened if left is not None else float("inf"))  # inf: still open after 60 s
        sock.close()
    return {
        "C-ECHO under flood (s)": f"{echo_s:.2f}",
        "10-instance push under flood (s)": f"{push_s:.2f}",
        "stalled sockets closed after (s, max)": f"{max(closed):.1f}",
    }


def _blast(sock: socket.socket, header: bytes, total: int) -> int:
    sent = 0
    chunk = bytes(1 << 20)
    try:
        sock.sendall(header)
        while sent < total:
            sent += sock.send(chunk[: min(len(chunk), total - sent)])
    except OSError:
        pass
    finally:
        sock.close()
    return sent


def scenario_oversize(target: Target) -> dict[str, str]:
    baseline = rss_total(target)
    peak = [baseline]
    results: dict[str, list[int]] = {"rq": [], "pdata": []}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_total(target))

    def rq(index: int) -> None:
        sock = connect_from(f"127.0.2.{index + 1}", target.port, timeout=30)
        results["rq"].append(_blast(sock, pdu_header(0x01, 256 << 20), 256 << 20))

    def pdata() -> None:
        sock = connect_from("127.0.0.1", target.port, timeout=30)
        sock.sendall(associate_rq("PACS", target.called))
        reply = read_pdu(sock, timeout=30)
        if reply is None or reply[0] != 0x02:
            sock.close()
            results["pdata"].append(-1)
            return
        results["pdata"].append(_blast(sock, pdu_header(0x04, 128 << 20), 128 << 20))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=rq, args=(i,)) for i in range(5)] + [threading.Thread(target=pdata) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    seconds = time.monotonic() - started
    time.sleep(0.5)
    stop.set()
    sampler.join()
    return {
        "256 MiB A-ASSOCIATE-RQ: most bytes taken (MB)": f"{max(results['rq']) / 1e6:.1f}",
        "128 MiB P-DATA-TF: most bytes taken (MB)": f"{max(results['pdata']) / 1e6:.1f}",
        "10 oversize clients done in (s)": f"{seconds:.1f}",
        "server RSS peak growth (MB)": f"{(peak[0] - baseline) / 1e6:.1f}",
    }


def scenario_unknown_ae(target: Target, attempts: int) -> dict[str, str]:
    titles = ["NOBODY\nFORGED", "X\x1b[31mY", "NOBODY"]
    log_before = target.log_bytes()
    started = time.monotonic()

    def worker(first: int) -> None:
        for index in range(first, attempts, 8):
            try:
                with connect_from("127.0.0.3", target.port, timeout=30) as sock:
                    sock.sendall(associate_rq(titles[index % 3], target.called))
                    read_pdu(sock, timeout=30)
            except OSError:
                pass

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    seconds = time.monotonic() - started
    return {f"{attempts} unknown-AE attempts (s)": f"{seconds:.1f}", "log bytes written during them": str(target.log_bytes() - log_before)}


def scenario_idle(target: Target, count: int, seconds: float) -> dict[str, str]:
    socks = []
    for _ in range(count):
        sock = connect_from("127.0.0.1", target.port, timeout=30)
        sock.sendall(associate_rq("PACS", target.called))
        reply = read_pdu(sock, timeout=30)
        if reply is None or reply[0] != 0x02:
            raise RuntimeError(f"{target.name}: idle association refused")
        socks.append(sock)
    time.sleep(1.0)
    pids = target.pids()
    before = cpu_seconds(pids)
    time.sleep(seconds)
    used = cpu_seconds(pids) - before
    for sock in socks:
        sock.close()
    return {f"{count} idle associations: CPU (cores)": f"{used / seconds:.3f}"}


def scenario_refresher(target: Target, files: list[Path], seconds: float, sockets: int = 70) -> dict[str, str]:
    refresher = Refresher("127.0.0.1", target.port, sockets).start()
    answered: list[float] = []
    asked = 0
    try:
        time.sleep(2.0)  # the refresher holds what it can before the source's first request
        pids = target.pids()
        cpu_before, reopened_before, started = cpu_seconds(pids), refresher.reopened, time.monotonic()
        end = started + seconds
        while time.monotonic() < end:
            took = timed(target, None if asked % 2 == 0 else [files[asked % len(files)]])
            asked += 1
            if took == took:  # not NaN: answered
                answered.append(took)
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(target.pids()) - cpu_before) / elapsed
        reopen_rate = (refresher.reopened - reopened_before) / elapsed
    finally:
        refresher.stop()
    answered.sort()
    return {
        f"{sockets} idle sockets from the source's address, re-opened at once: requests answered": f"{len(answered)}/{asked}",
        "... slowest / median answered request (s)": f"{answered[-1]:.2f} / {answered[len(answered) // 2]:.2f}" if answered else "-",
        "... attacker re-opens per second": f"{reopen_rate:.0f}",
        "... server CPU meanwhile (cores)": f"{cpu:.2f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--unknown", type=int, default=1000)
    parser.add_argument("--refresher-seconds", type=float, default=40.0)
    parser.add_argument("--only", choices=("flood", "oversize", "unknown", "idle", "refresher"), action="append",
                        help="run only these scenarios (repeatable); default: all")  # fmt: skip
    args = parser.parse_args()
    run = set(args.only or ("flood", "oversize", "unknown", "idle", "refresher"))
    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="port-hostile-") as tmp:
        work = Path(tmp)
        files = write_synthetic_set(work / "in", 10, study_uid="1.2.826.0.1.3680043.9.7777.99", rows=256, columns=256)
        for make in (lambda: NodeTarget(work / "node"), lambda: StoreScpTarget(work / "storescp")):
            target = make()
            try:
                results: dict[str, str] = {}
                if "flood" in run:
                    results |= scenario_flood(target, files)
                if "oversize" in run:
                    results |= scenario_oversize(target)
                if "unknown" in run:
                    results |= scenario_unknown_ae(target, args.unknown)
                if "idle" in run:
                    results |= scenario_idle(target, args.idle, args.idle_seconds)
                if "refresher" in run:
                    results |= scenario_refresher(target, files, args.refresher_seconds)
                rows[target.name] = results
            finally:
                target.stop()
            rows_after = target.audit_rows()  # the node flushes its aggregated summaries when it stops
            results["audit rows for the whole run (after stop)"] = "-" if rows_after is None else str(rows_after)
            results["log bytes for the whole run"] = str(target.log_bytes())
            print(f"{target.name}: done", file=sys.stderr)
        if "idle" in run:
            slow = NodeTarget(work / "node-1ms", idle_poll_s=0.001)
            try:
                rows[slow.name] = scenario_idle(slow, args.idle, args.idle_seconds)
            finally:
                slow.stop()
    names = list(rows)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        print(f"| {key} | " + " | ".join(rows[n].get(key, "-") for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
