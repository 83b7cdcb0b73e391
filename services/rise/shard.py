"""Shard serialisation: safetensors bytes with one JSON metadata entry.

A shard holds, for its examples in record order: ids, ingest generations, record numbers,
supervised token counts, and either unit-normalised sketches with float32 norms and
per-channel sums of the stored unit sketches (mode ``sketch``), or exact per-token factors
with float64 norms (modes ``exact`` and ``nosketch``).  The bytes are a pure function of
the content: no timestamps, one metadata key holding sorted JSON, tensors in fixed order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from rise import constants
from rise.errors import Corrupt
from rise.factors import Features, TokenFactors

_META_KEY = "rise"


def encode_ids(ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    blobs = [s.encode("utf-8") for s in ids]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    if blobs:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs]), 0)
    data = torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)
    return data[: int(offsets[-1])].clone(), offsets


def decode_ids(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw = data.numpy().tobytes()
    off = offsets.tolist()
    return [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


@dataclass
class ShardData:
    """Decoded shard content."""

    meta: dict
    ids: list[str]
    ingest: torch.Tensor  # (n,) int64 ingest generation of each record
    record: torch.Tensor  # (n,) int64 record number within its ingest's dataset
    token_count: torch.Tensor  # (n,) int64
    norms: torch.Tensor  # (n, 2): ||RH||, ||GH||
    rh: torch.Tensor | None = None  # (n, kr*kh) unit sketches, storage dtype
    gh: torch.Tensor | None = None
    rh_sum: torch.Tensor | None = None  # (kr*kh,) float64 sum of stored unit sketches
    gh_sum: torch.Tensor | None = None
    factors: list[TokenFactors] | None = field(default=None, repr=False)
    derived: dict = field(default_factory=dict, repr=False)
    """Values computed once from the stored tensors (e.g. float64 unit rows) and reused
    while the shard stays loaded (the scorer's cache keeps it across requests)."""

    def __len__(self) -> int:
        return len(self.ids)


def unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit norm (zero rows stay zero) and their norms."""
    norms = x.norm(dim=1)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None], norms


def factor_tensors(fs: list[TokenFactors]) -> dict[str, torch.Tensor]:
    """Per-token factors of several examples, concatenated, with token offsets: the layout
    of factor shards and of factor query sets."""
    counts = torch.tensor([f.h.shape[0] for f in fs], dtype=torch.int64)
    off = torch.zeros(len(fs) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(counts, 0)
    t = {"tok_offsets": off}
    t["h"] = torch.cat([f.h for f in fs]).contiguous()
    t["g"] = torch.cat([f.g for f in fs]).contiguous()
    t["w"] = torch.cat([f.weights for f in fs]).contiguous()
    t["r"] = torch.cat([f.r for f in fs]).contiguous()
    if fs and fs[0].idx is not None:
        t["r_idx"] = torch.cat([f.vocab_ids for f in fs]).to(torch.int32).contiguous()
    return t


def build_shard(
    meta: dict,
    ids: list[str],
    ingest: list[int],
    record: list[int],
    feats: Features,
    storage_dtype: str,
    factor_norms: torch.Tensor | None = None,
) -> bytes:
    """Serialise one shard; ``meta`` must be JSON-able and free of timestamps."""
    id_data, id_off = encode_ids(ids)
    t: dict[str, torch.Tensor] = {
        "ids_utf8": id_data,
        "ids_offsets": id_off,
        "ingest": torch.tensor(ingest, dtype=torch.int64),
        "record": torch.tensor(record, dtype=torch.int64),
        "token_count": feats.token_counts.to(torch.int64).contiguous(),
    }
    if feats.rh is not None and feats.gh is not None:
        dt = getattr(torch, storage_dtype)
        urh, nrh = unit_rows(feats.rh)
        ugh, ngh = unit_rows(feats.gh)
        t["rh"] = urh.to(dt).contiguous()
        t["gh"] = ugh.to(dt).contiguous()
        t["norms"] = torch.stack([nrh, ngh], dim=1).to(torch.float32).contiguous()
        t["rh_sum"] = t["rh"].double().sum(0)
        t["gh_sum"] = t["gh"].double().sum(0)
    else:
        if factor_norms is None:
            raise ValueError("factor shards need their exact norms")
        t["norms"] = factor_norms.to(torch.float64).contiguous()
        t.update(factor_tensors(feats.factors or []))
    return serialize(meta, t)


def serialize(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """Shard bytes from its tensors; the count comes from the ids."""
    full_meta = dict(meta, format_version=constants.FORMAT_VERSION,
                     count=int(tensors["ids_offsets"].shape[0] - 1))
    return save(tensors, metadata={_META_KEY: json.dumps(full_meta, sort_keys=True)})


def concat_rows(parts: list[tuple[ShardData, list[int]]]) -> dict[str, torch.Tensor]:
    """Tensors of a new shard made of the given rows of existing shards, bytes unchanged.

    Used by compaction: stored sketches and norms are copied, never recomputed.
    """
    ids = [p.ids[i] for p, rows in parts for i in rows]
    id_data, id_off = encode_ids(ids)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name)[rows] for p, rows in parts]).contiguous()

    t = {"ids_utf8": id_data, "ids_offsets": id_off, "ingest": cat("ingest"),
         "record": cat("record"), "token_count": cat("token_count"), "norms": cat("norms")}
    first = parts[0][0]
    if first.rh is not None:
        t["rh"], t["gh"] = cat("rh"), cat("gh")
        t["rh_sum"] = t["rh"].double().sum(0)
        t["gh_sum"] = t["gh"].double().sum(0)
        return t
    fs = [p.factors[i] for p, rows in parts for i in rows]  # type: ignore[index]
    t.update(factor_tensors(fs))
    return t


def factors_from_tensors(t: dict[str, torch.Tensor]) -> list[TokenFactors]:
    """Inverse of ``factor_tensors`` (views into ``t``; indices widened to int64)."""
    off = t["tok_offsets"].tolist()
    return [
        TokenFactors(h=t["h"][a:b], g=t["g"][a:b], w=t["w"][a:b], r=t["r"][a:b],
                     idx=t["r_idx"][a:b].long() if "r_idx" in t else None)
        for a, b in zip(off[:-1], off[1:], strict=True)
    ]


def read_meta(data: bytes) -> dict:
    """Only the metadata of a shard (cheap: the JSON header)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise Corrupt(f"not a RISE shard: {e}") from None


def parse_shard(data: bytes) -> ShardData:
    """Decode shard bytes; Corrupt on anything malformed."""
    meta = read_meta(data)
    try:
        t = load(data)
        ids = decode_ids(t["ids_utf8"], t["ids_offsets"])
        sd = ShardData(
            meta=meta, ids=ids, ingest=t["ingest"], record=t["record"],
            token_count=t["token_count"], norms=t["norms"],
        )
        if "rh" in t:
            sd.rh, sd.gh, sd.rh_sum, sd.gh_sum = t["rh"], t["gh"], t["rh_sum"], t["gh_sum"]
        else:
            sd.factors = factors_from_tensors(t)
    except (KeyError, ValueError, RuntimeError, UnicodeDecodeError, SafetensorError) as e:
        raise Corrupt(f"malformed shard: {e}") from None
    if len(ids) != meta.get("count"):
        raise Corrupt(f"shard holds {len(ids)} ids but its header says {meta.get('count')}")
    return sd


# safetensors dtype names -> numpy dtypes of the tensors a shard holds
_NP_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "U8": np.uint8}
# Tensors a sketch shard scans; every other tensor is small and copied into memory.
_MAPPED = ("rh", "gh")


def map_shard(path: str | os.PathLike) -> ShardData:
    """A sketch shard file opened in place: ``rh`` and ``gh`` are views of a memory map of
    the file (read from disk as they are scanned, never loaded whole), the small tensors
    (ids, norms, counts, sums) are copied into memory.  The file format is the one
    ``parse_shard`` reads (safetensors: a JSON header of byte offsets, then the tensors,
    8-byte aligned); nothing about it changes.  Factor shards (small validation indexes)
    are read whole.  Corrupt on anything malformed; the caller has verified the sha256.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 < n < (1 << 26) else b""
    try:
        header = json.loads(raw)
        meta = json.loads(header.pop("__metadata__")[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Corrupt(f"not a RISE shard: {e}") from None
    if "rh" not in header:
        with open(path, "rb") as f:
            return parse_shard(f.read())
    size = os.path.getsize(path)
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="c")  # private: views are writable, never written
    t: dict[str, torch.Tensor] = {}
    try:
        for name, info in header.items():
            dt = _NP_DTYPES.get(info["dtype"])
            lo, hi = (base + int(v) for v in info["data_offsets"])
            shape = tuple(int(v) for v in info["shape"])
            if dt is None or not base <= lo <= hi <= size:
                raise ValueError(f"tensor {name}: dtype {info['dtype']} or offsets out of range")
            arr = mm[lo:hi].view(dt).reshape(shape)
            t[name] = torch.from_numpy(arr if name in _MAPPED else np.array(arr))
        ids = decode_ids(t["ids_utf8"], t["ids_offsets"])
        sd = ShardData(meta=meta, ids=ids, ingest=t["ingest"], record=t["record"],
                       token_count=t["token_count"], norms=t["norms"], rh=t["rh"], gh=t["gh"],
                       rh_sum=t["rh_sum"], gh_sum=t["gh_sum"])
    except (KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError) as e:
        raise Corrupt(f"malformed shard: {e}") from None
    if len(ids) != meta.get("count") or t["rh"].shape[0] != len(ids) or \
            t["gh"].shape[0] != len(ids):
        raise Corrupt(f"shard holds {len(ids)} ids but its header says {meta.get('count')}")
    return sd


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
