"""Real image-caption data: a folder of `name.jpg` + `name.txt` pairs, or WebDataset tar shards (img2dataset layout).

Both are map-style datasets of {"image": (3, size, size) float32 in [-1, 1], "caption": str, "key": str}, sorted by
key. Images without a caption are skipped and counted; every bad input raises a one-line ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ecviz.codec import from_uint8
from ecviz.data import collate  # noqa: F401  (re-exported: the DataLoader collate_fn of this data)
from ecviz.errors import EcvizError
from ecviz.progress import progress_bar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
MAX_EXAMPLES = 5
BRACE = re.compile(r"\{([^{}]*)\}")


def one_line(err: BaseException) -> str:
    """An exception's message squeezed onto one line (or its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is `size` (bicubic), then cut the centre size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != img.size:
        img = img.resize(new, Image.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float32 tensor in [-1, 1]."""
    return from_uint8(np.array(img, dtype=np.uint8)[None])[0]


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit greyscale (a 16-bit PNG) at 255, which makes it white:
    its values are scaled to 8 bits first (mode "I" too, where they exceed 255)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or a.max(initial=0) > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(source: str | Path | BinaryIO, size: int, name: str) -> torch.Tensor:
    """Decode, turn as its EXIF orientation says (as every viewer shows it), convert to 8-bit RGB, resize and
    crop one image; an undecodable file is a one-line ValueError."""
    try:
        with Image.open(source) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers `size`
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise EcvizError(f"image {name}: gone (deleted or moved since the data was listed)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EcvizError(f"corrupt image {name}: {one_line(e)}") from None
    return to_tensor(resize_center_crop(rgb, size))


def check_image(read, name: str) -> None:
    """Fully check one image (PIL verify, then a fresh open and load); read() returns a path or a file object."""
    try:
        with Image.open(read()) as img:
            img.verify()
        with Image.open(read()) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EcvizError(f"corrupt image {name}: {one_line(e)}") from None


def decode_caption(data: bytes, name: str) -> str:
    """Caption bytes as stripped UTF-8 text; anything else is a one-line ValueError naming the file."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise EcvizError(f"caption {name}: not UTF-8 text ({one_line(e)})") from None


def hidden(relative: str | Path) -> bool:
    """A hidden file, or one in a hidden folder (a name starting with a dot: macOS's ._name.png resource forks,
    .git, editors' temporaries): not data, in a folder or a shard alike."""
    return any(part.startswith(".") for part in Path(relative).parts)


VERIFY_THREADS = 8
VERIFY_BLOCK = 4096  # items checked at once (not a future per item of a million-image set)
_OPENING = threading.Lock()


class _ImageText(Dataset):
    """Shared item assembly and bookkeeping; subclasses fill `keys` and implement the three readers."""

    def __init__(self, size: int):
        if size < 1:
            raise EcvizError(f"image size must be >= 1, got {size}")
        self.size = size
        self.keys: list[str] = []
        self.skipped_no_caption = 0
        self.skipped_examples: list[str] = []

    def _skip(self, key: str) -> None:
        self.skipped_no_caption += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(key)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return {"image": self._image(i), "caption": self._caption(i), "key": self.keys[i]}

    def identity(self) -> dict:
        """Which items this set holds: their number and the sha256 of their keys in order (what a resumed run
        checks: an image added, removed or renamed changes every later batch; an image edited in place does
        not change it)."""
        digest = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()
        return {"items": len(self.keys), "keys_sha256": digest}

    def verify(self, progress: bool = False) -> None:
        """Open every image and caption once, raising the first problem in item order, so training fails before it
        starts: in threads (decoding releases the GIL), a block of items at a time, with a bar if asked."""
        from concurrent.futures import ThreadPoolExecutor

        def check(i: int) -> None:
            self._check(i)
            self._caption(i)

        bar = progress_bar(len(self), "image", "check data") if progress else None
        try:
            with ThreadPoolExecutor(min(VERIFY_THREADS, len(os.sched_getaffinity(0)))) as pool:
                for start in range(0, len(self), VERIFY_BLOCK):
                    block = range(start, min(start + VERIFY_BLOCK, len(self)))
                    list(pool.map(check, block))
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()

    def _image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _caption(self, i: int) -> str:
        raise NotImplementedError

    def _check(self, i: int) -> None:
        raise NotImplementedError


class FolderImageText(_ImageText):
    """A folder tree of `name.jpg|jpeg|png|webp` images, each with a `name.txt` caption beside it."""

    def __init__(self, root: str | Path, size: int = 32):
        super().__init__(size)
        self.root = Path(root)
        if not self.root.exists():
            raise EcvizError(f"data folder {root}: not found")
        if not self.root.is_dir():
            raise EcvizError(f"data folder {root}: not a directory")
        self.paths: list[Path] = []
        for key, path in self._scan():
            if path.with_suffix("." + CAPTION_EXT).is_file():
                if self.keys and self.keys[-1] == key:  # sorted: a.jpg beside a.png
                    raise EcvizError(f"data folder {root}: {self.paths[-1].name} and {path.name} share the caption "
                                     f"{key}.{CAPTION_EXT} (one image per caption)")
                self.keys.append(key)
                self.paths.append(path)
            else:
                self._skip(key)
        if not self.keys:
            raise EcvizError(f"data folder {root}: no image-caption pairs "
                             f"({self.skipped_no_caption} images without a .txt caption)")

    def _scan(self) -> list[tuple[str, Path]]:
        """(key, path) of every image file under root that is not hidden (nor in a hidden folder), sorted by key."""
        found = []
        for path in self.root.rglob("*"):
            if hidden(path.relative_to(self.root)):
                continue
            if path.suffix[1:].lower() in IMAGE_EXTS and path.is_file():
                found.append((path.relative_to(self.root).with_suffix("").as_posix(), path))
        return sorted(found)

    def _image(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size, str(self.paths[i]))

    def _caption(self, i: int) -> str:
        path = self.paths[i].with_suffix("." + CAPTION_EXT)
        return decode_caption(path.read_bytes(), str(path))

    def _check(self, i: int) -> None:
        check_image(lambda: self.paths[i], str(self.paths[i]))


def expand_braces(pattern: str) -> list[str]:
    """Expand `{00000..00003}` ranges (zero-padded like the start) and `{a,b}` lists, as WebDataset URLs use."""
    m = BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(lo) > int(hi):
            raise EcvizError(f"shard pattern {pattern}: empty range {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise EcvizError(f"shard pattern {pattern}: cannot expand {{{body}}} (use {{0..9}} or {{a,b}})")
    return [out for c in choices for out in expand_braces(head + c + tail)]


def expand_shards(shards: str | Path | list | tuple) -> list[Path]:
    """Shard paths from one .tar, a directory of .tar files (sorted), a brace pattern, or a list of those."""
    if isinstance(shards, list | tuple):
        paths = [p for s in shards for p in expand_shards(s)]
    elif BRACE.search(str(shards)):
        paths = [Path(p) for p in expand_braces(str(shards))]
    elif Path(shards).is_dir():
        paths = sorted(Path(shards).glob("*.tar"))
        if not paths:
            raise EcvizError(f"shard directory {shards}: no .tar files")
    else:
        paths = [Path(shards)]
    if not paths:
        raise EcvizError("no shards given")
    return paths


class _Member(NamedTuple):
    """Where one tar member's bytes lie: read `size` bytes at `offset` of the shard file."""

    name: str
    offset: int
    size: int


def split_member(name: str) -> tuple[str, str]:
    """WebDataset key and extension: the directory part plus the basename up to its first dot, and the rest."""
    name = name.removeprefix("./")
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: Path) -> dict[str, dict[str, _Member]]:
    """{key: {"image"|"caption": member}} for one shard, read from its tar headers only; a shard cut short (inside
    or between headers: tarfile ends its listing there silently) is refused."""
    if not path.is_file():
        raise EcvizError(f"shard {path}: not found")
    try:
        tf = tarfile.open(path, mode="r:")
    except tarfile.TarError:
        raise EcvizError(f"shard {path}: not a tar file") from None
    groups: dict[str, dict[str, _Member]] = {}
    with tf:
        try:
            for info in tf:
                if hidden(info.name):
                    continue
                key, ext = split_member(info.name)
                role = "image" if ext in IMAGE_EXTS else "caption" if ext == CAPTION_EXT else None
                if info.isfile() and role:
                    groups.setdefault(key, {})[role] = _Member(info.name, info.offset_data, info.size)
        except tarfile.TarError as e:
            raise EcvizError(f"shard {path}: corrupt tar ({one_line(e)})") from None
        if path.stat().st_size - tf.offset < tarfile.BLOCKSIZE:  # tarfile stops at a cut header without a word
            raise EcvizError(f"shard {path}: cut short after {len(tf.getmembers())} members, without the end-of-"
                             "archive blocks a whole tar ends with (an interrupted download or copy?); fetch it "
                             "again or leave it out")
    return groups


class TarImageText(_ImageText):
    """WebDataset tar shards as written by img2dataset (`00000/000000001.jpg` + `.txt` + `.json`), indexed up front.

    Members are read on demand by offset through one cached file handle per shard and process; handles are
    dropped when pickled and reopened after a fork, so DataLoader workers never share a file position.
    """

    def __init__(self, shards: str | Path | list | tuple, size: int = 32):
        super().__init__(size)
        self.shards = expand_shards(shards)
        entries = []
        for s, path in enumerate(self.shards):
            for key, group in index_shard(path).items():
                if "image" not in group:
                    continue
                if "caption" not in group:
                    self._skip(key)
                    continue
                entries.append((key, s, group["image"], group["caption"]))
        entries.sort(key=lambda e: (e[0], e[1]))
        self.keys = [e[0] for e in entries]
        self.members = [e[1:] for e in entries]
        if not self.keys:
            shown = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} (+{len(self.shards) - 1} more)"
            raise EcvizError(f"shards {shown}: no image-caption pairs "
                             f"({self.skipped_no_caption} images without a .txt caption)")
        self._handles: dict[int, BinaryIO] = {}
        self._pid = os.getpid()

    def _read(self, shard: int, member: _Member) -> bytes:
        """One member's bytes, through this process's handle on the shard (a forked worker opens its own)."""
        if self._pid != os.getpid():
            self.close()  # closes only this process's copies of the parent's descriptors
            self._pid = os.getpid()
        f = self._handles.get(shard)
        if f is None:
            with _OPENING:  # verify's threads share the handles: one each
                f = self._handles.get(shard) or open(self.shards[shard], "rb")
                self._handles[shard] = f
        data = os.pread(f.fileno(), member.size, member.offset)  # no shared file position: safe in threads
        if len(data) != member.size:
            raise EcvizError(f"shard {self.shards[shard]}: truncated at {member.name}")
        return data

    def _name(self, shard: int, member: _Member) -> str:
        return f"{self.shards[shard]}:{member.name}"

    def _image(self, i: int) -> torch.Tensor:
        shard, img, _ = self.members[i]
        return load_image(io.BytesIO(self._read(shard, img)), self.size, self._name(shard, img))

    def _caption(self, i: int) -> str:
        shard, _, txt = self.members[i]
        return decode_caption(self._read(shard, txt), self._name(shard, txt))

    def _check(self, i: int) -> None:
        shard, img, _ = self.members[i]
        data = self._read(shard, img)
        check_image(lambda: io.BytesIO(data), self._name(shard, img))

    def close(self) -> None:
        """Close the cached shard handles (they reopen on the next read)."""
        for f in getattr(self, "_handles", {}).values():
            f.close()
        self._handles = {}

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


def load_imagetext(spec: str | Path, size: int = 32) -> FolderImageText | TarImageText:
    """The dataset a --data argument names: tar shards (a .tar, a folder of .tar files, a brace pattern) or a folder."""
    spec = str(spec)
    path = Path(spec)
    if BRACE.search(spec) or spec.endswith(".tar"):
        return TarImageText(spec, size)
    if path.is_dir():
        if any(path.glob("*.tar")):
            loose = next((p for p in path.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTS
                          and not hidden(p.relative_to(path))), None)
            if loose is not None:  # the shards were read and the loose images silently left out
                raise EcvizError(f"data {spec}: holds .tar shards and loose images ({loose.relative_to(path)}) "
                                 "both; give a folder of one kind")
            return TarImageText(path, size)
        return FolderImageText(path, size)
    if not path.exists():
        raise EcvizError(f"data {spec}: not found (want a folder of images + .txt captions, a .tar shard, "
                         "a folder of .tar shards or a pattern like data/{00000..00009}.tar)")
    raise EcvizError(f"data {spec}: not a folder or a .tar shard")
