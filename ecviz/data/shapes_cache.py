"""A pre-rendered Shapes cache: items of `ShapesDataset(seed, size, categories)` in memory-mapped chunk files.

Why: an item costs about 0.1 ms of a core to draw even with `render_batch` (a fresh
`np.random.default_rng([seed, i])` and a few dozen small draws per item, which cannot be vectorised without
changing what is drawn), so two cores cannot make 20,000 items/s; read from the cache, a batch is a gather from
memory-mapped arrays. An item is a pure function of (seed, index), so a cached item is the same item, and a run
trains bit-identically with or without the cache.

Layout: ROOT/shapes-{size}px-seed{seed}-{digest}/ holds key.json and chunk-KKKKKK.npy files, each a structured
array (`item_dtype`) of items [K·CHUNK, (K+1)·CHUNK): image (H, W, 3) uint8, masks bit-packed (4, ⌈H·W/8⌉),
n_objects, category, caption (bytes) and word_object. The digest hashes the key: format version, seed, size,
categories, numpy's version and the renderer (the source of shapes.py and shapes_fast.py), so a changed
renderer gets a fresh directory instead of stale items; a key.json that disagrees with its directory is
refused. A build runs in worker processes under an exclusive lock on the directory (concurrent runs and ranks
wait, then reuse), writes every chunk atomically (a killed build leaves whole chunks only; the next build
removes its temporary files and any chunk that is not whole) and, once done, checks one item of every chunk the
run reads against the reference renderer (a chunk copied in from another cache, or damaged, is refused).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from ecviz.data import shapes, shapes_fast
from ecviz.data.shapes import CATEGORIES, MAX_OBJECTS, ShapesDataset
from ecviz.data.shapes_fast import FIELDS, render_batch, to_float
from ecviz.errors import EcvizError
from ecviz.io import atomic_write
from ecviz.progress import progress_bar

FORMAT = 1
CHUNK = 4096  # items per chunk file (15 MB at 32 px)
CAPTION_BYTES = 64
MAX_WORDS = 8
RENDER_BATCH = 512  # items rendered at once while building


def renderer_digest() -> str:
    """sha256 of the code that decides what an item is: any edit to it keys a fresh cache."""
    h = hashlib.sha256()
    for mod in (shapes, shapes_fast):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$ECVIZ_CACHE, else $XDG_CACHE_HOME/ecviz, else ~/.cache/ecviz."""
    if os.environ.get("ECVIZ_CACHE"):
        return Path(os.environ["ECVIZ_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ecviz"


def item_dtype(size: int) -> np.dtype:
    return np.dtype([("image", np.uint8, (size, size, 3)), ("masks", np.uint8, (MAX_OBJECTS, -(-size * size // 8))),
                     ("n_objects", np.uint8), ("category", np.uint8), ("caption", f"S{CAPTION_BYTES}"),
                     ("n_words", np.uint8), ("word_object", np.int8, (MAX_WORDS,))])


def render_chunk(ds: ShapesDataset, start: int, n: int) -> np.ndarray:
    """Items [start, start + n) as a structured array of `item_dtype` (the fast renderer, batch by batch)."""
    out = np.zeros(n, item_dtype(ds.size))
    for lo in range(0, n, RENDER_BATCH):
        scenes = [ds.scene(i) for i in range(start + lo, start + min(n, lo + RENDER_BATCH))]
        images, masks = render_batch([sc.objects for sc in scenes], ds.size)
        rec = out[lo: lo + len(scenes)]
        rec["image"] = images
        rec["masks"] = np.packbits(masks.reshape(len(scenes), MAX_OBJECTS, -1), axis=-1)
        for r, sc in zip(rec, scenes, strict=True):
            caption = sc.caption.encode("ascii")
            if len(caption) > CAPTION_BYTES or len(sc.word_object) > MAX_WORDS:
                raise ValueError(f"caption {sc.caption!r} does not fit the cache's record")
            r["n_objects"], r["category"], r["caption"] = len(sc.objects), CATEGORIES.index(sc.category), caption
            r["n_words"] = len(sc.word_object)
            r["word_object"][: len(sc.word_object)] = sc.word_object
    return out


def _die_with_parent() -> None:
    """Pool initializer: a worker dies with the build that started it (Linux), so none outlives a killed build."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def _build_chunk(args: tuple) -> int:
    """Worker process: render chunk k and write it atomically."""
    directory, seed, size, categories, chunk, k = args
    ds = ShapesDataset(length=2**62, size=size, seed=seed, categories=list(categories))
    arr = render_chunk(ds, k * chunk, chunk)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(Path(directory) / chunk_name(k), write)
    return k


def whole_chunk(path: Path, items: int, dtype: np.dtype) -> bool:
    """Whether `path` is an .npy file of `items` records of `dtype`, every byte of them there."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, found = read(f)
            size = f.tell() + items * dtype.itemsize
            return shape == (items,) and found == dtype and os.fstat(f.fileno()).st_size == size
    except (OSError, ValueError, EOFError):
        return False


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.npy"


class ShapesCache:
    """The cache of one (seed, size, categories) Shapes stream under `root`; `ensure` builds, `items` reads."""

    def __init__(self, root: str | Path, seed: int = 0, size: int = 32, categories: list[str] | None = None,
                 chunk: int = CHUNK):
        self.seed, self.size, self.chunk_items = seed, size, chunk
        self.categories = tuple(categories) if categories else shapes.CATEGORIES
        self.key = {"format": FORMAT, "seed": seed, "size": size, "categories": list(self.categories),
                    "chunk": chunk, "numpy": np.__version__, "renderer": renderer_digest()}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root).expanduser() / f"shapes-{size}px-seed{seed}-{digest}"
        self.dtype = item_dtype(size)
        self.chunks: set[int] = set()
        self.present = np.zeros(1, bool)
        self._open: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:  # memory maps are reopened in another process, not pickled
        return {**self.__dict__, "_open": {}}

    def dataset(self, length: int = 2**40) -> ShapesDataset:
        return ShapesDataset(length=length, size=self.size, seed=self.seed, categories=list(self.categories))

    def check_key(self) -> None:
        path = self.dir / "key.json"
        try:
            key = json.loads(path.read_text()) if path.exists() else self.key
        except (OSError, ValueError, UnicodeDecodeError):
            key = None  # unreadable: as foreign as another key
        if key != self.key:
            raise EcvizError(f"shapes cache {self.dir} holds items of another key than its name says (or an "
                             f"unreadable key.json); delete it to rebuild")

    def ensure(self, stop: int, start: int = 0, workers: int | None = None, progress: bool = False) -> ShapesCache:
        """Build whatever chunks items [start, stop) lie in and are missing, with `workers` processes (default:
        every core); then check one item of each of those chunks against the reference renderer. A cache this
        process cannot write (a shared, read-only one) is used as it is when it holds those chunks whole."""
        want = range(start // self.chunk_items, math.ceil(stop / self.chunk_items))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.dir / ".lock", "a+")
        except OSError as e:
            self._read_only(want, e)
        else:
            with lock:
                fcntl.lockf(lock, fcntl.LOCK_EX)  # a POSIX lock: this process's alone, gone when it closes or dies
                self.check_key()
                if not (self.dir / "key.json").exists():
                    atomic_write(self.dir / "key.json", lambda tmp: Path(tmp).write_text(json.dumps(self.key) + "\n"))
                for tmp in self.dir.glob(".chunk-*.tmp"):  # left by a killed build: nobody else holds the lock
                    tmp.unlink(missing_ok=True)
                have = self._whole_chunks(remove_others=True)  # one cut short: rebuilt below if this run needs it
                missing = [k for k in want if k not in have]
                if missing:
                    self._build(missing, workers or len(os.sched_getaffinity(0)), progress)
            self.chunks = have | set(missing)
        self.present = np.zeros(max(self.chunks, default=-1) + 2, bool)  # (K + 1,) by chunk; the last: False
        self.present[list(self.chunks)] = True
        self.verify([k for k in want if k in self.chunks])
        return self

    def _whole_chunks(self, remove_others: bool = False) -> set[int]:
        """The numbers of the chunk files here that are whole; with remove_others (under the lock) the others
        (cut short: a copy, a crash before the disk had it) are deleted, else their items are drawn as they come."""
        whole = set()
        for path in self.dir.glob("chunk-*.npy"):
            if whole_chunk(path, self.chunk_items, self.dtype):
                whole.add(int(path.stem.split("-")[1]))
            elif remove_others:
                path.unlink()
        return whole

    def _read_only(self, want: range, why: OSError) -> None:
        """Take the whole chunks of a cache that cannot be written; EcvizError if it lacks some of `want`."""
        if not (self.dir / "key.json").is_file():
            raise EcvizError(f"shapes cache {self.dir}: cannot create it ({why.strerror}); give --data-cache a "
                             "directory you can write") from None
        self.check_key()
        self.chunks = self._whole_chunks()
        lacking = [k for k in want if k not in self.chunks]
        if lacking:
            raise EcvizError(f"shapes cache {self.dir} is read-only ({why.strerror}) and lacks "
                             f"{len(lacking)} of the {len(want)} chunks this run reads; give --data-cache a "
                             "directory you can write") from None

    def _build(self, missing: list[int], workers: int, progress: bool) -> None:
        jobs = [(str(self.dir), self.seed, self.size, self.categories, self.chunk_items, k) for k in missing]
        bar = None
        if progress:

            bar = progress_bar(len(jobs) * self.chunk_items, "item", f"shapes cache {self.dir.name}")
        if workers <= 1 or len(jobs) == 1:
            done = map(_build_chunk, jobs)
        else:  # fork: the workers only run numpy (a spawned one would re-run the `ecviz` command line)
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("fork"),
                                       initializer=_die_with_parent)
            done = pool.map(_build_chunk, jobs)
        try:
            for _ in done:
                if bar is not None:
                    bar.update(self.chunk_items)
        finally:
            if workers > 1 and len(jobs) > 1:
                pool.shutdown(cancel_futures=True)
            if bar is not None:
                bar.close()

    def verify(self, chunks: list[int]) -> None:
        """One item of each of these chunks must be what the reference renderer draws: chunk 0's first item, and
        an item that moves from chunk to chunk (about 0.3 ms a chunk; a chunk holds 4096 items)."""
        if not chunks:
            return
        idx = np.array([k * self.chunk_items + (k * 7919) % self.chunk_items for k in chunks])
        ds = self.dataset()
        ref, got = shapes.collate([ds[int(i)] for i in idx]), self.items(idx)
        for j, k in enumerate(chunks):
            if not all(torch.equal(ref[f][j], got[f][j]) if isinstance(ref[f], torch.Tensor) else ref[f][j] == got[f][j]
                       for f in FIELDS):
                raise EcvizError(f"shapes cache {self.dir}: {chunk_name(k)} does not match the reference renderer "
                                 f"(item {idx[j]}); delete the cache to rebuild it")

    def has(self, indices: np.ndarray) -> np.ndarray:
        """(B,) bool: which items are cached."""
        return self.present[np.minimum(np.asarray(indices) // self.chunk_items, len(self.present) - 1)]

    def chunk(self, k: int) -> np.ndarray:
        if k not in self._open:
            self._open[k] = np.load(self.dir / chunk_name(k), mmap_mode="r").view(np.ndarray)  # a plain view
        return self._open[k]

    def records(self, indices: np.ndarray) -> np.ndarray:
        """(B,) records of cached items, in the order asked."""
        indices = np.asarray(indices, np.int64)
        out = np.empty(len(indices), self.dtype)
        ks = indices // self.chunk_items
        if len(ks) and ks.min() == ks.max():  # the usual case: one chunk
            return self.chunk(int(ks[0]))[indices - ks[0] * self.chunk_items]
        for k in np.unique(ks):
            at = np.flatnonzero(ks == k)
            out[at] = self.chunk(int(k))[indices[at] - k * self.chunk_items]
        return out

    def items(self, indices: np.ndarray, fields=FIELDS) -> dict:
        """Collated cached items, as `collate([ShapesDataset[i] ...])` gives them (only `fields`)."""
        rec, H = self.records(indices), self.size
        out = {}
        if "image" in fields:
            out["image"] = to_float(rec["image"])  # (B, 3, H, W) in [-1, 1]
        if "caption" in fields:
            out["caption"] = [c.decode("ascii") for c in rec["caption"]]
        if "category" in fields:
            out["category"] = [CATEGORIES[c] for c in rec["category"]]
        if "masks" in fields:
            bits = np.unpackbits(rec["masks"], axis=-1, count=H * H)  # (B, 4, H·W)
            out["masks"] = torch.from_numpy(bits.reshape(len(rec), MAX_OBJECTS, H, H).astype(bool))
        if "n_objects" in fields:
            out["n_objects"] = torch.from_numpy(rec["n_objects"].astype(np.int64))
        if "word_object" in fields:
            out["word_object"] = [w[:n].tolist() for w, n in zip(rec["word_object"], rec["n_words"], strict=True)]
        return out
