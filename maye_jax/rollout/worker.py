"""The torch-side rollout worker: `python -m maye_jax.rollout.worker --backend hf|vllm --model DIR`.

It runs in its own process, usually in its own virtual environment (vLLM pins its own torch and
transformers), with the project on PYTHONPATH; it imports no JAX. The trainer starts it through
`client.WorkerEngine`, which passes one end of a socket pair as `--fd` and chooses its devices
through the environment (e.g. CUDA_VISIBLE_DEVICES=7 while the trainer uses 0-6). Messages follow
protocol.py; weights arrive through the shared-memory segment of shm.py.

Backends (same protocol, same outputs; logprobs as SPEC §3 defines them):
- `hf`: transformers `generate`. The model's generation config is replaced by a neutral one and
  every field that could change the distribution (repetition penalty, top-k, top-p, n-gram bans,
  forced or suppressed tokens, ...) is set explicitly to its neutral value. Sampling itself is
  done by our own logits processor, with one torch.Generator per (prompt, sample) seeded by
  `request_seed`: it computes log_softmax(logits / T) over the full vocabulary, records the
  sampled token's logprob, applies top-k / top-p, draws the token and hands `generate` a one-hot
  score (greedy decoding of it returns our token). Weights: copied into the parameters from torch
  views of the mapped segment.
- `vllm`: vllm.LLM (offline engine, engine core in this process unless
  VLLM_ENABLE_V1_MULTIPROCESSING=1). Images are passed as precomputed inputs,
  `multi_modal_data={"image": {"pixel_values", "image_grid_thw"}}`: vLLM 0.32 accepts a dict of
  tensors for Qwen-VL only for `image_embeds`, so the worker registers `pixel_values` as the
  dict's value field (`_accept_pixel_values`); the tensors go through to the model's vision tower
  unchanged, so vLLM sees exactly the trainer's pixels (no re-encoding, no resizing). Logprobs use
  `logprobs_mode="processed_logprobs"`: log_softmax of the logits after temperature and after
  top-k / top-p. That equals SPEC §3 whenever top_k = -1 and top_p = 1 (MAYE's rollouts);
  "raw_logprobs" would ignore the temperature. With truncation active vLLM offers neither
  quantity, and the worker logs that the logprobs are those of the truncated distribution.
  Scoring (teacher forcing) uses prompt logprobs, which vLLM computes at temperature 1 only.
  Weights: `collective_rpc("reload_weights", weights_iterator=[(name, torch view of the mapping)])`
  in process, or `weights_path=<segment directory>` when the engine core is another process;
  then the prefix and encoder caches are reset.

After each sync the worker checks that the engine holds the new values of the RMSNorm weights in
the segment (they are stored unchanged by both engines), so a load that silently did nothing is
an error, not a stale rollout.

Multi-host: shared memory is host-local. A worker serves the trainer process on its own host: in
a multi-host run, each host that runs a worker has its local trainer process gather the trainable
parameters to its host memory (replicated, e.g. `multihost_utils.process_allgather` of the HF
arrays, or a fully replicated sharding before `device_get`) and write its own segment; workers
never read weights across hosts. A setup with rollouts on one host only needs the gather on that
host's process alone; the other hosts skip `sync_weights`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from maye_jax.rollout import protocol
from maye_jax.rollout.engine import Completion, Prompt, Sampling, request_seed
from maye_jax.rollout.shm import SegmentError, SegmentReader, SegmentView

IMAGE_PAD_ID = 151655
PAD_ID = 151643


def log(message: str) -> None:
    print(f"[maye-worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


def normalize_hf_name(name: str) -> str:
    """transformers 5 in-memory names -> checkpoint (hub file) names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def is_norm_weight(name: str) -> bool:
    return not name.startswith("visual.") and (
        name.endswith("layernorm.weight") or name == "model.norm.weight"
    )


def torch_view(array: np.ndarray, safetensors_dtype: str):
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if safetensors_dtype == "BF16" else tensor


def decode_texts(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(tokens), skip_special_tokens=True) for tokens in token_lists]


def finish(tokens: list[int], logprobs: list[float], sampling: Sampling) -> tuple[list, list, str]:
    """Cuts a sampled row at its first stop token (kept) or at max_tokens."""
    stops = set(sampling.stop_token_ids)
    for index, token in enumerate(tokens[: sampling.max_tokens]):
        if token in stops:
            return tokens[: index + 1], logprobs[: index + 1], "stop"
    return tokens[: sampling.max_tokens], logprobs[: sampling.max_tokens], "length"


# ---------------------------------------------------------------------------------------------
# hf backend


class _SeededSampler:
    """A transformers logits processor that samples each row with its own generator."""

    def __init__(self, sampling: Sampling, generators: list):
        self.sampling = sampling
        self.generators = generators
        self.chosen_logprobs: list = []  # per step: [rows] float32

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        temperature = self.sampling.temperature if not self.sampling.greedy else 1.0
        logprobs = torch.log_softmax(scores / temperature, dim=-1)  # SPEC §3, before truncation
        if self.sampling.greedy:
            chosen = logprobs.argmax(dim=-1)
        else:
            truncated = _truncate(logprobs, self.sampling.top_k, self.sampling.top_p)
            probs = torch.softmax(truncated, dim=-1)
            chosen = torch.stack(
                [
                    torch.multinomial(probs[row], 1, generator=g)[0]
                    for row, g in enumerate(self.generators)
                ]
            )
        self.chosen_logprobs.append(logprobs.gather(1, chosen[:, None])[:, 0])
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chosen[:, None], 0.0)
        return forced


def _truncate(logprobs, top_k: int, top_p: float):
    import torch

    if top_k is not None and 0 < top_k < logprobs.shape[-1]:
        kth = torch.topk(logprobs, top_k, dim=-1).values[:, -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logprobs, order = torch.sort(logprobs, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logprobs, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logprobs, dim=-1) >= top_p  # keep the first
        sorted_logprobs = sorted_logprobs.masked_fill(remove, float("-inf"))
        logprobs = torch.full_like(logprobs, float("-inf")).scatter(1, order, sorted_logprobs)
    return logprobs


NEUTRAL_GENERATION = dict(
    do_sample=False,  # our processor samples; greedy decoding of its one-hot scores follows it
    num_beams=1,
    num_return_sequences=1,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    length_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    bad_words_ids=None,
    force_words_ids=None,
    renormalize_logits=False,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    remove_invalid_values=False,
    exponential_decay_length_penalty=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    sequence_bias=None,
    guidance_scale=None,
    min_length=0,
    min_new_tokens=0,
    stop_strings=None,
    max_time=None,
    watermarking_config=None,
    use_cache=True,
    output_scores=False,
    return_dict_in_generate=False,
)


class HFBackend:
    def __init__(self, model_dir: str, dtype: str, max_batch_rows: int = 64):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        ).eval()
        self.model.generation_config = GenerationConfig(**NEUTRAL_GENERATION)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_token_id = int(getattr(self.model.config, "image_token_id", IMAGE_PAD_ID))
        self.max_batch_rows = max_batch_rows
        self.params = {normalize_hf_name(n): p for n, p in self.model.named_parameters()}

    def load_weights(self, view: SegmentView) -> None:
        unknown = sorted(set(view.tensors) - set(self.params))
        if unknown:
            raise SegmentError(f"segment tensors unknown to the model: {unknown[:10]}")
        with self.torch.no_grad():
            for name, array in view.tensors.items():
                param = self.params[name]
                if tuple(param.shape) != tuple(array.shape):
                    raise SegmentError(f"{name}: segment {array.shape}, model {tuple(param.shape)}")
                param.copy_(torch_view(array, view.dtypes[name]))

    def engine_values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: self.params[name].detach().float().numpy() for name in names}

    def _model_inputs(self, rows: Sequence[tuple[Prompt, Sequence[int]]], left_pad: bool):
        torch = self.torch
        sequences = [
            np.concatenate([np.asarray(p.prompt_token_ids), response]) for p, response in rows
        ]
        length = max(len(s) for s in sequences)
        input_ids = np.full((len(rows), length), PAD_ID, np.int64)
        attention = np.zeros((len(rows), length), np.int64)
        types = np.zeros((len(rows), length), np.int64)
        for row, ((prompt, _), sequence) in enumerate(zip(rows, sequences)):
            start = length - len(sequence) if left_pad else 0
            input_ids[row, start : start + len(sequence)] = sequence
            attention[row, start : start + len(sequence)] = 1
            prompt_ids = np.asarray(prompt.prompt_token_ids)
            types[row, start : start + len(prompt_ids)] = prompt_ids == self.image_token_id
        inputs = dict(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention),
            mm_token_type_ids=torch.from_numpy(types),
        )
        with_images = [p for p, _ in rows if p.pixel_values is not None]
        if with_images:
            inputs["pixel_values"] = torch.from_numpy(
                np.concatenate([np.asarray(p.pixel_values, np.float32) for p in with_images])
            ).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.from_numpy(
                np.concatenate(
                    [np.asarray(p.image_grid_thw, np.int64).reshape(-1, 3) for p in with_images]
                )
            )
        return inputs, length

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, step: int
    ) -> list[list[Completion]]:
        from transformers import GenerationConfig, LogitsProcessorList

        torch = self.torch
        rows = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        finished = []  # (tokens, logprobs, finish_reason) per row, in row order
        config = GenerationConfig(
            **NEUTRAL_GENERATION,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=list(sampling.stop_token_ids),
            pad_token_id=PAD_ID,
        )
        for begin in range(0, len(rows), self.max_batch_rows):
            batch = rows[begin : begin + self.max_batch_rows]
            inputs, prompt_len = self._model_inputs(
                [(prompts[i], []) for i, _ in batch], left_pad=True
            )
            generators = [
                torch.Generator().manual_seed(request_seed(sampling.seed, step, i, j))
                for i, j in batch
            ]
            sampler = _SeededSampler(sampling, generators)
            with torch.no_grad():
                output = self.model.generate(
                    **inputs,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                )
            new_tokens = output[:, prompt_len:].tolist()
            logprobs = torch.stack(sampler.chosen_logprobs, dim=1).tolist()
            finished += [finish(t, lp, sampling) for t, lp in zip(new_tokens, logprobs)]
        texts = decode_texts(self.tokenizer, [tokens for tokens, _, _ in finished])
        completions = [Completion(t, lp, text, r) for (t, lp, r), text in zip(finished, texts)]
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def score(
        self, items: Sequence[tuple[Prompt, np.ndarray]], temperature: float
    ) -> list[np.ndarray]:
        torch = self.torch
        scores = []
        for begin in range(0, len(items), self.max_batch_rows):
            batch = items[begin : begin + self.max_batch_rows]
            inputs, _ = self._model_inputs(batch, left_pad=False)
            with torch.no_grad():
                logits = self.model(**inputs).logits.float()
            for row, (prompt, response) in enumerate(batch):
                start = len(prompt.prompt_token_ids) - 1
                predicting = logits[row, start : start + len(response)] / temperature
                targets = torch.from_numpy(np.asarray(response, np.int64))
                logprobs = torch.log_softmax(predicting, dim=-1).gather(1, targets[:, None])[:, 0]
                scores.append(logprobs.numpy().astype(np.float32))
        return scores

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# vllm backend


def _accept_pixel_values() -> None:
    """Lets vLLM's Qwen-VL parser take `{"pixel_values", "image_grid_thw"}` dicts (precomputed
    pixels) where it takes `{"image_embeds", "image_grid_thw"}`; both go to the model as is."""
    from vllm.model_executor.models import qwen2_vl

    parser = qwen2_vl.Qwen2VLMultiModalDataParser
    fields = dict(parser.embedding_fields)
    fields["image"] = {"pixel_values": "values", "image_grid_thw": "metadata"}
    parser.embedding_fields = fields


def _engine_norm_weights(worker, names: list[str]) -> dict[str, list[float]]:
    """Runs inside vLLM's worker (collective_rpc): current values of the named norm weights."""
    model = worker.model_runner.get_model()
    found = {}
    params = dict(model.named_parameters())
    for name in names:
        matches = [p for n, p in params.items() if n == name or n.endswith("." + name)]
        if len(matches) == 1:
            found[name] = matches[0].detach().float().cpu().tolist()
    return found


def _check_prompt(output, expected_ids) -> None:
    if list(output.prompt_token_ids) != [int(t) for t in expected_ids]:
        raise ValueError(
            f"vLLM's prompt ({len(output.prompt_token_ids)} tokens) differs from the trainer's "
            f"({len(expected_ids)} tokens): image placeholders do not match image_grid_thw"
        )


class VLLMBackend:
    def __init__(self, model_dir: str, dtype: str, engine_args: dict[str, Any]):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import logging

        from vllm import LLM

        _accept_pixel_values()
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        if not self.in_process:
            # the post-sync check sends a function (`_engine_norm_weights`) to the engine core
            # process; vLLM pickles callables only when allowed (local IPC between our processes)
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        kwargs = dict(
            model=model_dir,
            dtype=dtype,
            seed=0,
            limit_mm_per_prompt={"image": 1, "video": 0},
            generation_config="vllm",  # never the model's sampling defaults
        )
        kwargs.update(engine_args)
        # the trainer's pixels are already rescaled and normalised: vLLM 0.32 would otherwise
        # normalise again inside the vision tower (mm_device_do_normalize defaults to True)
        kwargs.update(
            logprobs_mode="processed_logprobs", enable_mm_embeds=True, mm_device_do_normalize=False
        )
        self.llm = LLM(**kwargs)
        # reloads warn for every layer without checkpoint tensors (rotary caches, and the vision
        # tower after the first sync); vLLM sets up its loggers in LLM(), so quiet this one after
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(
            logging.ERROR
        )
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.image_token_id = int(getattr(hf_config, "image_token_id", IMAGE_PAD_ID))
        self.warned_truncation = False

    def load_weights(self, view: SegmentView, directory: str) -> None:
        if self.in_process:
            weights = [(name, torch_view(a, view.dtypes[name])) for name, a in view.tensors.items()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def engine_values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        found = self.llm.collective_rpc(_engine_norm_weights, args=(list(names),))[0]
        return {name: np.asarray(values, np.float32) for name, values in found.items()}

    def _request(self, prompt: Prompt, extra_tokens=()) -> dict[str, Any]:
        """A vLLM prompt. vLLM expands each image's placeholder itself (it would expand one pad
        of an already expanded run again), so every run of image pads becomes one pad here;
        `_check_prompt` verifies that vLLM's expansion gives back the trainer's ids."""
        import torch

        tokens = np.asarray(prompt.prompt_token_ids, np.int64)
        if prompt.pixel_values is not None:
            is_pad = tokens == self.image_token_id
            run_start = is_pad & np.concatenate([[True], ~is_pad[:-1]])
            tokens = tokens[~is_pad | run_start]
        tokens = np.concatenate([tokens, np.asarray(extra_tokens, np.int64)])
        request: dict[str, Any] = {"prompt_token_ids": tokens.tolist()}
        if prompt.pixel_values is not None:
            request["multi_modal_data"] = {
                "image": {
                    "pixel_values": torch.from_numpy(np.asarray(prompt.pixel_values, np.float32)),
                    "image_grid_thw": torch.from_numpy(
                        np.asarray(prompt.image_grid_thw, np.int64).reshape(-1, 3)
                    ),
                }
            }
        return request

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, step: int
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        truncated = sampling.top_k > 0 or sampling.top_p < 1.0
        if truncated and not sampling.greedy and not self.warned_truncation:
            log("top-k/top-p active: vLLM returns logprobs of the truncated distribution")
            self.warned_truncation = True
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                requests.append(self._request(prompt))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=max(sampling.temperature, 0.0),
                        top_p=sampling.top_p,
                        top_k=sampling.top_k if sampling.top_k > 0 else 0,
                        max_tokens=sampling.max_tokens,
                        seed=request_seed(sampling.seed, step, i, j),
                        stop_token_ids=list(sampling.stop_token_ids),
                        ignore_eos=True,  # stop exactly at the requested stop tokens
                        logprobs=0,
                        detokenize=False,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = []
        for index, output in enumerate(outputs):
            _check_prompt(output, prompts[index // sampling.n].prompt_token_ids)
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [entry[token].logprob for token, entry in zip(tokens, sample.logprobs)]
            tokens, logprobs, reason = finish(tokens, logprobs, sampling)
            rows.append((tokens, logprobs, reason))
        texts = decode_texts(self.tokenizer, [tokens for tokens, _, _ in rows])
        completions = [Completion(t, lp, text, r) for (t, lp, r), text in zip(rows, texts)]
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def score(
        self, items: Sequence[tuple[Prompt, np.ndarray]], temperature: float
    ) -> list[np.ndarray]:
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError(
                "the vllm backend scores at temperature 1 only (vLLM's prompt logprobs)"
            )
        requests = [self._request(prompt, response) for prompt, response in items]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        scores = []
        for (prompt, response), output in zip(items, outputs):
            _check_prompt(output, np.concatenate([prompt.prompt_token_ids, response]))
            start = len(prompt.prompt_token_ids)
            entries = output.prompt_logprobs[start : start + len(response)]
            scores.append(
                np.asarray([e[int(t)].logprob for e, t in zip(entries, response)], np.float32)
            )
        return scores

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "llm_engine"):
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if shutdown is not None:
                shutdown()
        self.llm = None


class NullBackend:
    """Maps and verifies weights only (benchmarks, protocol tests). With `device` (engine args
    `{"device": "cuda"}`), it also copies every tensor into a torch tensor of its own on that
    device, allocated on the first sync and overwritten by later ones, as an engine's weight
    load would (benchmarks/gpu_sync.py)."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.values: dict[str, Any] = {}

    def load_weights(self, view: SegmentView) -> None:
        views = {name: torch_view(a, view.dtypes[name]) for name, a in view.tensors.items()}
        if self.device is None:
            self.values = views
            return
        import torch

        for name, source in views.items():
            target = self.values.get(name)
            if target is None or target.shape != source.shape or target.dtype != source.dtype:
                target = self.values[name] = torch.empty_like(source, device=self.device)
            target.copy_(source)
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def engine_values(self, names):
        return {
            name: self.values[name].float().cpu().numpy() for name in names if name in self.values
        }

    def close(self) -> None:
        self.values = {}


# ---------------------------------------------------------------------------------------------
# The request loop


class Worker:
    def __init__(self, backend, backend_name: str):
        self.backend = backend
        self.backend_name = backend_name
        self.reader = SegmentReader()
        self.version: int | None = None
        self.segment_directory: str | None = None

    def handle(self, header: dict, buffers: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
        op = header["op"]
        if op == "sync":
            return self.sync(header), []
        if op in ("generate", "score") and header.get("version") != self.version:
            raise RuntimeError(
                f"{op} asks for weights version {header.get('version')}, worker holds {self.version}"
            )
        if op == "generate":
            prompts = [protocol.decode_prompt(p, buffers) for p in header["prompts"]]
            sampling = protocol.decode_sampling(header["sampling"])
            completions = self.backend.generate(prompts, sampling, int(header["step"]))
            out = protocol.BufferList()
            encoded = [
                [
                    dict(
                        tokens=out.add(np.asarray(c.token_ids, np.int32), "int32"),
                        logprobs=out.add(np.asarray(c.logprobs, np.float32), "float32"),
                        text=c.text,
                        finish_reason=c.finish_reason,
                    )
                    for c in row
                ]
                for row in completions
            ]
            return dict(ok=True, version=self.version, completions=encoded), out.arrays
        if op == "score":
            items = [
                (protocol.decode_prompt(item, buffers), buffers[item["response"]])
                for item in header["items"]
            ]
            scores = self.backend.score(items, float(header["temperature"]))
            return dict(ok=True, version=self.version, logprobs=list(range(len(scores)))), scores
        raise ValueError(f"unknown op {op!r}")

    def sync(self, header: dict) -> dict:
        started = time.perf_counter()
        self.segment_directory = os.path.dirname(header["path"])
        view = self.reader.read(header["path"], int(header["version"]), header["checksum"])
        read_seconds = time.perf_counter() - started
        if isinstance(self.backend, VLLMBackend):
            self.backend.load_weights(view, self.segment_directory)
        else:
            self.backend.load_weights(view)
        load_seconds = time.perf_counter() - started - read_seconds
        probes = [name for name in view.tensors if is_norm_weight(name)]
        engine = self.backend.engine_values(probes)
        stale = [
            name
            for name in probes
            if name not in engine
            or not np.array_equal(engine[name], _as_float32(view.tensors[name], view.dtypes[name]))
        ]
        if stale:
            raise SegmentError(f"engine does not hold version {view.version} of {stale[:5]}")
        del view
        self.version = int(header["version"])
        return dict(
            ok=True,
            version=self.version,
            checksum=header["checksum"],
            num_tensors=int(header["num_tensors"]),
            probed=len(probes),
            seconds=time.perf_counter() - started,
            read_seconds=read_seconds,  # map + checksum + views of the segment
            load_seconds=load_seconds,  # the engine's copy into its own tensors
        )

    def close(self) -> None:
        self.reader.close()
        self.backend.close()


def _as_float32(array: np.ndarray, safetensors_dtype: str) -> np.ndarray:
    if safetensors_dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _set_parent_death_signal() -> None:
    """Linux: SIGTERM this worker when the trainer process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def make_backend(name: str, model_dir: str, dtype: str, engine_args: dict, max_batch_rows: int):
    if name == "hf":
        return HFBackend(model_dir, dtype, max_batch_rows)
    if name == "vllm":
        return VLLMBackend(model_dir, dtype, engine_args)
    if name == "null":
        return NullBackend(**engine_args)
    raise ValueError(f"unknown backend {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("hf", "vllm", "null"), required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the trainer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--engine-args", default="{}", help="JSON: extra vllm.LLM arguments")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    args = parser.parse_args(argv)
    _set_parent_death_signal()
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)  # engine subprocesses must not keep the trainer's socket open
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    worker = None
    shutdown_requested = False
    try:
        started = time.perf_counter()
        backend = make_backend(
            args.backend, args.model, args.dtype, json.loads(args.engine_args), args.max_batch_rows
        )
        worker = Worker(backend, args.backend)
        log(f"{args.backend} backend ready in {time.perf_counter() - started:.1f} s")
        protocol.send_message(
            sock, dict(ok=True, op="ready", backend=args.backend, model=args.model, pid=os.getpid())
        )
        while True:
            try:
                header, buffers = protocol.recv_message(sock)
            except protocol.ConnectionClosed:
                log("trainer closed the connection")
                break
            if header.get("op") == "shutdown":
                shutdown_requested = True
                protocol.send_message(sock, dict(ok=True))
                break
            try:
                reply, out = worker.handle(header, buffers)
            except Exception as error:  # reported to the trainer, which raises it
                log(f"{header.get('op')} failed: {error!r}")
                traceback.print_exc()
                reply, out = dict(ok=False, error=repr(error), traceback=traceback.format_exc()), []
            protocol.send_message(sock, reply, out)
    except Exception as error:
        log(f"fatal: {error!r}")
        traceback.print_exc()
        try:
            protocol.send_message(
                sock, dict(ok=False, error=repr(error), traceback=traceback.format_exc())
            )
        except OSError:
            pass
        return 1
    finally:
        if worker is not None:
            worker.close()
        # the trainer unlinks its segment; if it vanished without saying goodbye, do it here
        if not shutdown_requested and worker is not None and worker.segment_directory:
            from maye_jax.rollout.shm import remove_segment_directory

            remove_segment_directory(worker.segment_directory)
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
