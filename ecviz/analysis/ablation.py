"""Causal word importance from an `ecviz ablate-words` store, set against attention-based importance.

The store holds, per sample and word, how much masking that word out of the text changed the allocation maps
(`alloc_change`, `rank_change`) and the image (`image_change`), and the word's attention-based importance in
the unmasked sample (`attn_importance`). A word the allocation "recognises" should score high on both.
"""

from __future__ import annotations

import numpy as np

from ecviz.errors import TraceError

PUNCT = ".,;:!?\"'()"


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:  # a constant side: undefined
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def _ablation(source):
    """An ablation store's Dataset: opened from a path, or one already open; a one-line TraceError for anything
    else (a trace's Dataset failed later with a KeyError)."""
    from ecviz.trace.ablation import DESCRIPTIONS, open_ablation

    if not hasattr(source, "data_vars"):
        return open_ablation(source)
    lost = [name for name in DESCRIPTIONS if name not in source.variables]
    if lost:
        raise TraceError(f"not a word-ablation result (it lacks `{lost[0]}`): pass the store `ecviz ablate-words` "
                         "wrote, or its path")
    return source


def ablation_summary(source) -> dict:
    """Counts and Spearman correlations between causal and attention-based importance (over all words)."""
    ds = _ablation(source)
    a = ds["alloc_change"].values.ravel()
    r = ds["rank_change"].values.ravel()
    im = ds["image_change"].values.ravel()
    att = ds["attn_importance"].values.ravel()
    return {"samples": int(ds.sizes["sample"]), "words": int(np.isfinite(a).sum()),
            "spearman_alloc_vs_attention": _spearman(a, att), "spearman_rank_vs_attention": _spearman(r, att),
            "spearman_alloc_vs_image": _spearman(a, im),
            "mean_alloc_change": float(np.nanmean(a)) if np.isfinite(a).any() else float("nan"),
            "mean_image_change": float(np.nanmean(im)) if np.isfinite(im).any() else float("nan")}


def ablation_by_word(source, lower: bool = True):
    """pandas DataFrame per word text: mean alloc_change, rank_change, image_change, attn_importance and n."""
    import pandas as pd

    ds = _ablation(source)
    frame = pd.DataFrame({k: ds[k].values.ravel() for k in ("alloc_change", "rank_change", "image_change",
                                                             "attn_importance")})
    frame["word"] = ds["prompt_word"].values.ravel().astype(object)
    if lower:
        frame["word"] = frame["word"].str.lower().str.strip(PUNCT)
    frame = frame[frame["alloc_change"].notna()]
    out = frame.groupby("word").agg(alloc_change=("alloc_change", "mean"), rank_change=("rank_change", "mean"),
                                    image_change=("image_change", "mean"),
                                    attn_importance=("attn_importance", "mean"), n=("alloc_change", "size"))
    return out.sort_values("alloc_change", ascending=False)
