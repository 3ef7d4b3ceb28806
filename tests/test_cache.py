import pytest

from pipeline import cache


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError):
        with cache.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_write_replaces_and_keeps_extension(tmp_path):
    target = tmp_path / "a.png"
    cache.write_bytes(target, b"one")
    with cache.atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o666 & ~cache._UMASK   # not mkstemp's 0600


def test_manifest_marks_completion(tmp_path):
    d = tmp_path / "stage" / "key"
    assert not cache.is_complete(d)
    cache.write_manifest(d, stage="s", key="key", params={"a": 1}, inputs={}, outputs={"n": 2},
                         config={"x": 1})
    assert cache.is_complete(d)
    assert cache.read_manifest(d)["outputs"] == {"n": 2}
    assert (d / "config.yaml").read_text().strip() == "x: 1"


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"aaaa")
    fp1 = cache.fingerprint_files([f])
    f.write_bytes(b"aaaaa")
    assert cache.fingerprint_files([f]) != fp1
    assert cache.stage_key({"h": 1}, "v1", {"raw": fp1}) != cache.stage_key({"h": 2}, "v1", {"raw": fp1})
