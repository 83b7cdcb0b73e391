"""Paging of ListIndexes and ListJobs in the gateway (rise.gateway.service): page tokens are
cursors (the last key returned), so a listing paged while others write returns every item
present throughout exactly once; a token of another listing is INVALID_ARGUMENT."""

from __future__ import annotations

import base64

import pytest
from rise.errors import InvalidInput
from rise.gateway import service as gs
from rise.v1 import rise_pb2


class Names:
    def __init__(self, names: list[str]) -> None:
        self.items = set(names)

    def names(self, tenant: str) -> list[str]:
        return sorted(self.items)


class Tenant:
    def tenant(self, context) -> str:
        return "a"


def _service(registry: Names, monkeypatch) -> gs.IndexService:
    svc = object.__new__(gs.IndexService)
    svc.registry = registry  # type: ignore[assignment]
    svc.auth = Tenant()  # type: ignore[assignment]
    svc._index = lambda tenant, name: ({"pool": "cpu"}, None)  # type: ignore[method-assign]
    svc._manifest = lambda store: None  # type: ignore[method-assign]
    monkeypatch.setattr(gs.convert, "index_to",
                        lambda name, pool, manifest: rise_pb2.Index(name=name, pool=pool))
    return svc


def _list(svc: gs.IndexService, size: int, token: str) -> rise_pb2.ListIndexesResponse:
    return gs.IndexService.ListIndexes.__wrapped__(  # type: ignore[attr-defined]
        svc, rise_pb2.ListIndexesRequest(page_size=size, page_token=token), None)


def test_index_pages_return_every_index_once_under_concurrent_inserts(monkeypatch):
    first = [f"idx-{i:03d}" for i in range(0, 100, 2)]
    reg = Names(first)
    svc = _service(reg, monkeypatch)
    seen: list[str] = []
    token, page = "", 0
    while True:
        resp = _list(svc, 7, token)
        assert len(resp.indexes) <= 7
        seen += [i.name for i in resp.indexes]
        token = resp.next_page_token
        # between pages, others create indexes on both sides of the cursor and drop one
        # not yet listed
        reg.items |= {f"idx-{page * 13 % 100 + 1:03d}", f"idx-{(page * 29 + 51) % 100:03d}x"}
        page += 1
        if not token:
            break
    assert len(seen) == len(set(seen))  # never twice
    assert set(first) <= set(seen)  # every index present throughout, once
    assert seen == sorted(seen)  # by name


def test_one_page_when_everything_fits_and_default_size(monkeypatch):
    svc = _service(Names(["a", "b"]), monkeypatch)
    resp = _list(svc, 0, "")
    assert [i.name for i in resp.indexes] == ["a", "b"] and resp.next_page_token == ""
    resp = _list(svc, 2, "")
    assert resp.next_page_token == ""  # exactly full: no empty page after it
    assert gs.page_size(0, gs.DEFAULT_PAGE) == 100 and gs.page_size(10**6, 5) == gs.MAX_PAGE


@pytest.mark.parametrize("token", ["garbage!", gs.make_page_token("jobs", "", [1.0, "x"]),
                                   gs.make_page_token("indexes", "other", "x"),
                                   gs.make_page_token("indexes", "", 5)])
def test_a_token_of_another_listing_is_invalid(token, monkeypatch):
    with pytest.raises(InvalidInput, match="page_token"):
        gs.read_page_token(token, "indexes", "")
    assert gs.read_page_token(gs.make_page_token("jobs", "docs", [2.5, "j"]), "jobs",
                              "docs") == [2.5, "j"]
    with pytest.raises(InvalidInput):
        gs.read_page_token(gs.make_page_token("jobs", "docs", [2.5, "j"]), "jobs", "")


def _forged(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"k":' * 5000 + "1" + "}" * 5000],
                         ids=["deep-array", "deep-object"])
def test_a_token_of_deep_json_is_invalid_not_internal(text):
    """The fuzz run (tests/fuzz/) found that a page token of deeply nested JSON raised
    RecursionError out of the decoder: INTERNAL instead of INVALID_ARGUMENT."""
    for kind in ("indexes", "jobs"):
        with pytest.raises(InvalidInput, match="page_token is not a token"):
            gs.read_page_token(_forged(text), kind, "")
