"""Id uniqueness over any number of records, in bounded memory.

``IdChecker`` takes each id as a fixed-size digest (8 bytes of BLAKE2b) with its record
number, never the id itself.  Digests go to a small in-memory chunk; a full chunk is
spilled to temporary files, one per partition of the digest space (its top bits), so at
the end each partition is loaded alone, sorted and scanned for equal neighbours: memory
is one chunk while adding and one partition (1/64 of the digests) while checking, never a
Python set of every id.  Equal digests are *candidates*: the caller confirms them against
the ids themselves (one more pass over only those records), so a digest collision can
never refuse good data.

Ids of an index (for an append) enter with a negative number (``EXISTING``,
``TOMBSTONED``), ahead of the new records, so a clash with them is found the same way.
Numpy only: the gateway and the planner import this without torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

EXISTING = -1
"""Record number given to a live id of the index appended to."""
TOMBSTONED = -2
"""Record number given to a deleted (not yet compacted) id of the index."""

CHUNK = 1 << 16
"""Digests held in memory before they are spilled to the partition files."""
PARTITION_BITS = 6
"""64 partitions by the digest's top bits."""
_ROW = np.dtype([("d", "<u8"), ("n", "<i8")])


def digest(ident: str) -> int:
    """The 64-bit digest of an id (of its UTF-8 bytes; stable across processes)."""
    raw = ident.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


@dataclass(frozen=True, order=True)
class Candidate:
    """Two records whose ids have equal digests: ``later`` (a record number of the new
    data) and ``earlier`` (an earlier record number, or EXISTING / TOMBSTONED)."""

    later: int
    earlier: int


class IdChecker:
    """Collect (id digest, record number) pairs; ``candidates()`` lists the repeats."""

    def __init__(self, *, chunk: int = CHUNK, partition_bits: int = PARTITION_BITS,
                 tmpdir: str | None = None) -> None:
        if chunk < 1 or not 0 <= partition_bits <= 12:
            raise ValueError("chunk >= 1 and 0 <= partition_bits <= 12")
        self.chunk = chunk
        self.bits = partition_bits
        self._buf = np.empty(chunk, dtype=_ROW)
        self._used = 0
        self._spilled = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._tmpdir = tmpdir
        self.count = 0

    def __enter__(self) -> IdChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @property
    def spilled(self) -> int:
        """Digests written to the partition files so far (the rest are in memory)."""
        return self._spilled

    def add(self, ident: str, number: int) -> None:
        self._buf[self._used] = (digest(ident), number)
        self._used += 1
        self.count += 1
        if self._used == self.chunk:
            self._spill()

    def _path(self, part: int) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="rise-ids-", dir=self._tmpdir)
        return os.path.join(self._dir.name, f"{part:04d}.bin")

    def _spill(self) -> None:
        rows = self._buf[: self._used]
        parts = rows["d"] >> np.uint64(64 - self.bits) if self.bits else \
            np.zeros(len(rows), dtype=np.uint64)
        for part in np.unique(parts):
            with open(self._path(int(part)), "ab") as f:
                rows[parts == part].tofile(f)
        self._spilled += self._used
        self._used = 0

    def candidates(self, limit: int = 16) -> list[Candidate]:
        """The (at most ``limit``) repeats with the smallest later record numbers.  Within
        a partition rows are in the order they were added, so a stable sort by digest
        keeps the earliest record of a group first."""
        if self._used:
            self._spill()
        if self._dir is None:
            return []
        found: list[Candidate] = []
        for name in sorted(os.listdir(self._dir.name)):
            rows = np.fromfile(os.path.join(self._dir.name, name), dtype=_ROW)
            rows = rows[np.argsort(rows["d"], kind="stable")]
            same = np.flatnonzero(rows["d"][1:] == rows["d"][:-1]) + 1
            if not len(same):
                continue
            # the first row of each run of equal digests is the earlier record of all of it
            starts = np.flatnonzero(np.r_[True, rows["d"][1:] != rows["d"][:-1]])
            first = starts[np.searchsorted(starts, same, side="right") - 1]
            for later, earlier in zip(rows["n"][same].tolist(), rows["n"][first].tolist(),
                                      strict=True):
                if later >= 0:  # two ids of the index itself never clash
                    found.append(Candidate(later, earlier))
            found = sorted(found)[:limit]
        return found
