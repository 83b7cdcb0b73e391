"""Typed sketch configuration.

The configuration is part of an index's identity: a query is scored only against an
index built with the same configuration and the same model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from rise import constants
from rise.errors import InvalidInput, validation_message

Mode = Literal["sketch", "exact", "nosketch"]

TEMPERATURE_RANGE = (0.05, 100.0)
"""Allowed softmax temperatures tau.  z / tau must stay finite in float32 (the head math)
for any logits a model produces: tau = 1e-300 makes it inf and the softmax NaN.  Below
0.05 nothing is gained anyway: softmax(z / 0.05) already puts all float32 mass on the top
logit once it leads by 0.8 (e^-16 is float32's epsilon), and |z| <= 1e3 stays below 2e4
after the division, far from overflow.  Above 100, logits spread over ~20 leave
softmax(z / tau) within e^0.2 of uniform: the residual no longer says what the model
predicted.  Both ends are refused (InvalidInput), never silently clamped."""
MAX_SKETCH_DIM = 2**16
"""Largest CountSketch width kr, kh or kg: the bucket hash takes 32 bits modulo k, whose
bias k / 2^32 stays negligible up to here (``rise.sketch.make_map``)."""
MAX_SKETCH_VALUES = 2**20
"""Largest (kr + kg) * kh, the values one example stores (2 MiB in float16, 85x the
default): a bound on every pool's memory before the planner's (``rise.placement``), which
counts the sketch work on a GPU pool's head device at submit time."""


class SketchConfig(BaseModel):
    """How each example is read out and compressed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "sketch"
    """``sketch`` (CountSketch, the product), ``exact`` (K = V, tau = 1, per-token
    factors, no sketch: ground truth) or ``nosketch`` (keeps K and tau, no sketch: the
    ceiling of the sketch itself)."""
    topk: int | None = constants.DEFAULT_TOPK
    """Residual entries kept per position: TopK(p, K) U {y}.  None keeps all V."""
    temperature: float = constants.DEFAULT_TEMPERATURE
    """Softmax temperature tau."""
    dims: tuple[int, int, int] = constants.DEFAULT_DIMS
    """CountSketch widths (kr, kh, kg) for the residual, hidden and projected error."""
    seed: int = constants.DEFAULT_SEED
    """Seed of the three CountSketch maps; same seed, same maps on every machine."""
    weighting: Literal["mean", "sum"] = "mean"
    """Token weight w_t: 1/|S(x)| (mean, the Hugging Face loss) or 1 (sum)."""
    max_length: int = constants.DEFAULT_MAX_LENGTH
    """Tokens per record after truncation."""
    storage_dtype: Literal["float16", "float32"] = "float16"
    """Dtype of stored unit sketches (norms are always float32)."""

    @model_validator(mode="before")
    @classmethod
    def _mode_temperature(cls, data: object) -> object:
        """An unspecified temperature is the product default, except in exact mode, which
        fixes tau = 1 (so ``SketchConfig(mode="exact")`` is valid on its own)."""
        if isinstance(data, dict) and "temperature" not in data and data.get("mode") == "exact":
            return {**data, "temperature": 1.0}
        return data

    @field_validator("topk")
    @classmethod
    def _topk(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("topk must be >= 1 or 'all'")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        lo, hi = TEMPERATURE_RANGE
        if not lo <= v <= hi:  # NaN and inf fail too
            raise ValueError(f"temperature must be in [{lo:g}, {hi:g}], got {v!r}")
        return v

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(k < 1 for k in v):
            raise ValueError("dims must be positive")
        if any(k > MAX_SKETCH_DIM for k in v):
            raise ValueError(f"dims must be at most {MAX_SKETCH_DIM} each, got {v}")
        kr, kh, kg = v
        if (kr + kg) * kh > MAX_SKETCH_VALUES:
            raise ValueError(f"dims {v} store (kr + kg) * kh = {(kr + kg) * kh:,} values per "
                             f"example; the limit is {MAX_SKETCH_VALUES:,}")
        return v

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 2:
            raise ValueError("max_length must be >= 2")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**63:
            raise ValueError("seed must be in [0, 2^63)")
        return v

    @model_validator(mode="after")
    def _exact(self) -> SketchConfig:
        if self.mode == "exact" and (self.topk is not None or self.temperature != 1.0):
            raise ValueError("exact mode means K = V and tau = 1")
        return self

    @property
    def sketched(self) -> bool:
        return self.mode == "sketch"

    @property
    def numbers_per_example(self) -> int:
        kr, kh, kg = self.dims
        return kr * kh + kg * kh

    def channel_dim(self, channel: str) -> int:
        kr, kh, kg = self.dims
        return kr * kh if channel == "rh" else kg * kh

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())

    def sha256(self) -> str:
        return hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()


def sketch_config(**fields: object) -> SketchConfig:
    """``SketchConfig(**fields)``, or InvalidInput with pydantic's messages on one line:
    how every adapter (CLI flags, gRPC messages, job requests) builds a config."""
    try:
        return SketchConfig.model_validate(fields)
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise InvalidInput(f"invalid sketch configuration: {validation_message(e)}") from None


def make_config(
    *,
    exact: bool = False,
    no_sketch: bool = False,
    topk: int | None | str = None,
    temperature: float | None = None,
    dims: tuple[int, int, int] | None = None,
    seed: int | None = None,
    weighting: str = "mean",
    max_length: int = constants.DEFAULT_MAX_LENGTH,
) -> SketchConfig:
    """Resolve CLI/API flags into a config; ``None`` means "not given" (use the default).

    Combining ``exact`` with topk, temperature or dims is an error: exact mode fixes them.
    """
    if exact and no_sketch:
        raise InvalidInput("--exact and --no-sketch are exclusive")
    if exact:
        given = [
            n
            for n, v in (("--topk", topk), ("--temperature", temperature), ("--dims", dims))
            if v is not None
        ]
        if given:
            raise InvalidInput(f"--exact fixes K = V, tau = 1 and no sketch; drop {', '.join(given)}")
    if no_sketch and dims is not None:
        raise InvalidInput("--no-sketch stores no sketch; drop --dims")
    topk_given = topk is not None
    if isinstance(topk, str):
        if topk == "all":
            topk = None
        else:
            try:
                topk = int(topk)
            except ValueError:
                raise InvalidInput(
                    f"--topk must be a positive integer or 'all', got {topk!r}"
                ) from None
    kwargs: dict = {"weighting": weighting, "max_length": max_length}
    if exact:
        kwargs.update(mode="exact", topk=None, temperature=1.0)
    else:
        kwargs["mode"] = "nosketch" if no_sketch else "sketch"
        if topk_given:
            kwargs["topk"] = topk
        if temperature is not None:
            kwargs["temperature"] = temperature
        if dims is not None:
            kwargs["dims"] = tuple(dims)
    if seed is not None:
        kwargs["seed"] = seed
    return sketch_config(**kwargs)


def parse_dims(text: str) -> tuple[int, int, int]:
    """Parse ``KR,KH,KG``."""
    parts = text.split(",")
    # At most 9 digits each: int() of thousands of digits raises ValueError, and any
    # width past MAX_SKETCH_DIM is refused by SketchConfig with the limit named.
    if len(parts) != 3 or not all(p.strip().isdigit() and len(p.strip()) <= 9 and int(p) > 0
                                  for p in parts):
        raise InvalidInput(f"--dims must be three positive integers KR,KH,KG, got {text!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def check_collapse(threshold: float) -> float:
    """InvalidInput unless ``threshold`` is a collapse threshold: a cosine in (0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) \
            or not 0.0 < threshold <= 1.0:
        raise InvalidInput(f"collapse threshold must be a cosine in (0, 1], got {threshold}")
    return float(threshold)
