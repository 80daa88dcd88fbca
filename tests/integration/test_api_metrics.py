"""``/metrics`` after a real DCMTK push into a node with two SCP processes, parsed with the
Prometheus client's own parser: counts per calling AE, rejections with their reason, studies by
state, non-empty stage histograms; the multiprocess directory is wiped at each serve start."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import api_node, http_url, wait_for_http
from tests.support.corpus import write_synthetic_set
from tests.support.dcmtk import echoscu, storescu


def scrape(node) -> dict[str, list]:
    """{family name: [(sample name, labels, value), ...]} from a live /metrics."""
    response = httpx.get(http_url(node) + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(response.text)}


def value(families: dict, sample: str, **labels: str) -> float | None:
    family = next((f for f in families.values() for s in f if s[0] == sample), [])
    found = [v for name, lab, v in family if name == sample and all(lab.get(k) == x for k, x in labels.items())]
    return sum(found) if found else None


def test_metrics_count_a_real_push_per_calling_ae_across_two_scp_processes(tmp_path):
    node = api_node(tmp_path / "node", scp_processes=2)
    node.add_source("moda", "MODA")
    node.add_source("modb", "MODB")
    node.start()
    try:
        wait_for_http(node)
        a = write_synthetic_set(tmp_path / "a", 3, study_uid="1.2.826.0.1.3680043.10.1431.7001")
        b = write_synthetic_set(tmp_path / "b", 2, study_uid="1.2.826.0.1.3680043.10.1431.7002")
        for files, ae in ((a, "MODA"), (b, "MODB"), (a[:1], "MODA")):  # the last: an exact duplicate, its own association
            sent = storescu(node.port, files, ae, node.ae_title)
            assert sent.returncode == 0, sent.stderr
        refused = echoscu(node.port, "STRANGER", node.ae_title)
        assert refused.returncode != 0

        deadline = time.monotonic() + 90
        while True:  # studies close after the 2 s quiet period; the histogram fills from their history
            families = scrape(node)
            if (value(families, "anatomix_stage_seconds_count", stage="receive_to_stable") or 0) >= 2:
                break
            assert time.monotonic() < deadline, families.get("anatomix_studies")
            time.sleep(0.5)

        assert value(families, "anatomix_instances_received_total", calling_ae="MODA") == 3
        assert value(families, "anatomix_instances_received_total", calling_ae="MODB") == 2
        assert value(families, "anatomix_instances_duplicate_total", calling_ae="MODA") == 1
        assert value(families, "anatomix_associations_total", calling_ae="MODA", outcome="released") == 2
        assert value(families, "anatomix_associations_total", calling_ae="MODB", outcome="released") == 1
        assert value(families, "anatomix_associations_total", calling_ae="STRANGER", outcome="rejected") == 1
        sizes = sum(p.stat().st_size for p in a + b)
        received_bytes = value(families, "anatomix_received_bytes_total", calling_ae="MODA") + value(
            families, "anatomix_received_bytes_total", calling_ae="MODB")  # fmt: skip
        assert sizes * 0.9 < received_bytes - sum(p.stat().st_size for p in a[:1]) < sizes * 1.1 + 1024
        # No model configured: both studies end failed ("no model"), and the gauge says so.
        states = {lab["state"]: v for name, lab, v in families["anatomix_studies"]}
        assert sum(states.values()) == 2 and states["receiving"] == 0
        assert value(families, "anatomix_stage_seconds_bucket", stage="receive_to_stable", le="+Inf") >= 2
        assert value(families, "anatomix_stage_seconds_sum", stage="receive_to_stable") >= 2 * 2.0  # at least the quiet period
        assert value(families, "anatomix_store_up") == 1 and value(families, "anatomix_spool_free_bytes") > 0
        assert {lab["queue"] for name, lab, v in families["anatomix_queue_depth"]} == {"analyze", "deliver"}

        # Every process wrote its own file; a new serve starts from a clean directory.
        files = list((node.data_dir / "metrics").glob("*.db"))
        assert len(files) >= 2, files
        node.stop()
        node.start()
        wait_for_http(node)
        assert value(scrape(node), "anatomix_instances_received_total", calling_ae="MODA") is None
    finally:
        node.stop()


def test_counters_are_complete_when_fresh_scp_processes_start_into_a_burst(tmp_path):
    """Issue 27: the first audit events of a fresh SCP process arrive on many threads at once; the
    counters must be created once (no ``Duplicated timeseries``, no ERROR) and count every row."""
    import threading

    from prometheus_client import CollectorRegistry, multiprocess

    from tests.support.node import NodeProcess
    from tests.support.raw_pdu import associate_rq, connect_from, read_pdu

    node = NodeProcess(tmp_path / "node", scp_processes=2, settings={"limits": {"audit_rejections_per_host": 1000}})
    node.add_source("moda", "MODA")
    replies: list[int | None] = []
    lock = threading.Lock()

    def client(index: int, gate: threading.Barrier) -> None:
        known = index % 2 == 0
        gate.wait(timeout=30)
        with connect_from("127.0.0.1" if known else f"127.0.5.{index + 1}", node.port, timeout=30) as sock:
            sock.sendall(associate_rq("MODA" if known else "STRANGER"))
            reply = read_pdu(sock, timeout=30)
            if known and reply is not None and reply[0] == 0x02:
                sock.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-ABORT from the service user
                time.sleep(0.2)
        with lock:
            replies.append(reply[0] if reply else None)

    rounds, burst = 1, 24
    for done in range(rounds):  # each start forks fresh SCP processes, each with its counters still to create
        node.start()
        try:
            gate = threading.Barrier(burst)
            threads = [threading.Thread(target=client, args=(i, gate), daemon=True) for i in range(burst)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(thread.is_alive() for thread in threads)
            store = node.open_store()
            try:  # the aborted rows are written when the node notices the abort: wait for all of them
                deadline = time.monotonic() + 30
                while len(store.list_audit_events("association_aborted")) < (done + 1) * burst // 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
                # This start's rows (the store keeps the earlier rounds'; the counters start from zero).
                rejected, aborted = (len(store.list_audit_events(e)) - done * burst // 2 for e in ("association_rejected", "association_aborted"))
            finally:
                store.close()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(node.data_dir / "metrics"))
            samples = [s for m in registry.collect() for s in m.samples if s.name == "anatomix_associations_total"]
            counted = {outcome: sum(s.value for s in samples if s.labels["outcome"] == outcome) for outcome in ("rejected", "aborted")}
        finally:
            node.stop()
        assert (rejected, aborted) == (burst // 2, burst // 2), (rejected, aborted)
        assert counted == {"rejected": rejected, "aborted": aborted}, counted
    assert sorted(set(replies)) == [0x02, 0x03] and len(replies) == rounds * burst
    errors = [line for line in node.log_text().splitlines() if " ERROR " in line or "Traceback" in line or "Duplicated" in line]
    assert not errors, errors
