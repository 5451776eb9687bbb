"""HF <-> Orbax conversion: bit-exact round trip, sharded writes, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from maye_jax.models.hf_mapping import CheckpointMismatchError
from maye_jax.sharding.mesh import make_mesh
from maye_jax.sharding.rules import param_sharding_fn
from maye_jax.storage import model_folders as checkpoint
from maye_jax.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = tiny_hf_model("qwen2_5_vl", tied=False, seed=3, initializer_range=0.2)
    model.save_pretrained(str(path))
    return path


def _all_tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _run_cli(*args):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    return subprocess.run(
        [sys.executable, "-m", "maye_jax.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_round_trip_is_bit_exact(hf_dir, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf_back"
    first = _run_cli(f"--input={hf_dir}", f"--output={ckpt}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert checkpoint.is_orbax_checkpoint(ckpt)
    second = _run_cli(f"--input={ckpt}", f"--output={back}", "--noprogress")
    assert second.returncode == 0, second.stderr[-2000:]
    num_tensors = len(_all_tensors(hf_dir))
    assert f"read {hf_dir.name}: 100%" in first.stderr
    assert f"{num_tensors}/{num_tensors}" in first.stderr
    assert "write hf_back" not in second.stderr and "100%" not in second.stderr
    original, restored = _all_tensors(hf_dir), _all_tensors(back)
    assert set(original) == set(restored)
    for name, value in original.items():
        assert restored[name].dtype == value.dtype, name
        assert np.array_equal(restored[name], value), name
    # transformers loads the export as is and computes the same logits.
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    source = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, source(input_ids=ids).logits)


def test_sharded_conversion_places_shards(hf_dir, tmp_path):
    mesh = make_mesh(fsdp=8)
    sharding_of = param_sharding_fn(mesh)
    model, _ = checkpoint.load_model(
        hf_dir,
        place=lambda name, value: jax.device_put(
            np.asarray(value, np.float32), sharding_of(name, value.shape)
        ),
    )
    kernel = model.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec[0] == "fsdp"  # [hidden 64, intermediate 128] over 8 devices
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (8, 128)
    saved = checkpoint.save_orbax(tmp_path / "ckpt", model, checkpoint.read_hf_config(hf_dir))
    restored, _ = checkpoint.load_model(saved, shardings=sharding_of)
    again = restored.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert again.sharding.spec == kernel.sharding.spec
    np.testing.assert_array_equal(np.asarray(again), np.asarray(kernel))


def test_progress_bars_count_every_tensor_both_ways(hf_dir, tmp_path, capsys):
    """HF -> model and model -> HF show one bar each on stderr, over every tensor; the export
    is the same with and without them."""
    num_tensors = len(_all_tensors(hf_dir))
    model, hf_config = checkpoint.load_model(hf_dir, progress=True)
    checkpoint.export_hf(model, hf_config, tmp_path / "shown", progress=True)
    shown = capsys.readouterr()
    assert f"read {hf_dir.name}: 100%" in shown.err and "write shown: 100%" in shown.err
    assert shown.err.count(f"{num_tensors}/{num_tensors}") >= 2 and shown.out == ""
    checkpoint.export_hf(model, hf_config, tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    quiet, with_bar = _all_tensors(tmp_path / "quiet"), _all_tensors(tmp_path / "shown")
    assert set(quiet) == set(with_bar) and len(quiet) == num_tensors
    assert all(np.array_equal(quiet[name], with_bar[name]) for name in quiet)


def _copy_with(hf_dir, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir()
    tensors = _all_tensors(hf_dir)
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    return out


def test_missing_tensor_is_named(hf_dir, tmp_path):
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    path = _copy_with(
        hf_dir,
        tmp_path,
        lambda t: t.pop(next(k for k in t if k.endswith("layers.1.mlp.up_proj.weight"))),
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"missing tensors: .*layers\.1\.mlp\.up_proj\.weight"
    ):
        checkpoint.load_model(path)
    del name


def test_unexpected_and_misshapen_tensors_are_named(hf_dir, tmp_path):
    def edit(tensors):
        tensors["model.extra_head.weight"] = np.zeros((2, 2), np.float32)
        key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
        tensors[key] = np.zeros((3, 3), np.float32)

    path = _copy_with(hf_dir, tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoint.load_model(path)
    message = str(error.value)
    assert "unexpected tensors: ['model.extra_head.weight']" in message
    assert "q_proj.weight: checkpoint (3, 3), model expects (64, 64)" in message


def test_unsupported_architecture_is_refused(hf_dir, tmp_path):
    out = tmp_path / "llama"
    out.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    result = _run_cli(f"--input={out}", f"--output={tmp_path / 'x'}")
    assert result.returncode == 1
    assert "unsupported architecture" in result.stderr


def test_qwen3_vl_hub_checkpoint_converts_both_ways(tmp_path):
    """A tied Qwen3-VL as the hub ships it (`model.visual.*` / `model.language_model.*`, no
    lm_head, a 4.57 config: `rope_scaling`, the tie flag at text level only), HF -> Orbax over 8
    devices (the CLI) and back (the same code in process): the same tensors under the same
    names, bit for bit, and transformers loads the export as is and computes the model's logits
    on an image prompt."""
    hub = tmp_path / "hub"
    model = tiny_hf_model("qwen3_vl", tied=True, seed=4, initializer_range=0.2)
    model.save_pretrained(str(hub))
    config = json.loads((hub / "config.json").read_text())
    text = config["text_config"]
    text["rope_scaling"] = text.pop("rope_parameters")
    text["rope_theta"] = text["rope_scaling"].pop("rope_theta")
    config.pop("tie_word_embeddings")
    (hub / "config.json").write_text(json.dumps(config))
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    first = _run_cli(f"--input={hub}", f"--output={ckpt}", "--fsdp=8", "--noprogress")
    assert first.returncode == 0, first.stderr[-2000:]
    restored_model, hf_config = checkpoint.load_model(ckpt)
    checkpoint.export_hf(restored_model, hf_config, back)
    original, restored = _all_tensors(hub), _all_tensors(back)
    assert set(restored) == set(original) and "lm_head.weight" not in restored
    assert any(n.startswith("model.visual.deepstack_merger_list.") for n in restored)
    assert all(np.array_equal(restored[n], v) for n, v in original.items())
    exported = json.loads((back / "config.json").read_text())
    assert exported["tie_word_embeddings"] and exported["text_config"]["tie_word_embeddings"]
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(back)).eval()
    vision = model.config.vision_config
    image_id, grid = model.config.image_token_id, torch.tensor([[1, 4, 6]])
    ids = torch.tensor([[5, 7, model.config.vision_start_token_id, *[image_id] * 6, 9, 11]])
    inputs = dict(
        input_ids=ids,
        pixel_values=torch.randn(24, 3 * 2 * vision.patch_size**2),
        image_grid_thw=grid,
        mm_token_type_ids=(ids == image_id).long(),
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
