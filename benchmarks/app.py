"""The app's response times on a PartiPrompts-size trace: the first page, switching layer or step, other views.

What: the synthetic trace of benchmarks/analysis.py (1,632 prompts, two guidance branches, 50 denoising steps,
14 sparse layers, 32 experts, 256 tokens, routing groups of 512; about 3.7 GB) opened by app/main.py. Why: the app
issue's targets are a first page within 3 s and a layer or step switch within 300 ms.

Two measurements, each in a fresh process:
- script runs (streamlit.testing's AppTest, in process): what `streamlit run` does once at server start before
  any page (scanning the installed packages for components; AppTest would do it inside its first run), timed
  apart as `server_start_components`, and compiling the script (once per server: its bytecode is cached; AppTest
  would compile it for every run), timed apart as `script_compile`; then the first run of the page as a newly
  started server does it
  (importing ecviz, opening the store, computing and drawing the first map), then `--switches` changes of
  the layer and of the denoising step to values not shown before (nothing cached), the same values again
  (cached), and the first visit of the Grids and Statistics views. This is the time between a widget change
  reaching the server and the page's elements leaving it.
- browser (with --browser, needs chromium): `streamlit run` on 127.0.0.1 and headless Chromium, the time from
  navigating to the page until its chart is drawn, for the first session after the server started (cold) and a
  second one (warm), so websocket, transfer and plotly's drawing are included.

    python benchmarks/app.py [--store PATH] [--switches N] [--repeats N] [--browser] [--out PATH]

Every run is timed in wall seconds and in the process's CPU seconds; on a shared machine the wall time includes
waiting for a core, so the summary gives best, median and max of the wall times (and the median CPU time) over
--repeats fresh processes, with the load average before and after each.

If --store does not exist it is written first (benchmarks/analysis.py's parameters; minutes).
Writes benchmarks/results/app.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "main.py"


def script_runs(store: str, switches: int, views: bool) -> dict:
    """In a fresh process: AppTest timings of the app on `store`."""
    from streamlit.testing.v1 import AppTest

    sys.argv = [str(APP), "--trace", store, "--root", str(Path(store).parent)]
    at = AppTest.from_file(str(APP), default_timeout=3600)
    # what `streamlit run` does once at server start, before any page: scan the installed packages for
    # components (about 1 s here). AppTest does it in its first run; do it first, timed on its own.
    from streamlit.components.v2.component_manager import BidiComponentManager

    t = time.perf_counter()
    manager = BidiComponentManager()
    manager.discover_and_register_components(start_file_watching=False)
    at._bidi_component_manager = manager
    server_start = time.perf_counter() - t
    # a server compiles the script once (its ScriptCache, with streamlit's magic rewrite of the syntax tree) and
    # reruns the bytecode; AppTest makes a new cache for every run, which would time the compile in every
    # switch. Compile it once, timed apart, and give every run that cache.
    import streamlit.testing.v1.app_test as app_test
    import streamlit.testing.v1.local_script_runner as local_script_runner
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache

    cache = ScriptCache()
    t = time.perf_counter()
    cache.get_bytecode(str(APP))
    compile_s = time.perf_counter() - t
    app_test.ScriptCache = local_script_runner.ScriptCache = lambda: cache

    def timed(change=None) -> list[float]:
        """[wall, cpu] seconds of one run of the page (cpu: this process's CPU time, every thread)."""
        if change is not None:
            change()
        t, c = time.perf_counter(), time.process_time()
        at.run()
        dt = [time.perf_counter() - t, time.process_time() - c]
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        return dt

    out: dict = {"server_start_components": [server_start, server_start], "script_compile": [compile_s, compile_s],
                 "first_page": timed()}
    assert any(c.proto.id.endswith("sample_heatmap") for c in at.get("plotly_chart"))
    layers = at.sidebar.selectbox(key="layer").options
    n_layers = len(layers) - 1
    steps = at.sidebar.select_slider(key="step").options[1:]
    layer_values = [int(v.split()[-1]) for v in layers[1:]][:switches]
    step_values = [int(s) for s in steps][::-1][1:][::max(1, (len(steps) - 1) // switches)][:switches]
    out["layer_switch_new"] = [timed(lambda v=v: at.sidebar.selectbox(key="layer").set_value(v))
                               for v in layer_values]
    at.sidebar.selectbox(key="layer").set_value("all")
    at.run()
    out["step_switch_new"] = [timed(lambda v=v: at.sidebar.select_slider(key="step").set_value(v))
                              for v in step_values]
    out["step_switch_cached"] = [timed(lambda v=v: at.sidebar.select_slider(key="step").set_value(v))
                                 for v in step_values]
    at.sidebar.select_slider(key="step").set_value(int(steps[-1]))  # the step the layer maps were made at
    at.run()
    out["layer_switch_cached"] = [timed(lambda v=v: at.sidebar.selectbox(key="layer").set_value(v))
                                  for v in layer_values]
    out["sample_switch_new"] = [timed(lambda v=v: at.sidebar.selectbox(key="sample").set_value(v))
                                for v in (100, 900, 1500)]
    if views:
        out["grids_first"] = timed(lambda: at.radio(key="view").set_value("Grids"))
        out["statistics_first"] = timed(lambda: at.radio(key="view").set_value("Statistics"))
        out["statistics_layer_switch"] = timed(lambda: at.sidebar.selectbox(key="layer").set_value(layer_values[0]))
    out["layers"], out["steps"] = n_layers, len(steps)
    return out


def browser_runs(store: str) -> dict:
    from ecviz.browser import READY_JS, chromium, find_chromium, screenshot, serve_app

    exe = find_chromium(install=False)
    if exe is None:
        return {"skipped": "chromium not found"}
    out = {}
    with serve_app(APP, "--trace", store, "--root", str(Path(store).parent), cwd=ROOT) as url, chromium(exe) as port:
        for name in ("cold", "warm", "warm_again"):
            t = time.perf_counter()
            screenshot(port, url + f"/?_={name}", 1400, 1000, READY_JS.format(n=1), timeout=600, settle=0)
            out[f"page_ready_{name}"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/work/bench-analysis.zarr")
    ap.add_argument("--switches", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes (first page measured once in each)")
    ap.add_argument("--browser", action="store_true", help="also time page loads in headless Chromium")
    ap.add_argument("--no-views", action="store_true", help="skip the Grids and Statistics first visits")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "app.json"))
    ap.add_argument("--_child", choices=["script", "browser"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child == "script":
        print(json.dumps(script_runs(args.store, args.switches, not args.no_views)))
        return
    if args._child == "browser":
        print(json.dumps(browser_runs(args.store)))
        return
    store = Path(args.store)
    if not store.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "analysis.py"), "--store", str(store), "--keep",
                        "--out", os.devnull], check=True)
    loads = [os.getloadavg()]
    res: dict = {"script": [], "browser": []}
    for i in range(args.repeats):
        for kind in ("script", *(("browser",) if args.browser else ())):
            cmd = [sys.executable, __file__, "--_child", kind, "--store", str(store), "--switches",
                   str(args.switches)]
            if args.no_views or i > 0:  # the other views once: they compute statistics of the whole trace
                cmd.append("--no-views")
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if r.returncode:
                raise SystemExit(f"{kind} run failed:\n{r.stderr[-3000:]}")
            res[kind].append(json.loads(r.stdout.strip().splitlines()[-1]))
            loads.append(os.getloadavg())
    runs = res["script"]

    def pooled(key):  # every measurement of key over the processes, [wall, cpu] pairs
        out = []
        for r in runs:
            v = r.get(key)
            if v is not None:
                out.extend(v if isinstance(v[0], list) else [v])
        return out

    summary = {}
    for k in ("server_start_components", "script_compile", "first_page", "layer_switch_new", "step_switch_new",
              "layer_switch_cached", "step_switch_cached", "sample_switch_new", "grids_first", "statistics_first",
              "statistics_layer_switch"):
        v = pooled(k)
        if not v:
            continue
        wall, cpu = [x[0] for x in v], [x[1] for x in v]
        summary[k] = {"n": len(v), "wall_best": min(wall), "wall_median": statistics.median(wall),
                      "wall_max": max(wall), "cpu_median": statistics.median(cpu)}
    for r in res["browser"]:
        for k, v in r.items():
            if k.startswith("page"):
                summary.setdefault(f"browser_{k}", {"n": 0, "walls": []})["walls"].append(v)
    for v in summary.values():
        if "walls" in v:
            v.update(n=len(v["walls"]), wall_best=min(v["walls"]), wall_median=statistics.median(v["walls"]),
                     wall_max=max(v["walls"]))
            del v["walls"]
    from ecviz.io import atomic_write

    result = {
        "meta": {"command": " ".join(["python", "benchmarks/app.py", *sys.argv[1:]]), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "loadavg_1_5_15_before_and_after_each": [[round(v, 2) for v in x] for x in loads],
                 "store": str(store), "targets": {"first_page_s": 3.0, "switch_s": 0.3}},
        "summary": {k: {m: round(x, 4) if isinstance(x, float) else x for m, x in v.items()}
                    for k, v in summary.items()},
        "raw": res,
    }
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"{'':26s} {'n':>3s} {'best':>8s} {'median':>8s} {'max':>8s} {'cpu med':>8s}  (ms)")
    for k, v in summary.items():
        cpu = f"{v['cpu_median'] * 1000:8.0f}" if "cpu_median" in v else f"{'':8s}"
        print(f"{k:26s} {v['n']:3d} {v['wall_best'] * 1000:8.0f} {v['wall_median'] * 1000:8.0f} "
              f"{v['wall_max'] * 1000:8.0f} {cpu}")
    print(f"load average before/after: {result['meta']['loadavg_1_5_15_before_and_after_each']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
