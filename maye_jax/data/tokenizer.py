"""The Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizer, built offline.

No model hub is reachable, but the `dashscope` wheel ships `qwen.tiktoken`: the 151,643 byte-level
BPE ranks that Qwen2's `vocab.json` holds. From the ranks we derive the merges (for every token, the
two-piece split that byte-pair encoding reaches last), add the special tokens at their Qwen ids and
the Qwen-VL chat template, and get a transformers `Qwen2Tokenizer` that encodes exactly like the
released one (tests check every id against `tiktoken` on the same ranks).

Building takes ~2 s, so the result is cached on disk (`save_pretrained`) under
`$MAYE_CACHE_DIR/tokenizer/<family>/<build version>/` and later loads take ~1 s.

This module must not import JAX: the rollout worker runs in another environment without it.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

# Qwen token ids that other modules rely on (identical in Qwen2-VL, Qwen2.5-VL and Qwen3-VL).
from maye_jax.qwen_ids import (  # noqa: F401 (re-exported: the tokenizer's ids)
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    NUM_BPE_TOKENS,
    STOP_TOKEN_IDS,  # noqa: F401, E402 (generation stops at these)
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Specials of Qwen2-VL, ids ENDOFTEXT_ID.. in this order; all are `special` (skipped on decode).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-VL adds ids 151657..151664. The released tokenizer marks them `special: false`, so
# `decode(..., skip_special_tokens=True)` keeps them as text; we do the same.
QWEN2_5_VL_EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen3 adds ids 151665..151668, also `special: false` in the released tokenizer.
QWEN3_VL_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
_MODEL_MAX_LENGTH = {"qwen2_vl": 32768, "qwen2_5_vl": 131072, "qwen3_vl": 262144}

# Same output as the chat template that the Qwen2-VL and Qwen2.5-VL model repositories ship:
# a default system turn when the first message is not a system message, user content either a
# string or a list of {type: image|video|text} items, `add_generation_prompt` opening the
# assistant turn. (Written here with explicit string literals so whitespace is unambiguous.)
# Qwen3-VL's template writes no default system turn (QWEN3_VL_CHAT_TEMPLATE); for system, user
# and assistant turns it is otherwise the same.
_DEFAULT_SYSTEM_TURN = """\
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {%- endif -%}
"""
CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
DEFAULT_SYSTEM_TURN
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Picture ' + image_count.value|string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Video ' + video_count.value|string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
QWEN3_VL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("DEFAULT_SYSTEM_TURN\n", "")
CHAT_TEMPLATE = CHAT_TEMPLATE.replace("DEFAULT_SYSTEM_TURN\n", _DEFAULT_SYSTEM_TURN)


def chat_template(family: str) -> str:
    return QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else CHAT_TEMPLATE


# Bump whenever the build below changes what it produces: the cache key includes it.
_BUILD_VERSION = "1"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `dashscope` wheel.

    Located with `find_spec`, which does not execute the package (importing dashscope takes ~1 s).
    """
    spec = importlib.util.find_spec("dashscope")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("dashscope is not installed; it ships the Qwen BPE ranks")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dashscope no longer ships qwen.tiktoken")
    return path


def load_bpe_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Token bytes -> rank, read from a tiktoken file (`<base64 token> <rank>` per line)."""
    path = Path(path) if path is not None else qwen_tiktoken_path()
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as error:
            raise ValueError(
                f"{path}:{line_number}: expected '<base64> <rank>', got {line!r}"
            ) from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def _final_bpe_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run byte-pair encoding on `token` using only merges ranked below the token itself.

    tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank.
    Stopping just before the token's own rank leaves the two pieces whose merge creates it: that
    pair, at the token's rank, is the merge rule a `merges.txt`-style BPE needs to reproduce
    tiktoken exactly.
    """
    max_rank = ranks[token]
    parts = [bytes([byte]) for byte in token]
    while True:
        best_index, best_rank = -1, max_rank
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = index, rank
        if best_index < 0:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merge rules in priority order (one per multi-byte token, ordered by the token's rank)."""
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) == 1:
            continue
        parts = _final_bpe_split(token, ranks)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {ranks[token]}) is not reachable by BPE merges"
            )
        merges.append((parts[0], parts[1]))
    return merges


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (what vocab.json stores)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def _as_byte_level(token: bytes) -> str:
    alphabet = _byte_to_unicode()
    return "".join(alphabet[byte] for byte in token)


@cache
def _byte_level_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json / merges.txt contents (byte-level strings); shared by both families."""
    ranks = load_bpe_ranks()
    if len(ranks) != NUM_BPE_TOKENS:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected {NUM_BPE_TOKENS}")
    vocab = {_as_byte_level(token): rank for token, rank in ranks.items()}
    merges = [(_as_byte_level(left), _as_byte_level(right)) for left, right in derive_merges(ranks)]
    return vocab, merges


def build_tokenizer(family: str = "qwen2_5_vl") -> Any:
    """Build the tokenizer from `qwen.tiktoken` (no cache; ~2 s). Prefer `load_tokenizer`."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    _check_family(family)
    vocab, merges = _byte_level_vocab_and_merges()

    # Special tokens follow the BPE ranks: id = ENDOFTEXT_ID + position in `_added_tokens(family)`.
    added_tokens = {
        ENDOFTEXT_ID + offset: AddedToken(content, special=is_special, normalized=False)
        for offset, (content, is_special) in enumerate(_added_tokens(family))
    }
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder=added_tokens,
        extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        model_max_length=_MODEL_MAX_LENGTH[family],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = chat_template(family)
    _check_special_ids(tokenizer, family)
    return tokenizer


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _added_tokens(family: str) -> list[tuple[str, bool]]:
    """(content, is_special) of the tokens after the BPE vocabulary, in id order."""
    tokens = [(content, True) for content in QWEN2_VL_SPECIAL_TOKENS]
    if family in ("qwen2_5_vl", "qwen3_vl"):
        tokens += [(content, False) for content in QWEN2_5_VL_EXTRA_TOKENS]
    if family == "qwen3_vl":
        tokens += [(content, False) for content in QWEN3_VL_EXTRA_TOKENS]
    return tokens


def _check_special_ids(tokenizer: Any, family: str) -> None:
    """Fail loudly if a special token did not land on its Qwen id (transformers reorders easily)."""
    for offset, (content, _) in enumerate(_added_tokens(family)):
        actual = tokenizer.convert_tokens_to_ids(content)
        if actual != ENDOFTEXT_ID + offset:
            raise RuntimeError(f"{content} has id {actual}, expected {ENDOFTEXT_ID + offset}")
    if (tokenizer.eos_token_id, tokenizer.pad_token_id) != (IM_END_ID, ENDOFTEXT_ID):
        raise RuntimeError(
            f"eos/pad ids are {tokenizer.eos_token_id}/{tokenizer.pad_token_id}, "
            f"expected {IM_END_ID}/{ENDOFTEXT_ID}"
        )


def cache_root() -> Path:
    """`$MAYE_CACHE_DIR` (default `~/.cache/maye_jax`)."""
    return Path(os.environ.get("MAYE_CACHE_DIR", Path.home() / ".cache" / "maye_jax"))


def cached_tokenizer_dir(family: str) -> Path:
    """Where the built tokenizer of `family` is cached; the build version is part of the path."""
    import transformers

    version = f"v{_BUILD_VERSION}-transformers{transformers.__version__}"
    return cache_root() / "tokenizer" / family / version


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a tokenizer of its own (tokenizer.json or vocab.json + config)."""
    return any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)


def save_tokenizer_files(tokenizer: Any, out_dir: str | os.PathLike) -> list[str]:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json, chat template) to out_dir.

    Used by checkpoint export, so an exported model directory loads with `AutoTokenizer` anywhere.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [str(path) for path in tokenizer.save_pretrained(str(out_dir))]


def _write_cache_atomically(tokenizer: Any, final_dir: Path) -> None:
    """Save into a temporary sibling directory, then rename it into place.

    A rename is atomic, so a concurrent reader sees either no cache or a complete one; if another
    process won the race, its copy is kept and ours is discarded.
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        save_tokenizer_files(tokenizer, temp_dir)
        os.rename(temp_dir, final_dir)
    except OSError:
        if not (final_dir / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def load_tokenizer(model_dir: str | os.PathLike | None = None, family: str = "qwen2_5_vl") -> Any:
    """The tokenizer to use: the model directory's own if it has one, else the offline build.

    Args:
      model_dir: a Hugging Face model directory; its tokenizer files win when present.
      family: "qwen2_vl" (14 added tokens), "qwen2_5_vl" (22) or "qwen3_vl" (26; no default
        system turn in its chat template) for the offline build.
    """
    from transformers import AutoTokenizer

    if model_dir is not None and has_tokenizer_files(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        if not tokenizer.chat_template:
            # Older exports keep the template only in the processor's chat_template.json.
            tokenizer.chat_template = chat_template(family)
        return tokenizer

    _check_family(family)
    cached_dir = cached_tokenizer_dir(family)
    if not (cached_dir / "tokenizer.json").is_file():
        tokenizer = build_tokenizer(family)
        _write_cache_atomically(tokenizer, cached_dir)
        return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(cached_dir), local_files_only=True)
    _check_special_ids(tokenizer, family)
    return tokenizer
