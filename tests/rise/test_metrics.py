"""The metric catalogue: GPU metrics are optional, job histograms get job-sized buckets,
per-process GPU memory adds up over a worker's processes, and scrape-time collectors are
served beside the registry's metrics."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from rise.metrics import CATALOGUE, GAUGE_MODES, GPU, JOB_BUCKETS, NVML, for_service, names_for, serve


def test_gpu_metrics_are_optional_and_labelled_by_pool():
    assert GPU and NVML <= GPU
    assert not set(names_for("worker")) & GPU
    assert GPU <= set(names_for("worker", optional=True))
    for name in GPU:
        assert CATALOGUE[name][2] == ("pool", "gpu")
    for name in ("rise_examples_sketched_total", "rise_tokens_sketched_total",
                 "rise_job_duration_seconds", "rise_job_queue_wait_seconds", "rise_jobs",
                 "rise_queue_depth", "rise_tasks_total", "rise_jobs_submitted_total"):
        assert "pool" in CATALOGUE[name][2], name


def test_for_service_objects():
    worker = for_service("worker")
    assert "rise_gpu_memory_allocated_bytes" in worker.objects
    assert not NVML & set(worker.objects)  # read at scrape time, never an object
    controller = for_service("controller")
    h = controller.job_duration_seconds.labels(pool="p", kind="COMPACT", state="FAILED")
    h.observe(7200)
    buckets = {s.labels["le"] for m in controller.registry.collect() for s in m.samples
               if s.name == "rise_job_duration_seconds_bucket"}
    assert {str(float(b)) for b in JOB_BUCKETS} | {"+Inf"} == buckets
    assert set(GAUGE_MODES) <= GPU


def test_multiprocess_gauge_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = for_service("worker", registry=CollectorRegistry())
    assert m.gpu_memory_allocated_bytes._multiprocess_mode == "livesum"
    assert m.gpu_memory_max_allocated_bytes._multiprocess_mode == "livesum"


class OneGauge:
    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily("rise_gpu_utilization_ratio", "x", labels=["pool", "gpu"])
        g.add_metric(["p", "0"], 0.5)
        yield g


def test_serve_adds_scrape_time_collectors():
    from rise.stack import free_port

    port = free_port()
    reg = CollectorRegistry()
    server, _thread = serve(port, reg, addr="127.0.0.1", collectors=[OneGauge()])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
    assert 'rise_gpu_utilization_ratio{gpu="0",pool="p"} 0.5' in text
