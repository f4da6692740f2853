"""Storage: the same calls round-trip on a local path and on a real S3 API; writes are atomic."""

from __future__ import annotations

import os

import pytest

from lipforcing import storage


def _round_trip(root: str) -> None:
    target = storage.join(root, "a", "b.bin")
    storage.write_bytes(target, b"\x00payload")
    assert storage.exists(target)
    assert storage.read_bytes(target) == b"\x00payload"
    storage.write_text(storage.join(root, "a", "c.txt"), "hello")
    assert storage.read_text(storage.join(root, "a", "c.txt")) == "hello"
    found = storage.glob(storage.join(root, "a", "*"))
    assert [f.rsplit("/", 1)[-1] for f in found] == ["b.bin", "c.txt"]
    if root.startswith("s3://"):
        assert all(f.startswith("s3://") for f in found)
    storage.remove(storage.join(root, "a"), recursive=True)
    assert not storage.exists(target)


def _failed_write_leaves_nothing(root: str) -> None:
    target = storage.join(root, "half.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as handle:
            handle.write(b"first half")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(target)
    assert storage.glob(storage.join(root, "*")) == []


def _overwrite_is_whole(root: str) -> None:
    target = storage.join(root, "file.bin")
    storage.write_bytes(target, b"old" * 1000)
    with storage.atomic_open(target) as handle:
        handle.write(b"new")
        assert storage.read_bytes(target) == b"old" * 1000  # readers still see the old file
    assert storage.read_bytes(target) == b"new"


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path))


def test_local_atomic_write(tmp_path):
    _failed_write_leaves_nothing(str(tmp_path / "x"))
    _overwrite_is_whole(str(tmp_path / "y"))
    assert not [name for name in os.listdir(tmp_path / "y") if ".tmp-" in name]


@pytest.mark.integration
def test_s3_round_trip(s3_bucket):
    _round_trip(s3_bucket + "/prefix")


@pytest.mark.integration
def test_s3_atomic_write(s3_bucket):
    _failed_write_leaves_nothing(s3_bucket + "/x")
    _overwrite_is_whole(s3_bucket + "/y")


@pytest.mark.integration
def test_s3_upload_file(s3_bucket, tmp_path):
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 << 20))
    storage.upload_file(local, s3_bucket + "/big.bin")
    assert storage.read_bytes(s3_bucket + "/big.bin") == local.read_bytes()


def test_join_keeps_scheme():
    assert storage.join("s3://bucket/x/", "y", "/z.tar") == "s3://bucket/x/y/z.tar"
    assert storage.join("outputs/data", "shards") == "outputs/data/shards"


def test_a_remote_file_is_fetched_once_per_machine_and_again_when_rewritten(s3_bucket, tmp_path, monkeypatch):
    """Eight workers of a node asking for the previous stage's weights at once cause one download;
    a rewritten object (a stage rerun with force=true) is not served from the stale copy."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(storage, "CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/distill/teacher/dit.safetensors"
    storage.write_bytes(url, b"a" * 1_000_000)
    fs = storage.filesystem(url)[0]
    downloads: list[str] = []
    real_get_file = fs.get_file

    def counting_get_file(remote, local, *args, **kwargs):  # a spy on the real s3fs call
        downloads.append(remote)
        return real_get_file(remote, local, *args, **kwargs)

    monkeypatch.setattr(fs, "get_file", counting_get_file)  # fsspec shares this instance per location
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: storage.cached(url), range(8)))
    assert len(set(paths)) == 1 and len(downloads) == 1
    assert open(paths[0], "rb").read() == b"a" * 1_000_000
    storage.write_bytes(url, b"b" * 10)
    fresh = storage.cached(url)
    assert fresh != paths[0] and open(fresh, "rb").read() == b"b" * 10 and len(downloads) == 2
