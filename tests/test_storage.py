"""ray_mff.storage: uri resolution, endpoint precedence, listing, atomic writes."""
from __future__ import annotations

import os

import pytest

from ray_mff import storage


def test_join_uri_and_basename():
    assert storage.join_uri("s3://b/in/", "a", "x.png") == "s3://b/in/a/x.png"
    assert storage.join_uri("s3://b", "x.png") == "s3://b/x.png"
    assert storage.join_uri("/data/in", "a", "x.png") == os.path.join("/data/in", "a", "x.png")
    assert storage.basename("s3://b/p/") == "p"
    assert storage.basename("s3://b") == "b"
    assert storage.basename("/x/y/") == "y"


def test_is_remote():
    assert not storage.is_remote("/tmp/x.png")
    assert not storage.is_remote("relative/x.png")
    assert not storage.is_remote("file:///tmp/x.png")
    assert storage.is_remote("s3://b/x.png")
    assert storage.is_remote("memory://x.png")


def test_resolve_local_and_cache(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "x.png"))
    assert path == str(tmp_path / "x.png")
    fs2, path2 = storage.resolve(f"file://{tmp_path}/x.png")
    assert fs2 is fs and path2 == path


def test_s3_endpoint_precedence(monkeypatch):
    pytest.importorskip("s3fs")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    fs, path = storage.resolve("s3://b/k.png")
    assert path == "b/k.png" and fs.client_kwargs.get("endpoint_url", fs.endpoint_url) == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert storage.resolve("s3://b/k.png")[0].endpoint_url == "http://s3only:2"
    assert storage.resolve("s3://b/k.png", s3_endpoint="http://explicit:3")[0].endpoint_url == "http://explicit:3"
    # The process-wide default (CLI --s3-endpoint) ranks between the argument and the environment.
    storage.set_s3_endpoint("http://process:4")
    try:
        assert storage.resolve("s3://b/k.png")[0].endpoint_url == "http://process:4"
        assert storage.resolve("s3://b/k.png", s3_endpoint="http://explicit:3")[0].endpoint_url == "http://explicit:3"
    finally:
        storage.set_s3_endpoint(None)
    assert storage.resolve("s3://b/k.png")[0].endpoint_url == "http://s3only:2"
    # Same options, same (cached) instance.
    assert storage.resolve("s3://b/a", s3_endpoint="http://explicit:3")[0] is storage.resolve(
        "s3://c/d", s3_endpoint="http://explicit:3"
    )[0]


def test_list_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"123")
    (tmp_path / "y.txt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    entries = storage.list_files(tmp_path)
    assert [e.relpath for e in entries] == ["a/b/x.png", "y.txt"]
    assert entries[0].uri == str(tmp_path / "a" / "b" / "x.png") and entries[0].size == 3
    assert storage.walk(tmp_path)[1] == ["a", "a/b", "empty"]
    assert storage.list_files(tmp_path / "missing") == []


def test_write_read_remove(tmp_path):
    uri = str(tmp_path / "new" / "f.bin")
    storage.write_bytes_atomic(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    storage.write_bytes_atomic(uri, b"xyz")  # replaces
    assert storage.read_bytes(uri) == b"xyz"
    assert os.listdir(tmp_path / "new") == ["f.bin"]
    storage.remove(uri)
    assert not storage.exists(uri)
    storage.remove(uri)  # missing is fine
    with pytest.raises(FileNotFoundError):
        storage.remove(uri, missing_ok=False)


def test_atomic_write_removes_temp_on_failure(tmp_path, monkeypatch):
    def boom(src, dst):
        assert os.path.basename(src).startswith(".f.bin.")  # hidden temp beside the target
        raise OSError("no space")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="no space"):
        storage.write_bytes_atomic(str(tmp_path / "f.bin"), b"abc")
    assert os.listdir(tmp_path) == []


def test_memory_filesystem_single_put():
    storage.write_bytes_atomic("memory://ray-mff-test/x.bin", b"hello")
    assert storage.read_bytes("memory://ray-mff-test/x.bin") == b"hello"
    assert [e.relpath for e in storage.list_files("memory://ray-mff-test")] == ["x.bin"]
    storage.remove("memory://ray-mff-test/x.bin")
