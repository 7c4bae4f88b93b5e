"""File I/O every writer shares: atomic files and directories, crash recovery, hashing.

Readers never see a half-written file or directory: writes go to a hidden temporary name beside the target
(same file system) and are renamed over it. Files keep the mode the user's umask gives new files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A fresh hidden name next to path (same file system, so a rename onto path is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside path, then rename it over path (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.touch(exist_ok=False)
    mode = tmp.stat().st_mode & 0o777  # what the user's umask gives any new file (mkstemp, safetensors: 0600)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(path: Path, write) -> None:
    """Build a directory with write(tmp_dir) beside path, then swap it in, so readers find the old one or the
    new one whole. Between the two renames only `.NAME.old` exists; `recover_dir` puts it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.mkdir()
    old = path.with_name(f".{path.name}.old")
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Undo a swap that `atomic_dir` was killed in the middle of."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
        except FileNotFoundError:  # another rank of the same run put it back first
            pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
