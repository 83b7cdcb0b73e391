"""Model sources (rise.modelsource): a folder pushed to S3 with its manifest, fetched once
into the cache and verified, shared by processes; a corrupted cached file fetched again, a
corrupted object refused; config.json alone for the planner; mounted paths; hub ids in
offline mode.

S3 is a ``file:///`` endpoint here (the deployment's bucket as a folder: the same code
path above the object calls); tests/rise/test_modelscli.py runs against a real S3 server.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rise import modelsource
from rise.errors import Corrupt, InvalidInput, NotFound, StorageError
from rise.modelsource import (
    MANIFEST,
    S3Models,
    build_manifest,
    local_model,
    model_config,
    parse_source,
)
from rise.settings import Settings

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
URI = "s3://rise/models/tiny/"


def make_folder(root: Path, weights: bytes = b"w" * 300_000) -> Path:
    folder = root / "tiny"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / ".hidden").write_text("not part of the model")
    return folder


@pytest.fixture
def env(tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    settings = Settings(s3_endpoint=f"file://{bucket}", s3_bucket="rise",
                        cache_dir=str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "src")
    S3Models(settings).push(folder, parse_source(URI))
    modelsource._configs.clear()
    return settings, folder, bucket


def test_sources_are_parsed_by_their_form(tmp_path):
    s3 = parse_source("s3://models/llm/pythia-1.4b/")
    assert (s3.kind, s3.bucket, s3.prefix, s3.name) == ("s3", "models", "llm/pythia-1.4b/",
                                                        "pythia-1.4b")
    assert parse_source("s3://models/x").prefix == "x/"
    assert parse_source("/models/pythia-1.4b").kind == "path"
    assert parse_source("file:///models/p").path == "/models/p"
    hub = parse_source("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert (hub.kind, hub.repo, hub.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                  "main")
    assert parse_source("hf://EleutherAI/pythia-14m").repo == "EleutherAI/pythia-14m"
    for bad in ("", "s3://bucket", "s3://bucket/../x/", "http://host/model", "hf://a b"):
        with pytest.raises(InvalidInput):
            parse_source(bad)


def test_push_writes_every_file_and_its_manifest(env):
    settings, folder, bucket = env
    stored = bucket / "models" / "tiny"
    manifest = json.loads((stored / MANIFEST).read_text())
    assert [f["path"] for f in manifest["files"]] == ["config.json", "model.safetensors",
                                                      "sub/tokenizer.json"]
    for f in manifest["files"]:
        data = (folder / f["path"]).read_bytes()
        assert (stored / f["path"]).read_bytes() == data
        assert (f["size"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert not (stored / ".hidden").exists()
    with pytest.raises(InvalidInput, match="no config.json"):
        build_manifest(folder / "sub")


def test_an_s3_model_is_fetched_once_verified_and_reused(env, caplog):
    settings, folder, _ = env
    caplog.set_level("INFO", "rise.modelsource")
    path = Path(local_model(URI, settings))
    assert path.name == "tiny"  # the model's name: what load_model records as its identity
    assert str(path).startswith(settings.cache_dir)
    for p in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        assert (path / p).read_bytes() == (folder / p).read_bytes()
    assert sum("fetched model" in r.message for r in caplog.records) == 1
    assert Path(local_model(URI, settings)) == path
    assert sum("fetched model" in r.message for r in caplog.records) == 1


def test_a_changed_cached_file_is_fetched_again(env, caplog):
    settings, folder, _ = env
    path = Path(local_model(URI, settings))
    (path / "model.safetensors").write_bytes(b"x" * 300_000)  # same size, other bytes
    (path / "sub" / "tokenizer.json").unlink()
    caplog.set_level("WARNING", "rise.modelsource")
    assert Path(local_model(URI, settings)) == path
    assert (path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (path / "sub" / "tokenizer.json").read_text() == "{}"
    fixed = sorted(r.args[1] for r in caplog.records if "fetching it again" in r.message)
    assert fixed == ["model.safetensors", "sub/tokenizer.json"]


def test_an_object_that_differs_from_the_manifest_is_refused(env):
    settings, _, bucket = env
    (bucket / "models" / "tiny" / "model.safetensors").write_bytes(b"evil" * 10)
    with pytest.raises(Corrupt) as e:
        local_model(URI, settings)
    assert str(e.value) == (f"model {URI}: model.safetensors in S3 differs from rise-model.json "
                            "(size or sha256, 2 downloads); push the model again")
    assert str(bucket) not in str(e.value) and settings.cache_dir not in str(e.value)
    assert not list((Path(settings.cache_dir) / "models" / "s3").glob("*/*/tiny"))


def test_a_prefix_without_a_manifest_is_not_a_model(env):
    settings, _, bucket = env
    with pytest.raises(NotFound, match=r"s3://rise/models/none/ has no rise-model.json .*push"):
        local_model("s3://rise/models/none/", settings)
    (bucket / "models" / "tiny" / MANIFEST).write_text('{"format": 1, "files": [{"path": '
                                                       '"../x", "size": 1, "sha256": "' + "0" * 64 + '"}]}')
    with pytest.raises(Corrupt, match="invalid path"):
        local_model(URI, settings)


def test_a_repushed_model_replaces_the_cached_version(env, tmp_path):
    settings, _, _ = env
    first = Path(local_model(URI, settings))
    newer = make_folder(tmp_path / "v2", weights=b"v" * 1000)
    S3Models(settings).push(newer, parse_source(URI))
    second = Path(local_model(URI, settings))
    assert second != first and second.name == "tiny" and not first.exists()
    assert (second / "model.safetensors").read_bytes() == b"v" * 1000


WORKER = textwrap.dedent("""
    import logging, sys, time
    from rise import modelsource
    from rise.settings import Settings

    slow = modelsource.S3Models.download
    def download(self, src, key, dest):  # slow enough that the processes overlap
        time.sleep(0.3)
        slow(self, src, key, dest)
    modelsource.S3Models.download = download
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = Settings(s3_endpoint=sys.argv[1], s3_bucket="rise", cache_dir=sys.argv[2])
    print(modelsource.local_model(sys.argv[3], settings))
""")


def test_worker_processes_share_one_download(env):
    settings, folder, _ = env
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, settings.s3_endpoint,
                               settings.cache_dir, URI], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    logs = "".join(e for _, e in outs)
    assert logs.count("fetched model") == 1  # one process downloaded, three waited and reused
    path = Path(paths.pop())
    assert (path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    leftovers = [p.name for p in path.parents[1].iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_the_planner_gets_config_json_alone_from_s3(env):
    settings, folder, _ = env
    path = model_config(URI, settings)
    assert path.read_bytes() == (folder / "config.json").read_bytes()
    cached = [p.name for p in Path(settings.cache_dir).rglob("*") if p.is_file()]
    assert cached == [path.name]  # no weights, no tokenizer
    assert model_config(URI, settings) == path


def test_mounted_paths_are_used_in_place(tmp_path):
    settings = Settings(cache_dir=str(tmp_path / "cache"))
    folder = make_folder(tmp_path)
    assert local_model(str(folder), settings) == str(folder)
    assert model_config(str(folder), settings) == folder / "config.json"
    assert model_config(str(CONFIGS / "pythia-14m.json"), settings) == CONFIGS / "pythia-14m.json"
    with pytest.raises(NotFound, match="is its volume mounted"):
        local_model("/models/pythia-1.4b", settings)
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    modelsource._configs.clear()
    return tmp_path / "hf" / "hub"


def test_an_offline_hub_id_not_in_the_cache_is_named_not_the_host(offline_hub):
    settings = Settings()
    for fn in (local_model, model_config):
        with pytest.raises(NotFound) as e:
            fn("someorg/no-such-model", settings)
        msg = str(e.value)
        assert "'someorg/no-such-model'" in msg and "HF_HUB_OFFLINE=1" in msg
        assert "huggingface.co" not in msg and "http" not in msg


def test_an_offline_hub_id_in_the_cache_resolves_to_its_snapshot(offline_hub):
    commit = "a" * 40
    repo = offline_hub / "models--someorg--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "config.json").write_text('{"model_type": "gpt_neox"}')
    (snap / "model.safetensors").write_bytes(b"w")
    assert Path(local_model("someorg/tiny", Settings())) == snap
    assert model_config("someorg/tiny", Settings()) == snap / "config.json"


def test_a_cache_that_fails_is_a_storage_error_without_its_path(env, monkeypatch):
    settings, _, _ = env

    def broken(*a, **k):
        raise PermissionError(13, "Permission denied", settings.cache_dir)

    monkeypatch.setattr(modelsource.os, "open", broken)
    with pytest.raises(StorageError) as e:
        local_model(URI, settings)
    assert URI in str(e.value) and settings.cache_dir not in str(e.value)
