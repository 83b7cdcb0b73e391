"""Id uniqueness in bounded memory (rise.idcheck): digests spilled to partition files,
repeats found across chunks, confirmed on the ids themselves by the planner."""

from __future__ import annotations

import pytest
from conftest import TEXTS, write_jsonl
from rise import ingest
from rise.config import make_config
from rise.errors import InvalidInput
from rise.idcheck import EXISTING, Candidate, IdChecker, digest
from rise.model import load_model
from rise.store import LocalStore


def test_digest_is_stable_and_fixed_size():
    assert digest("a") == digest("a") != digest("b")
    assert 0 <= digest("x" * 256) < 2**64


def test_repeats_across_chunks_are_found_with_their_record_numbers():
    with IdChecker(chunk=8, partition_bits=2) as c:
        for n in range(1000):
            c.add(f"id-{n}", n)
        c.add("id-3", 1000)
        c.add("id-999", 1001)
        c.add("id-3", 1002)
        assert c.spilled >= 992  # nearly everything left memory before the check
        assert c.candidates() == [Candidate(1000, 3), Candidate(1001, 999),
                                  Candidate(1002, 3)]


def test_no_repeats_no_candidates_and_existing_ids_clash():
    with IdChecker(chunk=4) as c:
        c.add("old", EXISTING)
        for n in range(20):
            c.add(f"new-{n}", n)
        c.add("old", 20)
        assert c.candidates() == [Candidate(20, EXISTING)]
    with IdChecker(chunk=4) as c:
        for n in range(20):
            c.add(f"new-{n}", n)
        assert c.candidates() == []


def test_candidates_are_limited_to_the_first():
    with IdChecker(chunk=3, partition_bits=1) as c:
        for n in range(50):
            c.add("same", n)
        assert [x.later for x in c.candidates(limit=4)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, dtype="float32")


def test_plan_finds_duplicates_in_a_stream_larger_than_the_chunk(tmp_path, lm):
    """The planner never holds every id: with a chunk of 4 ids, a repeat 40 records apart
    is still found and named with both lines and record numbers."""
    rows = [{"id": f"r{i}", "text": TEXTS[i % len(TEXTS)]} for i in range(50)]
    rows[43]["id"] = "r2"
    rows[47]["id"] = "r5"
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidInput) as e:
        ingest.plan(LocalStore(tmp_path / "idx"), lm, data, config=make_config(),
                    shard_size=8, id_chunk=4)
    msg = str(e.value)
    assert msg.startswith(f"duplicate id 'r2' in {data}: line 3 (record 2) and line 44 "
                          "(record 43)")
    assert "'r5'" in msg  # the next repeat is named too
    assert LocalStore(tmp_path / "idx").list() == []
