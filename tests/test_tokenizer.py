"""Specifications of qwen2_jax.inference.tokenizer: Qwen2's tokenizer rebuilt from qwen.tiktoken, chat templates, streaming."""

import json
import random
import shutil
import unicodedata

import pytest
import tiktoken

from qwen2_jax.inference.tokenizer import (QWEN2_PATTERN, SPECIAL_TOKENS, StreamDecoder, TokenizerError,
                                 build_qwen2_tokenizer_files, load_qwen_ranks, load_tokenizer)

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "I'm sure you'll see it's what they've said, we'd go. I'M SURE YOU'LL SEE IT'S WHAT THEY'VE SAID",
    "don't DON'T Don'T o'clock rock'n'roll '' 's",
    "通义千问是阿里云研发的大语言模型。你好，世界！",
    "日本語のテキストとカタカナ、한국어 텍스트, Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
    "mixed中文and English混合text123数字",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\r\n// done\r\n",
    '{"key": [1, 2.5e-3, null], "s": "a\\nb"}',
    "emoji 😀😃🦜🧑‍🚀 👍🏽 🇨🇳🇺🇸 ❤️ ✨",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "\t\ttabs\tand\t\t\tmore",
    "\n\n\nnewlines\n\n",
    " \n \t\n\r\n  \t  mixed whitespace \u3000 ideographic space\u00a0nbsp",
    "1234567890 3.14159265358979 -42 1e10 000123 99999999999999999999",
    "phone: +1 (555) 010-9999, year 2024, ９８７ full-width digits",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|><|im_start|>",
    "not special: <|im_end <|im_start| |im_end|> <|unknown|>",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("qwen2_tok"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def tiktoken_enc():
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=load_qwen_ranks(),
                             special_tokens=SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def random_nfc_texts(n, seed=0):
    """Random strings over many scripts, emoji, digits and whitespace; NFC like real Qwen2 input."""
    pools = ["abcXYZ'sdmlltrev ", "0123456789", " \t\n\r\u3000\u00a0\u2028", "!?.,;:()[]{}<>|\"'",
             "".join(map(chr, range(0x4E00, 0x4E80))), "😀🦜🧑‍🚀👍🏽🇨🇳", "éàüßœ ÅÇ", "ابتثجحخدذ", "अआइईकखगघ्ि",
             "가나다라마바사아자", "\u0301\u0308"]
    rng = random.Random(seed)
    for _ in range(n):
        yield unicodedata.normalize("NFC", "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json


def test_build_writes_only_tokenizer_json_and_config(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_json_has_qwen2_published_shape(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(data["model"]["vocab"]) == 151643
    assert len(data["model"]["merges"]) == 151643 - 256  # exactly one merge per multi-byte token
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == [
        (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True)]
    assert data["normalizer"] == {"type": "NFC"}
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN2_PATTERN
    assert data["decoder"]["type"] == "ByteLevel"


def test_tokenizer_config_is_qwen2_instruct(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert cfg["model_max_length"] == 32768 and cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {
        151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}


def test_special_token_properties(tok):
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert tok.special_ids == {151643, 151644, 151645}
    assert tok.vocab_size == 151646


def test_known_qwen2_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("你好") == [108386]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]


# ---------------------------------------------------------------------------------------------------------------
# encode / decode


@pytest.mark.parametrize("text", CORPUS)
def test_encode_equals_tiktoken_with_special_tokens_allowed(tok, tiktoken_enc, text):
    assert tok.encode(text) == tiktoken_enc.encode(text, allowed_special="all")


def test_encode_equals_tiktoken_on_random_multiscript_text(tok, tiktoken_enc):
    for text in random_nfc_texts(500):
        assert tok.encode(text) == tiktoken_enc.encode(text, allowed_special="all"), repr(text)


@pytest.mark.parametrize("text", CORPUS)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_is_nfc_normalized_so_non_nfc_text_differs_from_tiktoken(tok, tiktoken_enc):
    # Qwen2's tokenizer.json normalizes to NFC; tiktoken (Qwen's original tokenizer) does not.
    decomposed, composed = "e\u0301", "\u00e9"
    assert tok.encode(decomposed) == tok.encode(composed) == tiktoken_enc.encode(composed)
    assert tiktoken_enc.encode(decomposed) != tiktoken_enc.encode(composed)
    assert tok.decode(tok.encode("\u2000")) == "\u2002"  # EN QUAD is canonically EN SPACE


def test_decode_skip_special_tokens_drops_only_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", CORPUS)
def test_encode_equals_transformers_tokenizer_loaded_from_our_files(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text))


# ---------------------------------------------------------------------------------------------------------------
# chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "system", "content": "用中文回答。"}, {"role": "user", "content": "天空为什么是蓝色的？😀"},
     {"role": "assistant", "content": "因为瑞利散射。"}, {"role": "user", "content": "Merci, très bien!\n\n  ok"}],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_byte_identical_to_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("messages", CONVERSATIONS[:4])
def test_tokenized_chat_equals_transformers_ids(tok, hf_tok, messages):
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ours == list(theirs["input_ids"])


def test_empty_conversation_is_refused_like_transformers(tok, hf_tok):
    with pytest.raises(ValueError):
        hf_tok.apply_chat_template([], tokenize=False)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])


def test_chat_template_is_qwen2_chatml_with_default_system_message(tok):
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("config", [None, {"eos_token": "<|im_end|>"}], ids=["no_config", "config_without_template"])
def test_default_chatml_template_used_when_checkpoint_has_none(tok, tok_dir, tmp_path, config):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = load_tokenizer(tmp_path)
    for messages in CONVERSATIONS[:4]:
        assert bare.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert bare.eos_token_id == 151645


def test_custom_chat_template_sees_special_tokens_and_transformers_helpers(tok_dir, tmp_path):
    # A checkpoint's own template wins; eos_token, tojson and raise_exception behave as in transformers.
    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('bad role') }}{% endif %}"
                "  {{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    messages = [{"role": "user", "content": "<b>héllo</b> \"q\""}, {"role": "assistant", "content": "ok"}]
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    for agp in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=agp) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=agp)
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


# ---------------------------------------------------------------------------------------------------------------
# streaming


def stream(tok, ids, **kw):
    decoder = StreamDecoder(tok, **kw)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


def test_stream_never_emits_broken_characters_and_reassembles_exactly(tok):
    text = "流式输出：😀🦜🧑‍🚀👍🏽 𠀀𪚥 龘 and ascii, 🇯🇵 done ✓"
    ids = tok.encode(text)
    # The text must really split characters across tokens for this test to mean anything.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail = stream(tok, ids)
    assert "" in pieces  # some pushes held text back
    assert not any("\ufffd" in p for p in pieces + [tail])
    assert "".join(pieces) + tail == tok.decode(ids) == text


def test_stream_emits_text_as_soon_as_characters_complete(tok):
    ids = tok.encode("Hello world, 你好")
    pieces, tail = stream(tok, ids)
    assert pieces == [tok.decode([i]) for i in ids] and tail == ""


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_on_random_ids_concatenates_to_decode(tok, skip_special_tokens):
    rng = random.Random(1)
    for _ in range(200):
        # Byte-level tokens (ids < 256) make partial and invalid UTF-8; the rest covers the whole vocab.
        ids = [rng.randrange(256) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(0, 40))]
        pieces, tail = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_stream_flush_returns_held_incomplete_character(tok):
    emoji_ids = tok.encode("🦜")
    assert len(emoji_ids) > 1
    pieces, tail = stream(tok, emoji_ids[:-1])
    assert pieces == [""] * len(pieces) and tail == tok.decode(emoji_ids[:-1]) and tail.endswith("\ufffd")


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_load_accepts_tokenizer_json_path_directly(tok_dir):
    assert load_tokenizer(tok_dir / "tokenizer.json").encode("Hello world") == [9707, 1879]


def test_missing_tokenizer_json_raises_tokenizer_error_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_tokenizer_json_raises_tokenizer_error_naming_it(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_corrupt_tokenizer_config_raises_tokenizer_error_naming_it(tok_dir, tmp_path):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
