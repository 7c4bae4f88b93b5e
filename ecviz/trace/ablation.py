"""The store `ecviz ablate-words` writes (xarray/Zarr v3): its version, its writer and its reader.

It lives beside the trace format, not in `ecviz.experiments` (which runs the model), so that analyses of an
ablation store (`ecviz.analysis.ablation`) read it without importing torch. Layout (per sample: one prompt and
seed; per variant: the original, then the prompt with one word masked out of the text):

- `prompt`, `prompt_index`, `seed` (sample); `prompt_word` (sample, word); `variant_word` (sample, variant):
  the word each variant masks, -1 the original, -2 padding;
- `image` (sample, variant, y, x, channel) uint8 and `expert_count` (sample, variant, step, layer, token) uint8
  of the conditional branch;
- per (sample, word), NaN where the prompt has no such word: `alloc_change`, `rank_change`, `image_change`
  (causal effects of masking the word) and `attn_importance`, `attn_correlation` (attention-based, in the
  original), each with a `description` attribute;
- attributes: `ecviz_ablation_version`, the checkpoint, prompt file and sampler settings (`steps`, `guidance`,
  `seed`, `group_size`, `capacity_factor` (the inference f_c), ...).

Version 2 renamed the attribute `cfg` (the guidance scale) to `guidance`; `open_ablation` reads version 1 stores
under the new name. Version 3 added `capacity_factor` (`--capacity-factor`); stores of versions 1 and 2 were
routed with the model's own f_c, which they do not record, and open without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecviz.errors import TraceError
from ecviz.io import atomic_dir

ABLATION_VERSION = 3
READABLE = (1, 2, ABLATION_VERSION)  # version 1 through the rename in open_ablation

DESCRIPTIONS = {
    "alloc_change": "mean |change| of experts per token when the word is masked, over the original's mean",
    "rank_change": "1 - Spearman of the allocation maps, masked vs not",
    "image_change": "mean |pixel change| / 255 when the word is masked",
    "attn_importance": "attention-based importance of the word (text_importance) in the original",
    "variant_word": "word masked in each variant; -1: the original, -2: padding",
}


def write_ablation(ds, out) -> Path:
    """Write an ablation Dataset to `out` atomically (stamped with the version and descriptions); its path."""
    ds = ds.copy()
    ds.attrs["ecviz_ablation_version"] = ABLATION_VERSION
    for name, doc in DESCRIPTIONS.items():
        ds[name].attrs["description"] = doc
    for name in list(ds.variables):
        if ds[name].dtype == object or ds[name].dtype.kind == "U":  # variable-length UTF-8 strings, as in traces
            ds[name] = ds[name].copy(data=np.asarray(ds[name].values.astype(object), dtype=np.dtypes.StringDType()))
    out = Path(out)
    atomic_dir(out, lambda tmp: ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=False))
    return out


def open_ablation(path):
    """An `ecviz ablate-words` store as an xarray Dataset (lazy), its attributes under version 2's names (and
    later ones')."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: not found")
    ds = xr.open_zarr(str(path), consolidated=False)
    version = ds.attrs.get("ecviz_ablation_version")
    if version not in READABLE:
        raise TraceError(f"{path}: not an ecviz ablate-words store of version {', '.join(map(str, READABLE))} "
                         f"(it says {version})")
    if version == 1 and "cfg" in ds.attrs:
        ds.attrs["guidance"] = ds.attrs.pop("cfg")
    return ds
