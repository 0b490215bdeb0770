"""storage: URI resolution (pvc://, file://, pkg://) and fsspec I/O against a moto S3 server."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_servers import S3_SLOW_DOWN, FakeServer, free_port
from finetune_trainer import storage
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import DatasetError, load_records, prepare_dataset
from finetune_trainer.errors import TransientError


# -- resolve --------------------------------------------------------------------------------
def test_pvc_resolves_under_the_mount_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_PVC_ROOT", "/data/claims")
    assert storage.resolve("pvc://models/llama/x.json") == "/data/claims/models/llama/x.json"
    assert storage.resolve("pvc://models") == "/data/claims/models"
    monkeypatch.delenv("FINETUNE_PVC_ROOT")
    assert storage.resolve("pvc://outputs/run1") == "/mnt/pvc/outputs/run1"


def test_pvc_rejects_escaping_the_claim() -> None:
    with pytest.raises(storage.StorageError, match=r"'\.\.' is not allowed"):
        storage.resolve("pvc://models/../secrets/key")
    with pytest.raises(storage.StorageError, match="claim name"):
        storage.resolve("pvc:///x")


def test_file_and_bare_paths() -> None:
    assert storage.resolve("file:///tmp/a%20b.jsonl") == "/tmp/a b.jsonl"
    assert storage.resolve("file://localhost/tmp/x") == "/tmp/x"
    assert storage.resolve("data/train.jsonl") == "data/train.jsonl"
    assert storage.resolve("/abs/train.jsonl") == "/abs/train.jsonl"
    with pytest.raises(storage.StorageError, match="must be local"):
        storage.resolve("file://otherhost/x")


@pytest.mark.parametrize(
    "uri", ["s3://bucket/key", "gs://b/k", "hf://datasets/org/name", "https://x.org/d.jsonl"]
)
def test_remote_uris_unchanged(uri: str) -> None:
    assert storage.resolve(uri) == uri
    assert not storage.is_local(uri)


def test_is_local() -> None:
    for uri in ("pvc://a/b", "file:///x", "pkg://json/x", "rel/path", "/abs"):
        assert storage.is_local(uri)


def test_pkg_resolves_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "boobytrapped_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (pkg / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    path = storage.resolve("pkg://boobytrapped_pkg/data/train.jsonl")
    assert Path(path) == pkg / "data" / "train.jsonl"
    assert "boobytrapped_pkg" not in sys.modules
    # and a dataset can be read from it
    raw = load_records(DatasetSpec(source="pkg://boobytrapped_pkg/data/train.jsonl"))
    assert raw.records == [{"text": "hello"}]
    assert "boobytrapped_pkg" not in sys.modules


def test_pkg_missing_package_is_named() -> None:
    with pytest.raises(storage.StorageError, match="'no_such_pkg_xyz' is not installed"):
        storage.resolve("pkg://no_such_pkg_xyz/file.gguf")
    with pytest.raises(storage.StorageError, match=r"'\.\.' is not allowed"):
        storage.resolve("pkg://json/../x")
    with pytest.raises(storage.StorageError, match="not a top-level"):
        storage.resolve("pkg://a.b/x")
    with pytest.raises(storage.StorageError, match="module, not a package"):
        storage.resolve("pkg://socket/x")


def test_pkg_missing_package_is_a_dataset_error() -> None:
    with pytest.raises(DatasetError, match="no_such_pkg_xyz"):
        load_records(DatasetSpec(source="pkg://no_such_pkg_xyz/train.jsonl"))


def test_storage_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert storage.storage_options("s3://b/k") == {"endpoint_url": "http://minio:9000"}
    monkeypatch.setenv("FINETUNE_S3_ENDPOINT_URL", "http://override:9000")
    assert storage.storage_options("s3://b/k") == {"endpoint_url": "http://override:9000"}
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert storage.storage_options("hf://datasets/o/n") == {"token": "hf_abc"}
    assert storage.storage_options("/local") == {}


def test_local_download_and_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload(src, "pvc://outputs/run1/adapter")
    out = tmp_path / "pvc" / "outputs" / "run1" / "adapter"
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert storage.download("pvc://outputs/run1/adapter", tmp_path / "unused") == out
    with pytest.raises(
        storage.StorageError, match=r"pvc://outputs/missing \(resolved to .*\): not found"
    ):
        storage.download("pvc://outputs/missing", tmp_path / "unused")


# -- S3 against moto --------------------------------------------------------------------------
def test_s3_upload_download_roundtrip(s3: str, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "nested" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    storage.upload(src, f"{s3}/models/tiny")
    assert storage.exists(f"{s3}/models/tiny/config.json")
    assert storage.list_files(f"{s3}/models/tiny") == [
        f"{s3}/models/tiny/config.json",
        f"{s3}/models/tiny/nested/weights.bin",
    ]
    got = storage.download(f"{s3}/models/tiny", tmp_path / "dl")
    assert got == tmp_path / "dl"
    assert (got / "config.json").read_text() == '{"a": 1}'
    assert (got / "nested" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    one = storage.download(f"{s3}/models/tiny/config.json", tmp_path / "one")
    assert one == tmp_path / "one" / "config.json" and one.read_text() == '{"a": 1}'
    with storage.open_text(f"{s3}/models/tiny/config.json") as handle:
        assert json.load(handle) == {"a": 1}
    storage.upload(src / "config.json", f"{s3}/single/config.json")
    assert storage.exists(f"{s3}/single/config.json")
    with pytest.raises(storage.StorageError, match=r"here\.bin: not found"):
        storage.download(f"{s3}/nothing/here.bin", tmp_path / "x")


def test_s3_dataset_with_line_numbers(s3: str, tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    local = tmp_path / "train.jsonl"
    rows = [json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"}) for i in range(10)]
    rows[3] = '{"prompt": "broken'  # line 4
    local.write_text("\n".join(rows) + "\n")
    storage.upload(local, f"{s3}/data/train.jsonl")
    uri = f"{s3}/data/train.jsonl"
    raw = load_records(DatasetSpec(source=uri))
    assert len(raw) == 9 and [i.origin.line for i in raw.errors] == [4]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DatasetSpec(source=uri), "causal-lm", tok, seed=0)
    assert f"{uri}:4: invalid JSON" in str(err.value)
    rows[3] = json.dumps({"prompt": "Q3: ", "completion": "answer 3"})
    local.write_text("\n".join(rows) + "\n")
    storage.upload(local, f"{s3}/data/ok.jsonl")
    prepared = prepare_dataset(DatasetSpec(source=f"{s3}/data/ok.jsonl"), "causal-lm", tok, seed=0)
    assert len(prepared.train) == 10 and prepared.format == "completion"


def test_s3_missing_source_is_a_dataset_error(s3: str) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_records(DatasetSpec(source=f"{s3}/nope/train.jsonl"))


# -- S3 failing: the user's problems (exit 65) vs outages (retryable) --------------------------
@pytest.fixture
def s3_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point S3 at an endpoint, with credentials, one attempt per request and no IMDS lookup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return lambda endpoint: monkeypatch.setenv("FINETUNE_S3_ENDPOINT_URL", endpoint)


@pytest.mark.parametrize("status", [500, 503])
def test_s3_server_errors_are_transient(
    status: int, s3_at: Callable[[str], None], tmp_path: Path
) -> None:
    server = FakeServer(status, S3_SLOW_DOWN)
    s3_at(server.url)
    try:
        with pytest.raises(
            TransientError, match=f"s3://b/train.jsonl: the server answered {status}"
        ):
            load_records(DatasetSpec(source="s3://b/train.jsonl"))
        with pytest.raises(TransientError, match="transient"):
            storage.download("s3://b/model", tmp_path / "m")
        (tmp_path / "a.txt").write_text("a")
        with pytest.raises(TransientError, match=r"s3://b/out/a\.txt: "):
            storage.upload(tmp_path / "a.txt", "s3://b/out/a.txt")
    finally:
        server.close()
    assert server.requests >= 3


def test_s3_unreachable_is_transient(s3_at: Callable[[str], None], tmp_path: Path) -> None:
    s3_at(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError, match=r"unreachable \(EndpointConnectionError"):
        load_records(DatasetSpec(source="s3://b/train.jsonl"))
    with pytest.raises(TransientError):
        storage.exists("s3://b/train.jsonl")


def test_s3_without_credentials_is_an_input_error(
    s3_at: Callable[[str], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = FakeServer(200)  # never asked: signing the request fails first
    s3_at(server.url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    try:
        with pytest.raises(DatasetError) as err:
            load_records(DatasetSpec(source="s3://b/train.jsonl"))
        with pytest.raises(storage.StorageError, match="no credentials"):
            storage.download("s3://b/model", tmp_path / "m")
    finally:
        server.close()
    assert "s3://b/train.jsonl: no credentials: set AWS_ACCESS_KEY_ID" in str(err.value)
    assert "spec.secrets.storage" in str(err.value)
    assert server.requests == 0


def test_s3_missing_bucket_is_an_input_error(s3: str, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-x1/a\.txt: "):
        storage.upload(tmp_path / "a.txt", "s3://no-such-bucket-x1/a.txt")
