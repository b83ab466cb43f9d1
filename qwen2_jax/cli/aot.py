"""``qwen2-jax aot``: the command line of ``qwen2_jax.tools.aot`` (compile a step for an accelerator this
machine does not have, and read what it moves)."""

from __future__ import annotations

import argparse
import json
import sys

from qwen2_jax.errors import InputError

from .common import add_dtype_argument, add_mesh_argument, add_quantize_argument, check_quantize, positive_int

DESCRIPTIONS = {"aot": """\
Compiles the step generate runs (the decode loop, or with --prompt-len the prefill), or with --engine a step of
the serving engine, for an accelerator this machine lacks: an H200 or H100 (the CUDA compiler, no GPU needed)
or a TPU slice (libtpu, deviceless), from abstract arrays placed as generate places them: nothing is allocated.
Reads nothing but --config. Prints a table per --batch: the bytes one step reads and writes against what it
must read (roofline_bytes), memory and whether it fits, kernels, collectives, FLOPs and an estimated tokens/s;
with --json the full results, with --dump-hlo the optimized HLO. Says on stderr which stage it is in: the
full-size model compiles for about a minute. Needs the aot extra (pip install 'qwen2-jax[aot]').

examples:
  qwen2-jax aot --target h200 --batch 1 --batch 64
  qwen2-jax aot --target v5p-8 --mesh expert=4 --quantize int8 --json -
  qwen2-jax aot --target h200 --engine --config qwen2-57b-a14b-instruct-yarn --max-model-len 65536 \
      --max-num-seqs 64 --batch 64 --cache-len 2048               # the server's decode step: 64 sequences of 2,048"""}


def add_arguments(name: str, parser) -> None:
    from qwen2_jax.tools.aot import ENGINE_STEPS, TARGETS

    parser.add_argument("--target", default="h200", choices=list(TARGETS),
                        help=f"the accelerator to compile for: {', '.join(TARGETS)} (default: h200)")
    add_mesh_argument(parser, over="the target's devices", default_text="one device on a GPU target, the "
                      "recommended mesh over all of a TPU slice's devices")
    parser.add_argument("--batch", type=positive_int, action="append", default=None, metavar="N",
                        help="batch size; repeat the flag for several (default: 1)")
    parser.add_argument("--prompt-len", type=positive_int, default=None, metavar="N",
                        help="compile the prefill of N-token prompts (default: the decode step)")
    parser.add_argument("--cache-len", type=positive_int, default=None, metavar="N",
                        help="KV cache positions (default: 4096 for decode; for a prefill, what generate allocates)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                        help="tokens a prefill step takes at a time (default: generate's, 2048)")
    add_dtype_argument(parser, default="bfloat16", default_text="bfloat16", choices=("bfloat16", "float32"))
    add_quantize_argument(parser, what="compile with the weights quantized", default_text="none, weights of --dtype")
    parser.add_argument("--config", default="qwen2-57b-a14b-instruct", metavar="NAME|PATH",
                        help="an embedded config name (qwen2_jax/configs) or a config.json (default: "
                             "qwen2-57b-a14b-instruct, the full Qwen2-57B-A14B)")
    parser.add_argument("--engine", nargs="?", const=True, default=False, choices=ENGINE_STEPS, metavar="STEP",
                        help="compile a step of the serving engine (qwen2-jax serve) over its paged KV cache instead "
                             "of generate's: decode (--batch sequences of --cache-len tokens), prefill (packed prompts, "
                             "--prompt-len tokens) or piece (--prompt-len tokens of a long or partly cached prompt, "
                             "after --cache-len tokens in its pages); alone: prefill with --prompt-len, else decode "
                             "(default: generate's step)")
    g = parser.add_argument_group("engine (with --engine; serve's flags)")
    g.add_argument("--max-num-seqs", type=positive_int, default=None, metavar="N",
                   help="sequences the engine runs at once, the decode step's rows (default: the batch)")
    g.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                   help="positions a sequence may use (default: --cache-len and one)")
    g.add_argument("--block-size", type=positive_int, default=16, metavar="N",
                   help="positions a KV page holds (default: 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="the share of the device's memory the weights and KV pages may take (default: 0.9)")
    g.add_argument("--num-gpu-blocks-override", type=positive_int, default=None, metavar="N",
                   help="KV pages in the pool, whatever the memory (default: what the memory holds)")
    g.add_argument("--attention-backend", choices=("xla", "pallas"), default="xla",
                   help="the attention over KV pages: xla (every backend) or pallas (the ragged TPU kernel) "
                        "(default: xla)")
    parser.add_argument("--slots", type=int, default=None, help=argparse.SUPPRESS)  # refused: --max-num-seqs
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON; '-' prints them instead of the table (default: none)")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR",
                        help="write each optimized HLO text to DIR (default: none)")


def run(name, args) -> int:
    from qwen2_jax.tools.aot import Request, compile_step, format_table

    check_quantize(args.quantize)
    if args.slots is not None:
        raise InputError("--slots is now --max-num-seqs (vLLM's name)")

    def progress(line: str) -> None:
        print(f"aot: {line} ...", file=sys.stderr, flush=True)

    results = [compile_step(Request(target=args.target, mesh=args.mesh, batch=b, prompt_len=args.prompt_len,
                                    cache_len=args.cache_len, dtype=args.dtype, config=args.config,
                                    prefill_chunk=args.prefill_chunk, quantize=args.quantize, engine=args.engine,
                                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                    block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                                    num_gpu_blocks_override=args.num_gpu_blocks_override,
                                    attention_backend=args.attention_backend),
                            dump_hlo=args.dump_hlo, progress=progress)
               for b in (args.batch or [1])]
    if args.json == "-":
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
