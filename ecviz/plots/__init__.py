"""Figures of routing analyses: matplotlib for files and notebooks (`ecviz.plots.figures`), plotly for the app
(`ecviz.plots.interactive`), training curves and sample grids (`ecviz.plots.training`). Plots draw what
`ecviz.analysis` computes; they compute nothing of their own and import neither torch nor the model."""

from ecviz.plots.training import GAP, GAP_FILL, loss_curve, object_compute_curve, read_metrics, sample_grid, tile

__all__ = ["GAP", "GAP_FILL", "loss_curve", "object_compute_curve", "read_metrics", "sample_grid", "tile"]
