"""Screenshots of every view of the app for the README (docs/img/app_*.png), from real traces.

    ./run.sh demo                                     # traces/demo.zarr (EC-DiT on the Shapes prompts)
    ecviz trace --ckpt checkpoints/tc-shapes --prompts ecviz/assets/prompts/shapes.jsonl \\
        --out traces/tc-demo.zarr --images-per-prompt 4 --record dispatch,cross_attn,x0   # for Compare
    python scripts/app_screenshots.py [--sample N] [--word N] [--step N] [--only app_grids,...]

Serves app/main.py with `streamlit run` and photographs each view in headless Chromium (ecviz.browser), once
every chart of the view is drawn; the PNGs are reduced to a 160-colour palette to stay small.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from ecviz.browser import READY_JS, chromium, screenshot, serve_app

ROOT = Path(__file__).resolve().parents[1]


def save(png: bytes, path: Path) -> None:
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(160, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} kB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="traces/demo.zarr")
    ap.add_argument("--run", default="checkpoints/ec-dit-shapes")
    ap.add_argument("--sample", type=int, default=122)
    ap.add_argument("--word", type=int, default=5)
    ap.add_argument("--step", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--only", help="these screenshots only, e.g. app_grids,app_training (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    q = f"sample={args.sample}&step={args.step}"
    shots = [  # name, query, charts to wait for, viewport height
        ("app_sample", f"view=Sample&{q}&layer=all&word={args.word}", 2, 880),
        ("app_grids", f"view=Grids&{q}&layer=1", 3, 1400),
        ("app_statistics", f"view=Statistics&{q}&layer=5", 8, 3900),
        ("app_compare", f"view=Compare&{q}&layer=all", 3, 720),
    ]
    with chromium() as port:
        with serve_app(ROOT / "app" / "main.py", "--trace", args.trace, cwd=ROOT) as url:
            for name, query, n, height in shots:
                if only and name not in only:
                    continue
                save(screenshot(port, f"{url}/?{query}", 1400, height, READY_JS.format(n=n), timeout=600,
                                settle=2), out / f"{name}.png")
        if only and "app_training" not in only:
            return
        with serve_app(ROOT / "app" / "main.py", "--trace", args.run, cwd=ROOT) as url:
            save(screenshot(port, f"{url}/?view=Training", 1400, 1750, READY_JS.format(n=5), timeout=600,
                            settle=2), out / "app_training.png")


if __name__ == "__main__":
    main()
