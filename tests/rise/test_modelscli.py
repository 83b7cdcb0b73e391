"""``rise models push|verify|ls`` against a real S3 server, and the pushed model loading
from S3 the way a worker pool loads it (rise.modelsource.local_model)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from conftest import save_tiny_model
from minio import Minio
from rise import cli
from rise.model import load_model
from rise.modelsource import local_model
from rise.settings import Settings
from servers import s3_server  # noqa: F401

pytestmark = pytest.mark.integration

BUCKET = "rise-models"


@pytest.fixture
def s3(s3_server, monkeypatch):
    monkeypatch.setenv("RISE_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("RISE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("RISE_S3_SECRET_KEY", s3_server.secret_key)
    client = Minio(s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key, secure=False)
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)
    return client


def rise(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_ls_verify_and_load_from_s3(s3, capsys, tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny-llama")
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/tiny-llama/"
    code, out, err = rise(capsys, "models", "push", str(model), uri, "--json")
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["uri"] == uri and pushed["files"] >= 4
    parent = uri.removesuffix("tiny-llama/")
    code, out, _ = rise(capsys, "models", "ls", parent)
    assert code == 0 and out.startswith(f"{uri}  {pushed['files']} files")
    code, out, _ = rise(capsys, "models", "verify", uri, "--deep")
    assert code == 0 and "match rise-model.json (sizes and sha256)" in out

    settings = Settings(cache_dir=str(tmp_path / "cache"))
    lm = load_model(local_model(uri, settings))
    want = load_model(str(model))
    assert lm.identity == want.identity  # same name, config, head and tokenizer
    capsys.readouterr()  # the loads' progress bars

    # An object changed behind the manifest's back: verify says which, exit 7 (Corrupt).
    prefix = uri.removeprefix(f"s3://{BUCKET}/")
    s3.put_object(BUCKET, prefix + "config.json", io.BytesIO(b"{}"), 2)
    code, out, err = rise(capsys, "models", "verify", uri)
    assert (code, out) == (7, "")
    assert err == f"rise: error: model {uri}: config.json has 2 bytes, the manifest says " \
                  f"{(model / 'config.json').stat().st_size}\n"


@pytest.mark.parametrize("argv,code,words", [
    (["models", "push", "/no/such/folder", f"s3://{BUCKET}/m/"], 3, "does not exist"),
    (["models", "push", ".", "/local/path"], 2, "models live under s3://bucket/prefix/"),
    (["models", "verify", f"s3://{BUCKET}/never-pushed/"], 3, "has no rise-model.json"),
    (["models", "push", "."], 2, "the following arguments are required: uri"),
])
def test_errors_are_one_line_with_an_exit_code(s3, capsys, argv, code, words):
    if code == 2 and "required" in words:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        got = e.value.code
        err = capsys.readouterr().err
    else:
        got, _, err = rise(capsys, *argv)
    assert got == code and words in err and err.count("\n") == 1, err
    assert err.startswith("rise: error: ")
