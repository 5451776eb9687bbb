"""What fits in the model's context, checked when a run's data is prepared (after the config,
before the model loads or any step), for every engine:

- every prompt (its image tokens counted from each image's size) within
  `data.max_prompt_tokens` (None: the training engine's context minus `rollout.max_tokens`):
  a record over it is refused in one line naming how many and which, or with
  `data.on_error=skip` skipped with one warning;
- the longest prompt plus the longest response within the context of the engine that
  samples it: the training prompts (RL) with `rollout.max_tokens`, the evaluated splits with
  `eval.max_tokens`. The engine's context is `rollout.max_model_len` for vLLM when set, else
  the model's positions (`max_position_embeddings`; the JAX sampler and the hf worker have
  no other limit, and would run past it silently).

    records, processor = check_run_prompts(settings, records, kind="rl")
"""

from __future__ import annotations

from maye_jax.config.settings import Settings
from maye_jax.data.records import Record
from maye_jax.errors import UserError


def model_config(settings: Settings):
    """The transformers config of the run's start model (its config.json only; for a tiny
    model, the config it will be built with)."""
    m = settings.model
    if m.path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(m.path), local_files_only=True)
    from maye_jax.tiny import tiny_hf_config

    return tiny_hf_config(
        m.tiny_family,
        vocab_size=151936,
        hidden_size=m.tiny_hidden_size,
        num_layers=m.tiny_num_layers,
    )


def model_context(hf_config) -> int:
    """The model's positions: `max_position_embeddings` (of the text model)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    return int(text.max_position_embeddings)


def engine_context(settings: Settings, engine: str, hf_config) -> tuple[int, str]:
    """(tokens the engine holds, prompt and response together; the name of that limit)."""
    if engine == "vllm" and settings.rollout.max_model_len is not None:
        return settings.rollout.max_model_len, "rollout.max_model_len"
    return model_context(hf_config), "the model's context (max_position_embeddings)"


def run_processor(settings: Settings, hf_config):
    """The run's processor: the start model's tokenizer (the offline one for a tiny model)
    with the configured pixel bounds."""
    from maye_jax.data.processor import load_processor
    from maye_jax.models.configs import ModelConfig

    return load_processor(
        settings.model.path,
        family=ModelConfig.from_hf(hf_config).family,
        min_pixels=settings.data.min_pixels,
        max_pixels=settings.data.max_pixels,
    )


def check_run_prompts(
    settings: Settings, data: dict[str, list[Record]], *, kind: str, files: dict | None = None
):
    """(the records of every split whose prompts fit, the run's processor), or UserError
    (see the module doc). `kind`: "rl" (its training prompts are sampled) or "sft";
    `files`: the split's file, for messages."""
    from maye_jax.data.processor import get_prompt_template
    from maye_jax.data.prompt_length import prompt_lengths, within_limit

    hf_config = model_config(settings)
    processor = run_processor(settings, hf_config)
    instruction = get_prompt_template(settings.data.prompt_template)
    train_engine = settings.rollout.engine
    limit = settings.data.max_prompt_tokens
    why = "raise data.max_prompt_tokens or shorten them"
    if limit is None:
        context, name = engine_context(settings, train_engine, hf_config)
        limit = context - settings.rollout.max_tokens
        why = (
            f"data.max_prompt_tokens is unset: {name} {context} minus rollout.max_tokens "
            f"{settings.rollout.max_tokens}; set it, lower rollout.max_tokens or shorten them"
        )
        if limit < 1:
            raise UserError(
                f"config.rollout.max_tokens: {settings.rollout.max_tokens} leaves no room for a "
                f"prompt in {name} {context}"
            )
    checked, longest = {}, {}
    for split, records in data.items():
        source = f"{split} ({files[split]})" if files and split in files else split
        lengths = prompt_lengths(processor, records, instruction)
        checked[split], lengths = within_limit(
            records,
            lengths,
            limit=limit,
            on_error=settings.data.on_error,
            source=source,
            field="config.data.max_prompt_tokens",
            why=why,
        )
        longest[split] = max(lengths)
    problems = []
    for split, prompt in longest.items():
        if split == "train":
            if kind != "rl":
                continue  # SFT samples no training prompt
            engine, response, field = (
                train_engine,
                settings.rollout.max_tokens,
                "rollout.max_tokens",
            )
        else:
            if not settings.eval.enabled or split not in settings.eval.splits:
                continue
            engine = train_engine if kind == "rl" else "jax"  # SFT evaluates in process
            response, field = settings.eval.max_tokens, "eval.max_tokens"
        context, name = engine_context(settings, engine, hf_config)
        if prompt + response > context:
            problems.append(
                f"config.{field}: the longest {split} prompt ({prompt} tokens) and {response} "
                f"response tokens are more than {name} {context} of the {engine} engine; "
                f"lower data.max_prompt_tokens or {field}"
            )
    if problems:
        raise UserError("\n".join(problems))
    return checked, processor
