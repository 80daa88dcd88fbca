"""A slow DNS resolver never stalls association acceptance (style notes, "DNS on the accept path").

The SCP runs in-process as an SCP process of ``serve`` runs it (guarded server, housekeeping, real
SQLite store) and DCMTK's ``echoscu`` is the sender. The fault: every lookup of a ``*.slow.test``
name blocks for SLOW_S seconds before answering 127.0.0.1 (``socket.getaddrinfo`` replaced in this
process for those names only; every other name resolves as usual).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.audit.trail import open_audit_trail
from dicom_node.net.scp import StorageScp
from dicom_node.net.server import InheritedSocketServer, make_scp_servers, open_listening_socket
from dicom_node.settings import Settings
from dicom_node.store import Store, open_store
from dicom_node.store.base import RemoteNode
from dicom_node.store.hosts import HostAddresses
from tests.support.dcmtk import run_dcmtk
from tests.support.net import free_port

pytestmark = pytest.mark.solo

SLOW_S = 4.0
#: An echo (echoscu start-up included) on a busy 2-core box; far below SLOW_S.
FAST_S = 2.0


@dataclass
class SlowResolver:
    calls: list[str]


@pytest.fixture
def slow_resolver(monkeypatch: pytest.MonkeyPatch) -> SlowResolver:
    real = socket.getaddrinfo
    resolver = SlowResolver(calls=[])

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".slow.test"):
            resolver.calls.append(host)
            time.sleep(SLOW_S)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return resolver


@dataclass
class RunningScp:
    store: Store
    port: int
    servers: list[InheritedSocketServer]
    started_s: float


@pytest.fixture
def scp(tmp_path: Path, slow_resolver: SlowResolver) -> Iterator[RunningScp]:
    port = free_port()
    settings = Settings().with_overrides(node={"port": port, "bind_address": "127.0.0.1"}, storage={"data_dir": tmp_path / "var", "min_free_bytes": 0})
    (tmp_path / "var" / "spool" / ".tmp").mkdir(parents=True)
    setup = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}")
    setup.add_remote_node(RemoteNode(name="modality", ae_title="MODALITY", host="127.0.0.1", port=104, role="source"))
    setup.add_remote_node(RemoteNode(name="ct", ae_title="CT", host="ct.slow.test", port=104, role="source"))
    setup.close()  # configured by another process (``anatomix-node ae add``): this one has resolved nothing
    assert slow_resolver.calls == []  # configuring a node resolves nothing in the configuring process
    store = open_store(f"sqlite:///{tmp_path / 'var' / 'anatomix.db'}", migrate=False)
    scp = StorageScp(settings, store, open_audit_trail(store, ""))
    clock = time.monotonic()
    servers = make_scp_servers(settings, scp, [(open_listening_socket("127.0.0.1", port), None)])
    started_s = time.monotonic() - clock
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    yield RunningScp(store, port, servers, started_s)
    for server in servers:
        server.shutdown()
    store.close()


def timed_echo(port: int, calling: str) -> tuple[int, float]:
    clock = time.monotonic()
    result = run_dcmtk("echoscu", "-to", "20", "-aet", calling, "-aec", "ANATOMIX", "127.0.0.1", str(port), timeout=60)
    return result.returncode, time.monotonic() - clock


def test_a_slow_resolver_never_stalls_acceptance(scp: RunningScp, slow_resolver: SlowResolver) -> None:
    assert scp.started_s < FAST_S, f"starting the SCP waited {scp.started_s:.1f} s on DNS"
    # While the housekeeping thread is still resolving ct.slow.test: a source by IP is accepted at once ...
    code, seconds = timed_echo(scp.port, "MODALITY")
    assert code == 0 and seconds < FAST_S, (code, seconds)
    # ... and the source by name is answered at once too: accepted, or (not resolved yet) rejected
    # as transient, so its sender retries; never kept waiting on the resolver.
    code, seconds = timed_echo(scp.port, "CT")
    assert seconds < FAST_S, f"acceptance waited {seconds:.1f} s on DNS"
    if code != 0:
        [rejected] = [e for e in scp.store.list_audit_events("association_rejected") if e.calling_ae == "CT"]
        assert rejected.detail["result"] == 0x02 and "still being resolved" in rejected.detail["reason"]

    deadline = time.monotonic() + 3 * SLOW_S  # the background resolution ends
    while scp.store.host_addresses.lookup("ct.slow.test") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(3):  # resolved once, off the accept path; every association after that is a cache hit
        code, seconds = timed_echo(scp.port, "CT")
        assert code == 0 and seconds < FAST_S, (code, seconds)
    assert slow_resolver.calls == ["ct.slow.test"]  # the housekeeping's lookup, which acceptance waited for briefly

    # Past the refresh age the old answer still serves while a background lookup renews it.
    scp.store.host_addresses.refresh_s = 0.0
    calls = len(slow_resolver.calls)
    code, seconds = timed_echo(scp.port, "CT")
    assert code == 0 and seconds < FAST_S, (code, seconds)
    deadline = time.monotonic() + 2.0
    while len(slow_resolver.calls) == calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(slow_resolver.calls) > calls  # the refresh ran (in the background)


def test_a_name_that_does_not_resolve_matches_no_peer_and_is_cached() -> None:
    cache = HostAddresses(first_wait_s=30.0)  # a working resolver: the first lookup gets its answer
    assert cache.lookup("no-such-host.invalid") == frozenset()
    assert cache.lookup("LOCALHOST") == cache.lookup("localhost") and "127.0.0.1" in (cache.lookup("localhost") or ())
    assert cache.cached(["localhost", "never-looked-up.example"]) >= {"127.0.0.1"}


def test_a_never_resolved_name_waits_at_most_first_wait(slow_resolver: SlowResolver) -> None:
    cache = HostAddresses(first_wait_s=0.2)
    clock = time.monotonic()
    assert cache.lookup("pacs.slow.test") is None  # still resolving: "not known yet"
    assert time.monotonic() - clock < 1.0
    assert cache.lookup("pacs.slow.test") is None  # the same background lookup, not a second one
    assert slow_resolver.calls == ["pacs.slow.test"]


# ---- the tests' own DCMTK servers never ask DNS who called (issue 27) ----------------------------------

#: Every DCMTK program that accepts associations (and so may look up its callers' names).
DCMTK_SERVERS = ("storescp", "dcmqrscp", "wlmscpfs", "dcmrecv", "echoscp")


def test_dcmtk_servers_in_tests_and_benchmarks_start_without_host_lookups(tmp_path: Path) -> None:
    import re

    from tests.support.dcmtk import NO_HOST_LOOKUP, REPO_ROOT_FOR_SCAN, StoreScp, run_dcmtk, server_command

    # Each server's no-lookup option is one the installed DCMTK program documents.
    for tool, option in NO_HOST_LOOKUP.items():
        command = server_command(tool, "104")
        assert command[1] == option and command[0].endswith(f"/{tool}")
        assert re.search(rf"^\s*{re.escape(option)}\s+--disable-host-lookup\b", run_dcmtk(tool, "--help", timeout=30).stdout, re.M), tool
    with pytest.raises(ValueError, match="echoscp"):
        server_command("echoscp")  # a server without a known no-lookup option cannot be started through it

    # The running reference receiver really has it on its command line.
    scp = StoreScp(tmp_path / "in").start()
    try:
        assert scp.process is not None
        argv = Path(f"/proc/{scp.process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-dhl" in argv, argv
    finally:
        scp.stop()

    # Nothing in tests/ or benchmarks/ starts a DCMTK server another way (a literal tool name passed
    # to dcmtk()/run_dcmtk() or a /usr/bin path); only server_command builds their argument lists.
    servers = "|".join(DCMTK_SERVERS)
    pattern = re.compile(rf"""(?:dcmtk\(\s*|/usr/bin/)["']?({servers})\b""")
    offenders = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((REPO_ROOT_FOR_SCAN / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and "--help" not in line:
                    offenders.append(f"{path.relative_to(REPO_ROOT_FOR_SCAN)}:{number}: {line.strip()}")
    assert not offenders, offenders
