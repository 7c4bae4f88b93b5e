#!/usr/bin/env bash
# The main job on the embedded default (called by ./run.sh demo inside the project's .venv): trace the shipped
# EC-DiT checkpoint on the bundled Shapes prompts into traces/demo.zarr, then write its report.
set -euo pipefail
ckpt=checkpoints/ec-dit-shapes
out=${ECVIZ_DEMO_OUT:-traces/demo.zarr}  # the tests point it elsewhere
report=${ECVIZ_DEMO_REPORT:-reports/demo}
status=0
ecviz trace --ckpt "$ckpt" --prompts shapes --out "$out" \
  --images-per-prompt 4 --record dispatch,cross_attn,x0 "$@" || status=$?
if [ "$status" -ne 0 ]; then  # e.g. a demo trace of an older ecviz, or of other settings, is kept, not replaced
  [ "$status" -eq 2 ] && [ -e "$out" ] && echo "(./run.sh demo --overwrite replaces $out)" >&2
  exit "$status"
fi
ecviz report --trace "$out" --out "$report"
python - "$report/summary.json" <<'PY'
import json
import sys


def f(x):  # summary.json holds null where a statistic has no images
    return "n/a" if x is None else f"{x:.2f}"


s = json.load(open(sys.argv[1]))
r, o = s["record"], s["objects_vs_background"]
print(f"experts per token at the last denoising step ({r['experts']} experts, capacity factor "
      f"{r['capacity_factor']:g}, groups of {r['group_size']} tokens), on the generated images:")
for layer in o["ratio"]:
    print(f"  block {layer}: objects {f(o['object'][layer])}, background {f(o['background'][layer])}, "
          f"ratio {f(o['ratio'][layer])} (95% interval {f(o['ratio_lo'][layer])}-{f(o['ratio_hi'][layer])})")
e = s["edges_vs_interior"]
print("object outlines over their insides, same step:")
for layer in e["ratio"]:
    print(f"  block {layer}: outline {f(e['edge'][layer])}, inside {f(e['interior'][layer])}, "
          f"ratio {f(e['ratio'][layer])} (95% interval {f(e['ratio_lo'][layer])}-{f(e['ratio_hi'][layer])})")
x = s["expert_objects"]
print(f"experts that seek the objects at the last step (object share over a random choice's, 95% interval above 1):")
for layer, lo in x["enrichment_lo"].items():
    seek = sorted((e for e, v in enumerate(lo) if v is not None and v > 1), key=lambda e: -x["enrichment"][layer][e])
    print(f"  block {layer}: " + (", ".join(f"expert {e} ({f(x['enrichment'][layer][e])}x, "
                                             f"{100 * x['object_coverage'][layer][e]:.0f}% of object tokens)"
                                             for e in seek) or "none"))
d = s.get("objects_draw_compute")
if d:  # images that shared a routing group: does the one with more object take compute from its partner?
    print(f"images sharing a routing group, {d['at']} (Spearman of an image's experts per token over its group's "
          f"mean and its object area over its partner's; above 0: more object, more compute):")
    for layer, r in d["rho"].items():
        print(f"  block {layer}: {f(r)} (95% interval {f(d['rho_lo'][layer])} to {f(d['rho_hi'][layer])})")
PY
echo "report: $report/summary.md   explore: python -c \"import ecviz; print(ecviz.open_trace('$out'))\""
streamlit=streamlit
[ -x .venv/bin/streamlit ] && streamlit=.venv/bin/streamlit
echo "see it:  $streamlit run app/main.py -- --trace $out"
