"""Analyses of recorded routing: where compute goes, how evenly, which experts, which words, against ground truth.

Functions take the Datasets that `ecviz.open_trace` (traces) and `open_probe` (a training run's
`routing.zarr`) give and return labelled xarray objects, lazy (dask) until computed. `ecviz.plots` draws them;
`ecviz report` writes them all.
"""

from ecviz.analysis.allocation import (
    allocation_stats,
    heatmap,
    heatmaps,
    histogram,
    layer_agreement,
    per_image,
    select,
    settling,
    token_grid,
)
from ecviz.analysis.common import check_complete, experts_per_token, open_probe, open_routing, require
from ecviz.analysis.shapes import (
    OBJECT_MIN,
    by_region,
    image_object_fraction,
    object_vs_background,
    trace_object_vs_background,
)
from ecviz.grid import patch_coverage

__all__ = [
    "OBJECT_MIN", "allocation_stats", "by_region", "check_complete", "experts_per_token", "heatmap", "heatmaps",
    "histogram", "image_object_fraction", "layer_agreement", "object_vs_background", "open_probe", "open_routing",
    "patch_coverage", "per_image", "require", "select", "settling", "token_grid", "trace_object_vs_background",
]
