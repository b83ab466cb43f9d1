"""``qwen2-jax generate`` and ``qwen2-jax chat``: text in, streamed text out.

Sampling defaults come from the checkpoint's ``generation_config.json`` (transformers' defaults where it says
nothing; greedy when there is none); each flag overrides its value. End tokens: ``--eos-token-id`` if given,
else the generation config's, else config.json's together with the tokenizer's end token.
The text goes to stdout as it is generated; what was loaded and compiled, timings and token counts go to stderr.

The parser is built for ``--help`` without jax: the model, the tokenizer and ``generate`` are imported by the
functions that run them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qwen2_jax.errors import InputError

from .common import (add_checkpoint_argument, add_dtype_argument, add_mesh_argument, add_quantize_argument,
                     check_quantize, human_bytes)

DEFAULT_MAX_NEW_TOKENS = 256
PREFILL_CHUNK = 2048  # qwen2_jax.inference.generate.PREFILL_CHUNK (tests/test_cli.py checks they agree)

DESCRIPTIONS = {
    "generate": """\
Generates text from --prompt with the model in CKPT, a local checkpoint directory: a Hugging Face one
(config.json, *.safetensors, tokenizer.json) or one that `qwen2-jax convert` wrote. The text is streamed to
stdout as it is generated; what was loaded (dtype or quantization, bytes on the device), when a prompt length
is compiled for the first time, and the timings (time to first token, tokens/s) go to stderr. Sampling
defaults come from the checkpoint's generation_config.json (greedy where it has none); each flag overrides one.

example:
  qwen2-jax generate ~/models/Qwen2-57B-A14B-Instruct --chat --prompt "Give me a short introduction to LLMs." \\
      --mesh auto --quantize int8""",
    "chat": """\
A multi-turn chat in the terminal with the model in CKPT, a local checkpoint directory (Hugging Face or
converted Orbax, with its tokenizer.json). Each line read from stdin is a user message, put through the
checkpoint's chat template with the conversation so far; the answer is streamed to stdout, and what was loaded,
compiled and the timings go to stderr. /reset clears the history, /exit or Ctrl-D quits, and Ctrl-C stops an
answer (what was written of it stays in the history). Sampling defaults as for generate.

example:
  qwen2-jax chat ~/models/Qwen2-57B-A14B-Instruct --system "You are a concise assistant." --mesh auto""",
}


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    if name == "generate":
        parser.add_argument("--prompt", required=True, help="the prompt text (required)")
        parser.add_argument("--chat", action="store_true",
                            help="wrap the prompt in the checkpoint's chat template as a user message (default: "
                                 "the prompt as it is)")
    else:
        parser.add_argument("--system", help="a system message (default: none, the chat template's own)")
    add_generation_arguments(parser)
    g = parser.add_argument_group("loading")
    add_dtype_argument(g)
    add_quantize_argument(g)
    add_mesh_argument(g)


def add_generation_arguments(parser, max_new_tokens: str = f"the generation config's, else {DEFAULT_MAX_NEW_TOKENS}"):
    """The sampling and prompt flags ``generate``, ``chat`` and ``demo`` share."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"most tokens to generate (default: {max_new_tokens})")
    g.add_argument("--temperature", type=float,
                   help="sampling temperature; 0 is greedy (default: the generation config's when it samples, else 0)")
    g.add_argument("--top-k", type=int, metavar="K",
                   help="keep the K most likely tokens; 0 is off (default: the generation config's, else 50)")
    g.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling threshold in (0, 1]; 1 is off (default: the generation config's, else 1)")
    g.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="Hugging Face's repetition penalty; 1 is off (default: the generation config's, else 1)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--eos-token-id", type=int, action="append", metavar="ID",
                   help="an end token, repeatable (default: the generation config's, else config.json's and the "
                        "tokenizer's)")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt too long for the context (default: refuse it)")
    g.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens the prefill takes at a time: longer prompts go through in chunks (default: "
                        f"{PREFILL_CHUNK})")


def sampling_settings(args, generation_config, default_eos=(), source: str = "generation_config.json") -> dict:
    """The keyword arguments of ``generate_stream``: each flag, else the value of ``generation_config`` (a
    ``GenerationConfig`` or None). A bad value is an InputError naming its flag, or ``source`` (the generation
    config file) when it came from there."""
    from qwen2_jax.inference.sampling import check_sampling_args
    from qwen2_jax.model.generation_config import GenerationConfig

    gen = generation_config or GenerationConfig()
    pick = lambda flag, value: value if flag is None else flag
    settings = dict(
        max_new_tokens=pick(args.max_new_tokens, gen.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        temperature=pick(args.temperature, gen.temperature if gen.do_sample else 0.0),
        top_k=pick(args.top_k, gen.top_k), top_p=pick(args.top_p, gen.top_p),
        repetition_penalty=pick(args.repetition_penalty, gen.repetition_penalty),
        seed=args.seed, truncate=args.truncate, prefill_chunk=getattr(args, "prefill_chunk", PREFILL_CHUNK),
        eos_token_ids=tuple(args.eos_token_id or gen.eos_token_id or default_eos))
    n = settings["max_new_tokens"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        where = "--max-new-tokens" if args.max_new_tokens is not None else f"{source}: max_new_tokens"
        raise InputError(f"{where} must be >= 1, got {n!r}{'' if isinstance(n, int) else ' (expected an integer)'}")
    try:
        check_sampling_args(**{k: settings[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")})
    except InputError as e:  # the message starts with the keyword: name the flag, or the file it came from
        keyword = str(e).split()[0]
        if getattr(args, keyword) is None:
            raise InputError(f"{source}: {e}") from None
        raise InputError("--" + keyword.replace("_", "-") + str(e)[len(keyword):]) from None
    return settings


def check_flags(args) -> None:
    """The flags' own values, before anything is loaded."""
    sampling_settings(args, None)
    if getattr(args, "prompt", None) is not None and not args.prompt:
        raise InputError("--prompt is empty")
    for flag in ("prompt", "system"):
        problem = not_utf8(getattr(args, flag, None))
        if problem:
            raise InputError(f"--{flag} is not valid UTF-8 text ({problem})")
    for e in args.eos_token_id or ():
        if not 0 <= e < 2**31:
            raise InputError(f"--eos-token-id {e} is not a token id: expected an integer in [0, vocab_size)")
    if getattr(args, "prefill_chunk", 1) < 1:
        raise InputError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    check_quantize(getattr(args, "quantize", None))


def not_utf8(text: str | None) -> str | None:
    """What makes ``text`` impossible to tokenize: a byte that was not UTF-8 where it came from (the command
    line or stdin decode such bytes to lone surrogates), or None when there is nothing wrong."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at character {e.start}"


def fit_prompt(prompt_ids: list[int], settings: dict, cfg) -> list[int]:
    """The prompt checked against the model before it runs: its ids in the vocabulary, its length in the context
    with room for ``max_new_tokens`` (with ``--truncate``, its last tokens)."""
    from qwen2_jax.inference.generate import fit_context

    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise InputError(f"the tokenizer gives token id {bad[0]}, outside the model's vocabulary [0, "
                         f"{cfg.vocab_size}) (vocab_size in config.json): its files are not this checkpoint's")
    return fit_context([prompt_ids], settings["max_new_tokens"], cfg.context_length, settings["truncate"])[0]


def prepare(args, checkpoint: str):
    """Config, tokenizer and sampling settings of a checkpoint directory: the cheap checks, before loading."""
    from qwen2_jax.inference.tokenizer import load_tokenizer
    from qwen2_jax.loading import read_generation_config
    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model.hf_files import check_checkpoint_dir

    check_checkpoint_dir(checkpoint)
    cfg = Qwen2MoeConfig.from_json(checkpoint)
    bad = [e for e in args.eos_token_id or () if not 0 <= e < cfg.vocab_size]
    if bad:
        raise InputError(f"--eos-token-id {bad[0]} is outside the vocabulary: expected an integer in "
                         f"[0, {cfg.vocab_size}) (vocab_size in config.json)")
    tokenizer = load_tokenizer(checkpoint)
    tokenizer_eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    default_eos = tuple(dict.fromkeys([*cfg.eos_token_id, *tokenizer_eos]))
    settings = sampling_settings(args, read_generation_config(checkpoint), default_eos,
                                 source=os.path.join(checkpoint, "generation_config.json"))
    return cfg, tokenizer, settings


def load_model(args, checkpoint: str, cfg):
    """The model in ``--dtype`` (float32 on CPU by default), quantized as ``--quantize`` asks, on ``--mesh`` if
    given; says on stderr what it loaded: the weights' type (the dtype, or the quantization) and their bytes."""
    from qwen2_jax.loading import from_pretrained

    quantize = getattr(args, "quantize", None)
    if quantize and cfg.quantization is not None:
        raise InputError(f"{checkpoint}: already quantized ({cfg.quantization.dtype}); load it without --quantize")
    mesh = None
    if getattr(args, "mesh", None):
        from qwen2_jax.sharding import mesh_from_args

        mesh = mesh_from_args(args, cfg)
    dtype = getattr(args, "dtype", None) or _default_dtype()
    start = time.perf_counter()
    model = from_pretrained(checkpoint, dtype=dtype, mesh=mesh, quantize=quantize)
    print(f"loaded {checkpoint} ({describe_weights(model, dtype)}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return model


def describe_weights(model, dtype: str) -> str:
    """"int8, 14.6 GB on the device" (the quantization, else the dtype), or "... over 8 devices" on a mesh."""
    import jax
    from flax import nnx

    quant = model.config.quantization
    kind = dtype if quant is None else quant.dtype + (f":{quant.block}" if quant.block else "")
    nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(nnx.state(model)))
    mesh = getattr(model, "mesh", None)
    where = "on the device" if mesh is None or mesh.size == 1 else f"over {mesh.size} devices"
    return f"{kind}, {human_bytes(nbytes)} {where}"


def _default_dtype() -> str:
    import jax

    # bf16 matmuls are many times slower than f32 on XLA:CPU
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def stream_answer(model, tokenizer, prompt_ids: list[int], settings: dict, *, stop_on_interrupt=False,
                  out=None, err=None, compiled: set | None = None) -> list[int]:
    """Generates from one prompt, writing the text to ``out`` as it comes and a line of figures to ``err``.
    Returns the new token ids (the end token included). Ctrl-C (KeyboardInterrupt) ends it after the figures:
    re-raised, or with ``stop_on_interrupt`` the answer so far is returned. ``compiled``: the padded prompt
    lengths this process has generated from; a prompt of a new one says first that it compiles."""
    from qwen2_jax.inference.generate import generate_stream
    from qwen2_jax.inference.tokenizer import StreamDecoder

    out, err = out or sys.stdout, err or sys.stderr
    say_if_compiling(len(prompt_ids), settings, compiled if compiled is not None else set(), err)
    eos = set(settings["eos_token_ids"])
    decoder = StreamDecoder(tokenizer)
    ids: list[int] = []
    start = time.perf_counter()
    first = None
    try:
        for new in generate_stream(model, [prompt_ids], **settings):
            if first is None:
                first = time.perf_counter()
            for t in new[0]:
                ids.append(t)
                if t not in eos:  # the end token is not part of the text
                    out.write(decoder.push(t))
            out.flush()
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            raise
        print("(stopped)", file=err)
    finally:
        end = time.perf_counter()
        out.write(decoder.flush() + "\n")
        out.flush()
        if first is not None:
            rate = f"{(len(ids) - 1) / (end - first):.1f} tokens/s after it" if len(ids) > 1 and end > first else "-"
            print(f"prompt {len(prompt_ids)} tokens, generated {len(ids)} tokens; time to first token "
                  f"{first - start:.2f} s, {rate}", file=err)
    return ids


def say_if_compiling(prompt_len: int, settings: dict, compiled: set, err) -> None:
    """``generate`` compiles its prefill and decode once per padded prompt length (16, 32, 64 .. tokens, whole
    prefill chunks beyond one): the first prompt of each length says so on ``err`` and adds it to ``compiled``."""
    from qwen2_jax.inference.generate import chunk_length, padded_prompt_length

    padded = padded_prompt_length(prompt_len, chunk_length(settings["prefill_chunk"], 1))
    if padded not in compiled:
        compiled.add(padded)
        print(f"compiling for prompts of up to {padded} tokens...", file=err, flush=True)


def run(name: str, args) -> int:
    check_flags(args)
    cfg, tokenizer, settings = prepare(args, args.checkpoint)
    if name == "chat":
        return chat(load_model(args, args.checkpoint, cfg), tokenizer, settings, system=args.system)
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    # checked before loading; with --truncate, the last tokens that leave room for --max-new-tokens
    kept = fit_prompt(prompt_ids, settings, cfg)
    if len(kept) < len(prompt_ids):
        print(f"prompt truncated from {len(prompt_ids)} to its last {len(kept)} tokens", file=sys.stderr)
    prompt_ids = kept
    stream_answer(load_model(args, args.checkpoint, cfg), tokenizer, prompt_ids, settings, compiled=set())
    return 0


def chat(model, tokenizer, settings: dict, *, system: str | None = None, stdin=None) -> int:
    """A terminal chat: each line is a user turn; ``/reset`` clears the history, ``/exit`` or EOF quits,
    Ctrl-C stops the answer being written (what was written stays in the history)."""
    stdin = stdin or sys.stdin
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = stdin.isatty()
    print("chat: /reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops an answer", file=sys.stderr)
    eos = set(settings["eos_token_ids"])
    compiled: set[int] = set()
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print(file=sys.stderr)
            continue
        except UnicodeDecodeError as e:  # stdin decodes strictly: the line is lost, the chat goes on
            print(f"error: the input is not valid UTF-8 text ({e.reason}); type it again", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if not_utf8(line):  # stdin decoding with surrogateescape (a C locale) lets such bytes through
            print(f"error: the input is not valid UTF-8 text ({not_utf8(line)}); type it again", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        try:
            prompt_ids = fit_prompt(prompt_ids, settings, model.config)
        except InputError as e:  # e.g. the history outgrew the context: say so and keep chatting
            history.pop()
            print(f"error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        answer = stream_answer(model, tokenizer, prompt_ids, settings, stop_on_interrupt=True, compiled=compiled)
        history.append({"role": "assistant", "content": tokenizer.decode([t for t in answer if t not in eos])})
