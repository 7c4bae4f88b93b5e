"""The ecviz app: pick a trace, a prompt, a layer and a denoising step, and see which image regions the experts
chose, next to the words that drew them.

    streamlit run app/main.py                          # the newest trace under traces/
    streamlit run app/main.py -- --trace PATH          # a given trace store or training run
    streamlit run app/main.py -- --root DIR            # look for traces/, runs/, checkpoints/ under DIR

Views: Sample (one image's allocation map, its words and their attention), Grids (the paper's Fig. 6a and 6b,
and every expert's tokens), Statistics, Compare (two traces, same prompt and seed), Training (a run's routing
probe). The URL carries the view, sample, layer, step, word and opacity (`?view=Grids&sample=3&layer=all&step=24`),
so a link reopens the same page.

This file only lays out widgets and figures. What it shows is computed by `ecviz.analysis` and drawn by
`ecviz.plots.interactive`; stores are opened once per path and version (`st.cache_resource`), maps and
statistics cached (`st.cache_data`), keyed by the store's stamp so that a rewritten store is read again. Every
error a store or a missing variable causes is shown as one line in the page (`ecviz.analysis.explain`).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ecviz of this checkout, installed or not

from ecviz import analysis as A
from ecviz.analysis.common import routing_kind
from ecviz.errors import EcvizError, TraceError
from ecviz.plots import interactive as P
from ecviz.plots.figures import background

VIEWS = ("Sample", "Grids", "Statistics", "Compare", "Training")
COLOURMAPS = ("Magma_r", "Viridis", "Inferno", "Hot_r", "Blues", "Greys")
STATS = {"gini": "Gini coefficient", "cv": "coefficient of variation", "entropy": "normalised entropy",
         "skipped": "share of tokens no expert took", "max_share": "most experts on one token / E",
         "mean": "experts per token"}
# widget values kept while their widget is not on the page (another view is shown)
PERSIST = ("view", "sample", "layer", "step", "search", "opacity", "cmap", "picture", "word", "stat", "category",
           "challenge", "stat_images", "compare", "run", "train_step", "t", "train_layer", "probe_image",
           "train_stat")
URL_KEYS = ("store", "view", "sample", "layer", "step", "word", "opacity")  # a link reopens the same page


# ---- reading (cached) -----------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=8)
def store(path: str, stamp: str):
    return A.open_store(path, partial=True)  # an unfinished trace: its done samples (the `partial` attribute)


def ds_of(path: str):
    """The open store at path and its stamp (the cache key of everything computed from it)."""
    stamp = A.stamp(path)
    return store(path, stamp), stamp


@st.cache_data(show_spinner=False, max_entries=8)
def sample_index(path: str, stamp: str) -> dict:
    ds = store(path, stamp)
    out = {"prompts": A.prompts(ds), "image_index": A.image_index(ds).tolist(),
           "number": A.original_samples(ds).tolist(),  # each sample's index in its store (a partial trace skips)
           "t": dict(zip(ds["step"].values.tolist(), ds["t"].values.tolist(), strict=True)) if "t" in ds.coords
           else {}}
    return out


@st.cache_data(show_spinner=False, max_entries=8)
def label_values(path: str, stamp: str, name: str) -> list[str]:
    return A.labels(store(path, stamp), name)


@st.cache_data(show_spinner=False, max_entries=64)
def search(path: str, stamp: str, query: str) -> list[int]:
    return A.search_prompts(store(path, stamp), query).tolist()


@st.cache_data(show_spinner=False, max_entries=1024)
def heat(path: str, stamp: str, sample: int, step, layer, **index):
    return A.heatmap(store(path, stamp), sample, step=step, layer=layer, **index)


@st.cache_data(show_spinner=False, max_entries=256)
def picture(path: str, stamp: str, sample: int, step, use: str):
    return background(store(path, stamp), sample, step, use)  # a probe's image, x0, or none


@st.cache_data(show_spinner=False, max_entries=256)
def grid_maps(path: str, stamp: str, sample: int, over: str, **index):
    return A.heatmaps(store(path, stamp), sample, over=over, **index)


@st.cache_data(show_spinner=False, max_entries=256)
def per_expert(path: str, stamp: str, sample: int, step, layer):
    return A.expert_maps(store(path, stamp), sample, step=step, layer=layer)


@st.cache_data(show_spinner=False, max_entries=256)
def words(path: str, stamp: str, sample: int, step, layer):
    return A.word_scores(store(path, stamp), sample, step=step, layer=layer)


@st.cache_data(show_spinner=False, max_entries=256)
def attention(path: str, stamp: str, sample: int, word: int, step, layer):
    return A.word_map(store(path, stamp), sample, word, step=step, layer=layer)


@st.cache_data(show_spinner=False, max_entries=256)
def sample_words(path: str, stamp: str, sample: int) -> list[str]:
    return A.sample_words(store(path, stamp), sample)


STAT_IMAGES = {64: "64 images, evenly spaced", 256: "256 images, evenly spaced", 1024: "1,024 images, evenly spaced",
               "all": "every image"}
STAT_DEFAULT = (512, 64)  # above this many images, statistics default to this many


@st.cache_resource(show_spinner=False, max_entries=16)
def _subset(path, stamp, category: tuple, challenge: tuple, at_most: int | None):
    """The images the Statistics filters keep, as one Dataset that every statistic and the image count share
    (working it out reads the store's group membership: seconds on a PartiPrompts-size trace)."""
    ds = store(path, stamp)
    keep = A.filter_samples(ds, category=list(category), challenge=list(challenge))
    if at_most is not None and len(keep) > at_most:  # whole routing groups: image-against-group statistics need
        groups = A.sample_groups(ds)["group"].isel(branch=0).values  # every partner (the first branch's groups)
        keep = A.spaced(keep, at_most, by=groups)
    return ds if len(keep) == ds.sizes["sample"] else A.subset(ds, keep)


@st.cache_data(show_spinner=False, max_entries=16)
def statistic(path: str, stamp: str, what: str, category: tuple = (), challenge: tuple = (),
              at_most: int | None = None, **kw):
    """Whole-record statistics of ecviz.analysis (by name) over the samples the filters keep, computed. "groups"
    is expert load and co-selection in one pass over the dispatch indices (both read all of them)."""
    import dask

    ds = _subset(path, stamp, category, challenge, at_most) if "sample" in ds_dims(path, stamp) else \
        store(path, stamp)
    if what == "groups":
        return dask.compute(A.expert_load(ds), A.coselection(ds))
    fn = {"allocation": A.allocation_stats, "load": A.expert_load, "drops": A.token_choice_drops,
          "objects": A.object_background, "edges": A.edge_interior, "experts": A.expert_objects,
          "partners": A.objects_draw_compute,
          "words": A.expert_words}[what]
    out = fn(ds, **kw)
    return out.compute() if hasattr(out, "compute") else out


def ds_dims(path: str, stamp: str) -> dict:
    return dict(store(path, stamp).sizes)


@st.cache_data(show_spinner=False, max_entries=64)
def n_kept(path: str, stamp: str, category: tuple, challenge: tuple, at_most: int | None) -> int:
    return _subset(path, stamp, category, challenge, at_most).sizes["sample"]


@st.cache_data(show_spinner=False, max_entries=256)
def compared(path_a: str, stamp_a: str, sample_a: int, path_b: str, stamp_b: str, sample_b: int, step, layer):
    return A.compare_maps(store(path_a, stamp_a), sample_a, store(path_b, stamp_b), sample_b, step=step,
                          layer=layer)


def pairs_with(path_a: str, path_b: str) -> bool | None:
    """Whether the trace at path_b pairs up with the one at path_a image for image and has routing to compare;
    None if it cannot be opened (damaged, another version: picking it in the sidebar says why)."""
    try:
        return pairs(path_a, A.stamp(path_a), path_b, A.stamp(path_b))
    except Exception:  # not cached: an error is met again until the store is mended
        return None


@st.cache_data(show_spinner=False, max_entries=1024)
def pairs(path_a: str, stamp_a: str, path_b: str, stamp_b: str) -> bool:
    b = store(path_b, stamp_b)
    return "expert_count" in b and A.comparable(store(path_a, stamp_a), b)


# ---- page helpers ---------------------------------------------------------------------------------------------
@contextmanager
def shown(path=None):
    """Run a section; any error it raises becomes one line in the page (and a traceback on the console only for
    errors that are not bad input), and the page goes on."""
    try:
        yield
    except Exception as e:  # the page must never show a traceback
        if not isinstance(e, EcvizError):
            traceback.print_exc()
        st.error(A.explain(e, path))


def choice(where, label: str, options: list, key: str, default, widget: str = "selectbox", **kw):
    """A selectbox / select_slider / radio whose remembered value is reset to default when no longer offered;
    a value the page's link asked for (from_url) that is not offered is said, once."""
    asked = st.session_state.get("_url_asked", {}).pop(key, None)
    if st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else (options[0] if options else None)
        if asked is not None:
            link_note(f"{key}={asked} is not offered here; showing {st.session_state[key]}")
    return getattr(where, widget)(label, options, key=key, **kw)


def link_note(text: str) -> None:
    st.warning(f"This page's link: {text}.")


def chart(fig, key: str, name: str, width: str = "content") -> None:
    st.plotly_chart(fig, key=key, config=P.export_config(name), width=width, theme=None)


def step_text(step, ds) -> str:
    if step == "all":
        return "all steps"
    t = sample_index(ds.attrs["path"], A.stamp(ds.attrs["path"]))["t"].get(step)
    return f"step {step}" + (f" (t = {t:.2f})" if t is not None else "")


def last(ds, dim: str, value):
    """A step or layer choice as one label: "all" is the last recorded (for what one step or block must show)."""
    return int(ds[dim].values[-1]) if value == "all" and ds.sizes.get(dim) else value


def layer_text(layer) -> str:
    return "all layers" if layer == "all" else f"block {layer}"


def same_path(a, b) -> bool:
    """Whether two paths name the same file; a path that does not resolve (a symlink loop) is only itself."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return str(a) == str(b)


def options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="streamlit run app/main.py --", add_help=False, exit_on_error=False)
    ap.add_argument("--trace", help="a trace store or training run to open first")
    ap.add_argument("--root", default=".", help="the folder holding traces/, runs/ and checkpoints/")
    try:
        args, unknown = ap.parse_known_args(sys.argv[1:])
    except (argparse.ArgumentError, SystemExit) as e:
        st.error(f"bad arguments after `--`: {e}; use --trace PATH and --root DIR")
        st.stop()
    if unknown:  # a mistyped option (--trce) would otherwise open the default trace without a word
        st.error(f"unknown arguments after `--`: {' '.join(unknown)}; use --trace PATH and --root DIR")
        st.stop()
    return args


def from_url() -> None:
    """On a session's first run, take the store, view, sample, layer, step, word and opacity from the URL."""
    if st.session_state.get("_url_read"):
        return
    st.session_state["_url_read"] = True
    q = st.query_params
    asked = st.session_state["_url_asked"] = {}  # what the link asked for, until its widget says it is offered
    for key in URL_KEYS:
        if key not in q:
            continue
        v = q[key]
        try:
            if key == "opacity":
                v = float(v)
                if not 0 <= v <= 1:  # nan too
                    raise ValueError
            elif key not in ("store", "view") and v != "all":
                v = int(v)
        except ValueError:
            link_note(f"{key}={q[key]} is not {'a number in 0..1' if key == 'opacity' else 'a whole number'}; "
                      "ignored")
            continue
        st.session_state[key] = v
        asked[key] = q[key]


def to_url() -> None:
    st.query_params.update({k: str(st.session_state[k]) for k in URL_KEYS
                            if st.session_state.get(k) is not None})
    if st.session_state.get("word") is None and "word" in st.query_params:
        del st.query_params["word"]


def store_changed() -> None:
    """Picking a training run shows the Training view; picking a trace leaves it. How many images statistics
    read defaults anew for each store (a subset above STAT_DEFAULT[0] images)."""
    st.session_state.pop("stat_images", None)
    st.session_state.pop("compare", None)  # B defaults anew: it may be the trace just picked
    kind = st.session_state["_kinds"].get(st.session_state["store"])
    if kind == "run":
        st.session_state["view"] = "Training"
        st.session_state["run"] = st.session_state["store"]  # the Training view shows the run just picked
    elif st.session_state.get("view") == "Training":
        st.session_state["view"] = "Sample"


# ---- views ----------------------------------------------------------------------------------------------------
def number(path: str, stamp: str, sample: int) -> int:
    """The sample's index in its store, as the URL, the picker and the page name it; `sample` is its position in
    the opened dataset, which differs where a partial trace's done samples are not the first ones."""
    return sample_index(path, stamp)["number"][sample]


def sample_view(path, ds, stamp, sample, step, layer, opacity, cmap, use):
    prompt = sample_index(path, stamp)["prompts"][sample]
    n = number(path, stamp, sample)
    st.markdown(f"**Sample {n}** · {layer_text(layer)} · {step_text(step, ds)}")
    words_box = st.container()
    left, right = st.columns(2)
    word = under = None
    scored = "expert_count" in ds  # routing recorded: a map to draw and words to score
    with left, shown(path):
        under = picture(path, stamp, sample, step, use)
        if not scored:  # a dense model, or no --record dispatch: the image still, one line on why no map, and
            if under is not None:  # below, the words' cross-attention where it was recorded
                st.image(under, caption="generated image", width=300)
            A.require(ds, "expert_count", what="an allocation map")
        m = heat(path, stamp, sample, step, layer)
        fig = P.heatmap_figure(m.values, under, opacity, cmap, title="experts per token")
        chart(fig, "sample_heatmap", f"ecviz_sample{n}_{layer}_{step}")
        if use == "x0" and step == "all":
            st.caption("x0 is per step: with all steps, the final image is shown")
    with words_box, shown(path):
        asked = st.session_state.get("_url_asked", {}).pop("word", None)  # what the page's link asked for
        try:
            A.require(ds, "cross_attn", "text_word", what="word importance and attention")
        except TraceError as e:
            st.markdown(f"> {prompt}")
            st.info(str(e))
            return
        if scored:
            scores = words(path, stamp, sample, step, layer)
            texts = [str(w) for w in scores["word_text"].values]
        else:
            scores, texts = None, sample_words(path, stamp, sample)
        offered = [i for i, w in enumerate(texts) if w]
        if st.session_state.get("word") not in offered:
            if asked is not None:
                link_note(f"word={asked} is not offered here (this prompt has {len(offered)} words, from 0); "
                          "showing none")
            st.session_state["word"] = None
        html = st.empty()
        word = st.pills("Show a word's cross-attention", offered, format_func=lambda i: texts[i], key="word")
        if scored:
            html.html(P.words_html(texts, scores["importance"].values, scores["correlation"].values, selected=word))
            st.caption("Words coloured by text importance: attention-weighted experts per token of the word's "
                       "region over the image mean (red: more, blue: fewer; hover a word for its values). A score "
                       "weighs the word's own attention map however little attention it gets: choose a word to "
                       "see its share.")
        else:
            html.html(P.words_html(texts, selected=word))
            st.caption("Words not scored: text importance weighs a word's attention by the experts per token, and "
                       "this trace recorded no routing (a dense model, or traced without --record dispatch).")
    if word is None:
        return
    with right, shown(path):
        amap = attention(path, stamp, sample, word, step, layer)
        fig = P.heatmap_figure(amap.values, under, opacity, cmap, title=f"cross-attention of “{texts[word]}”",
                               label="attention")
        chart(fig, "word_heatmap", f"ecviz_sample{n}_word{word}_{layer}_{step}")
        st.caption(blocks_text(amap.attrs["blocks"], ds))
        if not scored:
            return
        corr, imp = float(scores["correlation"][word]), float(scores["importance"][word])
        share = amap.attrs["share"]
        c1, c2, c3 = st.columns(3)
        c1.metric("Spearman ρ", "n/a" if corr != corr else f"{corr:+.3f}",  # short: a long label is cut off
                  help="correlation over the tokens between this word's attention and the experts per token")
        c2.metric("importance", "n/a" if imp != imp else f"{imp:.3f}",
                  help="experts per token of the word's attention region over the image mean")
        c3.metric("attention", "n/a" if share != share else f"{share:.1%}",
                  help="this word's share of the image tokens' cross-attention (each token's attention sums to 1 "
                       "over the caption's tokens, [CLS] and [SEP] included): a score resting on a share of a "
                       "few percent rests on little")
        if corr != corr or imp != imp:
            st.caption(f"No score: “{texts[word]}” gets no attention here, or the same everywhere (the heads "
                       "look at other text tokens), so it has no region to score. Try another step or layer.")


def blocks_text(blocks: list[int], ds) -> str:
    """Which blocks' cross-attention a word map shows (`word_map`'s attribute `blocks`)."""
    if len(blocks) == 1:
        return f"Cross-attention of block {blocks[0]}, what its router saw (mean over heads)."
    names = ", ".join(map(str, blocks))
    if "layer" in ds.coords and ds.sizes["layer"]:
        return f"Cross-attention averaged over the sparse layers' blocks {names} (mean over heads)."
    return f"Cross-attention averaged over every block, {names}: a dense model has no sparse layers."


def routed(path, ds, what: str) -> bool:
    """Whether the trace recorded routing; if not, one error for the whole view (each section said it again)."""
    try:
        A.require(ds, "expert_count", "dispatch", what=what)
    except TraceError as e:
        st.error(A.explain(e, path))
        return False
    return True


def grids_view(path, ds, stamp, sample, step, layer, opacity, cmap, use):
    if not routed(path, ds, "the grids of allocation maps"):
        return
    n = number(path, stamp, sample)
    with shown(path):
        st.subheader(f"Every sparse layer at {step_text(step, ds)}")
        maps = grid_maps(path, stamp, sample, "layer", step=step)
        under = picture(path, stamp, sample, step, use)
        fig = P.grid_figure(maps, "layer", [under] * maps.sizes["layer"], opacity, cmap)
        chart(fig, "grid_layers", f"ecviz_sample{n}_layers_{step}")
    with shown(path):
        st.subheader(f"Every denoising step of {layer_text(layer)}")
        maps = grid_maps(path, stamp, sample, "step", layer=layer)
        steps = [int(s) for s in maps["step"].values]
        unders = [picture(path, stamp, sample, s, use) for s in steps]
        fig = P.grid_figure(maps, "step", unders, opacity, cmap, per_row=10, cell=110)
        chart(fig, "grid_steps", f"ecviz_sample{n}_steps_{layer}")
        if use == "x0":
            st.caption("Under each step: the model's clean-image estimate x0 at that step.")
    with shown(path):
        block = last(ds, "layer", layer)  # expert k of one block is not expert k of another: never averaged over blocks
        st.subheader(f"Every expert of {layer_text(block)} at {step_text(step, ds)}")
        maps = per_expert(path, stamp, sample, step, block)
        under = picture(path, stamp, sample, step, use)
        averaged = step == "all"
        fig = P.grid_figure(maps["taken"], "expert", [under] * maps.sizes["expert"], opacity, cmap,
                            label="share taken" if averaged else "taken")
        chart(fig, "grid_experts", f"ecviz_sample{n}_experts_{block}_{step}")
        st.caption(("Layer is 'all': these are the last sparse block's experts (each block has its own experts; "
                    "pick a layer in the sidebar for another's). " if layer == "all" else "") +
                   "The tokens each expert took" + (" (the share of the steps in which it took them)"
                                                    if averaged else "") +
                   "; together they make this block's experts per token. "
                   f"`ecviz sample --from-trace {path} --sample {n} --remove-experts E --remove-layers {block} "
                   "--out x.png` draws this image again without this block's expert E.")


def statistics_view(path, ds, stamp, step, layer):
    """Whole-trace statistics of the images the filters keep, a section each; `stat(kind)` is the cached
    statistic of those images."""
    if not routed(path, ds, "routing statistics"):
        return
    cat, chal, at_most = statistics_filters(path, ds, stamp)

    def stat(kind, **kw):
        return statistic(path, stamp, kind, cat, chal, at_most, **kw)

    heterogeneity_section(path, stat)
    load_section(path, ds, stat, step, layer)
    coselection_section(path, stat, layer)
    drops_section(path, ds, stat)
    if "word_object" in ds:
        objects_sections(path, ds, stat)

        # intervals are per step, words per layer: "all" shows the last
        expert_objects_section(path, ds, stat, step, layer, last(ds, "step", step))
        expert_words_section(path, ds, stat, step, layer, last(ds, "layer", layer), last(ds, "step", step))


def statistics_filters(path, ds, stamp):
    """The category and challenge filters and the number of images: (categories, challenges, at most)."""
    filters = {}
    cols = st.columns(2)
    for col, name, label in ((cols[0], "category", "PartiPrompts category / GenEval tag"),
                             (cols[1], "challenge", "PartiPrompts challenge")):
        offered = label_values(path, stamp, name)
        if offered:
            st.session_state[name] = [v for v in st.session_state.get(name, []) if v in offered]
            filters[name] = tuple(sorted(col.multiselect(label, offered, key=name)))
    cat, chal = filters.get("category", ()), filters.get("challenge", ())
    total = ds.sizes["sample"]
    offered = [k for k in STAT_IMAGES if k == "all" or k < total]
    st.session_state.setdefault("stat_images", STAT_DEFAULT[1] if total > STAT_DEFAULT[0] else "all")
    at_most = choice(st, "statistics over", offered, "stat_images", "all", format_func=lambda k: STAT_IMAGES[k],
                     help="Statistics of a large trace read all of it (minutes for thousands of images); an evenly "
                          "spaced subset gives estimates in a fraction of the time.")
    at_most = None if at_most == "all" else at_most
    with shown(path):
        n = n_kept(path, stamp, cat, chal, at_most)
        st.caption(f"{n} of {total} images" + (" (expert load and co-selection count every token of the routing "
                                               "groups these images were in)" if n < total else ""))
    return cat, chal, at_most


def heterogeneity_section(path, stat):
    """A per-step, per-layer matrix of the chosen allocation statistic."""
    with shown(path):
        st.subheader("Heterogeneity over layers and steps")
        name = choice(st, "statistic", list(STATS), "stat", "gini", format_func=lambda k: STATS[k])
        with st.spinner("computing allocation statistics"):
            stats = stat("allocation")
        chart(P.matrix_figure(stats[name], x="step", y="layer", label=name), "stat_matrix",
              f"ecviz_{name}", width="stretch")


def load_section(path, ds, stat, step, layer):
    """Tokens and gate mass per expert."""
    with shown(path):
        st.subheader(f"Per-expert load and gate mass · {layer_text(layer)} · {step_text(step, ds)}")
        with st.spinner("computing expert load and co-selection"):
            load, _ = stat("groups")
        c1, c2 = st.columns(2)
        tokens = A.select(load["tokens"], step=step, layer=layer)
        gate = A.select(load["gate_mass"], step=step, layer=layer)
        with c1:
            chart(P.bars_figure(tokens["expert"].values, tokens.values, "tokens per expert", "expert", "tokens"),
                  "load_tokens", f"ecviz_tokens_{layer}_{step}", width="stretch")
        with c2:
            chart(P.bars_figure(gate["expert"].values, gate.values, "gate mass per expert", "expert", "gate mass"),
                  "load_gate", f"ecviz_gate_{layer}_{step}", width="stretch")
        st.caption("Totals over every routing group of the images counted, both guidance branches (the "
                   "unconditional forward routes too); with all steps or layers, their mean." + (
                       " Expert choice: every expert takes exactly C tokens of every routing group, so tokens are "
                       "even by construction; the gate mass says how confidently each expert took them."
                       if load.attrs.get("routing") == "ec" else ""))


def coselection_section(path, stat, layer):
    """How often two experts take the same token, over chance."""
    with shown(path):
        st.subheader(f"Expert co-selection · {layer_text(layer)}")
        _, cosel = stat("groups")
        lift = A.select(cosel["lift"], layer=layer)
        chart(P.matrix_figure(lift, x="expert_b", y="expert", label="lift", colorscale="RdBu_r", diagonal=False,
                              zmid=1.0, zrange=(0.0, 2.0)), "coselection", f"ecviz_coselection_{layer}")
        st.caption(f"Tokens both experts took over what independent experts would give (1: no association; the "
                   f"diagonal, each expert with itself, is left blank), "
                   f"over steps {', '.join(map(str, cosel.attrs['steps']))}.")


def drops_section(path, ds, stat):
    """Token choice's dropped share per step and layer."""
    with shown(path):
        st.subheader("Token-choice drop rates")
        if routing_kind(ds) == "ec":
            st.caption("Expert choice drops no token: every expert fills exactly its capacity.")
        elif routing_kind(ds) != "tc":
            st.caption("A dense model routes nothing, so it drops nothing.")
        else:
            drops = stat("drops")
            chart(P.lines_figure(drops["share"], x="step", by="layer", label="share dropped"), "drops",
                  "ecviz_drops", width="stretch")


def objects_sections(path, ds, stat):
    """Shapes ground truth: objects over background, outlines over insides, images against their partners."""
    with shown(path):
        st.subheader("Objects over background (Shapes)")
        with st.spinner("bootstrapping"):
            ob = stat("objects")
        if ob.attrs["n"] == 0:  # the sections below still apply: no return
            st.info("No generated image has both object and background tokens (every token is part drawn, or "
                    "nothing is drawn): nothing to compare.")
        else:
            chart(P.lines_figure(ob["ratio"], x="step", by="layer", lo=ob["ratio_lo"], hi=ob["ratio_hi"],
                                 label="experts per token: objects / background", baseline=1.0), "objects",
                  "ecviz_objects", width="stretch")
            st.caption(f"{ob.attrs['n']} images with both object and background tokens; " + (
                f"band: {ob.attrs['level']:.0%} bootstrap interval resampling their {ob.attrs['clusters']} "
                "clusters (images joined by a prompt or a routing group) whole." if ob.attrs["clusters"] >= 2 else
                "no interval: they make one cluster (images joined by a prompt or a routing group), and the "
                "bootstrap needs two."))
    with shown(path):
        st.subheader("Object outlines over their insides")
        with st.spinner("bootstrapping"):
            ei = stat("edges")
        if ei.attrs["n"] == 0:
            st.info("No generated image has objects with both an outline and an inside: nothing to compare.")
        else:
            chart(P.lines_figure(ei["ratio"], x="step", by="layer", lo=ei["ratio_lo"], hi=ei["ratio_hi"],
                                 label="experts per token: outline / inside", baseline=1.0), "edges", "ecviz_edges",
                  width="stretch")
            st.caption(f"{ei.attrs['n']} images; an object token is on the outline when its patch is only "
                       "partly covered or a neighbour is not object. Above 1: compute follows the shapes' "
                       "detail rather than whole objects.")
    with shown(path):
        st.subheader("Images that shared a routing group")
        with st.spinner("bootstrapping"):
            dc = stat("partners")
        if not np.isfinite(dc["rho"].values).any():
            st.info(f"The {dc.attrs['n']} images in groups of two or more have the same object area as their "
                    "partners (or the same experts per token): no correlation to draw.")
            return
        chart(P.lines_figure(dc["rho"], x="step", by="layer", lo=dc["rho_lo"], hi=dc["rho_hi"],
                             label="Spearman: experts per token vs object area", baseline=0.0), "partners",
              "ecviz_partners", width="stretch")
        st.caption(f"{dc.attrs['n']} images in groups of two or more: an image's experts per token over its "
                   "group's mean against its object area over its partners'. " + (
                       "Expert choice fixes only the group's mean: above 0, the image with more object takes "
                       "compute from its partners. " if routing_kind(ds) == "ec" else
                       "Token choice fixes no group mean: an image's excess is what its own tokens' choices and "
                       "drops gave it. ") + (
                       f"Band: {dc.attrs['level']:.0%} bootstrap interval resampling prompts and routing groups "
                       "whole." if dc.attrs["clusters"] >= 2 else "No interval: the images make one cluster of "
                       "prompts and routing groups, and the bootstrap needs two."))


def expert_objects_section(path, ds, stat, step, layer, one_step):
    """Shapes: which experts take object tokens more than chance, at one step."""
    with shown(path):
        st.subheader(f"Which experts take the objects · {layer_text(layer)} · {step_text(one_step, ds)}")
        with st.spinner("bootstrapping"):
            eo = stat("experts")
        if not float(eo["object_tokens"]):
            st.info("No generated image has object tokens: no expert can take them.")
            return
        at = {k: A.select(eo[k], step=one_step) for k in ("enrichment", "enrichment_lo", "enrichment_hi",
                                                           "object_coverage")}
        if layer == "all":  # an expert of one block is not the same expert in another: no mean over layers
            chart(P.matrix_figure(at["enrichment"], x="expert", y="layer", colorscale="RdBu_r", zmid=1.0,
                                  zrange=(0.0, 2.0), label="× random"), "expert_objects",
                  f"ecviz_expert_objects_{one_step}")
            seek = []
        else:
            at = {k: A.select(v, layer=layer) for k, v in at.items()}
            chart(P.bars_figure(at["enrichment"]["expert"].values, at["enrichment"].values,
                                "object share of the expert's tokens / a random choice's", "expert", "ratio",
                                baseline=1.0, lo=at["enrichment_lo"].values, hi=at["enrichment_hi"].values),
                  "expert_objects", f"ecviz_expert_objects_{layer}_{one_step}", width="stretch")
            seek = [int(e) for e in at["enrichment"]["expert"].values[at["enrichment_lo"].values > 1]]
        st.caption(f"Object tokens are {float(eo['object_tokens']):.0%} of the {eo.attrs['n']} images' tokens; "
                   "above 1 an expert takes them more often than a random choice would"
                   + (" (one row per block: expert k of one block is not expert k of another). "
                      if layer == "all" else
                      (f" (bars: {eo.attrs['level']:.0%} bootstrap interval over {eo.attrs['clusters']} "
                       "clusters). " if eo.attrs["clusters"] >= 2 else " (no interval: the images make one "
                       "cluster, and the bootstrap needs two). "))
                   + ("The last step, as every step is chosen (an interval is of one step). " if step == "all"
                      else "")
                   + ((f"Interval above 1: expert{'s' * (len(seek) > 1)} "
                       + ", ".join(f"{e} ({float(at['object_coverage'].sel(expert=e)):.0%} of the object "
                                   "tokens)" for e in seek) + ". ") if seek else "")
                   + "The Grids view shows each expert's tokens of one image.")


def expert_words_section(path, ds, stat, step, layer, one_layer, one_step):
    """Shapes: each word's object tokens, shared among the experts, at one layer and step."""
    with shown(path):
        A.require(ds, "dispatch", what="which experts take each word's object")  # a dense trace: says so
        st.subheader(f"Which experts take each word's object · {layer_text(one_layer)} · "
                     f"{step_text(one_step, ds)}")
        with st.spinner("finding each word's object in the images"):
            words = stat("words", step=int(one_step), layer=int(one_layer))
        cover = words["coverage"].sel(word=words["n"] >= 2)
        if cover.sizes["word"] == 0:
            st.info("No word's object was drawn and found in two images or more: nothing to show.")
        else:
            chart(P.matrix_figure(cover, x="expert", y="word", label="share taken", colorscale="Blues",
                                  zrange=(0.0, 1.0), rows_down=True), "expert_words",
                  f"ecviz_expert_words_{one_layer}_{one_step}", width="stretch")
            st.caption("The share of each word's object tokens that each expert took, averaged over the images "
                       "where ShapesEval found the object (words found twice or more). Colour words against "
                       "each other say whether routing follows colour"
                       + ("; one block and step: the last, as every block and step is chosen." if
                          (layer == "all" or step == "all") else "."))


def compare_view(path, ds, stamp, entries, sample, step, layer, opacity, cmap):
    try:
        A.require(ds, "expert_count", what="a comparison of allocation maps")
    except TraceError as e:
        st.error(A.explain(e, path))
        return
    current = next(label for label, (p, _) in entries.items() if p == path)
    others = [label for label, (_, kind) in entries.items() if kind == "trace" and label != current]
    pairing = {t: pairs_with(path, entries[t][0]) for t in others}
    traces = [t for t, ok in pairing.items() if ok]  # only those that can pair
    unreadable = [t for t, ok in pairing.items() if ok is None]
    unpaired = len(others) - len(traces) - len(unreadable)
    left_out = ([f"{unpaired} that do{'es' if unpaired == 1 else ''} not pair with this one (other prompts, seed or "
                 "images per prompt, or no routing)"] if unpaired else []) + \
               ([f"{', '.join(unreadable)}, which cannot be opened (pick it in the sidebar to see why)"]
                if unreadable else [])
    if not traces:
        st.info("No other trace pairs with this one image for image (the same prompt file, seed and images per "
                "prompt, with --record dispatch): trace the same prompts with another checkpoint to compare."
                + (f" Not listed: {'; '.join(left_out)}." if unreadable else ""))
        return
    other = choice(st, "Compare with", traces, "compare", traces[0],
                   help="another trace of the same prompt file and seed: the other checkpoint, or token choice")
    if left_out:
        st.caption(f"Other traces not listed: {'; '.join(left_out)}.")
    path_b = entries[other][0]
    with shown(path_b):
        ds_b, stamp_b = ds_of(path_b)
        sample_b = A.matching_sample(ds, sample, ds_b)
        if sample_b is None:
            what = (f"{other} has not done this image yet ({ds_b.attrs['partial']}); reload when it has"
                    if "partial" in ds_b.attrs and A.comparable(ds, ds_b) else
                    f"{other} has no image with this prompt and seed; compare traces of the same prompt file and "
                    "seed")
            st.warning(f"Sample {number(path, stamp, sample)} ({sample_index(path, stamp)['prompts'][sample]!r}): "
                       f"{what}")
            return
        maps = compared(path, stamp, sample, path_b, stamp_b, sample_b, step, layer)
        zmax = float(max(maps["a"].max(), maps["b"].max()))
        lim = float(abs(maps["difference"]).max()) or 1.0
        cols = st.columns(3)
        for col, key, name, p, stp, s, d in ((cols[0], "a", "A", path, stamp, sample, ds),
                                             (cols[1], "b", "B", path_b, stamp_b, sample_b, ds_b)):
            with col:  # titles above the charts, not in them: plotly's toolbar covers a narrow chart's title
                kind = d.attrs.get("routing", {}).get("kind", "?")
                st.markdown(f"**{name}**: {Path(p).name} ({kind}), sample {number(p, stp, s)}")
                fig = P.heatmap_figure(maps[key].values, picture(p, stp, s, "all", "image"), opacity, cmap,
                                       zmax=zmax, size=300)
                chart(fig, f"compare_{key}", f"ecviz_compare_{name}")
        with cols[2]:
            st.markdown("**A − B**")
            fig = P.heatmap_figure(maps["difference"].values, None, colorscale="RdBu_r", zmin=-lim, zmax=lim,
                                   zmid=0, label="difference", size=300)
            chart(fig, "compare_difference", "ecviz_compare_difference")
        st.caption(f"{compared_text(maps, layer, step, ds)} · mean |A − B| "
                   f"{maps.attrs['mean_abs_difference']:.3f} experts per token · correlation "
                   f"{maps.attrs['correlation']:+.3f}")


def compared_text(maps, layer, step, ds) -> str:
    """What the compared maps average: "all layers" or "all steps" only where both traces recorded all of this
    one's; else the ones they share (`compare_maps` keeps those)."""
    layers, steps = maps.attrs.get("layers"), maps.attrs.get("steps")
    text = [layer_text(layer), step_text(step, ds)]
    if layer == "all" and layers is not None and len(layers) < ds.sizes["layer"]:
        text[0] = "the shared layers " + ", ".join(map(str, layers))
    if step == "all" and steps is not None and len(steps) < ds.sizes["step"]:
        text[1] = "the shared steps " + ", ".join(map(str, steps))
    return " · ".join(text)


def training_view(entries, picked):
    runs = [label for label, (_, kind) in entries.items() if kind == "run"]
    if not runs:
        st.info("No training run with a routing probe under runs/ or checkpoints/: `ecviz train` on a sparse "
                "model writes runs/NAME/routing.zarr.")
        return
    label = choice(st, "Training run", runs, "run", picked if picked in runs else runs[0])
    path = entries[label][0]
    try:
        probe, stamp = ds_of(path)
        steps = [int(s) for s in probe["train_step"].values]
        ts_opts = [float(t) for t in probe["t"].values]
        layers = [int(v) for v in probe["layer"].values]
        captions = [str(c) for c in probe["caption"].values]
    except Exception as e:
        st.error(A.explain(e, path))
        return
    c = st.columns(4)
    ts = choice(c[0], "train step", steps, "train_step", steps[-1], widget="select_slider")
    t = choice(c[1], "timestep t", ["all", *ts_opts], "t", "all",
               format_func=lambda v: "all t" if v == "all" else f"t = {v:g}")
    layer = choice(c[2], "layer", ["all", *layers], "train_layer", "all", format_func=layer_text)
    img = choice(c[3], "probe image", list(range(len(captions))), "probe_image", 0,
                 format_func=lambda i: f"{i}: {captions[i]}")
    with shown(path):
        left, right = st.columns([1, 2])
        with left:
            m = heat(path, stamp, img, -1, layer, train_step=ts, t=t)
            fig = P.heatmap_figure(m.values, picture(path, stamp, img, None, "image"), 0.6, "Magma_r",
                                   title=f"train step {ts} · {layer_text(layer)}", size=300)
            chart(fig, "train_heatmap", f"ecviz_train{ts}_{img}")
        with right:
            maps = grid_maps(path, stamp, img, "layer", train_step=ts, t=t)
            fig = P.grid_figure(maps, "layer", [picture(path, stamp, img, None, "image")] * maps.sizes["layer"])
            chart(fig, "train_grid", f"ecviz_train{ts}_{img}_layers")
    with shown(path):
        st.subheader("Routing over training")
        stat = choice(st, "statistic", list(STATS), "train_stat", "gini", format_func=lambda k: STATS[k])
        stats = statistic(path, stamp, "allocation")
        chart(P.lines_figure(A.select(stats[stat], t=t), x="train_step", by="layer", label=stat), "train_stat_chart",
              f"ecviz_train_{stat}", width="stretch")
        load = statistic(path, stamp, "load")
        chart(P.lines_figure(A.select(load["imbalance"], t=t), x="train_step", by="layer",
                             label="load imbalance (max / mean)"), "train_load", "ecviz_train_load", width="stretch")
        if routing_kind(probe) == "ec":
            st.caption("Expert choice: every expert takes exactly C tokens of every group, so its load imbalance is "
                       "1 by construction and the blocks' lines lie on each other; it is token choice's to watch.")
        if routing_kind(probe) == "tc":
            drops = statistic(path, stamp, "drops")
            chart(P.lines_figure(A.select(drops["share"], t=t), x="train_step", by="layer",
                                 label="token-choice share dropped"), "train_drops", "ecviz_train_drops",
                  width="stretch")
    if "object_fraction" in probe:
        with shown(path):
            st.subheader("Objects over background along training")
            ob = statistic(path, stamp, "objects", mean_over=("t",) if t == "all" else ())
            ob = ob if t == "all" else A.select(ob, t=t)
            chart(P.lines_figure(ob["ratio"], x="train_step", by="layer", lo=ob["ratio_lo"], hi=ob["ratio_hi"],
                                 label="experts per token: objects / background", baseline=1.0), "train_objects",
                  "ecviz_train_objects", width="stretch")
            st.caption(f"Against the data's object masks; band: {ob.attrs['level']:.0%} bootstrap interval over the "
                       f"{ob.attrs['n']} probe images.")


# ---- the page -------------------------------------------------------------------------------------------------
def main() -> None:
    st.set_page_config(page_title="ecviz", layout="wide")
    for key in PERSIST:  # keep values of widgets another view hides
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    args = options()
    from_url()
    root = Path(args.root)
    found = A.find_stores(root)
    entries = {s.label: (str(s.path), s.kind) for s in found}
    picked = None
    if args.trace:
        given = Path(args.trace)
        label = next((lbl for lbl, (p, _) in entries.items() if same_path(p, given)), None)
        if label is None:
            label = args.trace
            run = (given / "routing.zarr").is_dir() or given.name == "routing.zarr"
            entries = {label: (str(given), "run" if run else "trace"), **entries}
        picked = label
    elif (newest := A.newest_trace(found)) is not None:
        picked = newest.label
    st.session_state["_kinds"] = {label: kind for label, (_, kind) in entries.items()}
    st.sidebar.title("ecviz")
    if not entries:
        st.error(f"No trace under {root / 'traces'} and no training run under {root / 'runs'} or "
                 f"{root / 'checkpoints'}: run ./run.sh demo (writes traces/demo.zarr), or pass --trace PATH.")
        st.stop()
    if "store" not in st.session_state and picked is not None and entries[picked][1] == "run":
        st.session_state["view"] = "Training"
    label = choice(st.sidebar, "Trace or training run", list(entries), "store", picked or next(iter(entries)),
                   format_func=lambda lbl: f"{entries[lbl][1]} · {lbl}", on_change=store_changed)
    path, kind = entries[label]
    view = choice(st, "View", list(VIEWS), "view", "Sample", widget="radio", horizontal=True,
                  label_visibility="collapsed")
    if kind == "run" or view == "Training":
        if view != "Training":
            st.info(f"{label} is a training run: its routing over training is in the Training view; pick a trace "
                    "for this one.")
        else:
            training_view(entries, label if kind == "run" else None)
        to_url()
        return
    try:
        ds, stamp = ds_of(path)
    except Exception as e:
        st.error(A.explain(e, path))
        st.stop()
    if "partial" in ds.attrs:
        st.info(f"{label}: {ds.attrs['partial']}.")
    index = sample_index(path, stamp)
    side = st.sidebar
    query = side.text_input("Search prompts", key="search", placeholder="words in the prompt")
    hits = search(path, stamp, query)
    if not hits:
        side.warning(f"No prompt contains {query!r}; showing every sample.")
        hits = list(range(len(index["prompts"])))
    numbers = index["number"]  # the picker and the URL name samples by store index, positions computed from them
    position = {n: i for i, n in enumerate(numbers)}
    picked = choice(side, "Sample", [numbers[i] for i in hits], "sample", numbers[hits[0]],
                    format_func=lambda n: f"{n}: {index['prompts'][position[n]][:60]} "
                                          f"(image {index['image_index'][position[n]]})")
    sample = position[picked]
    layers = [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []
    steps = [int(v) for v in ds["step"].values] if "step" in ds.coords else []
    layer = choice(side, "Layer", ["all", *layers], "layer", "all", format_func=layer_text)
    step = choice(side, "Denoising step", ["all", *steps], "step", steps[-1] if steps else "all",
                  widget="select_slider", format_func=lambda s: "all" if s == "all" else str(s),
                  help="0 is the first step, from pure noise. The t shown with a step is the flow time the model "
                       "saw: t = 0 is noise and t = 1 the image (the paper's rectified flow; diffusers and SD3 "
                       "count the other way).")
    side.divider()
    st.session_state.setdefault("opacity", 0.6)
    opacity = side.slider("Heatmap opacity", 0.0, 1.0, step=0.05, key="opacity")
    cmap = choice(side, "Colour map", list(COLOURMAPS), "cmap", COLOURMAPS[0])
    pics = ["image", "x0"] if "x0" in ds else ["image"]
    use = choice(side, "Under the heatmap", pics, "picture", "image", widget="radio",
                 format_func=lambda p: "final image" if p == "image" else "x0 estimate at the step")
    if "x0" not in ds:
        side.caption("x0 estimates: record them with ecviz trace --record x0.")
    side.caption(f"{label}: {ds.sizes['sample']} images, {routing_kind(ds)} routing, "
                 f"{len(layers)} sparse layers, {len(steps)} steps")
    if view == "Sample":
        sample_view(path, ds, stamp, sample, step, layer, opacity, cmap, use)
    elif view == "Grids":
        grids_view(path, ds, stamp, sample, step, layer, opacity, cmap, use)
    elif view == "Statistics":
        statistics_view(path, ds, stamp, step, layer)
    elif view == "Compare":
        compare_view(path, ds, stamp, entries, sample, step, layer, opacity, cmap)
    to_url()


main()
