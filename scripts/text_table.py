"""Precompute text embeddings (`ecviz.text.TextTable`) for a machine without the text encoder: the GPU machine
lacks the MiniLM package, and its weights (91 MB) do not fit the 64 MiB a device call carries. There,
`ecviz train --text-table FILE` reads its captions from the table, and with `ECVIZ_TEXT_TABLE=FILE[:FILE...]`
every command that encodes text (sample, trace, eval, ...) reads its prompts from it instead of loading the
encoder. By default the table holds every Shapes caption (1,902) and the bundled sets `shapes` and
`shapes-eval`: about 13 MB in float16.

    python scripts/text_table.py --out .device/shapes_minilm32.safetensors [--max-len 32] [--dtype float16]
    python scripts/text_table.py --out t16.safetensors --max-len 16 --items 64 --prompts shapes --prompts FILE
"""

from __future__ import annotations

import argparse

import torch

from ecviz.data.shapes import ShapesDataset, all_captions
from ecviz.prompts import read_prompts
from ecviz.text import TextTable, load_text_encoder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--encoder", default="minilm", help="text encoder spec (default: minilm)")
    ap.add_argument("--max-len", type=int, default=32, help="the model's text_len (default: 32, the Shapes presets')")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--prompts", action="append", default=None,
                    help="a prompt file or bundled set to add (repeatable; default: shapes and shapes-eval)")
    ap.add_argument("--items", type=int, default=None,
                    help="only the captions of Shapes items 0..N-1 (seed 0), e.g. what a short test run draws "
                         "(default: every caption; 0: none)")
    args = ap.parse_args(argv)
    if args.items is None:
        prompts = all_captions()
    else:
        prompts = [ShapesDataset(length=max(args.items, 1)).scene(i).caption for i in range(args.items)]
    for spec in args.prompts if args.prompts is not None else ["shapes", "shapes-eval"]:
        prompts += read_prompts(spec).prompts
    prompts = list(dict.fromkeys(prompts))  # distinct, in order
    table = TextTable.build(load_text_encoder(args.encoder, args.max_len), prompts)
    table.save(args.out, getattr(torch, args.dtype))
    print(f"wrote {args.out}: {len(table.prompts)} prompts, {len(table.emb)} tokens of {table.dim}, {args.dtype}")


if __name__ == "__main__":
    main()
