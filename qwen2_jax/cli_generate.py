"""``qwen2-jax generate`` and ``qwen2-jax chat``: text in, streamed text out.

Sampling defaults come from the checkpoint's ``generation_config.json`` (transformers' defaults where it says
nothing; greedy when there is none); each flag overrides its value. End tokens: ``--eos-token-id`` if given,
else the generation config's, else config.json's together with the tokenizer's end token.
The text goes to stdout as it is generated; timings and token counts go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .generate import GenerationConfig, fit_context, generate_stream
from .sampling import check_sampling_args

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name != "demo":
        parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (Hugging Face or converted Orbax)")
    if name in ("generate", "demo"):
        parser.add_argument("--prompt", required=name == "generate", help="the prompt text")
    if name == "generate":
        parser.add_argument("--chat", action="store_true",
                            help="wrap the prompt in the chat template as a user message")
    if name in ("chat", "demo"):
        parser.add_argument("--system", help="a system message (default: the chat template's own)")
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, help=f"most tokens to generate (default: the generation config's, "
                                                      f"else {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, help="0 means greedy (default: the generation config's)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens; 0 is off")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]; 1 is off")
    g.add_argument("--repetition-penalty", type=float, help="HF's repetition penalty; 1 is off")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--eos-token-id", type=int, action="append", metavar="ID",
                   help="an end token (repeatable; default: the generation config's)")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt too long for the context instead of refusing it")
    if name != "demo":
        g.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="weights dtype (default: float32 on CPU, bfloat16 on accelerators)")
        from .sharding import add_mesh_argument

        add_mesh_argument(g)


def sampling_settings(args, generation_config: GenerationConfig | None, default_eos=()) -> dict:
    """The keyword arguments of ``generate_stream``: each flag, else the generation config's value."""
    gen = generation_config or GenerationConfig()
    pick = lambda flag, value: value if flag is None else flag
    settings = dict(
        max_new_tokens=pick(args.max_new_tokens, gen.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        temperature=pick(args.temperature, gen.temperature if gen.do_sample else 0.0),
        top_k=pick(args.top_k, gen.top_k), top_p=pick(args.top_p, gen.top_p),
        repetition_penalty=pick(args.repetition_penalty, gen.repetition_penalty),
        seed=args.seed, truncate=args.truncate,
        eos_token_ids=tuple(args.eos_token_id or gen.eos_token_id or default_eos))
    if settings["max_new_tokens"] < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {settings['max_new_tokens']}")
    try:
        check_sampling_args(**{k: settings[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")})
    except ValueError as e:  # the message starts with the keyword: name the flag instead
        keyword = str(e).split()[0]
        raise ValueError("--" + keyword.replace("_", "-") + str(e)[len(keyword):]) from None
    return settings


def check_flags(args) -> None:
    """The flags' own values, before anything is loaded."""
    sampling_settings(args, None)
    if getattr(args, "prompt", None) is not None and not args.prompt:
        raise ValueError("--prompt is empty")


def prepare(args, checkpoint: str):
    """Config, tokenizer and sampling settings of a checkpoint directory: the cheap checks, before loading."""
    from .config import Qwen2MoeConfig
    from .hf_files import CheckpointError
    from .tokenizer import load_tokenizer

    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a checkpoint directory")
    cfg = Qwen2MoeConfig.from_json(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    tokenizer_eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    default_eos = tuple(dict.fromkeys([*cfg.eos_token_id, *tokenizer_eos]))
    settings = sampling_settings(args, GenerationConfig.from_pretrained(checkpoint), default_eos)
    return cfg, tokenizer, settings


def load_model(args, checkpoint: str, cfg):
    """The model in ``--dtype`` (float32 on CPU by default), on ``--mesh`` if given."""
    from .loading import from_pretrained

    mesh = None
    if getattr(args, "mesh", None):
        from .sharding import mesh_from_args

        mesh = mesh_from_args(args, cfg)
    dtype = getattr(args, "dtype", None) or _default_dtype()
    start = time.perf_counter()
    model = from_pretrained(checkpoint, dtype=dtype, mesh=mesh)
    print(f"loaded {checkpoint} ({dtype}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def _default_dtype() -> str:
    import jax

    # bf16 matmuls are many times slower than f32 on XLA:CPU
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def stream_answer(model, tokenizer, prompt_ids: list[int], settings: dict, *, stop_on_interrupt=False,
                  out=None, err=None) -> list[int]:
    """Generates from one prompt, writing the text to ``out`` as it comes and a line of figures to ``err``.
    Returns the new token ids (the end token included). Ctrl-C (KeyboardInterrupt) ends it after the figures:
    re-raised, or with ``stop_on_interrupt`` the answer so far is returned."""
    from .tokenizer import StreamDecoder

    out, err = out or sys.stdout, err or sys.stderr
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
    kept = fit_context([prompt_ids], settings["max_new_tokens"], cfg.max_position_embeddings, args.truncate)[0]
    if len(kept) < len(prompt_ids):
        print(f"prompt truncated from {len(prompt_ids)} to its last {len(kept)} tokens", file=sys.stderr)
    prompt_ids = kept
    stream_answer(load_model(args, args.checkpoint, cfg), tokenizer, prompt_ids, settings)
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
        line = line.strip()
        if not line:
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
            answer = stream_answer(model, tokenizer, prompt_ids, settings, stop_on_interrupt=True)
        except ValueError as e:  # e.g. the history outgrew the context: say so and keep chatting
            history.pop()
            print(f"error: {e} (/reset clears the history)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": tokenizer.decode([t for t in answer if t not in eos])})
