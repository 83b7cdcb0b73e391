"""Sketch configurations refused at the door: temperatures whose softmax is not finite
in float32 (or carries nothing), and sketch widths no pool can hold."""

from __future__ import annotations

import math

import pytest
import torch
from rise.config import (
    MAX_SKETCH_DIM,
    MAX_SKETCH_VALUES,
    TEMPERATURE_RANGE,
    SketchConfig,
    make_config,
    parse_dims,
    sketch_config,
)
from rise.errors import InvalidInput


@pytest.mark.parametrize("tau", [1e-300, 1e-40, 0.0, -1.0, 0.049, 100.5, 1e300,
                                 math.inf, math.nan])
def test_temperatures_outside_the_range_are_refused(tau):
    with pytest.raises(InvalidInput, match=r"temperature must be in \[0.05, 100\]"):
        make_config(temperature=tau)


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 2.0, 4.0, 100.0])
def test_temperatures_inside_the_range_are_accepted(tau):
    assert make_config(temperature=tau).temperature == tau


def test_the_range_keeps_the_softmax_finite_in_float32():
    """What the bounds are for: at either end, softmax(z / tau) of float32 logits far
    beyond what models produce is finite; at tau = 1e-300 it was NaN."""
    z = torch.tensor([[1e3, -1e3, 0.0, 999.2]], dtype=torch.float32)
    for tau in TEMPERATURE_RANGE:
        assert torch.isfinite(torch.softmax(z / tau, dim=-1)).all()
    assert torch.isnan(torch.softmax(z / 1e-300, dim=-1)).any()


@pytest.mark.parametrize("dims,words", [
    ((2**32 - 1, 64, 64), f"at most {MAX_SKETCH_DIM}"),
    ((128, 2**17, 1), f"at most {MAX_SKETCH_DIM}"),
    ((1024, 1024, 1024), "values per example"),
    ((0, 64, 64), "positive"),
])
def test_dims_beyond_the_bounds_are_refused(dims, words):
    with pytest.raises(InvalidInput, match=words):
        sketch_config(dims=dims)


def test_dims_at_the_bounds_are_accepted():
    assert SketchConfig(dims=(MAX_SKETCH_DIM, 8, 8)).dims == (MAX_SKETCH_DIM, 8, 8)
    kh = 1024
    kr = MAX_SKETCH_VALUES // kh - 1
    assert (kr + 1) * kh == MAX_SKETCH_VALUES
    assert SketchConfig(dims=(kr, kh, 1)).numbers_per_example == MAX_SKETCH_VALUES


@pytest.mark.parametrize("text", ["1" * 5000 + ",64,64", "128,64", "a,b,c", "0,1,1",
                                  "1234567890,1,1"])
def test_dims_flags_that_are_not_three_small_positive_integers_are_refused(text):
    with pytest.raises(InvalidInput, match="--dims must be three positive integers"):
        parse_dims(text)
