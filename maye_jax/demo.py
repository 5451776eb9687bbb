"""The embedded-default demo (CPU, tiny model, generated data).

Builds a tiny random Qwen2-VL model with the real Qwen vocabulary and tokenizer, converts it
HF -> Orbax -> HF, checks the round trip is bit-exact, scores a response to an image question
with the Orbax checkpoint and prints its per-token log-probabilities and accuracy reward.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory (default: a temporary directory).")


def main(argv):
    del argv
    from PIL import Image, ImageDraw

    from maye_jax import checkpoint
    from maye_jax.data import read_records
    from maye_jax.processor import load_processor
    from maye_jax.score import score_records
    from maye_jax.tiny import tiny_hf_model
    from models.configs import ModelConfig

    out = Path(FLAGS.out or tempfile.mkdtemp(prefix="maye_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] writing to {out}")
    hf = tiny_hf_model("qwen2_vl", vocab_size=151936, initializer_range=0.2, seed=0)
    hf.save_pretrained(str(out / "hf"))
    load_processor(family="qwen2_vl").save_pretrained(out / "hf")
    model, hf_config = checkpoint.load_model(out / "hf")
    checkpoint.save_orbax(out / "orbax", model, hf_config, source_dir=out / "hf")
    restored, _ = checkpoint.load_model(out / "orbax")
    checkpoint.export_hf(restored, hf_config, out / "hf_back", tokenizer_source=out / "hf")
    original = dict(checkpoint.iter_safetensors(out / "hf"))
    back = dict(checkpoint.iter_safetensors(out / "hf_back"))
    exact = set(original) == set(back) and all(np.array_equal(original[k], back[k]) for k in original)
    print(f"[demo] HF -> Orbax -> HF round trip bit-exact: {exact} ({len(back)} tensors)")

    image = Image.new("RGB", (112, 84), "white")
    ImageDraw.Draw(image).rectangle([10, 10, 100, 70], outline="black", width=3)
    image.save(out / "rect.png")
    record = dict(id="demo-0", question="<image>A rectangle has sides 3 and 4. What is its area?",
                  image="rect.png", answer="12", solution="\\boxed{12}",
                  response="The area is $3 \\times 4 = 12$. \\boxed{12}")
    (out / "demo.jsonl").write_text(json.dumps(record) + "\n")
    records = read_records(out / "demo.jsonl", required=("question", "response"))
    processor = load_processor(str(out / "orbax"))
    config = ModelConfig.from_hf(hf_config)
    (_, ids, logprobs), = score_records(restored, processor, config, records, batch_size=1)
    print(f"[demo] response tokens: {len(ids)}; mean logprob under the random model: "
          f"{np.mean(logprobs):.3f} (uniform would be {-np.log(config.text.vocab_size):.3f})")
    for token, logprob in list(zip(ids, logprobs))[:8]:
        print(f"    {processor.tokenizer.decode([token])!r:>12}  {logprob:8.3f}")
    return 0 if exact else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
