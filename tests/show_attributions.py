"""Print attributions next to the texts they point at (used by `make demo`)."""

from __future__ import annotations

import json
import sys


def main(queries: str, attributions: str, corpus: str) -> None:
    texts = {}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts[str(r["id"])] = r["text"]
    with open(queries, encoding="utf-8") as f:
        qs = {str(r["id"]): r for r in map(json.loads, f)}
    with open(attributions, encoding="utf-8") as f:
        for row in map(json.loads, f):
            q = qs[row["query_id"]]
            print(f"\nquery {row['query_id']}: {q['text'][:100]!r}")
            if "source_id" in q:
                print(f"  (taken from {q['source_id']})")
            for hit in row["results"]:
                print(f"  {hit['score']:+.4f}  {hit['id']}  {texts[hit['id']][:80]!r}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
