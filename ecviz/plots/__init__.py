"""Figures of routing analyses: matplotlib for files and notebooks (`ecviz.plots.figures`), plotly for the app
(`ecviz.plots.interactive`), training curves (`ecviz.plots.training`). Plots draw what `ecviz.analysis`
computes; they compute nothing of their own and import neither torch nor the model."""

from ecviz.plots.training import loss_curve, object_compute_curve, read_metrics

__all__ = ["loss_curve", "object_compute_curve", "read_metrics"]
