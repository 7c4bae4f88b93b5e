"""Text importance: which words draw compute (paper §3.4: allocation "recognises varying textual importance").

From recorded cross-attention (`--record cross_attn`: conditional branch, mean over heads) and the allocation
of the same block: for each word, its attention map over image tokens (sub-word pieces summed into their word,
as DAAM does; special and padding tokens left out), then
- importance: the experts per token its attended region receives, attention-weighted, over the image mean
  (> 1: the word's region gets more compute than the image average);
- correlation: Spearman's rank correlation between its attention map and the allocation map.
A sparse block's router sees x + MHCA(x) of its own block (Eq. 4), so each layer is paired with its own block's
cross-attention. Results aggregate by word, by PartiPrompts category and challenge, and by GenEval tag.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ecviz.analysis.common import experts_per_token, float_ranks, n_experts, pearson_rows, require, row_ranks
from ecviz.errors import TraceError

SAMPLE_CHUNK = 16


def _word_matrix(text_word: np.ndarray, W: int) -> np.ndarray:
    """(..., text) word index (-1 none) -> (..., text, W) float32 one-hot."""
    return (text_word[..., None] == np.arange(W)).astype(np.float32)


def word_attention(ds: xr.Dataset) -> xr.DataArray:
    """Cross-attention merged into words: (sample, step, block, token, word), each word's pieces summed. Lazy."""
    require(ds, "cross_attn", "text_word", what="word attention")
    W = ds.sizes["word"]
    attn = ds["cross_attn"].chunk({"sample": SAMPLE_CHUNK, "step": -1, "block": -1, "token": -1, "text": -1})
    tw = ds["text_word"].chunk({"sample": SAMPLE_CHUNK, "text": -1})

    def kernel(a, w):  # a (..., token, text), w (..., text) broadcast to a's leading dims -> (..., token, W)
        return np.matmul(a.astype(np.float32), _word_matrix(w, W))

    return xr.apply_ufunc(kernel, attn, tw, input_core_dims=[["token", "text"], ["text"]],
                          output_core_dims=[["token", "word"]], dask="parallelized", output_dtypes=[np.float32],
                          dask_gufunc_kwargs={"output_sizes": {"word": W}})


def attention_on_words(ds: xr.Dataset) -> xr.Dataset:
    """What text importance can rest on, per block: `share`, the part of the image tokens' cross-attention that
    reaches the caption's words rather than the encoder's special tokens ([CLS], [SEP]), and `empty`, the share of
    (sample, step, word) maps that hold no attention at all (float16 zeros), words that exist only. A model that
    reads its captions through [CLS] leaves most word maps empty, and importance is then undefined for them (NaN)
    or rests on a few tokens. Computed."""
    A = word_attention(ds)  # (sample, step, block, token, word)
    tokens = ds.sizes["token"]  # each image token's attention sums to 1 over the text tokens
    real = ds["prompt_word"] != ""  # (sample, word)
    mass = A.sum("token")  # (sample, step, block, word)
    share = mass.sum("word").mean(["sample", "step"]) / tokens
    empty = (mass <= 0).where(real).mean(["sample", "step", "word"])
    out = xr.Dataset({"share": share, "empty": empty}).compute()
    out["share"].attrs["description"] = "share of the image tokens' attention on the caption's words"
    out["empty"].attrs["description"] = "share of the words' attention maps with no attention at all"
    return out


def _importance_kernel(A: np.ndarray, c: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """A (..., token, W) attention per word; c (..., token) experts per token -> (importance, correlation),
    each (..., W), NaN for words without attention (padding)."""
    c = c.astype(np.float32)
    mass = A.sum(-2)  # (..., W)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = A / mass[..., None, :]
        imp = (a * c[..., :, None]).sum(-2) / c.mean(-1)[..., None]
    rc = row_ranks(c.astype(np.int64), E)  # (..., token)
    ra = float_ranks(np.moveaxis(A, -1, -2))  # (..., W, token)
    corr = pearson_rows(ra, rc[..., None, :])
    empty = mass <= 0
    return np.where(empty, np.nan, imp).astype(np.float32), np.where(empty, np.nan, corr).astype(np.float32)


def _conditional(branch: str, what: str) -> None:
    """`cross_attn` is the conditional branch's (the unconditional one reads the null text): a statistic pairing
    it with another branch's allocation would set one image's attention against another's compute."""
    if branch != "cond":
        raise TraceError(f"{what} of branch {branch!r}: cross-attention is recorded for the conditional branch only "
                         "(the unconditional one reads the empty text); use branch='cond'")


def text_importance(ds: xr.Dataset, branch: str = "cond") -> xr.Dataset:
    """Per (sample, step, layer, word): importance and correlation (module docstring), plus `word` labels
    (sample, word). Lazy. Needs a trace recorded with `--record dispatch,cross_attn`."""
    require(ds, "cross_attn", "text_word", "prompt_word", "expert_count", what="text importance")
    _conditional(branch, "text importance")
    E = n_experts(ds)
    A = word_attention(ds).sel(block=ds["layer"].values).rename(block="layer")
    A = A.assign_coords(layer=ds["layer"].values)
    c = experts_per_token(ds, branch).chunk({"sample": SAMPLE_CHUNK})
    imp, corr = xr.apply_ufunc(_importance_kernel, A, c, kwargs={"E": E},
                               input_core_dims=[["token", "word"], ["token"]], output_core_dims=[["word"], ["word"]],
                               dask="parallelized", output_dtypes=[np.float32, np.float32])
    out = xr.Dataset({"importance": imp, "correlation": corr})
    out = out.assign_coords(word_text=ds["prompt_word"])
    out["importance"].attrs["description"] = "attention-weighted experts per token of the word's region / image mean"
    out["correlation"].attrs["description"] = "Spearman correlation of the word's attention map and the allocation"
    return out


def token_importance(ds: xr.Dataset, branch: str = "cond") -> xr.Dataset:
    """As text_importance, per text-encoder token (special tokens included), (sample, step, layer, text)."""
    require(ds, "cross_attn", "expert_count", what="token importance")
    _conditional(branch, "token importance")
    E = n_experts(ds)
    A = ds["cross_attn"].sel(block=ds["layer"].values).rename(block="layer").assign_coords(layer=ds["layer"].values)
    A = A.chunk({"sample": SAMPLE_CHUNK, "step": -1, "layer": -1, "token": -1, "text": -1}).astype(np.float32)
    c = experts_per_token(ds, branch).chunk({"sample": SAMPLE_CHUNK})
    imp, corr = xr.apply_ufunc(_importance_kernel, A, c, kwargs={"E": E},
                               input_core_dims=[["token", "text"], ["token"]], output_core_dims=[["text"], ["text"]],
                               dask="parallelized", output_dtypes=[np.float32, np.float32])
    return xr.Dataset({"importance": imp, "correlation": corr}).assign_coords(token_text=ds["text_token"])


def object_name(code: int) -> str:
    """A `word_object` code as words: -1 "no object", -2 "every object", k >= 0 "object k+1" (caption order)."""
    return {-1: "no object", -2: "every object"}.get(code, f"object {code + 1}")


def by_word(imp: xr.Dataset, ds: xr.Dataset | None = None, by: str = "word", lower: bool = True):
    """Aggregate a text_importance result (reduce step/layer first, or they are averaged) into a pandas
    DataFrame indexed by `by`: "word" (the word's text), "category", "challenge" (PartiPrompts; GenEval's
    tag is its category), or "word_object" (Shapes: which object the word names, `object_name`: "no object",
    "every object", "object 1", "object 2" in caption order). Columns: importance, correlation (means) and n
    (words counted: those with an importance, i.e. some attention; a word with none anywhere, padding or a real
    word whose float16 attention is all zero, is left out, and correlation averages only the counted words
    whose attention and allocation maps vary, Spearman's being undefined for a constant map)."""
    import pandas as pd

    require(imp, "importance", "correlation", "word_text", what="by_word (it takes a text_importance result)")
    imp = imp.mean([d for d in imp.dims if d not in ("sample", "word")]).compute()
    frame = pd.DataFrame({
        "sample": np.repeat(np.arange(imp.sizes["sample"]), imp.sizes["word"]),
        "word": imp["word_text"].values.ravel().astype(object),
        "importance": imp["importance"].values.ravel(),
        "correlation": imp["correlation"].values.ravel(),
    })
    if lower:
        frame["word"] = frame["word"].str.lower().str.strip(".,;:!?\"'()")
    frame = frame[(frame["word"] != "") & frame["importance"].notna()]
    if by != "word":
        if ds is None or by not in ds:
            raise TraceError(f"grouping by {by!r} needs the trace's `{by}` variable")
        same = ds.sizes["sample"] == imp.sizes["sample"] and "prompt_word" in ds and np.array_equal(
            imp["word_text"].values.astype(object), ds["prompt_word"].values.astype(object))
        if not same:  # rows are matched by position: another trace's labels would be silently wrong
            raise TraceError(f"the importance result's {imp.sizes['sample']} samples and words are not those of the "
                             f"trace's {ds.sizes['sample']}: pass the trace (or subset) it was computed from")
        values = ds[by].values
        values = values.astype(object)
        frame[by] = values[frame["sample"].values] if values.ndim == 1 else \
            values.reshape(len(values), -1)[frame["sample"].values, frame.index.values % imp.sizes["word"]]
        if by == "word_object":  # the trace's codes (docs/trace-format.md) as names
            frame[by] = [object_name(int(v)) for v in frame[by]]
    out = frame.groupby(by).agg(importance=("importance", "mean"), correlation=("correlation", "mean"),
                                n=("importance", "size"))
    return out.sort_values("importance", ascending=False)
