"""Analyses of recorded routing: where compute goes, measured against ground truth where there is some.

Functions take the xarray Datasets that `ecviz.open_trace` (traces) and `xarray.open_zarr` (training probes,
`runs/NAME/routing.zarr`) return, and return DataArrays, so results keep their coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

OBJECT_MIN = 0.5  # a token is "object" when at least half its patch is covered by an object


def token_grid(da: xr.DataArray, rows: int | None = None) -> xr.DataArray:
    """Unflatten the `token` dimension into (`row`, `col`) on the patch grid (row-major, square by default)."""
    n = da.sizes["token"]
    rows = rows or math.isqrt(n)
    cols = n // rows
    out = da.drop_vars([c for c in ("token", "row", "col") if c in da.coords])
    out = out.assign_coords(token=np.arange(n))
    return out.coarsen(token=cols).construct(token=("row", "col")).assign_coords(row=np.arange(rows),
                                                                                    col=np.arange(cols))


def by_region(count: xr.DataArray, object_fraction: xr.DataArray, over: tuple[str, ...]) -> xr.DataArray:
    """Mean of `count` over `over` on object tokens (>= OBJECT_MIN of the patch covered) and on background
    tokens (nothing covered), along a new `region` dimension (object, background). Computed (small)."""
    regions = {"object": object_fraction >= OBJECT_MIN, "background": object_fraction == 0}
    out = [count.astype(np.float32).where(mask).mean(over) for mask in regions.values()]
    return xr.concat(out, dim=xr.DataArray(list(regions), dims="region", name="region")).compute()


def object_vs_background(probe: xr.Dataset) -> xr.DataArray:
    """Mean experts per token on object and on background tokens of a training probe store, against the data's
    ground-truth masks: (region, train_step, t, layer). Expert choice spends f_c experts per token on average;
    the split shows where."""
    return by_region(probe["expert_count"], probe["object_fraction"], ("probe", "token"))


def patch_coverage(fg: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, rows·cols) float32: the fraction of each token's patch where the mask fg (N, H, W) is set."""
    n, h, w = fg.shape
    return fg.reshape(n, rows, h // rows, cols, w // cols).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


def image_object_fraction(ds: xr.Dataset, threshold: int = 64) -> xr.DataArray:
    """(sample, token): the fraction of each token's patch that is not background in the generated image
    (a pixel is background when every channel is below `threshold`): object masks for Shapes-like images."""
    fg = (ds["image"] >= threshold).any("channel").values  # (sample, H, W)
    return xr.DataArray(patch_coverage(fg, *ds.attrs["grid"]), dims=("sample", "token"))


def trace_object_vs_background(ds: xr.Dataset, branch: str = "cond") -> xr.DataArray:
    """Mean experts per token on the objects and on the background of each trace's own generated images:
    (region, step, layer), over all samples."""
    count = ds["expert_count"].sel(branch=branch).drop_vars(["row", "col", "token"], errors="ignore")
    return by_region(count, image_object_fraction(ds), ("sample", "token"))
