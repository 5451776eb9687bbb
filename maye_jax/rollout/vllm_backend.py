"""The rollout worker's `vllm` backend: an offline `vllm.LLM` engine.

The engine core runs in this process unless VLLM_ENABLE_V1_MULTIPROCESSING=1. Images are passed as precomputed inputs,
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

Scheduling. Every request carries its own seed (`request_seed`), so its draws do not depend on
batching. vLLM's scheduler prefills at most `max_num_batched_tokens` tokens per step and splits a
prompt that does not fit ("chunked prefill"); after a partial prefill it rewinds the request's
generator, which only GPU generators allow ("CPU Generator does not use offset"). So on CPU a
`generate` is cut into engine calls that each fit one scheduler step (`plan_engine_calls`: at most
`max_num_batched_tokens` prompt tokens and `max_num_seqs` requests), so no prompt is ever split;
the limit (`rollout.max_num_batched_tokens`, default `CPU_MAX_NUM_BATCHED_TOKENS`) only trades
memory for fewer calls. The `n` samples of a prompt are `n` requests with their own seeds (vLLM's
own `n` would seed them seed+i); with n > 1, one 1-token request per prompt of at least one full
KV block runs first, so the prompt's blocks are in vLLM's prefix cache and its `n` samples
prefill only the last partial block instead of the whole prompt each (copies scheduled in the
same step never share).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from maye_jax.qwen_ids import IMAGE_PAD_ID
from maye_jax.rollout.backend_common import decode_texts, finish, log, torch_view
from maye_jax.rollout.engine import Completion, Prompt, Sampling, request_seed
from maye_jax.rollout.shm import SegmentView

# The scheduler limit on CPU when `rollout.max_num_batched_tokens` is unset (vLLM's CPU default is
# 4096, which a step of 64 requests of ~110-token prompts already exceeds).
CPU_MAX_NUM_BATCHED_TOKENS = 16384


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
    from maye_jax.models.hf_names import normalize_hf_name

    model = worker.model_runner.get_model()
    found = {}
    params = dict(model.named_parameters())
    for name in names:
        # vLLM's own names end with the normalised one (language_model.model.layers.N...)
        key = normalize_hf_name(name)
        matches = [p for n, p in params.items() if n == key or n.endswith("." + key)]
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
        self.on_cpu = _on_cpu()
        if self.on_cpu and kwargs.get("max_num_batched_tokens") is None:
            kwargs["max_num_batched_tokens"] = max(
                CPU_MAX_NUM_BATCHED_TOKENS, int(kwargs.get("max_model_len") or 0)
            )
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
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
        self.merge_unit = int(getattr(hf_config.vision_config, "spatial_merge_size", 2)) ** 2
        self.warned_truncation = False
        config = self.llm.llm_engine.vllm_config
        self.max_batched_tokens = int(config.scheduler_config.max_num_batched_tokens)
        self.max_seqs = int(config.scheduler_config.max_num_seqs)
        self.prefix_caching = bool(config.cache_config.enable_prefix_caching)
        self.block_size = int(config.cache_config.block_size)
        self.last_stats: dict[str, float] = {}

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
        self, prompts: Sequence[Prompt], sampling: Sampling, step: int, first_index: int = 0
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        truncated = sampling.top_k > 0 or sampling.top_p < 1.0
        if truncated and not sampling.greedy and not self.warned_truncation:
            log("top-k/top-p active: vLLM returns logprobs of the truncated distribution")
            self.warned_truncation = True
        base = [self._request(prompt) for prompt in prompts]
        lengths = [self._prompt_tokens(request) for request in base]
        self.last_stats = dict(
            engine_calls=0, prompt_tokens=0, cached_prompt_tokens=0, block_size=self.block_size
        )
        # one 1-token request per prompt fills the prefix cache for its n samples (only prompts
        # with a full KV block: vLLM caches whole blocks, 128 tokens on CPU)
        warm = [i for i, n in enumerate(lengths) if n > self.block_size]
        if sampling.n > 1 and self.prefix_caching and warm:
            params = SamplingParams(max_tokens=1, temperature=1.0, seed=0, detokenize=False)
            self._run([base[i] for i in warm], [params] * len(warm), [lengths[i] for i in warm])
        requests, params, request_lengths = [], [], []
        for i, request in enumerate(base):
            for j in range(sampling.n):
                requests.append(request)
                request_lengths.append(lengths[i])
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=max(sampling.temperature, 0.0),
                        top_p=sampling.top_p,
                        top_k=sampling.top_k if sampling.top_k > 0 else 0,
                        max_tokens=sampling.max_tokens,
                        seed=request_seed(sampling.seed, step, first_index + i, j),
                        stop_token_ids=list(sampling.stop_token_ids),
                        ignore_eos=True,  # stop exactly at the requested stop tokens
                        logprobs=0,
                        detokenize=False,
                    )
                )
        outputs = self._run(requests, params, request_lengths)
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

    def _prompt_tokens(self, request: dict[str, Any]) -> int:
        """The tokens vLLM prefills for a request: its ids with each image's pad expanded."""
        tokens = len(request["prompt_token_ids"])
        image = request.get("multi_modal_data", {}).get("image")
        if image is not None:
            grid = np.asarray(image["image_grid_thw"]).reshape(-1, 3)
            tokens += int(grid.prod(axis=1).sum()) // self.merge_unit - len(grid)
        return tokens

    def _run(self, requests: list, params: list, lengths: list[int]) -> list:
        """`llm.generate` of the requests, in order; on CPU in engine calls that each fit one
        scheduler step (no prompt is split, see the module doc)."""
        if self.on_cpu:
            if max(lengths, default=0) > self.max_batched_tokens:
                raise ValueError(
                    f"a prompt of {max(lengths)} tokens exceeds vLLM's scheduler limit "
                    f"{self.max_batched_tokens}: on CPU vLLM cannot split a seeded prompt "
                    "across steps; raise rollout.max_num_batched_tokens"
                )
            calls = plan_engine_calls(lengths, self.max_batched_tokens, self.max_seqs)
        else:
            calls = [(0, len(requests))]
        outputs = []
        for start, stop in calls:
            done = self.llm.generate(requests[start:stop], params[start:stop], use_tqdm=False)
            outputs.extend(done)
            self.last_stats["engine_calls"] += 1
            self.last_stats["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in done)
            self.last_stats["cached_prompt_tokens"] += sum(o.num_cached_tokens or 0 for o in done)
            _add_phase_seconds(self.last_stats, done)
        return outputs

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
        self.last_stats = dict(
            engine_calls=0, prompt_tokens=0, cached_prompt_tokens=0, block_size=self.block_size
        )
        lengths = [self._prompt_tokens(request) for request in requests]
        outputs = self._run(requests, [params] * len(requests), lengths)
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


def _add_phase_seconds(stats: dict, outputs: list) -> None:
    """Adds one engine call's prefill and decode seconds to `stats`, from vLLM's request
    metrics (only there when the engine was built with `disable_log_stats=False`). The call's
    requests are all scheduled in its first step (`plan_engine_calls`): prefill (the vision
    encoder included) runs from the first scheduling to the last first token, decode from there
    to the last token."""
    metrics = [output.metrics for output in outputs]
    if not metrics or any(m is None or not m.first_token_ts for m in metrics):
        return
    first_token = max(m.first_token_ts for m in metrics)
    prefill = first_token - min(m.scheduled_ts for m in metrics)
    decode = max(m.last_token_ts for m in metrics) - first_token
    stats["prefill_seconds"] = stats.get("prefill_seconds", 0.0) + prefill
    stats["decode_seconds"] = stats.get("decode_seconds", 0.0) + decode


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def plan_engine_calls(
    prompt_tokens: Sequence[int], max_batched_tokens: int, max_seqs: int
) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of requests, each with at most `max_batched_tokens`
    prompt tokens and `max_seqs` requests, so the scheduler prefills all of a call's prompts in
    its first step and never splits one (a prompt longer than the limit gets a call of its own;
    the backend refuses it before)."""
    calls, start, tokens = [], 0, 0
    for index, count in enumerate(prompt_tokens):
        if index > start and (tokens + count > max_batched_tokens or index - start >= max_seqs):
            calls.append((start, index))
            start, tokens = index, 0
        tokens += count
    if start < len(prompt_tokens):
        calls.append((start, len(prompt_tokens)))
    return calls
