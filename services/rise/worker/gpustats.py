"""GPU figures of a worker: torch's memory per process, NVML's utilisation per device.

Both are optional.  A process that never initialised CUDA (a CPU pool, a control-queue
task) writes no torch memory gauge; without ``nvidia-ml-py`` (``pip install rise[gpu]``), or
without an NVIDIA driver, the NVML figures are simply not exported: nothing fails, nothing
is logged more than once.

- ``record_torch_memory(pool)``: in the process that holds the model, after a load and
  after every batch; ``memory_allocated``, ``memory_reserved`` and ``max_memory_allocated``
  of each CUDA device, as gauges that add up over the worker's live processes.
- ``NvmlCollector(pool)``: registered with the worker's /metrics (the serving process),
  read at scrape time: utilisation and memory in use of each device the worker may use
  (``CUDA_VISIBLE_DEVICES`` by index or UUID, else every device), labelled with torch's
  ordinal of the device.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from rise.metrics import CATALOGUE

log = logging.getLogger("rise.worker")


def record_torch_memory(metrics: Any, pool: str) -> None:
    """Set the torch memory gauges of this process, if it uses CUDA at all."""
    torch = sys.modules.get("torch")  # never import torch (nor initialise CUDA) for this
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    for i in range(torch.cuda.device_count()):
        gpu = str(i)
        metrics.gpu_memory_allocated_bytes.labels(pool=pool, gpu=gpu).set(
            torch.cuda.memory_allocated(i))
        metrics.gpu_memory_reserved_bytes.labels(pool=pool, gpu=gpu).set(
            torch.cuda.memory_reserved(i))
        metrics.gpu_memory_max_allocated_bytes.labels(pool=pool, gpu=gpu).set(
            torch.cuda.max_memory_allocated(i))


def _visible(count: int, uuids: list[str]) -> list[int]:
    """NVML indices of the devices this process may use (CUDA_VISIBLE_DEVICES)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(count))
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < count:
            out.append(int(item))
        else:
            out += [i for i, u in enumerate(uuids) if u.startswith(item)]
    return out


class NvmlCollector:
    """rise_gpu_utilization_ratio and rise_gpu_memory_used_bytes from NVML at scrape time;
    no series at all where NVML is missing."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._failed = False

    def _open(self) -> Any:
        with self._lock:
            if self._nvml is None and not self._failed:
                try:
                    # optional: the rise[gpu] extra (nvidia-ml-py)
                    pynvml = importlib.import_module("pynvml")
                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as e:  # noqa: BLE001 - no package, no driver, no GPU
                    self._failed = True
                    log.info("no NVML GPU metrics (%s: %s)", type(e).__name__, e)
            return self._nvml

    def describe(self) -> list:
        return []  # names vary with the machine: nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._open()
        if nvml is None:
            return
        util = GaugeMetricFamily("rise_gpu_utilization_ratio",
                                 CATALOGUE["rise_gpu_utilization_ratio"][1],
                                 labels=["pool", "gpu"])
        used = GaugeMetricFamily("rise_gpu_memory_used_bytes",
                                 CATALOGUE["rise_gpu_memory_used_bytes"][1],
                                 labels=["pool", "gpu"])
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [str(nvml.nvmlDeviceGetUUID(h)) for h in handles]
            # ``gpu`` is the device's ordinal as torch numbers it (its position among the
            # visible devices), so both kinds of GPU series of one device share it.
            for n, i in enumerate(_visible(count, uuids)):
                rates = nvml.nvmlDeviceGetUtilizationRates(handles[i])
                memory = nvml.nvmlDeviceGetMemoryInfo(handles[i])
                util.add_metric([self.pool, str(n)], rates.gpu / 100.0)
                used.add_metric([self.pool, str(n)], float(memory.used))
        except Exception as e:  # noqa: BLE001 - a GPU fell off the bus: skip this scrape
            log.warning("NVML read failed: %s: %s", type(e).__name__, e)
            return
        yield util
        yield used
