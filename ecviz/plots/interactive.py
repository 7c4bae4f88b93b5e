"""Plotly figures of routing analyses, for the Streamlit app: values on hover, PNG download from the toolbar.

Same inputs as `ecviz.plots.figures`; each function returns a `plotly.graph_objects.Figure`. Heatmaps over an
image use a layout image (the picture, upscaled without smoothing) under a semi-transparent heatmap trace whose
cells span the picture's patches, so hovering a cell shows its row, column and experts. The picture is
upscaled here, by an integer factor with nearest-neighbour sampling, because browsers smooth a small image that
they stretch. `words_html` colours a prompt's words by a per-word value; `export_config` is the chart
configuration that makes the toolbar's camera button download a PNG.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import xarray as xr

COLORSCALE = "Magma_r"


def theme_safe(colorscale) -> list:
    """A plotly colorscale (a name, or [position, colour] pairs) as [position, "rgb(r, g, b)"] pairs. Streamlit's
    plotly chart takes the hex colours #000001 to #000040 for placeholders of its theme's own colours and paints
    them so, even with theme=None: Magma's and Inferno's black, #000004, came out bright violet, at the top of
    every experts-per-token scale (Magma_r) or at zero experts (Inferno). rgb() colours it leaves alone."""
    from plotly.colors import get_colorscale, hex_to_rgb

    scale = get_colorscale(colorscale) if isinstance(colorscale, str) else colorscale
    return [[float(p), "rgb({}, {}, {})".format(*hex_to_rgb(c)) if c.startswith("#") else c] for p, c in scale]


IMAGE_PX = 384  # pictures under heatmaps are upscaled to at least this many pixels across


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) -> (H·factor, W·factor, C), every pixel repeated (nearest neighbour: no smoothing)."""
    return np.repeat(np.repeat(np.asarray(image), factor, 0), factor, 1)


def image_uri(image: np.ndarray, min_px: int = 0) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, upscaled without smoothing by the smallest integer factor that
    makes it at least min_px wide."""
    from PIL import Image

    image = np.asarray(image, np.uint8)
    factor = max(1, -(-min_px // image.shape[1]))
    buf = io.BytesIO()
    Image.fromarray(upscale(image, factor)).save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_uri(uri: str) -> np.ndarray:
    """The (H, W, 3) pixels of a PNG data URI (image_uri's inverse, at the upscaled size)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def export_config(filename: str, scale: int = 2) -> dict:
    """Plotly chart config: the toolbar (shown on hover) has a camera button that downloads `filename`.png."""
    return {"toImageButtonOptions": {"format": "png", "filename": filename, "scale": scale},
            "displaylogo": False}


def heatmap_figure(heat: np.ndarray, image: np.ndarray | None = None, opacity: float = 0.6,
                   colorscale: str = COLORSCALE, zmax: float | None = None, title: str | None = None,
                   label: str = "experts", size: int = 360, zmin: float | None = 0, zmid: float | None = None):
    """A (rows, cols) heatmap, over an (H, W, 3) image when given (pixels stretched to the same extent).
    zmin/zmax fix the colour range (None: the data's), zmid centres a diverging scale (differences). A band
    40 px high stays above the plot, with or without a title, for plotly's toolbar (which would cover the
    colour bar's label)."""
    import plotly.graph_objects as go

    heat = np.asarray(heat)
    if zmin is not None and zmax is None:  # plotly fixes the range only when both ends are given
        zmax = float(np.nanmax(heat)) if np.isfinite(heat).any() else None
        if zmax is not None and zmax <= zmin:  # a flat map (a word with no attention): keep the scale above zmin
            zmax = zmin + 1.0
    rows, cols = heat.shape
    h, w = image.shape[:2] if image is not None else (rows, cols)
    trace = go.Heatmap(
        z=heat, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2, dy=h / rows, colorscale=theme_safe(colorscale),
        zmin=zmin, zmax=zmax, zmid=zmid, opacity=opacity if image is not None else 1.0, colorbar={"title": label},
        customdata=np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1),
        hovertemplate="row %{customdata[1]}, col %{customdata[0]}<br>" + label + " %{z:.3f}<extra></extra>")
    images = [{"source": image_uri(image, IMAGE_PX), "x": 0, "y": 0, "sizex": w, "sizey": h, "xref": "x",
               "yref": "y", "sizing": "stretch", "layer": "below"}] if image is not None else []
    layout = {"xaxis": {"range": [0, w], "visible": False, "constrain": "domain"},
              "yaxis": {"range": [h, 0], "visible": False, "scaleanchor": "x"},
              "images": images, "width": size + 90, "height": size + 40,  # the top 40 px: title and toolbar
              "margin": {"l": 0, "r": 0, "t": 40, "b": 0}, "plot_bgcolor": "white",
              "title": {"text": title, "x": 0, "xanchor": "left"} if title else None}
    return go.Figure(trace, layout)  # one construction: plotly validates each update separately


def grid_figure(maps: xr.DataArray, over: str, images: list[np.ndarray | None] | None = None,
                opacity: float = 0.6, colorscale: str = COLORSCALE, per_row: int = 8, cell: int = 150,
                label: str = "experts"):
    """Heatmaps (over, row, col) side by side (Fig. 6a over layers, 6b over steps; or over experts), over their
    images, on one colour scale, `per_row` to a row. One heatmap trace per map, in the order of `over`; `label`
    names the values (colour bar and hover)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = maps.sizes[over]
    ncols = min(n, per_row)
    nrows = -(-n // ncols)
    name = {"layer": "block", "step": "step", "expert": "expert"}.get(over, over)
    labels = [f"{name} {v}" for v in maps[over].values]
    fig = make_subplots(nrows, ncols, subplot_titles=labels, horizontal_spacing=0.01,
                        vertical_spacing=min(0.3 / nrows, 0.08))
    zmax = float(maps.max())
    rows, cols = maps.sizes["row"], maps.sizes["col"]
    for i in range(n):
        image = images[i] if images else None
        h, w = image.shape[:2] if image is not None else (rows, cols)
        r, c = i // ncols + 1, i % ncols + 1
        fig.add_trace(go.Heatmap(z=maps.isel({over: i}).values, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2,
                                 dy=h / rows, zmin=0, zmax=zmax, colorscale=theme_safe(colorscale),
                                 showscale=i == n - 1,
                                 opacity=opacity if image is not None else 1.0, name=labels[i],
                                 colorbar={"title": label, "len": min(1.0, 1.2 / nrows + 0.2)},
                                 hovertemplate=labels[i] + f"<br>{label} %{{z:.2f}}<extra></extra>"), r, c)
        axis = "" if i == 0 else str(i + 1)
        if image is not None:
            fig.add_layout_image(source=image_uri(image, cell), x=0, y=0, sizex=w, sizey=h, xref=f"x{axis}",
                                 yref=f"y{axis}", sizing="stretch", layer="below")
        fig.update_xaxes(range=[0, w], visible=False, row=r, col=c)
        fig.update_yaxes(range=[h, 0], visible=False, row=r, col=c, scaleanchor=f"x{axis}")
    fig.update_layout(height=(cell + 30) * nrows + 50, width=max(400, (cell + 10) * ncols + 100),
                      margin={"l": 0, "r": 0, "t": 60, "b": 0})  # the toolbar above the first row's titles
    return fig


BLANK = "#bdbdbd"  # a matrix's blanked cells (a co-selection diagonal): grey, unlike any value's colour
PALETTE = ("#17becf", "#1f77b4", "#bcbd22", "#ff7f0e", "#e377c2", "#2ca02c", "#8c564b", "#d62728", "#7f7f7f",
           "#9467bd")  # lines_figure: a block's colour follows its index, the same in every chart; the odd indices
# (every second block is sparse, as in the paper) get the most distinct: blue, orange, green, red, purple


def diverging_at(name: str, mid: float) -> list:
    """Plotly's diverging colorscale `name` ("RdBu_r"...) with its centre colour moved to `mid` (0..1 of the
    range): a ratio's scale from 0 with white at 1, its two sides of unequal length."""
    from plotly.colors import get_colorscale

    scale = get_colorscale(name)
    mid = min(max(mid, 1e-6), 1 - 1e-6)
    return [[p * 2 * mid if p <= 0.5 else mid + (p - 0.5) * 2 * (1 - mid), c] for p, c in scale]


def matrix_figure(da: xr.DataArray, x: str, y: str, title: str | None = None, colorscale: str = "Viridis",
                  label: str | None = None, diagonal: bool = True, zmid: float | None = None,
                  zrange: tuple[float, float] | None = None, rows_down: bool = False):
    """A 2-D DataArray (y, x) as a heatmap with its coordinates on category axes (labels such as sparse block
    indices 1, 3, 5 are not spaced as numbers). diagonal=False leaves the diagonal blank (a co-selection matrix's
    diagonal is each expert with itself, off the scale of the rest); zmid centres a diverging scale, zrange fixes
    it (with zmid too: white at zmid, the scale from zrange's low end up to the data's maximum, for ratios that
    cannot go below 0); rows_down lists the rows top to bottom (a table of words), and the figure grows with them."""
    import plotly.graph_objects as go

    da = da.transpose(y, x)
    z = da.values.astype(float)
    if not diagonal:
        z = z.copy()
        np.fill_diagonal(z, np.nan)
    lo, hi = zrange or (None, None)
    if zmid is not None and lo is not None:  # a ratio (lift, enrichment): white at zmid, the range from lo
        finite = z[np.isfinite(z)]
        hi = max(hi if hi is not None else -np.inf, float(finite.max()) if finite.size else zmid, 2 * zmid - lo)
        colorscale, zmid = diverging_at(colorscale, (zmid - lo) / (hi - lo)), None
    fig = go.Figure(go.Heatmap(z=z, x=[str(v) for v in da[x].values], y=[str(v) for v in da[y].values],
                               colorscale=theme_safe(colorscale), zmid=zmid, zmin=lo, zmax=hi,
                               colorbar={"title": label or (da.name or "")},
                               hovertemplate=f"{y} %{{y}}, {x} %{{x}}<br>%{{z:.3f}}<extra></extra>"))
    rows = da.sizes[y]
    fig.update_layout(title=_title(title), xaxis={"title": x.replace("_", " "), "type": "category"},
                      yaxis={"title": y.replace("_", " "), "type": "category", "automargin": True,
                             **({"autorange": "reversed"} if rows_down else {})},
                      height=max(320, 22 * rows + 90) if rows_down else 320,
                      **({} if diagonal else {"plot_bgcolor": BLANK}),
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})  # top 40 px: title, toolbar
    return fig


def _title(title: str | None) -> dict | None:
    """A chart title at the left: plotly's toolbar, shown on hover at the top right, covered a centred one."""
    return {"text": title, "x": 0, "xanchor": "left"} if title else None


def lines_figure(da: xr.DataArray, x: str, by: str = "layer", title: str | None = None,
                 lo: xr.DataArray | None = None, hi: xr.DataArray | None = None, label: str | None = None,
                 baseline: float | None = None):
    """Lines of da along x, one per value of `by`, with an optional (lo, hi) band and a reference line at
    `baseline` (a ratio's 1, a correlation's 0). The y axis takes the room its labels need (a fixed margin cut
    the minus sign off -0.5 under a long axis title)."""
    import plotly.graph_objects as go
    from plotly.colors import hex_to_rgb

    fig = go.Figure()
    for i, v in enumerate(da[by].values):
        y = da.sel({by: v})
        name = f"block {v}" if by == "layer" else str(v)
        colour = PALETTE[(int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else i) % len(PALETTE)]
        fig.add_trace(go.Scatter(x=da[x].values, y=y.values, mode="lines+markers", name=name,
                                 line={"color": colour}, legendgroup=name))
        if lo is not None and hi is not None:  # the band in its line's colour (not the next in plotly's cycle)
            fig.add_trace(go.Scatter(x=np.concatenate([da[x].values, da[x].values[::-1]]),
                                     y=np.concatenate([lo.sel({by: v}).values, hi.sel({by: v}).values[::-1]]),
                                     fill="toself", fillcolor="rgba({},{},{},0.2)".format(*hex_to_rgb(colour)),
                                     line={"width": 0}, showlegend=False, hoverinfo="skip", name=name + " interval",
                                     legendgroup=name))
    if baseline is not None:
        fig.add_hline(y=baseline, line_width=1, line_dash="dot", line_color="grey")
    fig.update_layout(title=_title(title), xaxis_title=x.replace("_", " "),
                      yaxis={"title": label or (da.name or ""), "automargin": True},
                      height=320, margin={"l": 40, "r": 10, "t": 40, "b": 40})  # top 40 px: title, toolbar
    return fig


def bars_figure(x, y, title: str | None = None, xlabel: str = "", ylabel: str = "", baseline: float | None = None,
                lo=None, hi=None):
    """Bars with values on hover, and error bars from lo to hi where given."""
    import plotly.graph_objects as go

    y = np.asarray(y, float)
    err = None
    if lo is not None and hi is not None:
        up, down = np.nan_to_num(np.asarray(hi, float) - y).clip(0), np.nan_to_num(y - np.asarray(lo, float)).clip(0)
        err = {"type": "data", "symmetric": False, "array": up, "arrayminus": down, "thickness": 1.2}
    fig = go.Figure(go.Bar(x=[str(v) for v in x], y=y, error_y=err,
                           customdata=None if err is None else np.stack([lo, hi], -1),
                           hovertemplate="%{x}: %{y:.3f}" + (" (%{customdata[0]:.2f}–%{customdata[1]:.2f})"
                                                            if err is not None else "") + "<extra></extra>"))
    if baseline is not None:
        fig.add_hline(y=baseline, line_width=1)
    fig.update_layout(title=_title(title), xaxis={"title": xlabel, "type": "category"},
                      yaxis={"title": ylabel, "automargin": True}, height=300,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})  # top 40 px: title, toolbar
    return fig


def value_colours(values, colorscale: str = "RdBu_r", lo: float = -1.0, hi: float = 1.0) -> list[str | None]:
    """Each value's colour on the colour scale over [lo, hi] (clipped), as 'rgb(r, g, b)'; None for NaN."""
    from plotly.colors import sample_colorscale

    out: list[str | None] = []
    for v in np.asarray(values, float):
        if not np.isfinite(v):
            out.append(None)
            continue
        out.append(sample_colorscale(colorscale, [float(np.clip((v - lo) / (hi - lo), 0, 1))])[0])
    return out


def words_html(words, importance=None, correlation=None, selected: int | None = None,
               colorscale: str = "RdBu_r") -> str:
    """A prompt as HTML, each word on a background coloured by its importance on a log2 scale (red: its region
    gets more experts than the image average, blue: fewer; full colour at 2× and 0.5×), the chosen word
    underlined; hovering shows the values. Each word is a span with data-word (its index) and, where it has
    one, data-importance and data-correlation. Padding words ('') are left out. Without importance (a trace
    that recorded no routing) the words are plain."""
    import html
    import re

    scored = importance is not None
    importance = np.asarray(importance if scored else [np.nan] * len(words), float)
    with np.errstate(divide="ignore", invalid="ignore"):
        colours = value_colours(np.log2(importance), colorscale)
    spans = []
    for i, word in enumerate(words):
        word = str(word)
        if not word:
            continue
        style = ["padding:1px 4px", "margin:1px", "border-radius:4px", "display:inline-block"]
        attrs = [f'data-word="{i}"']
        tip = "no cross-attention recorded for it" if scored else "not scored: the trace recorded no routing"
        if colours[i] is not None:
            r, g, b = (int(x) for x in re.findall(r"[\d.]+", colours[i])[:3])
            ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"
            style += [f"background:{colours[i]}", f"color:{ink}"]
            attrs.append(f'data-importance="{importance[i]:.6g}"')
            tip = f"importance {importance[i]:.3f}"
            if correlation is not None and np.isfinite(correlation[i]):
                attrs.append(f'data-correlation="{float(correlation[i]):.6g}"')
                tip += f", correlation {float(correlation[i]):+.3f}"
        if selected == i:
            style.append("text-decoration:underline;font-weight:bold")
        spans.append(f'<span {" ".join(attrs)} title="{html.escape(tip)}" style="{";".join(style)}">'
                     f"{html.escape(word)}</span>")
    return '<div style="font-size:1.15em;line-height:1.9">' + " ".join(spans) + "</div>"
