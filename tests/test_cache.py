"""On-disk kernel cache: location, keys, atomic writes under concurrent writers."""
import os
import subprocess
import sys
import textwrap

import pytest

from attncc.runtime import cache


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ATTNCC_CACHE_DIR")
    assert cache.cache_dir() == cache.Path.home() / ".cache" / "attncc"


def test_key_depends_on_every_part(monkeypatch):
    import hashlib

    import attncc
    base = cache.cache_key("ir", "opt", "struct")
    expected = hashlib.sha256("\0".join(("ir", "opt", "struct", attncc.__version__)).encode())
    assert base == expected.hexdigest()
    assert len({base, cache.cache_key("ir2", "opt", "struct"), cache.cache_key("ir", "opt2", "struct"),
                cache.cache_key("ir", "opt", "struct2")}) == 4
    monkeypatch.setattr(attncc, "__version__", "9.9.9")
    assert cache.cache_key("ir", "opt", "struct") != base


def test_store_and_read_roundtrip(tmp_path):
    key = cache.cache_key("a", "b", "c")
    path = cache.store_kernel(key, "SOURCE\n", "IR\n", "SCHED\n", root=tmp_path)
    assert path == tmp_path / key[:2] / key / "kernel.py"
    assert cache.read(key, "kernel.py", tmp_path) == "SOURCE\n"
    assert cache.read(key, "ir.txt", tmp_path) == "IR\n"
    assert cache.read(key, "schedule.txt", tmp_path) == "SCHED\n"
    assert cache.read("0" * 64, "kernel.py", tmp_path) is None
    # no temporary files are left behind
    assert sorted(os.listdir(path.parent)) == ["ir.txt", "kernel.py", "schedule.txt"]


def test_store_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="bad cache file name"):
        cache.store("k" * 64, {"../x": "y"}, root=tmp_path)


def test_unwritable_cache_gives_none(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cache.store_kernel("ab" * 32, "s", "i", "c", root=blocker) is None


_WORKER = textwrap.dedent("""
    import sys, time
    from attncc.runtime import cache
    root, key, tag, role = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    body = ("# line of generated source " * 40 + "\\n") * 2000     # ~2 MB: writes are not instant
    text = body + "# END\\n"
    bad = 0
    deadline = time.time() + 2.5
    n = 0
    while time.time() < deadline and n < 12:
        if role == "writer":
            cache.atomic_write(cache.entry_dir(key, root) / "kernel.py", text)
            n += 1
        got = cache.read(key, "kernel.py", root)
        if got is not None and got != text:
            bad += 1
    print(bad)
""")


def test_concurrent_writers_never_expose_partial_files(tmp_path):
    """Several processes write the same entry repeatedly while others read it: every read is
    either absent or the complete file."""
    key = cache.cache_key("concurrent", "opts", "structure")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    roles = ["writer", "writer", "writer", "reader", "reader"]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), key, str(i), r],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i, r in enumerate(roles)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == "0", f"a reader saw a partial file: {out!r}"
    entry = cache.entry_dir(key, tmp_path / "cache")
    assert os.listdir(entry) == ["kernel.py"]
    assert cache.read(key, "kernel.py", tmp_path / "cache").endswith("# END\n")


def test_partial_write_detector_can_fail(tmp_path):
    """The check above would notice a non-atomic writer: a plain open/write exposes a
    truncated file to a reader that looks mid-write."""
    path = tmp_path / "plain.py"
    with open(path, "w") as f:
        f.write("x" * 1000)
        f.flush()
        seen = path.read_text()
        f.write("# END\n")
    assert not seen.endswith("# END\n")
