"""The offline Qwen tokenizer must encode exactly like tiktoken on the same BPE ranks."""

import random
import unicodedata

import pytest
import tiktoken

from maye_jax.data import tokenizer as tokenizer_module
from maye_jax.data.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    QWEN2_5_VL_EXTRA_TOKENS,
    QWEN2_VL_SPECIAL_TOKENS,
    STOP_TOKEN_IDS,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    load_bpe_ranks,
    load_tokenizer,
    save_tokenizer_files,
)

# Qwen2's pre-tokenization regex, as Qwen's own tiktoken-based tokenizer declares it.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "Hello world! It's a test; we'll see: they're fine, I'm sure, you've done it, he'd go.",
    "HELLO WORLD IT'S LOUD",
    "在三角形ABC中，∠A=60°，求BC的长度。答案是\\boxed{20}。",
    "中文和English混合的句子，包含数字12345和标点！",
    "Find $x$ if $\\frac{x^2+3x-4}{x-1} = \\sqrt{2}\\cdot\\pi$, where $x \\in \\mathbb{R}$.",
    "\\begin{align} a_{n+1} &= 2a_n + 1 \\\\ b &= \\int_0^1 f(t)\\,dt \\end{align}",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n",
    "   leading spaces, trailing spaces   \n\n  \t \n",
    "tabs\t\t\tand\n\n\n\nnewlines\r\n\r\n",
    "emoji 😀🎉👍🏽 and flags 🇨🇳 and zwj 👨‍👩‍👧",
    "numbers 3.14159 1,000,000 2024-01-01 0x1F 1e-10 -42 ½ ² ³",
    "Ünïcödé àccents, ß, ñ, Ω, ∑, ∫, ≤, ≥ and a non-breaking\u00a0space and\u3000ideographic",
    "<image>In the figure, AB is a diameter of circle O. Find the measure of angle ACB.",
    "",
    " ",
    "\n",
    "a",
]


@pytest.fixture(scope="module")
def fresh_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("maye_cache")


@pytest.fixture(scope="module")
def built_tokenizer(fresh_cache_dir):
    """A freshly built (not previously cached) Qwen2.5-VL tokenizer, built once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAYE_CACHE_DIR", str(fresh_cache_dir))
        yield load_tokenizer(family="qwen2_5_vl")


@pytest.fixture(scope="module")
def reference_encoding():
    return tiktoken.Encoding(
        "qwen_reference", pat_str=QWEN_PATTERN, mergeable_ranks=load_bpe_ranks(), special_tokens={}
    )


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Random strings over letters, CJK, digits, punctuation, whitespace runs and emoji."""
    pool = list("abcxyzABCXYZ0123456789 \t\n\r.,;:!?'\"()[]{}\\/$^_+-*=<>|&%#@~`")
    pool += list("的一是在不了有和人这中大为上个国我以要他时来用们生到作") + ["  ", "\n\n", "\t "]
    pool += ["😀", "🎉", "∠", "△", "√", "π", "°", "é", "ß", "Ω", "\u00a0", "\u3000", "'s", "'LL"]
    generator = random.Random(seed)
    return ["".join(generator.choices(pool, k=generator.randint(1, 60))) for _ in range(count)]


def test_ids_equal_tiktoken_on_mixed_corpus(built_tokenizer, reference_encoding):
    # The HF pipeline NFC-normalises first (as the released Qwen2 tokenizer does); tiktoken does
    # not, so the reference sees NFC text. Every corpus text is NFC already except where noted.
    texts = CORPUS + random_texts(2000)
    ours = built_tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours, strict=True):
        expected = reference_encoding.encode_ordinary(unicodedata.normalize("NFC", text))
        assert ids == expected, text


def test_vocabulary_entries_encode_like_tiktoken(built_tokenizer, reference_encoding):
    # Vocabulary entries that are valid UTF-8 text must come back as the same token(s) tiktoken
    # gives: this reaches derived merges that no corpus would. A seeded third of the vocabulary
    # keeps the test fast; all ~150k entries agreed when run in full.
    ranks = load_bpe_ranks()
    texts = []
    for token in random.Random(0).sample(sorted(ranks), 50_000):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.is_normalized("NFC", text):
            texts.append(text)
    ours = built_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [
        text
        for text, ids in zip(texts, ours, strict=True)
        if ids != reference_encoding.encode_ordinary(text)
    ]
    assert len(texts) > 45_000
    assert mismatches == []


def test_decode_round_trip(built_tokenizer):
    for text in CORPUS + random_texts(200, seed=1):
        text = unicodedata.normalize("NFC", text)
        ids = built_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert built_tokenizer.decode(ids) == text


def test_known_ids(built_tokenizer):
    assert built_tokenizer("Hello", add_special_tokens=False)["input_ids"] == [9707]
    assert built_tokenizer(" world", add_special_tokens=False)["input_ids"] == [1879]
    # No BOS/EOS added by default, as with the released tokenizer.
    assert built_tokenizer("Hello world")["input_ids"] == [9707, 1879]


def test_special_token_ids(built_tokenizer):
    names = QWEN2_VL_SPECIAL_TOKENS + QWEN2_5_VL_EXTRA_TOKENS
    for offset, name in enumerate(names):
        assert built_tokenizer.convert_tokens_to_ids(name) == 151643 + offset
        assert built_tokenizer(name, add_special_tokens=False)["input_ids"] == [151643 + offset]
    assert len(built_tokenizer) == 151665
    assert (ENDOFTEXT_ID, IM_END_ID, VISION_START_ID, VISION_END_ID) == (
        151643,
        151645,
        151652,
        151653,
    )
    assert (IMAGE_PAD_ID, VIDEO_PAD_ID, STOP_TOKEN_IDS) == (151655, 151656, (151645, 151643))
    assert built_tokenizer.eos_token_id == IM_END_ID
    assert built_tokenizer.pad_token_id == ENDOFTEXT_ID
    ids = built_tokenizer("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 13048, 151645]
    # Qwen2.5-VL's extra tokens are not `special`: skip_special_tokens keeps them.
    decoded = built_tokenizer.decode([151644, 9707, 151657, 151645], skip_special_tokens=True)
    assert decoded == "Hello<tool_call>"


def test_qwen2_vl_family_has_14_specials(tmp_path, monkeypatch, reference_encoding):
    monkeypatch.setenv("MAYE_CACHE_DIR", str(tmp_path))
    tokenizer = load_tokenizer(family="qwen2_vl")
    assert len(tokenizer) == 151657
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == VIDEO_PAD_ID
    # `<tool_call>` is plain text in Qwen2-VL.
    ids = tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == reference_encoding.encode_ordinary("<tool_call>")
    assert len(ids) > 1


def test_chat_template_golden_strings(built_tokenizer):
    with_image = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Find x. <image>"}],
        }
    ]
    assert built_tokenizer.apply_chat_template(
        with_image, tokenize=False, add_generation_prompt=True
    ) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x. <image><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "1+1?"}]},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
    ]
    assert built_tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n"
    )
    assert built_tokenizer.chat_template == CHAT_TEMPLATE


def test_cache_is_reused_and_keyed_by_build_version(built_tokenizer, fresh_cache_dir, monkeypatch):
    # `built_tokenizer` was built into `fresh_cache_dir`.
    monkeypatch.setenv("MAYE_CACHE_DIR", str(fresh_cache_dir))
    first = built_tokenizer
    cached_dir = tokenizer_module.cached_tokenizer_dir("qwen2_5_vl")
    assert (cached_dir / "tokenizer.json").is_file()
    assert cached_dir.is_relative_to(fresh_cache_dir / "tokenizer" / "qwen2_5_vl")
    # A later load reads the cache instead of rebuilding.
    monkeypatch.setattr(tokenizer_module, "build_tokenizer", _fail_if_called)
    second = load_tokenizer(family="qwen2_5_vl")
    assert second(CORPUS)["input_ids"] == first(CORPUS)["input_ids"]
    assert second.chat_template == CHAT_TEMPLATE
    assert second.added_tokens_decoder == first.added_tokens_decoder
    # A new build version gets a new cache directory (and therefore a rebuild).
    monkeypatch.setattr(tokenizer_module, "_BUILD_VERSION", "test-next")
    assert tokenizer_module.cached_tokenizer_dir("qwen2_5_vl") != cached_dir
    with pytest.raises(AssertionError, match="rebuilt"):
        load_tokenizer(family="qwen2_5_vl")
    # No temporary directories are left behind next to the cache.
    assert [path.name for path in cached_dir.parent.iterdir()] == [cached_dir.name]


def _fail_if_called(family):
    raise AssertionError(f"tokenizer for {family} was rebuilt instead of loaded from the cache")


def test_model_dir_with_its_own_tokenizer_wins(built_tokenizer, tmp_path):
    built_tokenizer.chat_template = "{{ 'custom template' }}"
    try:
        save_tokenizer_files(built_tokenizer, tmp_path)
    finally:
        built_tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "custom template"
    )
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="family"):
        load_tokenizer(family="llama")


def test_qwen3_vl_family_adds_four_tokens_and_no_default_system_turn():
    tokenizer = load_tokenizer(family="qwen3_vl")
    assert len(tokenizer) == 151669
    for offset, name in enumerate(("<tool_response>", "</tool_response>", "<think>", "</think>")):
        assert tokenizer(name, add_special_tokens=False)["input_ids"] == [151665 + offset]
    # not `special`: decoding with skip_special_tokens keeps them, as the released tokenizer
    decoded = tokenizer.decode([151667, 9707, 151668, 151645], skip_special_tokens=True)
    assert decoded == "<think>Hello</think>"
    with_image = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}
    ]
    assert tokenizer.apply_chat_template(
        with_image, tokenize=False, add_generation_prompt=True
    ) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
