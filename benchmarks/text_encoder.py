"""The default text encoder: what loading it costs a command, and its encoding speed, native against transformers.

`ecviz.text` runs the packaged all-MiniLM-L6-v2 with its own small BERT (tokenized by `tokenizers`); the same
files load through transformers with `--text-encoder hf:<the package's directory>`. Each load is timed in a
fresh interpreter (python -c: import ecviz.text, then load_text_encoder), as a command would pay it, interleaved
and in reversed order every other round; encoding times a batch of 32 Shapes captions in one process. Ratios of
best times; the JSON has every time.

    python benchmarks/text_encoder.py [--rounds 5]   # writes benchmarks/results/text_encoder.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD = """
import time
t0 = time.perf_counter()
import ecviz.text as T
t1 = time.perf_counter()
spec = {spec!r} or "hf:" + str(T.minilm_path())
T.load_text_encoder(spec, 32)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def load_times(spec: str) -> tuple[float, float]:
    """(import seconds, load seconds) in a fresh interpreter; spec '' means the hf: path of the package."""
    r = subprocess.run([sys.executable, "-c", LOAD.format(spec=spec)], capture_output=True, text=True, check=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    a, b = r.stdout.split()
    return float(a), float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_encoder.json"))
    args = ap.parse_args()

    import torch
    from timing import interleaved

    from ecviz.data.shapes import ShapesDataset
    from ecviz.text import load_text_encoder, minilm_path

    specs = {"native": "minilm", "transformers": ""}
    loads: dict[str, list[float]] = {n: [] for n in specs}
    for r in range(args.rounds):
        for n in specs if r % 2 == 0 else reversed(specs):
            loads[n].append(load_times(specs[n])[1])
    ds = ShapesDataset(size=32, seed=0)
    captions = [ds[i]["caption"] for i in range(32)]
    enc = {"native": load_text_encoder("minilm", 32), "transformers": load_text_encoder(f"hf:{minilm_path()}", 32)}
    same = torch.equal(enc["native"].encode(captions).emb, enc["transformers"].encode(captions).emb)
    encode = interleaved({n: (lambda e=e: e.encode(captions)) for n, e in enc.items()}, args.rounds * 2)
    best = {k: {n: min(v) for n, v in d.items()} for k, d in (("load_s", loads), ("encode32_s", encode))}
    result = {
        "command": "python benchmarks/text_encoder.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M"),
        "embeddings_equal": same, "best": best,
        "load_transformers_over_native": best["load_s"]["transformers"] / best["load_s"]["native"],
        "encode_transformers_over_native": best["encode32_s"]["transformers"] / best["encode32_s"]["native"],
        "raw": {"load_s": loads, "encode32_s": encode},
    }
    from ecviz.io import atomic_write

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"load (fresh interpreter, ecviz.text imported): native {best['load_s']['native']:.2f} s, "
          f"transformers {best['load_s']['transformers']:.2f} s ({result['load_transformers_over_native']:.1f}x)")
    print(f"encode 32 captions: native {best['encode32_s']['native'] * 1e3:.0f} ms, transformers "
          f"{best['encode32_s']['transformers'] * 1e3:.0f} ms ({result['encode_transformers_over_native']:.2f}x); "
          f"embeddings equal: {same}")


if __name__ == "__main__":
    main()
