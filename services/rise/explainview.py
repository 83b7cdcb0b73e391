"""A picture of an explanation: one self-contained HTML file (inline CSS and script, no
network), the query and the hit side by side, every token shaded by its contribution to
the score, and hovering a token shows its partners on the other side.

It reads the JSON form of an explanation (``rise.explain.Explanation.to_dict``, or the
same fields rebuilt from an ``ExplainResponse``), so the local and the remote verbs draw
the same page.  The page's script builds the token spans from the embedded data; each
span carries ``data-shade``, the opacity of its shade (1 for the token of largest
|contribution|), which is what a test reads back from the rendered DOM.  A fragment
``#hover=q:POS`` (or ``x:POS``) shows that token's partners on load.
"""

from __future__ import annotations

import html
import json
from typing import Any

_CSS = """
body{font:14px/1.5 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;
color:#1d1d1f;background:#fff}
h1{font-size:18px;margin:0 0 6px}
.meta{color:#555;margin:0 0 12px}
.meta b{color:#1d1d1f}
table.ch{border-collapse:collapse;margin:0 0 14px;font-size:13px}
table.ch td,table.ch th{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.ch th{background:#f5f5f7}
.sides{display:flex;gap:18px}
.side{flex:1 1 0;min-width:0;border:1px solid #ddd;border-radius:6px;padding:10px}
.side h2{font-size:14px;margin:0 0 8px}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:13px;line-height:1.9}
.tok{border-radius:3px;padding:1px 0;cursor:default}
.tok.unsup{color:#999}
.tok.focus{outline:2px solid #111}
#partners{margin-top:14px;min-height:3em;font-size:13px}
#partners ol{margin:4px 0 0 18px;padding:0}
.legend{font-size:12px;color:#555;margin:8px 0}
.sw{display:inline-block;width:12px;height:12px;vertical-align:middle;border-radius:2px}
"""

_JS = r"""
(function(){
  var d = JSON.parse(document.getElementById('rise-data').textContent);
  var rows = d.pair_rows, cols = d.pair_cols, P = d.pairs;
  var rowOf = {}, colOf = {};
  rows.forEach(function(p, i){ rowOf[p] = i; });
  cols.forEach(function(p, j){ colOf[p] = j; });
  var maxAbs = 0;
  d.query_tokens.concat(d.hit_tokens).forEach(function(t){
    if (t.supervised) maxAbs = Math.max(maxAbs, Math.abs(t.contribution));
  });
  function color(v, scale){
    var a = scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0;
    return {a: a, css: v >= 0 ? 'rgba(230,85,13,' + a.toFixed(4) + ')'
                              : 'rgba(49,130,189,' + a.toFixed(4) + ')'};
  }
  function shade(el, v, scale){
    var c = color(v, scale);
    el.style.backgroundColor = c.css;
    el.setAttribute('data-shade', c.a.toFixed(4));
  }
  function fmt(v){ return (v >= 0 ? '+' : '') + v.toExponential(3); }
  function build(side, tokens){
    var box = document.getElementById(side + '-text');
    tokens.forEach(function(t){
      var s = document.createElement('span');
      s.className = 'tok' + (t.supervised ? '' : ' unsup');
      s.id = side + '-' + t.position;
      s.setAttribute('data-pos', t.position);
      s.setAttribute('data-contribution', t.contribution);
      s.textContent = t.text;
      s.title = t.supervised ? 'contribution ' + fmt(t.contribution) : 'not supervised';
      s.addEventListener('mouseenter', function(){ hover(side, t.position); });
      s.addEventListener('mouseleave', reset);
      box.appendChild(s);
    });
  }
  function baseShades(){
    [['q', d.query_tokens], ['x', d.hit_tokens]].forEach(function(st){
      st[1].forEach(function(t){
        var el = document.getElementById(st[0] + '-' + t.position);
        el.classList.remove('focus');
        shade(el, t.supervised ? t.contribution : 0, maxAbs);
      });
    });
  }
  function reset(){
    baseShades();
    document.getElementById('partners').innerHTML =
      '<i>Hover a token to see its partners on the other side.</i>';
  }
  function hover(side, pos){
    baseShades();
    var me = document.getElementById(side + '-' + pos);
    me.classList.add('focus');
    var list = [];
    if (side === 'q' && pos in rowOf){
      var r = P[rowOf[pos]];
      cols.forEach(function(p, j){ list.push([p, r[j]]); });
    } else if (side === 'x' && pos in colOf){
      var j = colOf[pos];
      rows.forEach(function(p, i){ list.push([p, P[i][j]]); });
    }
    var other = side === 'q' ? 'x' : 'q';
    var otherTokens = side === 'q' ? d.hit_tokens : d.query_tokens;
    var m = 0;
    list.forEach(function(e){ m = Math.max(m, Math.abs(e[1])); });
    var byPos = {};
    list.forEach(function(e){ byPos[e[0]] = e[1]; });
    otherTokens.forEach(function(t){
      shade(document.getElementById(other + '-' + t.position), byPos[t.position] || 0, m);
    });
    list.sort(function(a, b){ return Math.abs(b[1]) - Math.abs(a[1]) || a[0] - b[0]; });
    var box = document.getElementById('partners');
    box.innerHTML = '';
    var head = document.createElement('div');
    head.textContent = (side === 'q' ? 'Query' : 'Hit') + ' token ' + pos + ' ' +
      JSON.stringify(me.textContent) + ': ' + (list.length ? 'top partners' : 'not supervised');
    box.appendChild(head);
    var ol = document.createElement('ol');
    ol.id = 'partner-list';
    list.slice(0, 8).forEach(function(e){
      var li = document.createElement('li');
      var el = document.getElementById(other + '-' + e[0]);
      li.textContent = JSON.stringify(el ? el.textContent : '?') + ' (' + other + ' ' + e[0] +
                       '): ' + fmt(e[1]);
      li.setAttribute('data-partner', e[0]);
      ol.appendChild(li);
    });
    box.appendChild(ol);
  }
  build('q', d.query_tokens);
  build('x', d.hit_tokens);
  reset();
  var m = /hover=([qx]):(\d+)/.exec(location.hash || '');
  if (m) hover(m[1], parseInt(m[2], 10));
  document.body.setAttribute('data-ready', '1');
})();
"""


def _embed(data: dict[str, Any]) -> str:
    """JSON safe inside a <script> element: no "</" or "<!--" can end it early."""
    return (json.dumps(data, ensure_ascii=False, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def render_html(d: dict[str, Any]) -> str:
    """The page of one explanation (``Explanation.to_dict()`` form)."""
    e = html.escape
    sc = d.get("scoring", {})
    rows = "".join(
        f"<tr><td style='text-align:left'>{e(c['channel'].upper())}</td><td>{c['weight']:.3g}</td>"
        f"<td>{c['value']:.5f}</td><td>{c['pairs']:.5f}</td><td>{c['centering']:.5f}</td></tr>"
        for c in d.get("channels", []))
    data = {k: d[k] for k in ("query_tokens", "hit_tokens", "pair_rows", "pair_cols", "pairs")}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>RISE: why {e(str(d['hit_id']))} for {e(str(d['query_id']))}</title>
<style>{_CSS}</style></head>
<body>
<h1>Why hit <code>{e(str(d['hit_id']))}</code> for query <code>{e(str(d['query_id']))}</code></h1>
<p class="meta">score <b>{d['score']:.5f}</b> = token pairs <b>{d['pair_total']:.5f}</b>
+ pool-mean centering <b>{d['centering']:.5f}</b> (not a token pair);
the index's sketched score {d['sketched_score']:.5f}.
{e(str(sc.get('score', 'cosine')))}, channel {e(str(sc.get('channel', 'both')))},
lambda {float(sc.get('lambda', 0.5)):.3g}. The top {len(d.get('top_pairs', []))} pairs carry
{100 * float(d.get('top_pairs_share', 0.0)):.1f}% of the token-pair score
({100 * float(d.get('top_pairs_abs_share', 0.0)):.1f}% of its absolute mass).</p>
<table class="ch"><tr><th>channel</th><th>weight</th><th>value</th><th>pairs</th>
<th>centering</th></tr>{rows}</table>
<div class="legend"><span class="sw" style="background:rgb(230,85,13)"></span> raises the score
&nbsp; <span class="sw" style="background:rgb(49,130,189)"></span> lowers it &nbsp; grey: not
supervised (no gradient)</div>
<div class="sides">
<div class="side"><h2>Query {e(str(d['query_id']))}</h2><div class="text" id="q-text"></div></div>
<div class="side"><h2>Hit {e(str(d['hit_id']))}</h2><div class="text" id="x-text"></div></div>
</div>
<div id="partners"></div>
<script type="application/json" id="rise-data">{_embed(data)}</script>
<script>{_JS}</script>
</body></html>
"""
