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
