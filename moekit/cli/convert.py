"""`moekit convert`: Hugging Face checkpoint folder <-> moekit folder.

    moekit convert --from-hf PATH_OR_REPO_ID --out DIR [--dtype bfloat16] [--quantize int8]
    moekit convert --to-hf MOEKIT_DIR --out DIR [--family mixtral] [--dtype bfloat16]

--from-hf streams the safetensors shards into a moekit LM and writes moekit_lm.json +
model.safetensors (tokenizer files are copied along); --to-hf writes a folder transformers loads.
--quantize int8 stores the expert weights as int8 with per-output-channel float32 scales
(weight-only, inference only; docs/serving.md); serve loads such a folder as it is.
"""

from __future__ import annotations

import argparse

_DTYPES = ("float32", "bfloat16", "float16")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.experts.int8 import quantization_of
    from moekit.hf.convert import convert_folder, load_moekit
    from moekit.hf.export import to_hf

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.from_hf is not None:
        out = convert_folder(args.from_hf, args.out, dtype=dtype, revision=args.revision,
                             overwrite=args.overwrite, quantize=args.quantize)
        print(f"wrote moekit model to {out}")
    else:
        if args.quantize is not None:
            raise ValueError("--quantize applies to --from-hf (the Hugging Face export writes float weights)")
        model = load_moekit(args.to_hf)
        if quantization_of(model) is not None:
            raise ValueError(f"--to-hf {args.to_hf}: the folder holds int8 experts; export the float folder it "
                             f"was converted from")
        out = to_hf(model, args.out, family=args.family, dtype=dtype, overwrite=args.overwrite)
        print(f"wrote Hugging Face checkpoint to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert between Hugging Face and moekit checkpoints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="PATH", help="HF checkpoint folder or hub repo id")
    src.add_argument("--to-hf", metavar="DIR", help="moekit folder written by --from-hf or save_moekit")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast weights (default: keep float32)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="store the experts as weight-only int8 with per-channel scales (--from-hf)")
    p.add_argument("--family", default=None, help="HF family for --to-hf (default: source or inferred)")
    p.add_argument("--revision", default=None, help="hub revision for --from-hf with a repo id")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --out (default: refuse a non-empty --out)")
    p.set_defaults(func=run)
