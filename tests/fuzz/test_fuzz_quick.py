"""The quick fuzz run (20 requests per RPC, ``tests/fuzz/run.py --quick``) as a test: every
answer's code is one ``docs/bad-input.md`` allows, none INTERNAL, no object written in S3
nor key in Redis by a refused request, every job ends as its input allows, every control
request succeeds and no process is lost.  About 2 minutes on 2 cores.
"""

from __future__ import annotations

import pytest

from . import run

pytestmark = pytest.mark.integration


def test_bad_input_is_refused_with_its_code_quick(tmp_path):
    opts = run.parse_args(["--quick", "--out", str(tmp_path / "report"),
                           "--work", str(tmp_path / "work")])
    report = run.run(opts)
    assert set(report["per_rpc"]) == set(run.oracle.RPCS)
    assert all(p["requests"] >= 20 for p in report["per_rpc"].values())
    assert report["totals"]["controls_passed"] > 0 and not report["totals"]["controls_failed"]
    assert report["totals"]["internal"] == 0 and report["totals"]["crashes"] == 0
    problems = report["problems"]
    assert not problems, (f"{len(problems)} problem(s) (report: {tmp_path / 'report' / 'fuzz.md'}):\n"
                          + "\n".join(f"{p['kind']} {p['rpc']}: {p['detail']} | "
                                      f"{p['request'][:300]}" for p in problems[:20]))
    assert not report["verdict"]
