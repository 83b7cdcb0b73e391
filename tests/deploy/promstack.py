"""A real Prometheus scraping the local stack, and the dashboard's queries through its HTTP API.

Used by tests/deploy/test_dashboard_live.py (every panel's query returns series after one
job) and tests/benchmarks/dashboard_picture.py (the panels plotted from a real run).
Prometheus is Debian's ``prometheus`` package (``$PROMETHEUS`` or PATH; ``make test``
installs it); it scrapes every /metrics of the stack each ``interval`` with the labels a
cluster's ServiceMonitor gives (``pod``, ``namespace``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "rise-dashboard.json"
NAMESPACE = "rise-local"


def find_prometheus() -> str | None:
    return os.environ.get("PROMETHEUS") or shutil.which("prometheus") or \
        next((p for p in ("/usr/bin/prometheus",) if Path(p).exists()), None)


@dataclass
class Target:
    """One query of a dashboard panel."""

    panel: dict[str, Any]
    ref: str
    expr: str
    legend: str

    @property
    def title(self) -> str:
        return self.panel["title"]

    @property
    def gpu(self) -> bool:
        """Panels of GPU metrics: empty on a machine without a GPU."""
        return "rise_gpu_" in self.expr


def dashboard_targets(path: Path = DASHBOARD) -> list[Target]:
    """Every query of every panel, in the dashboard's order."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append(Target(p, t["refId"], t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


def variable_selectors(path: Path = DASHBOARD) -> dict[str, str]:
    """name -> the selector of each label_values() variable of the dashboard."""
    out = {}
    for var in json.loads(path.read_text())["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            if m:
                out[var["name"]] = m.group(1)
    return out


def expand(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query as Grafana sends it with every variable at "All"."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", rate_interval, expr)
    return re.sub(r"\$\{?(namespace|pool|queue)\}?", ".*", expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def finite(result: list[dict[str, Any]]) -> bool:
    """Whether an instant query's result holds a series with a finite value."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


class Prometheus:
    """A Prometheus server of its own (config, data and log under ``root``)."""

    def __init__(self, root: Path, targets: dict[str, str], interval: str = "1s",
                 binary: str | None = None) -> None:
        from rise.stack import free_port

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.binary = binary or find_prometheus()
        if not self.binary:
            raise FileNotFoundError("prometheus not found (apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = []
        for name, url in sorted(targets.items()):
            u = urllib.parse.urlsplit(url)
            jobs.append({"job_name": name, "honor_labels": True, "metrics_path": u.path,
                         "static_configs": [{"targets": [u.netloc], "labels": {
                             "pod": name, "namespace": NAMESPACE}}]})
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval,
                             "scrape_timeout": interval}, "scrape_configs": jobs}
        (self.root / "prometheus.yml").write_text(json.dumps(config, indent=1))  # YAML too
        self.log = open(self.root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.root / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return (self.root / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_health(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"]
                for t in self.api("targets")["activeTargets"]}

    def wait_scraped(self, timeout: float = 60) -> None:
        """Until every target was scraped (up) twice at least: a counter must be seen at
        its value before a job moves it, or rate() misses the step."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.targets_health()
            if health and set(health.values()) == {"up"} and len(self.query(
                    "count_over_time(up[1h]) >= 2")) == len(health):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not all scraped after {timeout} s: {health}")
            time.sleep(0.5)

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll an instant query until it has a finite series."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if finite(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no finite series for {expr} after {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
