"""URI parsing, TensorStore kvstore specs, and SeaweedFS as a real S3 server."""

from __future__ import annotations

import ipaddress
import tempfile
from pathlib import Path

import pytest

from warmstart._process import listening_addresses, pid_running
from warmstart.objectstore import (
    InvalidURI,
    ObjectURI,
    SeaweedFS,
    SeaweedFSConfig,
    kvstore_spec,
    parse_uri,
)

# --- parse_uri -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://models", ObjectURI("s3", "models", "")),
        ("s3://models/llama/v1/", ObjectURI("s3", "models", "llama/v1/")),
        ("s3://my.bucket-1/a", ObjectURI("s3", "my.bucket-1", "a")),
        ("gs://my_bucket/ckpt", ObjectURI("gs", "my_bucket", "ckpt")),
        ("http://127.0.0.1:8080/ckpt", ObjectURI("http", "127.0.0.1:8080", "/ckpt")),
        ("https://example.com/a/b", ObjectURI("https", "example.com", "/a/b")),
        ("file:///data/ckpt", ObjectURI("file", "", "/data/ckpt")),
    ],
)
def test_parse_uri_splits_valid_uris(uri: str, expected: ObjectURI) -> None:
    assert parse_uri(uri) == expected
    assert parse_uri(expected.uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "models/llama",
        "ftp://host/x",
        "s3://",
        "s3://ab",
        "s3://Models/x",
        "s3://my_bucket/x",
        "s3://-models/x",
        "s3://a..b/x",
        "s3://192.168.1.1/x",
        "s3://models/../etc",
        "s3://models/a/../../b",
        "s3://models/a//b",
        "s3://models/./a",
        "s3://models/a\x00b",
        "s3://models/a\nb",
        "s3://models/a\\b",
        "s3://models/a?x=1",
        "gs://b/x#frag",
        "http://user:pw@host/x",
        "http:///x",
        "http://host:99999/x",
        "file://remote/x",
        "file:///data/../etc/passwd",
    ],
)
def test_parse_uri_raises_for_invalid_uris(uri: str) -> None:
    with pytest.raises(InvalidURI):
        parse_uri(uri)


# --- kvstore_spec --------------------------------------------------------------------------------------


def test_kvstore_spec_prefers_argument_then_warmstart_then_aws_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    monkeypatch.setenv("WARMSTART_S3_ENDPOINT", "http://ws-env:2")
    assert kvstore_spec("s3://models/x", endpoint="http://arg:3")["endpoint"] == "http://arg:3"
    assert kvstore_spec("s3://models/x")["endpoint"] == "http://ws-env:2"
    monkeypatch.delenv("WARMSTART_S3_ENDPOINT")
    assert kvstore_spec("s3://models/x") == {
        "driver": "s3",
        "bucket": "models",
        "path": "x/",
        "endpoint": "http://aws-env:1",
        "aws_region": "us-east-1",
        "aws_credentials": {"type": "anonymous"},
    }
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "endpoint" not in kvstore_spec("s3://models/x")
    assert kvstore_spec("s3://models/x")["aws_credentials"] == {"type": "default"}


def test_kvstore_spec_uses_environment_credentials_when_keys_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    spec = kvstore_spec("s3://models", endpoint="http://127.0.0.1:1", request_concurrency=8)
    assert spec["aws_credentials"] == {"type": "environment"}
    assert spec["s3_request_concurrency"] == {"limit": 8}
    assert spec["path"] == ""


def test_kvstore_spec_maps_other_schemes() -> None:
    assert kvstore_spec("file:///data/ck") == {"driver": "file", "path": "/data/ck/"}
    assert kvstore_spec("gs://bkt/ck") == {"driver": "gcs", "bucket": "bkt", "path": "ck/"}
    assert kvstore_spec("http://h:8/ck") == {"driver": "http", "base_url": "http://h:8", "path": "/ck/"}


@pytest.mark.parametrize("endpoint", ["ftp://h:1", "http://h:1/path", "127.0.0.1:8333"])
def test_kvstore_spec_raises_for_invalid_endpoint(endpoint: str) -> None:
    with pytest.raises(InvalidURI):
        kvstore_spec("s3://models/x", endpoint=endpoint)


def test_kvstore_spec_file_round_trip_through_tensorstore(tmp_path: Path) -> None:
    import tensorstore as ts

    kv = ts.KvStore.open(kvstore_spec(f"file://{tmp_path}/ck")).result()
    kv.write("a.bin", b"0123456789").result()
    assert kv.read("a.bin", byte_range=slice(3, 6)).result().value == b"345"
    assert (tmp_path / "ck" / "a.bin").read_bytes() == b"0123456789"


# --- SeaweedFS -----------------------------------------------------------------------------------------


@pytest.mark.s3
def test_seaweedfs_listens_on_loopback_only_with_bucket_models(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.pid is not None
    addresses = listening_addresses(seaweedfs.pid)
    assert (seaweedfs.config.bind_address, seaweedfs.config.s3_port) in addresses
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in addresses), addresses
    assert seaweedfs.bucket_exists("models")
    assert not seaweedfs.bucket_exists("absent")


@pytest.mark.s3
def test_tensorstore_write_ranged_read_list_delete_round_trip(seaweedfs: SeaweedFS) -> None:
    import tensorstore as ts

    kv = ts.KvStore.open(kvstore_spec("s3://models/roundtrip")).result()  # endpoint from the fixture's env
    payload = bytes(range(256)) * 64
    kv.write("data-00000.bin", payload).result()
    kv.write("index.json", b"{}").result()

    assert kv.read("data-00000.bin", byte_range=slice(1000, 1100)).result().value == payload[1000:1100]
    assert kv.read("data-00000.bin").result().value == payload
    assert sorted(kv.list().result()) == [b"data-00000.bin", b"index.json"]

    kv.delete_range(ts.KvStore.KeyRange("index.json", "index.json\x00")).result()
    assert kv.read("index.json").result().state == "missing"
    assert kv.list().result() == [b"data-00000.bin"]
    # The prefix keeps keys of other checkpoints apart.
    other = ts.KvStore.open(kvstore_spec("s3://models/other", endpoint=seaweedfs.endpoint)).result()
    assert other.list().result() == []


@pytest.mark.s3
def test_create_bucket_makes_a_bucket_tensorstore_can_use(seaweedfs: SeaweedFS) -> None:
    import tensorstore as ts

    seaweedfs.create_bucket("extra")
    assert seaweedfs.bucket_exists("extra")
    kv = ts.KvStore.open(kvstore_spec("s3://extra/p", endpoint=seaweedfs.endpoint)).result()
    kv.write("k", b"v").result()
    assert kv.read("k").result().value == b"v"


@pytest.mark.s3
def test_seaweedfs_with_credentials_refuses_anonymous_and_accepts_environment_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorstore as ts

    with SeaweedFS(
        SeaweedFSConfig(data_dir=tmp_path / "auth", access_key="AKIDWARMSTART", secret_key="s3cr3t-key")
    ) as server:
        anon = ts.KvStore.open(
            kvstore_spec("s3://models/a", endpoint=server.endpoint, credentials="anonymous")
        )
        with pytest.raises(ValueError, match=r"Access ?Denied"):
            anon.result().write("k", b"v").result()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWARMSTART")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-key")
        kv = ts.KvStore.open(kvstore_spec("s3://models/a", endpoint=server.endpoint)).result()
        kv.write("k", b"v").result()
        assert kv.read("k").result().value == b"v"
        server.create_bucket("signed")  # SigV4-signed CreateBucket
        assert server.bucket_exists("signed")


@pytest.mark.s3
@pytest.mark.parametrize("timeout", [10.0, 0.0], ids=["graceful", "killed"])
def test_seaweedfs_stop_leaves_no_process_and_no_socket(tmp_path: Path, timeout: float) -> None:
    server = SeaweedFS(SeaweedFSConfig(data_dir=tmp_path / "own", buckets=("a-bucket",))).start()
    pid = server.pid
    assert pid is not None and server.is_alive() and server.bucket_exists("a-bucket")
    socket_dir = Path(server._socket_dir or "")
    assert socket_dir.is_dir()
    grpc_ports = [port for flag, port in server.config.aux_ports.items() if flag.endswith(".grpc")]

    server.stop(timeout=timeout)
    server.stop()  # idempotent

    assert not pid_running(pid)
    assert not server.is_alive()
    assert not socket_dir.exists()
    leftovers = [
        p
        for p in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock")
        if int(p.stem.rsplit("-", 1)[1]) in grpc_ports
    ]
    assert leftovers == []
