"""(images, question) -> Qwen-VL model inputs, on the host in NumPy/PIL.

Reproduces what transformers' Qwen2-VL processor gives (tokenizer + `Qwen2VLImageProcessorPil`,
checked bit for bit in tests) without depending on transformers' image code, so the trainer here and
a rollout engine in another environment compute the same pixels from the same functions. Qwen3-VL
uses the same image processor with other settings (`FAMILY_IMAGE_SETTINGS`: 16-pixel patches, so
sides are rounded to multiples of 32, and mean = std = 0.5).

Image pipeline, as in the Qwen processor: RGB (transparency composited onto white) -> "smart resize"
(PIL bicubic) to sides that are multiples of patch_size * merge_size = 28 -> x / 255 -> (x - mean) /
std -> patches of 3 x temporal_patch_size x 14 x 14 = 1176 values (the single frame is repeated
temporal_patch_size times), ordered so every merge_size x merge_size block of patches is contiguous
(the vision tower's patch merger relies on that order). Each image becomes
grid_t * grid_h * grid_w / merge_size**2 `<|image_pad|>` tokens in the prompt.

This module must not import JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maye_jax.data.images import to_rgb
from maye_jax.data.layouts import IMAGE_MARKER
from maye_jax.data.tokenizer import ENDOFTEXT_ID, IMAGE_PAD_ID, load_tokenizer

# SPEC §1: appended to every question; the literal `<image>` marker stays in the question text.
MAYE_INSTRUCTION = (
    "\nSolve the above mathematics problem, write out the solution process according to the "
    "question, and use the same LaTeX format as the question in the solution process. Please "
    "display the final answer in the format \\boxed{}."
)

# SPEC §1 pixel bounds (the original's pre-resize); transformers' own default max is 28*28*1280.
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 16384 * 28 * 28
# OpenAI CLIP normalisation, used by both Qwen-VL families.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# What a family's released preprocessor_config.json sets differently from the defaults above;
# a model directory's own file, then explicit min/max_pixels, win over these.
FAMILY_IMAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "qwen3_vl": dict(
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        min_pixels=65536,  # size.shortest_edge: at least 64 merged tokens
        max_pixels=16777216,  # size.longest_edge: at most 16384
    ),
}


# Instructions appended to the question, by name; users add theirs with register_prompt_template.
PROMPT_TEMPLATES: dict[str, str] = {"maye": MAYE_INSTRUCTION, "plain": ""}


def register_prompt_template(name: str, instruction: str) -> None:
    if name in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {name!r} already registered")
    PROMPT_TEMPLATES[name] = instruction


def prompt_template_names() -> tuple[str, ...]:
    return tuple(PROMPT_TEMPLATES)


def get_prompt_template(name: str) -> str:
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[name]


def build_messages(
    question: str,
    num_images: int,
    instruction: str = MAYE_INSTRUCTION,
    *,
    images_first: bool = True,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """One user turn (after `system`'s turn, if given) holding the question plus the instruction
    and `num_images` image items: before the text (`images_first`: MAYE's single-image layout,
    the literal `<image>` marker stays in the text), or each at its `<image>` marker of the text,
    which then leaves the text (EasyR1's and verl's layout; empty text pieces are dropped)."""
    text = question + instruction
    if images_first:
        content: list[dict[str, Any]] = [{"type": "image"}] * num_images
        content.append({"type": "text", "text": text})
    else:
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) != num_images + 1:
            raise ValueError(
                f"the question has {len(pieces) - 1} {IMAGE_MARKER} markers for {num_images} images"
            )
        content = []
        for index, piece in enumerate(pieces):
            if index:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": content}]


def render_prompt(
    tokenizer: Any,
    question: str,
    num_images: int,
    instruction: str = MAYE_INSTRUCTION,
    *,
    images_first: bool = True,
    system: str | None = None,
) -> str:
    """The prompt text: chat template (with its default system turn unless `system` is given)
    and the generation prompt; each image is `<|vision_start|><|image_pad|><|vision_end|>`."""
    messages = build_messages(
        question, num_images, instruction, images_first=images_first, system=system
    )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen's target size: sides multiples of `factor`, area within [min_pixels, max_pixels].

    Same arithmetic as transformers' `smart_resize` (Python's round-half-to-even included), so the
    number of image tokens matches the released processor for every image size.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    aspect_ratio = max(height, width) / min(height, width)
    if aspect_ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {aspect_ratio}"
        )
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        resized_height = max(factor, math.floor(height / beta / factor) * factor)
        resized_width = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


@dataclasses.dataclass
class VLProcessor:
    """Tokenizer plus the Qwen-VL image settings; turns (image, question) into model inputs."""

    tokenizer: Any
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC

    @property
    def patch_dim(self) -> int:
        """Values per patch row of `pixel_values`: 3 * 2 * 14 * 14 = 1176."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def preprocess_image(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """-> pixel_values float32 [grid_h * grid_w, 1176], grid_thw int32 (1, grid_h, grid_w)."""
        rgb = to_rgb(image)
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(
            rgb.height, rgb.width, factor, self.min_pixels, self.max_pixels
        )
        resized = np.asarray(rgb.resize((width, height), resample=self.resample))  # [H, W, 3] uint8
        # Same dtypes and operation order as transformers (rescale in float64, then float32).
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        normalized = (scaled - mean) / std

        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        merge, patch = self.merge_size, self.patch_size
        blocks = normalized.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3)
        # [gh/m, gw/m, m, m, channel, patch_row, patch_col]: merge blocks contiguous.
        blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
        # Repeat the single frame along time: [..., channel, time, patch_row, patch_col].
        frames = np.broadcast_to(
            blocks[:, :, :, :, :, None], (*blocks.shape[:5], self.temporal_patch_size, patch, patch)
        )
        pixel_values = np.ascontiguousarray(frames).reshape(grid_h * grid_w, self.patch_dim)
        return pixel_values, np.array([1, grid_h, grid_w], dtype=np.int32)

    def image_tokens_of_size(self, width: int, height: int) -> int:
        """How many `<|image_pad|>` tokens an image of `width` x `height` pixels occupies (its
        resized grid over merge_size**2), known without decoding its pixels."""
        factor = self.patch_size * self.merge_size
        resized_height, resized_width = smart_resize(
            height, width, factor, self.min_pixels, self.max_pixels
        )
        return (resized_height // factor) * (resized_width // factor)

    def num_image_tokens(self, grid_thw: np.ndarray) -> int:
        """How many `<|image_pad|>` tokens one image occupies: t * h * w / merge_size**2."""
        return int(np.prod(grid_thw)) // self.merge_size**2

    def encode(
        self,
        images: Image.Image | Sequence[Image.Image] | None,
        question: str,
        instruction: str = MAYE_INSTRUCTION,
        *,
        images_first: bool = True,
        system: str | None = None,
    ) -> dict[str, np.ndarray | None]:
        """One prompt of `images` (one, a list in prompt order, or None) and `question` (placed
        as `build_messages` says): input_ids int32 [L], attention_mask int32 [L], pixel_values
        float32 [P, 1176] (every image's patches, in order) | None, image_grid_thw int32 [N, 3]
        | None."""
        if images is None:
            images = []
        elif isinstance(images, Image.Image):
            images = [images]
        prompt = render_prompt(
            self.tokenizer,
            question,
            len(images),
            instruction,
            images_first=images_first,
            system=system,
        )
        prompt_ids = np.asarray(
            self.tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=np.int32
        )
        pixel_values = image_grid_thw = None
        if images:
            processed = [self.preprocess_image(image) for image in images]
            pixel_values = np.concatenate([pixels for pixels, _ in processed])
            image_grid_thw = np.stack([grid for _, grid in processed])
        input_ids = self._expand_image_pads(prompt_ids, image_grid_thw)
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }

    def encode_record(self, record, instruction: str = MAYE_INSTRUCTION) -> dict:
        """`encode` of a record (maye_jax/data/records.py): its images decoded now, placed as
        the record's layout says, its chat's system turn if it has one."""
        return self.encode(
            record.load_images(),
            record.question,
            instruction,
            images_first=record.images_first,
            system=record.system,
        )

    def _expand_image_pads(self, ids: np.ndarray, grid_thw: np.ndarray | None) -> np.ndarray:
        """Repeat the i-th `<|image_pad|>` once per merged patch of image i (as HF does in text)."""
        pad_positions = np.flatnonzero(ids == IMAGE_PAD_ID)
        num_images = 0 if grid_thw is None else len(grid_thw)
        if len(pad_positions) != num_images:
            raise ValueError(
                f"prompt has {len(pad_positions)} <|image_pad|> tokens but {num_images} images"
            )
        if num_images == 0:
            return ids
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[pad_positions] = [self.num_image_tokens(grid) for grid in grid_thw]
        return np.repeat(ids, repeats)

    def encode_batch(
        self,
        examples: list[tuple[Image.Image | Sequence[Image.Image] | None, str]],
        pad_to_multiple: int | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Left-padded batch of (images, question) examples (`encode`'s MAYE placement):
        input_ids / attention_mask int32 [B, L] (pad id <|endoftext|>, mask 0), pixel_values
        float32 [sum P, 1176] in example order, image_grid_thw int32 [num_images, 3]; both None
        when no example has an image.

        Left padding keeps every prompt's last token in the last column, where generation starts.
        """
        if not examples:
            raise ValueError("encode_batch needs at least one (image, question) example")
        encoded = [self.encode(image, question) for image, question in examples]
        length = max(len(item["input_ids"]) for item in encoded)
        if pad_to_multiple:
            length = -(-length // pad_to_multiple) * pad_to_multiple
        input_ids = np.full((len(encoded), length), ENDOFTEXT_ID, dtype=np.int32)
        attention_mask = np.zeros((len(encoded), length), dtype=np.int32)
        for row, item in enumerate(encoded):
            num_tokens = len(item["input_ids"])
            input_ids[row, length - num_tokens :] = item["input_ids"]
            attention_mask[row, length - num_tokens :] = 1
        with_images = [item for item in encoded if item["pixel_values"] is not None]
        if not with_images:
            pixel_values = image_grid_thw = None
        else:
            pixel_values = np.concatenate([item["pixel_values"] for item in with_images])
            image_grid_thw = np.concatenate([item["image_grid_thw"] for item in with_images])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
        }

    def preprocessor_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` transformers and vLLM read (explicit pixel bounds)."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "resample": int(self.resample),
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer files and preprocessor_config.json (for checkpoint export)."""
        from maye_jax.data.tokenizer import save_tokenizer_files

        save_tokenizer_files(self.tokenizer, out_dir)
        config_path = Path(out_dir) / "preprocessor_config.json"
        config_path.write_text(json.dumps(self.preprocessor_config(), indent=2) + "\n")


def read_image_settings(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Image settings from `<model_dir>/preprocessor_config.json`, resolved as transformers 5 does:
    top-level min_pixels / max_pixels win over size.shortest_edge / size.longest_edge."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    size = config.get("size") or {}
    settings: dict[str, Any] = {}
    for name, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        value = config.get(name)
        if value is None:
            value = size.get(size_key)
        if value is not None:
            settings[name] = int(value)
    for name in ("patch_size", "merge_size", "temporal_patch_size", "resample"):
        if config.get(name) is not None:
            settings[name] = int(config[name])
    for name in ("image_mean", "image_std"):
        if config.get(name) is not None:
            if len(config[name]) != 3:
                raise ValueError(f"{path}: {name} must have 3 values, got {config[name]}")
            settings[name] = tuple(float(value) for value in config[name])
    return settings


def load_processor(
    model_dir: str | os.PathLike | None = None,
    family: str = "qwen2_5_vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> VLProcessor:
    """A processor from a model directory (its tokenizer and preprocessor_config.json) or, without
    one, the offline tokenizer and the family's settings (SPEC §1 pixel bounds for Qwen2-VL and
    Qwen2.5-VL). Explicit min/max_pixels override both."""
    settings = dict(FAMILY_IMAGE_SETTINGS.get(family, {}))
    if model_dir is not None:
        settings.update(read_image_settings(model_dir))
    if min_pixels is not None:
        settings["min_pixels"] = min_pixels
    if max_pixels is not None:
        settings["max_pixels"] = max_pixels
    processor = VLProcessor(tokenizer=load_tokenizer(model_dir, family=family), **settings)
    if not 0 < processor.min_pixels <= processor.max_pixels:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got {processor.min_pixels}, {processor.max_pixels}"
        )
    return processor
