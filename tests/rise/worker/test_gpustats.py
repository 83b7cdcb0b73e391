"""GPU figures of a worker: NVML's per device at scrape time (with a stand-in NVML here;
tests/gpu/gpu_check.py checks the real one on a GPU machine), nothing at all without NVML
or CUDA."""

from __future__ import annotations

import sys
import types

import pytest
from rise.metrics import for_service
from rise.worker import gpustats


def fake_nvml(count=3, fail_init=False):
    m = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}aaaa"
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * (h + 1))
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1000 * (h + 1))
    return m


def samples(collector):
    return {(s.name, s.labels["gpu"]): s.value for fam in collector.collect()
            for s in fam.samples if s.labels["pool"] == "p"}


def test_nvml_devices_as_torch_numbers_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0")
    got = samples(gpustats.NvmlCollector("p"))
    assert got == {("rise_gpu_utilization_ratio", "0"): 0.3,
                   ("rise_gpu_utilization_ratio", "1"): 0.1,
                   ("rise_gpu_memory_used_bytes", "0"): 3000.0,
                   ("rise_gpu_memory_used_bytes", "1"): 1000.0}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(samples(gpustats.NvmlCollector("p"))) == 6


@pytest.mark.parametrize("module", [None, "broken"])
def test_no_nvml_no_series_no_error(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "pynvml",
                        None if module is None else fake_nvml(fail_init=True))
    c = gpustats.NvmlCollector("p")
    assert list(c.collect()) == [] and list(c.collect()) == []


def test_torch_memory_only_where_cuda_is_in_use(monkeypatch):
    m = for_service("worker")
    gpustats.record_torch_memory(m, "p")  # the CPU build here: CUDA never initialised
    assert not [s for fam in m.registry.collect() for s in fam.samples
                if s.name.startswith("rise_gpu_")]

    class Cuda:
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        device_count = staticmethod(lambda: 1)
        memory_allocated = staticmethod(lambda i: 5)
        memory_reserved = staticmethod(lambda i: 8)
        max_memory_allocated = staticmethod(lambda i: 7)

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=Cuda))
    gpustats.record_torch_memory(m, "p")
    reg = m.registry
    assert reg.get_sample_value("rise_gpu_memory_allocated_bytes", {"pool": "p", "gpu": "0"}) == 5
    assert reg.get_sample_value("rise_gpu_memory_reserved_bytes", {"pool": "p", "gpu": "0"}) == 8
    assert reg.get_sample_value("rise_gpu_memory_max_allocated_bytes",
                                {"pool": "p", "gpu": "0"}) == 7
