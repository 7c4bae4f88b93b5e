"""Prompt files: plain text (one prompt a line), PartiPrompts TSV and GenEval metadata JSONL.

Text is kept exactly as written (only the line ending is removed); a PartiPrompts prompt that starts with
a double quote keeps it, because the TSV is read with quoting disabled.

Four sets ship inside the package (`ecviz/assets/prompts/`, sources and licences in its README.md), so
`--prompts parti`, `geneval`, `shapes` and `shapes-eval` work in a clone with nothing beside it. A bare
name picks a bundled set; anything else is a path (write `./parti` for a file of that name).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ecviz.errors import UsageError

PARTI_HEADER = ["Prompt", "Category", "Challenge", "Note"]
ASSETS = Path(__file__).parent / "assets" / "prompts"
BUNDLED = {  # name -> file in ASSETS, byte-exact copies of their sources
    "parti": "PartiPrompts.tsv",  # google-research/parti, Apache-2.0: 1632 prompts, 12 categories
    "geneval": "geneval_metadata.jsonl",  # djghosh13/geneval evaluation metadata, MIT: 553 prompts, 6 tags
    "shapes": "shapes.jsonl",  # ours: 36 GenEval-style prompts for the synthetic Shapes set (ShapesEval)
    "shapes-eval": "shapes_eval.jsonl",  # ours: the evaluation set, 48 per category, drawn with its own seed
}


def prompt_path(spec: str | Path) -> Path:
    """The file a `--prompts` value names: a bundled set by name (BUNDLED's keys), else a path.
    Only a str can name a set; a Path is always a path."""
    return ASSETS / BUNDLED[spec] if isinstance(spec, str) and spec in BUNDLED else Path(spec)


@dataclass
class PromptSet:
    prompts: list[str]
    path: Path
    sha256: str
    kind: str  # "text" | "parti" | "geneval"
    category: list[str] | None = None  # Parti Category, GenEval tag
    challenge: list[str] | None = None  # Parti Challenge
    skipped_blank: int = 0
    meta: list[dict] = field(default_factory=list)  # per prompt, anything else the file said

    def __len__(self) -> int:
        return len(self.prompts)


MAX_PROMPT_BYTES = 64 << 20  # a prompt file larger than this is not one (about a million Parti-length prompts)


def check_readable_by_every_rank(path: str | Path, processes: int) -> None:
    """A prompt file that several processes each read whole must be a regular file: from a pipe (`/dev/stdin`,
    `<(...)`) each rank got part of the stream, and the ranks traced different prompts into one store."""
    if processes <= 1:
        return
    path = prompt_path(path)
    if path.exists() and not path.is_file():
        raise UsageError(f"--prompts {path}: a pipe or device, which the {processes} processes cannot each read "
                         "whole; write it to a file first")


def read_prompts(path: str | Path) -> PromptSet:
    """Read a prompt file or a bundled set (see `prompt_path`); one-line UsageError for a missing, empty or
    undecodable one."""
    path = prompt_path(path)
    try:
        with open(path, "rb") as f:  # a pipe too, for one process (`--prompts <(grep cat parti.tsv)`)
            raw = f.read(MAX_PROMPT_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"prompt file {path}: not found (or name a bundled set: {', '.join(BUNDLED)})") from None
    except IsADirectoryError:
        raise UsageError(f"prompt file {path}: is a directory") from None
    except OSError as e:
        raise UsageError(f"prompt file {path}: unreadable ({e.strerror})") from None
    if len(raw) > MAX_PROMPT_BYTES:
        raise UsageError(f"prompt file {path}: larger than {MAX_PROMPT_BYTES >> 20} MiB; split it (PartiPrompts is "
                         "0.1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        raise UsageError(f"prompt file {path}: not UTF-8 text ({bad})") from None
    text = text.removeprefix("\ufeff")
    sha = hashlib.sha256(raw).hexdigest()
    first = text.split("\n", 1)[0].rstrip("\r")
    if first.split("\t") == PARTI_HEADER:
        ps = _parti(text, path, sha)
    elif path.suffix.lower() == ".jsonl":
        ps = _geneval(text, path, sha)
    elif path.suffix.lower() == ".tsv":  # read as plain text, its header would be prompt 0 and its tabs in each
        raise UsageError(f"prompt file {path}: a .tsv whose header is not PartiPrompts' "
                         f"({', '.join(PARTI_HEADER)}, tab-separated); give it that header, or name it .txt to "
                         "read each line as a prompt")
    else:
        ps = _plain(text, path, sha)
    if not ps.prompts:
        raise UsageError(f"prompt file {path}: no prompts")
    return ps


def _lines(text: str) -> list[str]:
    return [line.removesuffix("\r") for line in text.split("\n")[: -1 if text.endswith("\n") else None]]


def _plain(text: str, path: Path, sha: str) -> PromptSet:
    lines = _lines(text)
    prompts = [line for line in lines if line.strip()]
    return PromptSet(prompts, path, sha, "text", skipped_blank=len(lines) - len(prompts))


def _parti(text: str, path: Path, sha: str) -> PromptSet:
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    prompts, category, challenge, meta = [], [], [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(PARTI_HEADER):
            raise UsageError(f"prompt file {path} line {n}: {len(row)} tab-separated fields, expected 4")
        if not row[0].strip():
            raise UsageError(f"prompt file {path} line {n}: the prompt is empty")
        prompts.append(row[0])
        category.append(row[1])
        challenge.append(row[2])
        meta.append({"note": row[3]})
    return PromptSet(prompts, path, sha, "parti", category, challenge, meta=meta)


def _geneval(text: str, path: Path, sha: str) -> PromptSet:
    prompts, tags, meta, blank = [], [], [], 0
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"prompt file {path} line {n}: not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("prompt"), str):
            raise UsageError(f"prompt file {path} line {n}: no \"prompt\" string")
        if not doc["prompt"].strip():
            raise UsageError(f"prompt file {path} line {n}: the prompt is empty")
        try:
            doc["prompt"].encode("utf-8")
        except UnicodeEncodeError:  # a JSON escape of half a surrogate pair, e.g. \ud800
            raise UsageError(f"prompt file {path} line {n}: the prompt is not Unicode text (a lone surrogate "
                             "escape)") from None
        prompts.append(doc["prompt"])
        tags.append(str(doc.get("tag", "")))
        meta.append({k: v for k, v in doc.items() if k not in ("prompt", "tag")})
    return PromptSet(prompts, path, sha, "geneval", category=tags, skipped_blank=blank, meta=meta)
