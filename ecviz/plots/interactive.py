"""Plotly figures of routing analyses, for the Streamlit app: values on hover, PNG download from the toolbar.

Same inputs as `ecviz.plots.figures`; each function returns a `plotly.graph_objects.Figure`. Heatmaps over an
image use a layout image (the picture, upscaled without smoothing) under a semi-transparent heatmap trace whose
cells span the picture's patches, so hovering a cell shows its row, column and experts.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import xarray as xr

COLORSCALE = "Magma_r"


def image_uri(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def heatmap_figure(heat: np.ndarray, image: np.ndarray | None = None, opacity: float = 0.6,
                   colorscale: str = COLORSCALE, zmax: float | None = None, title: str | None = None,
                   label: str = "experts", size: int = 360):
    """A (rows, cols) heatmap, over an (H, W, 3) image when given (pixels stretched to the same extent)."""
    import plotly.graph_objects as go

    rows, cols = heat.shape
    h, w = image.shape[:2] if image is not None else (rows, cols)
    fig = go.Figure(go.Heatmap(
        z=heat, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2, dy=h / rows, colorscale=colorscale, zmin=0,
        zmax=zmax, opacity=opacity if image is not None else 1.0, colorbar={"title": label},
        customdata=np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1),
        hovertemplate="row %{customdata[1]}, col %{customdata[0]}<br>" + label + " %{z:.2f}<extra></extra>"))
    if image is not None:
        fig.add_layout_image(source=image_uri(image), x=0, y=0, sizex=w, sizey=h, xref="x", yref="y",
                             sizing="stretch", layer="below")
    fig.update_xaxes(range=[0, w], visible=False, constrain="domain")
    fig.update_yaxes(range=[h, 0], visible=False, scaleanchor="x")
    fig.update_layout(width=size + 90, height=size, margin={"l": 0, "r": 0, "t": 30 if title else 0, "b": 0},
                      title=title, plot_bgcolor="white")
    return fig


def grid_figure(maps: xr.DataArray, over: str, images: list[np.ndarray | None] | None = None,
                opacity: float = 0.6, colorscale: str = COLORSCALE):
    """Heatmaps (over, row, col) side by side (Fig. 6a over layers, 6b over steps), over their images."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = maps.sizes[over]
    labels = [f"block {v}" if over == "layer" else f"step {v}" for v in maps[over].values]
    fig = make_subplots(1, n, subplot_titles=labels, horizontal_spacing=0.01)
    zmax = float(maps.max())
    rows, cols = maps.sizes["row"], maps.sizes["col"]
    for i in range(n):
        image = images[i] if images else None
        h, w = image.shape[:2] if image is not None else (rows, cols)
        fig.add_trace(go.Heatmap(z=maps.isel({over: i}).values, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2,
                                 dy=h / rows, zmin=0, zmax=zmax, colorscale=colorscale, showscale=i == n - 1,
                                 opacity=opacity if image is not None else 1.0, name=labels[i],
                                 hovertemplate=labels[i] + "<br>experts %{z:.2f}<extra></extra>"), 1, i + 1)
        if image is not None:
            fig.add_layout_image(source=image_uri(image), x=0, y=0, sizex=w, sizey=h, xref=f"x{i + 1}",
                                 yref=f"y{i + 1}", sizing="stretch", layer="below")
        fig.update_xaxes(range=[0, w], visible=False, row=1, col=i + 1)
        fig.update_yaxes(range=[h, 0], visible=False, row=1, col=i + 1, scaleanchor=f"x{i + 1}")
    fig.update_layout(height=230, width=max(400, 180 * n + 80), margin={"l": 0, "r": 0, "t": 30, "b": 0})
    return fig


def matrix_figure(da: xr.DataArray, x: str, y: str, title: str | None = None, colorscale: str = "Viridis",
                  label: str | None = None):
    """A 2-D DataArray (y, x) as a heatmap with its coordinates on the axes."""
    import plotly.graph_objects as go

    da = da.transpose(y, x)
    fig = go.Figure(go.Heatmap(z=da.values, x=[str(v) for v in da[x].values], y=[str(v) for v in da[y].values],
                               colorscale=colorscale, colorbar={"title": label or (da.name or "")},
                               hovertemplate=f"{y} %{{y}}, {x} %{{x}}<br>%{{z:.3f}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x.replace("_", " "), yaxis_title=y.replace("_", " "), height=320,
                      margin={"l": 40, "r": 10, "t": 40 if title else 10, "b": 40})
    return fig


def lines_figure(da: xr.DataArray, x: str, by: str = "layer", title: str | None = None,
                 lo: xr.DataArray | None = None, hi: xr.DataArray | None = None, label: str | None = None):
    """Lines of da along x, one per value of `by`, with an optional (lo, hi) band."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in da[by].values:
        y = da.sel({by: v})
        name = f"block {v}" if by == "layer" else str(v)
        fig.add_trace(go.Scatter(x=da[x].values, y=y.values, mode="lines+markers", name=name))
        if lo is not None and hi is not None:
            fig.add_trace(go.Scatter(x=np.concatenate([da[x].values, da[x].values[::-1]]),
                                     y=np.concatenate([lo.sel({by: v}).values, hi.sel({by: v}).values[::-1]]),
                                     fill="toself", opacity=0.2, line={"width": 0}, showlegend=False,
                                     hoverinfo="skip", name=name + " interval"))
    fig.update_layout(title=title, xaxis_title=x.replace("_", " "), yaxis_title=label or (da.name or ""),
                      height=320, margin={"l": 40, "r": 10, "t": 40 if title else 10, "b": 40})
    return fig


def bars_figure(x, y, title: str | None = None, xlabel: str = "", ylabel: str = "", baseline: float | None = None):
    """Bars with values on hover."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[str(v) for v in x], y=np.asarray(y, float),
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    if baseline is not None:
        fig.add_hline(y=baseline, line_width=1)
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=300,
                      margin={"l": 40, "r": 10, "t": 40 if title else 10, "b": 40})
    return fig
