"""Precompute the text embeddings of every Shapes caption (`ecviz.text.TextTable`), so that `ecviz train
--text-table FILE` trains on Shapes without loading the text encoder: on the GPU machine, which lacks the MiniLM
package and whose carry limit (64 MiB) its weights (91 MB) do not fit. 1,902 captions, about 13 MB in float16.

    python scripts/text_table.py --out .device/shapes_minilm32.safetensors [--max-len 32] [--dtype float16]
"""

from __future__ import annotations

import argparse

import torch

from ecviz.data.shapes import all_captions
from ecviz.text import TextTable, load_text_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--encoder", default="minilm", help="text encoder spec (default: minilm)")
    ap.add_argument("--max-len", type=int, default=32, help="the model's text_len (default: 32, every Shapes preset)")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = ap.parse_args()
    table = TextTable.build(load_text_encoder(args.encoder, args.max_len), all_captions())
    table.save(args.out, getattr(torch, args.dtype))
    print(f"wrote {args.out}: {len(table.prompts)} captions, {len(table.emb)} tokens of {table.dim}, {args.dtype}")


if __name__ == "__main__":
    main()
