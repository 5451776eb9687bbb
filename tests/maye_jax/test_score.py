"""The score CLI: teacher-forced response logprobs equal transformers' (real vocabulary; a tiny
Qwen3-VL, whose image features reach the decoder at several layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maye_jax.data.processor import load_processor
from maye_jax.tiny import tiny_hf_model

RESPONSES = [
    "The area is $3 \\times 4 = 12$, so the answer is \\boxed{12}.",
    "Wait, <|image_pad|> is just text here: \\boxed{7}<|im_end|>",
]


@pytest.fixture(scope="module")
def scored(module_scratch):
    root = module_scratch("score")
    model_dir = root / "model"
    hf = tiny_hf_model("qwen3_vl", tied=False, seed=5, vocab_size=151936, initializer_range=0.2)
    hf.save_pretrained(str(model_dir))
    load_processor(family="qwen3_vl").save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(root / "img.png")
    records = [
        dict(
            id="a",
            question="<image>What is the area of the rectangle?",
            image="img.png",
            answer="12",
            solution="\\boxed{12}",
            response=RESPONSES[0],
        ),
        dict(
            id="b",
            question="What is 3 + 4?",
            answer="7",
            solution="\\boxed{7}",
            response=RESPONSES[1],
        ),
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maye_jax.score",
            f"--model={model_dir}",
            f"--data={data}",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "score: 100%" in result.stderr and "2/2" in result.stderr  # the progress bar
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return hf, model_dir, root, records, lines


def _hf_logprobs(hf, processor, record, root):
    image = Image.open(root / record["image"]).convert("RGB") if "image" in record else None
    prompt = processor.encode(image, record["question"])
    response = processor.tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt["input_ids"]) + response])
    kwargs = {}
    if image is not None:
        kwargs = dict(
            pixel_values=torch.tensor(prompt["pixel_values"]),
            image_grid_thw=torch.tensor(prompt["image_grid_thw"]),
            mm_token_type_ids=(ids == 151655).long()
            * (torch.arange(ids.shape[1]) < len(prompt["input_ids"])),
        )
    with torch.no_grad():
        logits = hf(input_ids=ids, **kwargs).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    start = len(prompt["input_ids"])
    targets = ids[0, start:]
    return response, logp[start - 1 : -1].gather(-1, targets[:, None])[:, 0].numpy()


def test_score_output_fields_and_tokenization(scored):
    _, model_dir, _, records, lines = scored
    processor = load_processor(str(model_dir))
    assert [line["id"] for line in lines] == ["a", "b"]
    for record, line in zip(records, lines):
        ids = processor.tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        assert line["response_token_ids"] == ids  # nothing added, nothing appended
        assert len(line["response_logprobs"]) == len(ids)
        assert line["question"] == record["question"]
    # The literal special-token strings in the response are tokenized as the specials.
    assert 151655 in lines[1]["response_token_ids"] and lines[1]["response_token_ids"][-1] == 151645


def test_score_logprobs_equal_transformers(scored):
    hf, model_dir, root, records, lines = scored
    processor = load_processor(str(model_dir))
    for record, line in zip(records, lines):
        ids, reference = _hf_logprobs(hf, processor, record, root)
        assert line["response_token_ids"] == ids
        # 1e-4: torch's and XLA's fp32 kernels sum in different orders through the layers and
        # the 152k-entry log_softmax; a wrong position or token moves a logprob by far more.
        np.testing.assert_allclose(line["response_logprobs"], reference, atol=1e-4, rtol=0)


def _transformers_inputs(model_dir, tokenizer, question: str, images: list, instruction: str):
    """transformers' inputs of one prompt: its chat template over the text pieces and an image
    item at each `<image>` marker, its PIL image processor on the images as the data set gives
    them (its settings read from the model folder: the family's patch size and normalisation),
    each image's pad repeated once per merged patch."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pieces = (question + instruction).split("<image>")
    content = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        content += [{"type": "image"}, {"type": "text", "text": piece}]
    content = [item for item in content if item.get("text", "image")]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    processed = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))(images=images)
    for count in np.prod(processed["image_grid_thw"], axis=1) // 4:
        text = text.replace("<|image_pad|>", "\0" * int(count), 1)
    ids = tokenizer(text.replace("\0", "<|image_pad|>"), add_special_tokens=False)["input_ids"]
    return ids, processed["pixel_values"], processed["image_grid_thw"]


def test_two_image_parquet_logprobs_equal_transformers_end_to_end(scored):
    """A geo3k_easyr1 parquet (embedded PNG, RGBA PNG and CMYK JPEG bytes; two images at two
    markers) through the score CLI equals transformers' processor and model on the same rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from maye_jax.data.processor import MAYE_INSTRUCTION
    from tests.byod_data import image_bytes

    hf, model_dir, root, _, _ = scored
    rows = [
        (
            "Compare <image> with <image>. Which is larger?",
            [(2, (56, 84), "PNG", "RGB"), (3, (60, 40), "PNG", "RGBA")],
        ),
        ("<image>What is the area?", [(1, (84, 56), "JPEG", "CMYK")]),
    ]
    blobs = [[image_bytes(*spec) for spec in specs] for _, specs in rows]
    data = root / "two_images.parquet"
    pq.write_table(
        pa.table(
            {
                "problem": [question for question, _ in rows],
                "answer": ["2", "12"],
                "images": [[{"bytes": b, "path": None} for b in row] for row in blobs],
                "response": [RESPONSES[0], "So the area is $84$, \\boxed{84}."],
            }
        ),
        data,
    )
    out = root / "two_images_out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "maye_jax.score", f"--model={model_dir}", f"--data={data}"]
        + [f"--output={out}", "--layout=geo3k_easyr1", "--noprogress"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = load_processor(str(model_dir)).tokenizer
    for (question, _), images, line in zip(rows, blobs, lines):
        assert "images" not in line and line["problem"] == question
        pil = [Image.open(io.BytesIO(b)) for b in images]
        prompt, pixels, grid = _transformers_inputs(
            model_dir, tokenizer, question, pil, MAYE_INSTRUCTION
        )
        response = tokenizer(line["response"], add_special_tokens=False)["input_ids"]
        assert line["response_token_ids"] == response
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = (
                hf(
                    input_ids=ids,
                    pixel_values=torch.tensor(pixels),
                    image_grid_thw=torch.tensor(grid),
                    mm_token_type_ids=(ids == 151655).long()
                    * (torch.arange(ids.shape[1]) < len(prompt)),
                )
                .logits[0]
                .double()
            )
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
        reference = logp.gather(-1, ids[0, len(prompt) :, None])[:, 0].numpy()
        assert len(grid) == len(images) and np.abs(reference).max() > 0.1
        np.testing.assert_allclose(line["response_logprobs"], reference, atol=1e-4, rtol=0)
