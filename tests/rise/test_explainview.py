"""The HTML view of an explanation (rise.explainview) in a real headless Chromium (the
Debian package ``chromium``; ``make test`` installs it): after the page's script ran, the
DOM holds every token of both sides, the token of largest |contribution| carries the
strongest shade, hovering a token lists its partners, and a screenshot is taken."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import TEXTS, write_jsonl
from rise import api
from rise.config import make_config
from rise.data import FieldMap, Record
from rise.explainview import render_html
from rise.model import load_model
from rise.store import LocalStore

pytestmark = pytest.mark.integration


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (make test installs the Debian package)")
    return exe


def run_chromium(tmp_path: Path, url: str, *extra: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Spans(HTMLParser):
    """id -> (attributes, text) of every token span."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: dict[str, tuple[dict[str, str], str]] = {}
        self.partners: list[str] = []
        self.ready = False
        self._cur: str | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body" and a.get("data-ready") == "1":
            self.ready = True
        if tag == "span" and "tok" in a.get("class", "").split():
            self._cur = a["id"]
            self.spans[a["id"]] = (a, "")
        if tag == "li" and "data-partner" in a:
            self.partners.append(a["data-partner"])

    def handle_data(self, data):
        if self._cur is not None:
            attrs, text = self.spans[self._cur]
            self.spans[self._cur] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "span":
            self._cur = None


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("explainview")
    pool = write_jsonl(root / "pool.jsonl", [{"id": f"doc-{i}", "text": t}
                                              for i, t in enumerate(TEXTS)])
    lm = load_model(tiny_model)
    store = LocalStore(root / "idx")
    api.create(store, lm, pool, FieldMap(), make_config())
    query = Record(id="q <&>", number=0, text="Sketches </script> say which examples shaped it.",
                   prompt=None, response=None, raw={})
    d = api.explain(api.open_index(store), lm, query, "doc-2").to_dict()
    path = root / "explain.html"
    path.write_text(render_html(d), encoding="utf-8")
    return path, d


def test_page_is_self_contained(page):
    path, _ = page
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text and "@import" not in text
    # the query's "</script>" did not end the data block early
    assert text.count("</script>") == 2


def test_dom_shows_every_token_and_the_top_token_is_darkest(page, tmp_path):
    path, d = page
    dom = run_chromium(tmp_path, path.as_uri(), "--dump-dom", "--virtual-time-budget=3000")
    p = Spans()
    p.feed(dom)
    assert p.ready, "the page's script did not run"
    want = {f"q-{t['position']}": t for t in d["query_tokens"]}
    want |= {f"x-{t['position']}": t for t in d["hit_tokens"]}
    assert set(p.spans) == set(want)
    for sid, t in want.items():
        assert p.spans[sid][1] == t["text"], sid
    shades = {sid: float(a["data-shade"]) for sid, (a, _) in p.spans.items()}
    sup = [sid for sid, t in want.items() if t["supervised"]]
    top = max(sup, key=lambda s: abs(want[s]["contribution"]))
    assert shades[top] == max(shades.values()) == 1.0
    assert all(shades[s] == 0.0 for s in want if not want[s]["supervised"])
    assert "background-color" in p.spans[top][0]["style"]


def test_hover_shows_partners(page, tmp_path):
    path, d = page
    pos = d["top_query_tokens"][0]
    dom = run_chromium(tmp_path, f"{path.as_uri()}#hover=q:{pos}", "--dump-dom",
                       "--virtual-time-budget=3000")
    p = Spans()
    p.feed(dom)
    row = d["pairs"][d["pair_rows"].index(pos)]
    best = max(range(len(row)), key=lambda j: (abs(row[j]), -j))
    assert p.partners and p.partners[0] == str(d["pair_cols"][best])
    # the hit side is reshaded by this token's pairs: its strongest partner is darkest
    hit_shades = {sid: float(a["data-shade"]) for sid, (a, _) in p.spans.items()
                  if sid.startswith("x-")}
    assert hit_shades[f"x-{d['pair_cols'][best]}"] == 1.0


def test_screenshot(page, tmp_path):
    path, _ = page
    shot = tmp_path / "explain.png"
    run_chromium(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1200,700",
                 "--hide-scrollbars", "--virtual-time-budget=3000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
