"""The float64-referenced parity table of docs/parity.md: for each configuration of tests/hf_reference.py's
``CONFIGS``, the errors that tests/test_model_parity.py holds to its bounds, computed by the same functions
(``parity_run``, ``parity_errors``): this port's and transformers' float32 logits and router logits and bfloat16
logits, against transformers in float64, relative to the largest |value|, over the compared positions.

    python scripts/parity_table.py [--configs default_topk2,yarn_mscale]   # markdown table on stdout
    python scripts/parity_table.py --save NAME DIR                          # write CONFIGS[NAME]'s checkpoint
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
    from hf_reference import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (default: all)")
    ap.add_argument("--save", nargs=2, metavar=("NAME", "DIR"), help="only write CONFIGS[NAME]'s checkpoint to DIR")
    args = ap.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names + ([args.save[0]] if args.save else []) if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration {unknown[0]!r}; expected one of {', '.join(CONFIGS)}")

    import jax
    import torch
    import transformers
    from hf_reference import parity_errors, parity_model, parity_run

    if args.save:
        parity_model(args.save[0], args.save[1])
        print(f"wrote {args.save[1]}")
        return

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__} on "
          f"{jax.default_backend()}; {datetime.date.today()}, {platform.machine()} ({os.cpu_count()} cores)\n")
    print("| configuration | positions compared | ours float32 | transformers float32 (best..worst of 4) | "
          "ours / worst | ours router | transformers router (worst) | ours bfloat16 | transformers bfloat16 "
          "(best..worst) | ours / worst |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            e = parity_errors(parity_run(name, d))
        t32, tr, t16 = (e[k].values() for k in ("transformers_float32", "transformers_router", "transformers_bfloat16"))
        t32, tr, t16 = list(t32), list(tr), list(t16)
        print(f"| {name} | {e['positions']} of {e['valid']} | {e['float32']:.2e} | {min(t32):.2e}..{max(t32):.2e} "
              f"| {e['float32'] / max(t32):.2f} | {e['router']:.2e} | {max(tr):.2e} | {e['bfloat16']:.2e} | "
              f"{min(t16):.2e}..{max(t16):.2e} | {e['bfloat16'] / max(t16):.2f} |", flush=True)


if __name__ == "__main__":
    main()
