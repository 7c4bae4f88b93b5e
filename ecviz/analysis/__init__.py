"""Analyses of recorded routing: where compute goes, how evenly, which experts, which words, against ground truth.

Functions take the Datasets that `ecviz.open_trace` (traces) and `open_probe` (a training run's
`routing.zarr`) give and return labelled xarray objects, lazy (dask) until computed. `ecviz.plots` draws them;
`ecviz report` writes them all.
"""

from ecviz.analysis.ablation import ablation_by_word, ablation_summary
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
from ecviz.analysis.explore import (
    comparable,
    compare_maps,
    filter_samples,
    image_index,
    labels,
    matching_sample,
    original_samples,
    prompts,
    sample_words,
    search_prompts,
    spaced,
    subset,
    word_map,
    word_scores,
)
from ecviz.analysis.load import (
    check_full_capacity,
    coselection,
    expert_load,
    expert_maps,
    expert_positions,
    expert_steps,
    group_mean,
    image_vs_group,
    routing_pass,
    sample_groups,
    token_choice_drops,
    tokens_taken,
)
from ecviz.analysis.shapes import (
    OBJECT_MIN,
    by_region,
    edge_interior,
    expert_objects,
    expert_words,
    image_clusters,
    image_object_fraction,
    object_background,
    object_edges,
    object_vs_background,
    objects_draw_compute,
    region_ratio,
    trace_object_vs_background,
    word_object_attention,
    word_object_lift,
    word_regions,
)
from ecviz.analysis.stores import Store, explain, find_stores, newest_trace, open_store, stamp
from ecviz.analysis.words import attention_on_words, by_word, text_importance, token_importance, word_attention
from ecviz.grid import patch_coverage

__all__ = [
    "OBJECT_MIN", "Store", "ablation_by_word", "ablation_summary", "allocation_stats", "attention_on_words",
    "by_region", "by_word",
    "check_complete", "check_full_capacity", "comparable", "compare_maps", "coselection", "edge_interior",
    "expert_load", "expert_maps", "expert_objects", "expert_positions", "expert_steps", "expert_words",
    "experts_per_token", "explain", "filter_samples", "find_stores", "group_mean", "heatmap", "heatmaps", "histogram",
    "image_clusters", "image_index", "image_object_fraction", "image_vs_group", "labels", "layer_agreement",
    "matching_sample", "newest_trace", "object_background", "object_edges", "object_vs_background",
    "objects_draw_compute", "open_probe", "open_routing", "open_store", "original_samples", "patch_coverage",
    "per_image", "prompts", "region_ratio", "require", "routing_pass", "sample_groups", "sample_words",
    "search_prompts", "select", "settling", "spaced", "stamp", "subset", "text_importance", "token_choice_drops",
    "token_grid", "token_importance", "tokens_taken", "trace_object_vs_background", "word_attention", "word_map",
    "word_object_attention", "word_object_lift", "word_regions", "word_scores",
]
