"""The processor must match transformers' Qwen2-VL processor token for token and bit for bit."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from maye_jax.data.processor import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    MAYE_INSTRUCTION,
    build_messages,
    load_processor,
    read_image_settings,
    render_prompt,
    smart_resize,
)
from maye_jax.data.tokenizer import ENDOFTEXT_ID, IMAGE_PAD_ID, save_tokenizer_files

QUESTION = "<image>In the figure, find $x$."


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def hf_reference(processor, image, question):
    """What the HF processor gives: the PIL image processor with the same bounds (and patch size
    and normalisation), then the tokenizer on the prompt whose `<|image_pad|>` was repeated
    once per merged patch."""
    prompt = render_prompt(processor.tokenizer, question, int(image is not None))
    if image is None:
        return {"input_ids": processor.tokenizer(prompt)["input_ids"]}
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=processor.min_pixels,
        max_pixels=processor.max_pixels,
        patch_size=processor.patch_size,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )
    vision = image_processor(images=[image])
    num_pads = int(vision["image_grid_thw"][0].prod()) // 4
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * num_pads)
    return {
        "input_ids": processor.tokenizer(prompt)["input_ids"],
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def test_instruction_and_messages():
    assert MAYE_INSTRUCTION.startswith("\nSolve the above mathematics problem, write out")
    assert MAYE_INSTRUCTION.endswith("Please display the final answer in the format \\boxed{}.")
    assert build_messages("Q <image>", 1) == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Q <image>" + MAYE_INSTRUCTION},
            ],
        }
    ]
    assert build_messages("Q", 0)[0]["content"] == [
        {"type": "text", "text": "Q" + MAYE_INSTRUCTION}
    ]


def test_render_prompt_golden(processor):
    instruction = (
        "\nSolve the above mathematics problem, write out the solution process according to the "
        "question, and use the same LaTeX format as the question in the solution process. Please "
        "display the final answer in the format \\boxed{}."
    )
    assert render_prompt(processor.tokenizer, QUESTION, 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><image>In the figure, find $x$."
        + instruction
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(processor.tokenizer, "What is 2+2?", 0) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "What is 2+2?" + instruction + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smart_resize_matches_transformers():
    sizes = [(h, w) for h in (1, 3, 27, 28, 29, 41, 56, 100, 224, 333, 1000) for w in (5, 28, 307)]
    sizes += [(4000, 3000), (8192, 8192), (50, 9000), (13, 2500), (2, 399)]
    bounds = [(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (3136, 200_000)]
    checked = 0
    for height, width in sizes:
        for min_pixels, max_pixels in bounds:
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(height, width, 28, min_pixels, max_pixels)
                continue
            ours = smart_resize(height, width, 28, min_pixels, max_pixels)
            assert ours == hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            checked += 1
    assert checked > 80
    assert smart_resize(224, 308) == (224, 308)


@pytest.mark.parametrize(
    ("height", "width", "mode"),
    [(224, 308, "RGB"), (375, 500, "RGB"), (10, 13, "RGB"), (1000, 40, "L"), (97, 61, "RGBA")],
)
def test_encode_matches_hf(processor, height, width, mode):
    image = random_image(height, width, seed=height, mode=mode)
    ours = processor.encode(image, QUESTION)
    reference = hf_reference(processor, image, QUESTION)
    np.testing.assert_array_equal(ours["pixel_values"], reference["pixel_values"])
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert ours["input_ids"].tolist() == reference["input_ids"]
    assert ours["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(ours["attention_mask"], np.ones(len(ours["input_ids"])))


@pytest.mark.parametrize(("height", "width"), [(97, 61), (1200, 1600)])  # scaled up, down
def test_qwen3_vl_settings_match_hf(height, width):
    """Qwen3-VL: 16-pixel patches (sides multiples of 32, 1536 values per patch), mean = std =
    0.5, at least 64 and at most 16384 merged tokens by default, no default system turn."""
    processor = load_processor(family="qwen3_vl")
    assert (processor.patch_size, processor.min_pixels, processor.max_pixels) == (16, 65536, 2**24)
    image = random_image(height, width, seed=height)
    ours = processor.encode(image, QUESTION)
    reference = hf_reference(processor, image, QUESTION)
    np.testing.assert_array_equal(ours["pixel_values"], reference["pixel_values"])
    assert ours["pixel_values"].shape[1] == 1536
    np.testing.assert_array_equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert ours["input_ids"].tolist() == reference["input_ids"]
    assert ours["input_ids"][:3].tolist() == [151644, 872, 198]  # <|im_start|>user\n
    assert int(np.prod(ours["image_grid_thw"])) // 4 >= 64


def test_224x308_example(processor):
    encoded = processor.encode(random_image(224, 308), QUESTION)
    assert encoded["image_grid_thw"].tolist() == [[1, 16, 22]]
    assert encoded["pixel_values"].shape == (352, 1176)
    image_pads = np.flatnonzero(encoded["input_ids"] == IMAGE_PAD_ID)
    assert len(image_pads) == 88
    # One contiguous run between <|vision_start|> and <|vision_end|>.
    assert image_pads[-1] - image_pads[0] == 87
    assert encoded["input_ids"][image_pads[0] - 1] == 151652
    assert encoded["input_ids"][image_pads[-1] + 1] == 151653


def test_max_pixels_bound_downscales(processor):
    image = random_image(1200, 1600, seed=3)
    small = dataclasses.replace(processor, max_pixels=256 * 28 * 28)
    encoded = small.encode(image, QUESTION)
    reference = hf_reference(small, image, QUESTION)
    np.testing.assert_array_equal(encoded["pixel_values"], reference["pixel_values"])
    assert encoded["image_grid_thw"].tolist() == [[1, 26, 36]]
    assert encoded["input_ids"].tolist() == reference["input_ids"]


def test_text_only(processor):
    encoded = processor.encode(None, "What is 2+2?")
    assert encoded["pixel_values"] is None and encoded["image_grid_thw"] is None
    assert (
        encoded["input_ids"].tolist() == hf_reference(processor, None, "What is 2+2?")["input_ids"]
    )
    assert IMAGE_PAD_ID not in encoded["input_ids"]


def test_encode_batch_left_pads_and_concatenates_images(processor):
    images = [random_image(224, 308, seed=1), None, random_image(56, 84, seed=2)]
    questions = [QUESTION, "What is 2+2?", "<image>Another, longer question about the figure?"]
    examples = list(zip(images, questions, strict=True))
    singles = [processor.encode(image, question) for image, question in examples]
    batch = processor.encode_batch(examples)

    length = max(len(single["input_ids"]) for single in singles)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, length)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    for row, single in enumerate(singles):
        num_pad = length - len(single["input_ids"])
        assert batch["input_ids"][row, :num_pad].tolist() == [ENDOFTEXT_ID] * num_pad
        assert batch["attention_mask"][row, :num_pad].sum() == 0
        assert batch["input_ids"][row, num_pad:].tolist() == single["input_ids"].tolist()
        assert batch["attention_mask"][row, num_pad:].min() == 1
    assert batch["image_grid_thw"].tolist() == [[1, 16, 22], [1, 4, 6]]
    expected_pixels = np.concatenate([singles[0]["pixel_values"], singles[2]["pixel_values"]])
    np.testing.assert_array_equal(batch["pixel_values"], expected_pixels)

    padded = processor.encode_batch(examples, pad_to_multiple=64)
    assert padded["input_ids"].shape[1] % 64 == 0
    assert padded["input_ids"].shape[1] - length < 64
    np.testing.assert_array_equal(padded["input_ids"][:, -length:], batch["input_ids"])
    assert padded["attention_mask"].sum() == batch["attention_mask"].sum()


def test_encode_batch_without_images(processor):
    batch = processor.encode_batch([(None, "a"), (None, "a longer question")])
    assert batch["pixel_values"] is None and batch["image_grid_thw"] is None
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].min() == 1


def test_model_dir_settings_and_tokenizer(processor, tmp_path):
    save_tokenizer_files(processor.tokenizer, tmp_path)
    config = {"min_pixels": 8 * 28 * 28, "max_pixels": 50 * 28 * 28, "patch_size": 14}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    from_dir = load_processor(tmp_path)
    assert (from_dir.min_pixels, from_dir.max_pixels) == (8 * 28 * 28, 50 * 28 * 28)
    assert from_dir.tokenizer.name_or_path == str(tmp_path)
    image = random_image(224, 308)
    encoded = from_dir.encode(image, QUESTION)
    reference = hf_reference(from_dir, image, QUESTION)
    np.testing.assert_array_equal(encoded["pixel_values"], reference["pixel_values"])
    assert encoded["image_grid_thw"].tolist() == [[1, 12, 16]]

    # transformers 5 layout: bounds only in `size`; explicit arguments still win.
    config = {"size": {"shortest_edge": 3136, "longest_edge": 40 * 28 * 28}, "max_pixels": None}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert read_image_settings(tmp_path) == {"min_pixels": 3136, "max_pixels": 40 * 28 * 28}
    overridden = load_processor(tmp_path, min_pixels=5000, max_pixels=60 * 28 * 28)
    assert (overridden.min_pixels, overridden.max_pixels) == (5000, 60 * 28 * 28)


def test_save_pretrained_round_trip(processor, tmp_path):
    custom = dataclasses.replace(processor, min_pixels=3136, max_pixels=300_000)
    custom.save_pretrained(tmp_path)
    reloaded = load_processor(tmp_path)
    assert (reloaded.min_pixels, reloaded.max_pixels) == (3136, 300_000)
    hf_image_processor = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert hf_image_processor.size["longest_edge"] == 300_000


def test_modules_do_not_import_jax(processor):
    # The rollout worker's environment has no JAX: using these modules (the processor, the
    # worker and its backends) must not import it.
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from maye_jax.data.processor import load_processor\n"
        "load_processor().encode(Image.new('RGB', (56, 56)), 'q')\n"
        "import maye_jax.rollout.worker, maye_jax.rollout.hf_backend\n"
        "import maye_jax.rollout.vllm_backend, maye_jax.rollout.client\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
