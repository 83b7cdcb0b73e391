"""CountSketch maps drawn from a seed by a counter-based generator.

Each map ``C: R^n -> R^k`` is a bucket hash ``eta: [n] -> [k]`` and a sign hash
``s: [n] -> {-1, +1}``; ``C(x)[b] = sum_{i: eta(i) = b} s(i) x_i``.  Hash values are
SplitMix64 outputs at counter ``i`` of a stream keyed by (seed, map, purpose), so the maps
are identical in every process and on every machine, whatever the order in which they are
built, and never depend on Python's ``hash()``.

The channel sketches of one example are

    phi_RH = sum_t w_t C_r(r_t) (x) C_h(h_t)    (kr x kh)
    phi_GH = sum_t w_t C_g(g_t) (x) C_h(h_t)    (kg x kh)

which by linearity are the CountSketch, under the product hash, of RH = sum_t w_t r_t h_t^T
and GH = sum_t w_t g_t h_t^T, so E<phi(a), phi(b)> = <RH(a), RH(b)>.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Stream ids: one per (map, purpose).  Fixed forever: changing them changes every index.
_STREAMS = {
    ("r", "bucket"): 1,
    ("r", "sign"): 2,
    ("h", "bucket"): 3,
    ("h", "sign"): 4,
    ("g", "bucket"): 5,
    ("g", "sign"): 6,
}


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def hash_stream(seed: int, stream: int, n: int) -> np.ndarray:
    """Values 0..n-1 of the counter-based stream (seed, stream): uint64 array of length n."""
    key = splitmix64(np.array([seed], dtype=np.uint64) ^ splitmix64(np.array([stream], np.uint64)))
    with np.errstate(over="ignore"):
        counters = key + np.arange(n, dtype=np.uint64) * _GOLDEN
    return splitmix64(counters)


@dataclass(frozen=True)
class CountSketchMap:
    """One CountSketch map R^n -> R^k."""

    n: int
    k: int
    bucket: torch.Tensor  # (n,) int64 in [0, k)
    sign: torch.Tensor  # (n,) float64 of +-1

    def matrix(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense (n, k) matrix S with one +-1 per row: C(x) = x @ S.

        For the d-dimensional maps a dense matmul is the fastest form on every device.
        """
        s = torch.zeros(self.n, self.k, dtype=dtype, device=device)
        s[torch.arange(self.n, device=device), self.bucket.to(device)] = self.sign.to(device, dtype)
        return s

    def apply_dense(self, x: torch.Tensor) -> torch.Tensor:
        """C(x) for dense rows x (N, n) -> (N, k)."""
        sign = self.sign.to(x.device, x.dtype)
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        return out.index_add_(1, self.bucket.to(x.device), x * sign)

    def apply_sparse(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        """C(x) for rows given as (indices, values): idx, val (N, m) -> (N, k).

        Duplicate or zero entries are harmless (they add zero or add linearly).
        """
        bucket = self.bucket.to(idx.device)[idx]
        sign = self.sign.to(idx.device, val.dtype)[idx]
        out = torch.zeros(idx.shape[0], self.k, dtype=val.dtype, device=val.device)
        return out.scatter_add_(1, bucket, val * sign)


def make_map(seed: int, name: str, n: int, k: int) -> CountSketchMap:
    """The CountSketch map ``name`` ('r', 'h' or 'g') of width k over R^n."""
    b = hash_stream(seed, _STREAMS[(name, "bucket")], n)
    s = hash_stream(seed, _STREAMS[(name, "sign")], n)
    # Top bits of a 64-bit hash; the modulo bias is k / 2^32, negligible for k <= 2^16.
    bucket = ((b >> np.uint64(32)) % np.uint64(k)).astype(np.int64)
    sign = 1.0 - 2.0 * ((s >> np.uint64(63)) & np.uint64(1)).astype(np.float64)
    return CountSketchMap(n=n, k=k, bucket=torch.from_numpy(bucket), sign=torch.from_numpy(sign))


@dataclass(frozen=True)
class Sketcher:
    """The three maps of one configuration over a model of vocabulary V and width d."""

    cr: CountSketchMap
    ch: CountSketchMap
    cg: CountSketchMap

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.cr.k, self.ch.k, self.cg.k)


@lru_cache(maxsize=8)
def make_sketcher(seed: int, vocab: int, hidden: int, dims: tuple[int, int, int]) -> Sketcher:
    kr, kh, kg = dims
    return Sketcher(
        cr=make_map(seed, "r", vocab, kr),
        ch=make_map(seed, "h", hidden, kh),
        cg=make_map(seed, "g", hidden, kg),
    )


def outer_accumulate(
    a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, example: torch.Tensor, n_examples: int
) -> torch.Tensor:
    """sum_t w_t a_t (x) b_t per example: a (T, ka), b (T, kb), w (T,), example (T,) int64.

    Returns (n_examples, ka * kb).  One matmul: M (n_examples, T) holds w_t where token t
    belongs to the example, and the outer products are flattened per token.
    """
    t = a.shape[0]
    m = torch.zeros(n_examples, t, dtype=a.dtype, device=a.device)
    m[example, torch.arange(t, device=a.device)] = w.to(a.dtype)
    outer = (a[:, :, None] * b[:, None, :]).reshape(t, -1)
    return m @ outer
