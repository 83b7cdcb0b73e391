"""tests/gpu/gpu_check.py in its CPU smoke mode, so the script made for a GPU machine
keeps running on the code it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rise.placement import sketch_bytes_per_example

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "gpu_check.py"


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    env = os.environ | {"PYTHONPATH": str(ROOT / "services"), "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "pythia-14m",
         "--tokens", "2x32", "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "| pythia-14m |" in run.stdout  # the markdown table is printed
    assert (out / "gpu_check.md").read_text().startswith("| model |")
    assert json.loads((out / "gpu_check.json").read_text())["gpu_metrics"] == {
        "skipped": "no GPU"}
    return json.loads((out / "gpu_check.json").read_text())


def test_smoke_mode_reports_every_figure(figures: dict) -> None:
    (row,) = figures["models"]
    assert row["model"] == "pythia-14m" and row["dtype"] == "float32"
    assert (row["batch"], row["length"]) == (2, 32)
    assert row["forward_tokens_per_s"] > 0 and row["featurize_tokens_per_s"] > 0
    assert row["featurize_over_forward"] > 0
    assert row["check_head"] == "ok" and row["sketch_finite"]
    kr, kh, kg = row["dims"]
    assert row["sketch_bytes_per_example"] == (kr * kh + kg * kh) * 2 + 40
    assert row["sketch_bytes_per_example"] == sketch_bytes_per_example(tuple(row["dims"]))
    assert row["plan_sketch_bytes_per_example"] == row["sketch_bytes_per_example"]
    assert row["plan_peak_bytes"] > 0 and row["plan_fits"] is True
    assert row["storage_ratio"] == pytest.approx(
        row["rapidin_bytes_per_example"] / row["sketch_bytes_per_example"])


def test_offloaded_split_gives_the_one_device_sketches(figures: dict) -> None:
    split = figures["models"][0]["split"]
    assert split["offload"] == "disk"  # a CPU run offloads to disk, a GPU run to the CPU
    assert split["max_rel_diff"] is not None and split["max_rel_diff"] < 1e-5
    for p in split["placements"]:
        if p["ok"]:
            assert p["head_device"] == "cpu" and p["max_rel_diff"] < 1e-5


def test_offloaded_embedding_placement_runs(figures: dict) -> None:
    first = figures["models"][0]["split"]["placements"][0]
    assert first["placement"].startswith("embeddings"), first
    assert first["ok"], first.get("error")
