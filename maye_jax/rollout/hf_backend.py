"""The rollout worker's `hf` backend: transformers `generate` with our own seeded sampler.

The model's generation config is replaced by a neutral one and every field that could change the distribution (repetition penalty, top-k, top-p, n-gram bans,
forced or suppressed tokens, ...) is set explicitly to its neutral value. Sampling itself is
done by our own logits processor, with one torch.Generator per (prompt, sample) seeded by
`request_seed`: it computes log_softmax(logits / T) over the full vocabulary, records the
sampled token's logprob, applies top-k / top-p, draws the token and hands `generate` a one-hot
score (greedy decoding of it returns our token). Weights: copied into the parameters from torch
views of the mapped segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maye_jax.models.hf_names import normalize_hf_name
from maye_jax.qwen_ids import IMAGE_PAD_ID, PAD_ID
from maye_jax.rollout.backend_common import decode_texts, finish, torch_view
from maye_jax.rollout.engine import Completion, Prompt, Sampling, request_seed
from maye_jax.rollout.shm import SegmentError, SegmentView


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
        unknown = sorted(n for n in view.tensors if normalize_hf_name(n) not in self.params)
        if unknown:
            raise SegmentError(f"segment tensors unknown to the model: {unknown[:10]}")
        with self.torch.no_grad():
            for name, array in view.tensors.items():
                param = self.params[normalize_hf_name(name)]
                if tuple(param.shape) != tuple(array.shape):
                    raise SegmentError(f"{name}: segment {array.shape}, model {tuple(param.shape)}")
                param.copy_(torch_view(array, view.dtypes[name]))

    def engine_values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {
            name: self.params[normalize_hf_name(name)].detach().float().numpy() for name in names
        }

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
        self, prompts: Sequence[Prompt], sampling: Sampling, step: int, first_index: int = 0
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
                torch.Generator().manual_seed(request_seed(sampling.seed, step, first_index + i, j))
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
