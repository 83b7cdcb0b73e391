"""Index names: the whole name must match (a trailing newline is not a name)."""

from __future__ import annotations

import pytest
from rise.errors import InvalidInput
from rise.jobs import check_name


@pytest.mark.parametrize("name", ["docs\n", "docs\r\n", "\ndocs", "docs/x", "Docs", "",
                                  "-docs", "a" * 64, "docs\x00", "d\u00e9"])
def test_names_are_matched_in_full(name):
    with pytest.raises(InvalidInput, match="index name"):
        check_name(name)


@pytest.mark.parametrize("name", ["docs", "a", "a" * 63, "docs-2.v1_x"])
def test_good_names_pass(name):
    assert check_name(name) == name


def test_a_huge_name_is_not_echoed_whole():
    with pytest.raises(InvalidInput) as e:
        check_name("x" * 100_000 + "/")
    assert len(str(e.value)) < 300
