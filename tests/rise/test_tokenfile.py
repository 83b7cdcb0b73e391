"""Bearer tokens from a file: hashed keys, revocation without a restart, a bad file
keeping the last good map, and no caller-facing message naming the file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from rise.errors import InvalidInput
from rise.tokenfile import TokenFile, parse_tokens, token_digest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, data: object) -> None:
    """Replace the file as an operator or the kubelet does: a new inode, renamed over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def sha(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_plain_and_hashed_keys_map_to_their_tenants(tmp_path):
    f = tmp_path / "tokens.json"
    write(f, {"plain-token": "a", sha("hashed-token"): "b", sha("UPPER").upper()
              .replace("SHA256:", "sha256:"): "c"})
    tokens = TokenFile(str(f))
    assert tokens.tenant("plain-token") == "a"
    assert tokens.tenant("hashed-token") == "b"
    assert tokens.tenant("UPPER") == "c"
    # a hash is not a token: presenting the stored digest itself gets nothing
    assert tokens.tenant(sha("hashed-token")) is None
    assert tokens.tenant("") is None and tokens.tenant("plain-token ") is None
    assert len(tokens) == 3


def test_lookup_is_by_digest_only():
    """What is kept is the SHA-256 of each token, never the token: the lookup compares
    digests of what the caller sent (see the module docstring for why that is safe)."""
    parsed = parse_tokens(json.dumps({"secret-token": "a"}))
    assert parsed == {token_digest("secret-token"): "a"}
    assert all(len(k) == 32 for k in parsed)


@pytest.mark.parametrize("text,words", [
    ("[]", "JSON object"),
    ("{", "not valid JSON"),
    ('{"t": 1}', "tenant must be"),
    ('{"t": ""}', "tenant must be"),
    ('{"t": "../b"}', "tenant must be"),
    ('{"t": "a/b"}', "tenant must be"),
    ('{"t": "a\\n"}', "tenant must be"),
    ('{"": "a"}', "token is empty"),
    ('{"sha256:abc": "a"}', "64 hex digits"),
    ('{"sha256:' + "0" * 64 + '\\n": "a"}', "64 hex digits"),
])
def test_malformed_files_are_refused_without_echoing_tokens(text, words):
    with pytest.raises(InvalidInput, match=words) as e:
        parse_tokens(text)
    assert "sha256:abc" not in str(e.value)


def test_a_token_for_two_tenants_is_refused():
    with pytest.raises(InvalidInput, match="maps to tenants"):
        parse_tokens(json.dumps({"tok": "a", sha("tok"): "b"}))


def test_a_removed_token_stops_working_within_the_check_interval(tmp_path):
    f = tmp_path / "tokens.json"
    write(f, {"tok-a": "a", "tok-b": "b"})
    clock = Clock()
    tokens = TokenFile(str(f), clock=clock)
    assert tokens.tenant("tok-b") == "b"
    write(f, {"tok-a": "a"})
    clock.now += 0.5  # within the interval: not even a stat
    assert tokens.tenant("tok-b") == "b"
    clock.now += 0.6  # past it: the changed inode is seen
    assert tokens.tenant("tok-b") is None
    assert tokens.tenant("tok-a") == "a"


def test_an_in_place_edit_of_the_same_size_is_seen(tmp_path):
    """An edit that keeps the inode and the size, within the mtime's granularity, is still
    read again while the file is young (the racy-file rule)."""
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"tok-1": "a"}))
    st = os.stat(f)
    clock = Clock()
    tokens = TokenFile(str(f), clock=clock)
    f.write_text(json.dumps({"tok-2": "a"}))  # same size, same inode
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    clock.now += 1.1
    assert tokens.tenant("tok-1") is None and tokens.tenant("tok-2") == "a"


def test_real_time_revocation_takes_about_a_second(tmp_path):
    import time

    f = tmp_path / "tokens.json"
    write(f, {"tok": "a"})
    tokens = TokenFile(str(f))
    assert tokens.tenant("tok") == "a"
    write(f, {})
    start = time.monotonic()
    while tokens.tenant("tok") is not None:
        assert time.monotonic() - start < 5, "a removed token still works after 5 s"
        time.sleep(0.05)


@pytest.mark.parametrize("breakage", ["garbage", "delete", "unreadable"])
def test_a_bad_file_after_a_good_load_keeps_the_last_good_map(tmp_path, caplog, breakage):
    f = tmp_path / "tokens.json"
    write(f, {"tok-a": "a"})
    clock = Clock()
    seen: list[bool] = []
    tokens = TokenFile(str(f), clock=clock, on_stale=seen.append)
    assert seen == [False]
    if breakage == "garbage":
        write(f, '{"tok-a": "a", ')  # a half-written edit
    elif breakage == "delete":
        f.unlink()
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        f.chmod(0)
    caplog.set_level(logging.ERROR, logger="rise.auth")
    for _ in range(3):  # logged once, not at every check
        clock.now += 1.1
        assert tokens.tenant("tok-a") == "a"
        assert tokens.tenant("tok-x") is None
    assert tokens.stale and seen[-1] is True
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(f) in errors[0].getMessage()
    # a good file again: loaded, no longer stale
    if breakage == "unreadable":
        f.chmod(0o600)
    write(f, {"tok-b": "b"})
    clock.now += 1.1
    assert tokens.tenant("tok-b") == "b" and tokens.tenant("tok-a") is None
    assert not tokens.stale and seen[-1] is False


def test_writing_an_empty_map_revokes_everything(tmp_path):
    f = tmp_path / "tokens.json"
    write(f, {"tok-a": "a"})
    clock = Clock()
    tokens = TokenFile(str(f), clock=clock)
    write(f, {})
    clock.now += 1.1
    assert tokens.tenant("tok-a") is None and not tokens.stale


@pytest.mark.parametrize("content", [None, "not json", '{"t": "bad/tenant"}'])
def test_an_unloadable_file_at_start_is_fatal(tmp_path, content):
    f = tmp_path / "tokens.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(InvalidInput) as e:
        TokenFile(str(f))
    assert str(f) in str(e.value)  # for the start-up log line, never for a caller


def test_no_file_means_no_tokens():
    tokens = TokenFile("")
    assert tokens.tenant("anything") is None and len(tokens) == 0 and not tokens.stale
