"""File I/O every writer shares: atomic files and directories, crash recovery, hashing.

Readers never see a half-written file or directory: writes go to a hidden temporary name beside the target
(same file system) and are renamed over it. Files keep the mode the user's umask gives new files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path


def temp_beside(path: Path) -> Path:
    """A fresh hidden name next to path (same file system, so a rename onto path is atomic); `.` and `..` are
    resolved first (they have no name to put a temporary beside)."""
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """atomic_write of a safetensors file. A full disk or another OS failure is an OSError naming the path (the
    error boundary's "fix your machine" one line), not safetensors' own exception type and its traceback."""
    import safetensors.torch  # looked up per call, not bound at import

    def write(tmp: Path) -> None:
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        except safetensors.SafetensorError as e:
            if "os error" not in str(e).lower():
                raise  # not the machine's: a bug
            raise OSError(f"{path}: cannot write it ({e})") from None

    atomic_write(path, write)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside path, then rename it over path (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        tmp.touch(exist_ok=False)
    except OSError as e:  # named by the path asked for, not by the hidden temporary's
        raise OSError(e.errno, f"{path}: cannot write it ({e.strerror or e})") from None
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
    new one whole. The finished build is renamed to `.NAME.new` first; between the two renames of the swap only
    `.NAME.old` and `.NAME.new` exist, both complete: `resolve_dir` reads one meanwhile, `recover_dir` puts
    one back after a kill."""
    path = linked(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.mkdir()
    new, old = _beside(path, "new"), _beside(path, "old")
    try:
        write(tmp)
        shutil.rmtree(new, ignore_errors=True)
        os.replace(tmp, new)  # complete from here on
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def linked(path: str | Path) -> Path:
    """path, or for a symbolic link (to a store on a bigger disk) its target: the swaps of `atomic_dir` and their
    recovery act there, beside the target, where its writer lock is too (ecviz.lock), and the link stays a link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _beside(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}")


def resolve_dir(path: Path) -> Path:
    """path, or while an `atomic_dir` swap is under way or was killed in the middle (path absent) the complete
    directory that stands in for it: `.NAME.new`, else `.NAME.old`. For readers; changes nothing."""
    path = linked(path)
    if path.exists():
        return path
    for alt in (_beside(path, "new"), _beside(path, "old")):
        if alt.is_dir():
            return alt
    return path


def recover_dir(path: Path) -> None:
    """Finish a swap that `atomic_dir` was killed in the middle of: with path absent, `.NAME.new` (complete)
    else `.NAME.old` becomes path again. Safe when several processes of one run call it at once."""
    path = linked(path)
    if path.exists():
        return
    for src in (_beside(path, "new"), _beside(path, "old")):
        try:
            os.replace(src, path)
            return
        except FileNotFoundError:  # not there, or another rank of the same run moved it first
            continue
        except OSError:  # path is there now: another rank put one back
            return


def remove_stale_temps(path: Path, before: float) -> int:
    """Delete the leftovers of interrupted atomic writes of path made before time `before` (a run start): hidden
    `.NAME.*.tmp` builds and a `.NAME.new` / `.NAME.old` that a finished swap no longer needs. Only a process
    that owns path calls it, at its start; returns how many it removed."""
    path = linked(path)
    n = 0
    if not path.parent.is_dir():
        return 0
    own_temp = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")  # temp_beside's, not a sibling's
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
        stale = bool(own_temp.fullmatch(entry.name)) or (
            path.exists() and entry.name in (_beside(path, "new").name, _beside(path, "old").name))
        try:
            if not stale or entry.lstat().st_mtime >= before:
                continue
        except FileNotFoundError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        n += 1
    return n


def remove(path: Path) -> None:
    """Delete a file or directory so that no reader meets half of it: a directory is renamed to a hidden
    temporary first (`remove_stale_temps` clears one a kill left), then deleted."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        gone = temp_beside(path)
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same place: equal once normalised, or the same existing file or directory (an
    absolute and a relative path to it, or a trailing slash)."""
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is gone (moved away since): the names decide
        return False
