"""On-disk kernel cache: generated Triton source, IR dump and schedule dump per compiled kernel.

Layout: `<cache dir>/<key[:2]>/<key>/{kernel.py, ir.txt, schedule.txt}` where the cache dir is
`$ATTNCC_CACHE_DIR` or `~/.cache/attncc`, and

    key = sha256(IR hash, CompileOptions.key(), tile-structure key, attncc.__version__)

Every file is written atomically (a temporary file in the same directory, then `os.replace`),
so a concurrent reader — another process compiling the same pattern — sees either no file or
a complete one, never a partial write. Writers of the same key write identical content, so
the last rename wins harmlessly.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional

SOURCE_FILE = "kernel.py"
IR_FILE = "ir.txt"
SCHEDULE_FILE = "schedule.txt"


def cache_dir() -> Path:
    """The cache root: `$ATTNCC_CACHE_DIR` if set, else `~/.cache/attncc` (not created here)."""
    env = os.environ.get("ATTNCC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "attncc"


def cache_key(ir_hash: str, options_key: str, structure: str) -> str:
    """Hex sha256 of the IR hash, the options key, the tile-structure key and the version."""
    from .. import __version__
    text = "\0".join((ir_hash, options_key, structure, __version__))
    return hashlib.sha256(text.encode()).hexdigest()


def entry_dir(key: str, root: Optional[Path] = None) -> Path:
    """Directory of cache entry `key` (not created here)."""
    root = cache_dir() if root is None else Path(root)
    return root / key[:2] / key


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers never observe a partial file: the data goes to
    a temporary file in the same directory, is flushed to disk, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read(key: str, name: str = SOURCE_FILE, root: Optional[Path] = None) -> Optional[str]:
    """Contents of file `name` of entry `key`, or None when absent."""
    try:
        return (entry_dir(key, root) / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def store(key: str, files: Mapping[str, str], root: Optional[Path] = None) -> Path:
    """Write `files` (name → text) into entry `key`; files already holding the same text are
    left untouched. Returns the entry directory."""
    d = entry_dir(key, root)
    for name, text in files.items():
        if os.sep in name or name.startswith("."):
            raise ValueError(f"bad cache file name {name!r}")
        if read(key, name, root) != text:
            atomic_write(d / name, text)
    return d


def store_kernel(key: str, source: str, ir_text: str, schedule_text: str,
                 root: Optional[Path] = None) -> Optional[Path]:
    """Store a kernel's source and dumps; returns the path of the source file, or None when
    the cache directory cannot be written (the kernel then runs from a temporary file)."""
    try:
        d = store(key, {IR_FILE: ir_text, SCHEDULE_FILE: schedule_text, SOURCE_FILE: source}, root)
    except OSError:
        return None
    return d / SOURCE_FILE
