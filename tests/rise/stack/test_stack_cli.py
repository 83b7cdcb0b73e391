"""``python -m rise.stack up --worker-concurrency N``: the worker's processes reach Stack.up,
and a count below one is refused before anything starts."""

from __future__ import annotations

import pytest
from rise.stack import Stack, cli


def test_worker_concurrency_reaches_stack_up(monkeypatch, tmp_path):
    seen = {}

    def fake_up(cls, dir, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Stack, "up", classmethod(fake_up))
    assert cli.main(["up", "--dir", str(tmp_path), "--worker-concurrency", "2"]) == 1
    assert seen["worker_concurrency"] == 2
    assert cli.main(["up", "--dir", str(tmp_path)]) == 1
    assert seen["worker_concurrency"] == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_worker_concurrency_below_one_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="worker concurrency"):
        Stack.up(tmp_path / "stack", worker_concurrency=bad)
    assert not (tmp_path / "stack").exists()  # refused before anything started
