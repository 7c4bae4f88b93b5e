"""The pre-rendered Shapes cache: it holds exactly the reference items, is keyed, refuses what does not match,
and a killed build leaves only whole chunks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_batch

from ecviz.data import shapes, shapes_fast
from ecviz.data.shapes import ShapesDataset, collate
from ecviz.data.shapes_cache import ShapesCache, chunk_name
from ecviz.errors import EcvizError

CHUNK = 64  # small chunks: several per test, quick to build


def reference(ds: ShapesDataset, idx) -> dict:
    return collate([ds[int(i)] for i in idx])


def test_cache_round_trips_the_reference_items(tmp_path):
    cache = ShapesCache(tmp_path, seed=3, size=32, chunk=CHUNK).ensure(150, workers=2)
    assert cache.chunks == {0, 1, 2} and {p.name for p in cache.dir.glob("chunk-*")} == {
        chunk_name(k) for k in range(3)}
    ds = ShapesDataset(length=10**6, size=32, seed=3)
    ds.use_cache(cache)
    idx = np.array([191, 0, 63, 64, 5, 128, 100, 77])  # across chunk boundaries, out of order
    assert cache.has(idx).all() and not cache.has(np.array([192, 10**5])).any()
    assert_same_batch(ds.batch(idx), reference(ds, idx))
    assert_same_batch(cache.items(np.arange(192)), reference(ds, range(192)))
    mixed = np.array([190, 500, 3, 192, 10**5])  # cached and not: those rendered on the fly, in order
    assert_same_batch(ds.batch(mixed), reference(ds, mixed))
    assert_same_batch(ds.batch(mixed, ("image", "caption")), {k: reference(ds, mixed)[k] for k in ("image", "caption")})


def test_cache_is_reused_keyed_and_refused_when_wrong(tmp_path):
    cache = ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(CHUNK)
    built = (cache.dir / chunk_name(0)).stat().st_mtime_ns
    again = ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(2 * CHUNK, workers=1)  # extends, reuses
    assert again.dir == cache.dir and again.chunks == {0, 1}
    assert (cache.dir / chunk_name(0)).stat().st_mtime_ns == built
    # what decides an item keys the directory: seed, size, categories, and the renderer's source
    others = [ShapesCache(tmp_path, seed=1, size=16, chunk=CHUNK), ShapesCache(tmp_path, seed=0, size=32, chunk=CHUNK),
              ShapesCache(tmp_path, seed=0, size=16, categories=["counting"], chunk=CHUNK)]
    assert len({c.dir for c in [cache, *others]}) == 4
    source = hashlib.sha256(Path(shapes.__file__).read_bytes() + Path(shapes_fast.__file__).read_bytes())
    assert json.loads((cache.dir / "key.json").read_text())["renderer"] == source.hexdigest()
    counting = others[2].ensure(CHUNK)
    assert set(counting.items(np.arange(CHUNK))["category"]) == {"counting"}
    with pytest.raises(ValueError, match="used for seed 0, size 16"):
        ShapesDataset(size=16, seed=0).use_cache(counting)
    # a key.json that disagrees with its directory (another renderer) is refused, not silently used
    key = json.loads((cache.dir / "key.json").read_text())
    (cache.dir / "key.json").write_text(json.dumps(key | {"renderer": "0" * 64}))
    with pytest.raises(EcvizError, match="holds items of another key"):
        ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(CHUNK)
    (cache.dir / "key.json").write_text(json.dumps(key))
    # items that are not the reference's are refused
    arr = np.load(cache.dir / chunk_name(0))
    arr["image"][0] ^= 1
    np.save(cache.dir / chunk_name(0), arr)
    with pytest.raises(EcvizError, match="does not match the reference renderer"):
        ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(CHUNK)
    # so is a chunk past the first: here another seed's second chunk copied in (only its first item was checked)
    arr["image"][0] ^= 1  # chunk 0 whole again
    np.save(cache.dir / chunk_name(0), arr)
    other = ShapesCache(tmp_path, seed=1, size=16, chunk=CHUNK).ensure(2 * CHUNK, workers=1)
    (cache.dir / chunk_name(1)).write_bytes((other.dir / chunk_name(1)).read_bytes())
    with pytest.raises(EcvizError, match=f"{chunk_name(1)} does not match the reference renderer"):
        ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(2 * CHUNK)


BUILD = """
import sys
from ecviz.data.shapes_cache import ShapesCache
ShapesCache(sys.argv[1], seed=5, size=32, chunk={chunk}).ensure({chunk} * 60, workers=2)
"""


def test_a_killed_build_leaves_whole_chunks_and_the_next_completes_it(tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", BUILD.format(chunk=CHUNK), str(tmp_path)], env=env)
    cache = ShapesCache(tmp_path, seed=5, size=32, chunk=CHUNK)
    deadline = time.monotonic() + 300
    while len(list(cache.dir.glob("chunk-*.npy"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # its workers die with it
    done = sorted(cache.dir.glob("chunk-*.npy"))
    assert 3 <= len(done) < 60, "the build was not killed half-way"
    ds = ShapesDataset(length=10**6, size=32, seed=5)
    for path in done:  # whole chunks only, each holding the reference items
        arr = np.load(path, mmap_mode="r")
        k = int(path.stem.split("-")[1])
        assert len(arr) == CHUNK
        assert_same_batch(cache.items(np.array([k * CHUNK, k * CHUNK + CHUNK - 1])),
                          reference(ds, [k * CHUNK, k * CHUNK + CHUNK - 1]))
    built = {p: p.stat().st_mtime_ns for p in done}
    cache.ensure(CHUNK * 60, workers=2)  # the lock died with the build: this neither waits nor rebuilds
    assert cache.chunks == set(range(60)) and not list(cache.dir.glob(".*.tmp"))
    assert all(p.stat().st_mtime_ns == t for p, t in built.items())
    idx = np.random.default_rng(0).integers(0, 60 * CHUNK, 100)
    ds.use_cache(cache)
    assert_same_batch(ds.batch(idx), reference(ds, idx))


def test_a_chunk_cut_short_is_rebuilt_not_a_traceback(tmp_path):
    """A chunk file cut short (a partial copy, a crash before the disk had it) failed inside numpy's memory map
    with a traceback, at the start of a run or in the middle of one. Every chunk is now checked whole (header,
    record type, length) under the build lock; one that is not is rebuilt where the run needs it, dropped
    otherwise."""
    cache = ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(3 * CHUNK, workers=1)
    first, last = cache.dir / chunk_name(0), cache.dir / chunk_name(2)
    whole = first.read_bytes()
    first.write_bytes(whole[:1000])
    last.write_bytes(b"")
    again = ShapesCache(tmp_path, seed=0, size=16, chunk=CHUNK).ensure(2 * CHUNK, workers=1)
    assert again.chunks == {0, 1} and first.read_bytes() == whole and not last.exists()
    ds = ShapesDataset(length=10**6, size=16, seed=0)
    ds.use_cache(again)
    idx = np.array([0, CHUNK - 1, CHUNK, 2 * CHUNK + 5])  # the last: no longer cached, drawn as it comes
    assert_same_batch(ds.batch(idx), reference(ds, idx))


def test_a_read_only_shared_cache_is_read_where_it_holds_the_run(tmp_path):
    """A cache built once and shared read-only (a cluster's data disk) failed on opening its lock file for
    writing. It is used as it is where it holds the chunks a run reads; where it lacks some, one line says
    so. On a real read-only mount (a tmpfs remounted read-only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "shared"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a file system here")
    try:
        built = ShapesCache(mnt, seed=0, size=16, chunk=CHUNK).ensure(2 * CHUNK, workers=1)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        shared = ShapesCache(mnt, seed=0, size=16, chunk=CHUNK).ensure(2 * CHUNK, workers=1)
        assert shared.chunks == built.chunks == {0, 1}
        ds = ShapesDataset(length=10**6, size=16, seed=0)
        ds.use_cache(shared)
        idx = np.array([0, 2 * CHUNK - 1, 5])
        assert_same_batch(ds.batch(idx), reference(ds, idx))
        with pytest.raises(EcvizError, match=r"is read-only .* lacks 1 of the 3 chunks") as e:
            ShapesCache(mnt, seed=0, size=16, chunk=CHUNK).ensure(3 * CHUNK, workers=1)
        assert "\n" not in str(e.value)
        with pytest.raises(EcvizError, match="cannot create it"):
            ShapesCache(mnt, seed=1, size=16, chunk=CHUNK).ensure(CHUNK, workers=1)
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)  # memory maps may still hold it
