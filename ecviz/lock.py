"""One writer at a time: the lock a trace store or a training run directory is written under.

What: `writing(directory)` holds an exclusive `fcntl.flock` on the lock file `.NAME.lock` beside the directory
`NAME` (a store `traces/x.zarr` has `traces/.x.zarr.lock`, a run `runs/x` has `runs/.x.lock`) for as long as
a run writes there; a second writer is refused with one line naming the holder (`BusyError`: pid, host and
command, which the holder writes into the lock file). Readers (`open_trace`, the app, `ecviz sample` and
`eval` reading a checkpoint) never hold it; one that finds a store unfinished asks `holder` whether a writer is
still at work, to say "being written" rather than "rerun".

Why flock: the kernel drops the lock when the last process holding it ends, however it ends (SIGKILL too), so
a dead writer never leaves a directory locked and a rerun takes over (and resumes) at once; a pid file alone
would outlive its writer. Why beside the directory and not inside: `ecviz trace` creates a store, and replaces
it on `--overwrite`, by swapping a whole new directory in (`ecviz.io.atomic_dir`); a lock file inside would be
swapped away with the old one while its holder still writes. The lock file is never replaced (a renamed-in
copy would be another file, unlocked): the holder's line is written into it in place.

Several processes of one run: the `--nproc` launcher takes the lock for the whole run and its ranks inherit
the open lock file (LOCK_FD_ENV names the descriptor), so the ranks of one run do not refuse each other and
the lock stays held while any of them lives. Under torchrun by hand, rank 0 takes it for the run.

When: a single process takes it once every input is checked (a refused input leaves no lock file), before it
looks at what the directory holds (resume or not, a half-done checkpoint swap) and writes; the launcher takes
it after the checks it makes itself, before starting ranks. A lock file outlives its holder (deleting it
would let two writers lock two different files); its holder line is then stale and never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ecviz.errors import BusyError

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking (the rest of ecviz works the same)
    fcntl = None

LOCK_FD_ENV = "ECVIZ_LOCK_FD"  # set by the --nproc launcher: the descriptor of the lock it holds for its ranks


def lock_path(directory: str | Path) -> Path:
    """The lock file of a store or run directory: `.NAME.lock` beside it (the same file for every spelling of
    the path, links resolved)."""
    d = Path(directory).resolve()
    return d.parent / f".{d.name or 'root'}.lock"


def this_command() -> str:
    """How this process was started, as its holder line names it: `ecviz train ...`."""
    return "ecviz " + shlex.join(sys.argv[1:])


_HELD: set[int] = set()  # lock descriptors open in this process


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: the lock must end with
    the process that took it, not live on in workers that notice their parent's death seconds later."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class Lock:
    """A held writer lock: the open lock file (`fd`) and its path; `release()` lets go."""

    def __init__(self, path: Path, fd: int | None, owned: bool = True):
        self.path, self.fd, self.owned = path, fd, owned
        if fd is not None:
            _HELD.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            if self.owned:
                os.close(self.fd)  # the kernel drops the flock with the last descriptor of it
        self.fd = None


def acquire(directory: str | Path, command: str | None = None) -> Lock:
    """Take the writer lock of `directory` (creating its parent if needed), or raise BusyError naming the live
    process that holds it. Under the --nproc launcher a rank gets the launcher's lock; under torchrun by hand
    only rank 0 takes it (the others return an empty Lock)."""
    path = lock_path(directory)
    if fcntl is None:
        return Lock(path, None)
    inherited = inherited_lock(path)
    if inherited is not None:
        return inherited
    from ecviz import dist  # the one reader of torchrun's variables (a garbage one: a one-line error)

    ranks = dist.ranks()
    if ranks.world > 1 and ranks.rank != 0:
        return Lock(path, None)  # torchrun by hand: rank 0 holds it for the run
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # never truncated before it is ours
    try:
        _lock_soon(fd)
    except BlockingIOError:
        holder = read_holder(fd)
        os.close(fd)
        raise BusyError(f"{directory} is being written by {holder}; wait for it or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command or this_command(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
    except OSError as e:  # a full disk: say which file
        os.close(fd)
        raise OSError(e.errno, f"cannot write the lock file {path}: {e.strerror}") from None
    return Lock(path, fd)


def _lock_soon(fd: int, tries: int = 5) -> None:
    """flock(LOCK_EX) without blocking for long: a few tries 50 ms apart, so that a reader looking for a writer
    (`holder`, which holds a shared lock for an instant) never makes a writer starting then refuse itself."""
    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == tries - 1:
                raise
            time.sleep(0.05)


def holder(directory: str | Path) -> str | None:
    """Who is writing `directory` now ('pid 1234 on HOST (COMMAND)'), or None where no live process holds its
    lock: for readers that find a store unfinished, to tell "being written" from "stopped; rerun". Takes the
    lock shared for an instant, which a writer waits out (`_lock_soon`); never creates a lock file."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock_path(directory), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: never written under a lock (or not by this ecviz)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(directory: str | Path, command: str | None = None) -> Iterator[Lock]:
    """Hold the writer lock of `directory` for the with-block (see `acquire`). In a process group (torchrun by
    hand: only rank 0 tries the lock) every rank learns whether it was refused and raises the same one-line
    BusyError; the others would otherwise go on to their next collective and fail there with a traceback."""
    from ecviz import dist

    try:
        lock, busy = acquire(directory, command), None
    except BusyError as e:
        lock, busy = None, e
    if dist.active() and dist.all_sum(float(busy is not None)) and busy is None:
        lock.release()
        busy = BusyError(f"{directory} is being written by another process (rank 0 found its lock taken); "
                         "wait for it or stop it")
    if busy is not None:
        raise busy
    try:
        yield lock
    finally:
        lock.release()


def inherited_lock(path: Path) -> Lock | None:
    """The lock the --nproc launcher handed this rank (LOCK_FD_ENV), if it is the lock file at `path`."""
    fd = os.environ.get(LOCK_FD_ENV)
    if not fd or not fd.isdigit():
        return None
    try:
        mine, there = os.fstat(int(fd)), os.stat(path)
    except OSError:
        return None
    if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
        return None
    fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the launcher's own lock: granted, never blocks
    return Lock(path, int(fd), owned=False)  # the launcher holds it until the run ends


def read_holder(fd: int) -> str:
    """'pid 1234 on HOST (COMMAND)' from a lock file's holder line. The holder writes it just after it takes
    the lock, so an empty line means it is about to: look again for a moment."""
    for _ in range(20):
        try:
            h = json.loads(os.pread(fd, 65536, 0).decode().split("\n", 1)[0])
            return f"pid {h['pid']} on {h['host']} ({h['command']})"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            time.sleep(0.05)
    return "another process"
