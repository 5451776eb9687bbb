"""maye_jax/rl/trajectory.py's reward scoring: rows prompt-major, the configured penalties."""

from maye_jax.data.records import Record
from maye_jax.rl.trajectory import TrajectoryConfig, score_responses
from maye_jax.rollout.engine import Completion


def record(index: int, answer: str) -> Record:
    return Record(
        id=f"r{index}",
        question="q <image>",
        answer=answer,
        solution=f"so \\boxed{{{answer}}}",
        image_path=None,
        source=f"test:{index}",
        fields={},
    )


def completion(text: str, num_tokens: int, finish_reason: str = "stop") -> Completion:
    return Completion(list(range(num_tokens)), [0.0] * num_tokens, text, finish_reason)


def test_scores_rows_prompt_major_with_the_original_penalty_and_the_overlong_penalty():
    records = [record(0, "7"), record(1, "3")]
    completions = [
        [completion("\\boxed{7}", 4), completion("\\boxed{7}", 10, "length")],
        [completion("\\boxed{3}", 1), completion("no answer", 8)],
    ]
    config = TrajectoryConfig(
        reward_names=("accuracy",),
        penalty={"min_response_length": 1, "reward_penalty": -0.1},
        overlong={"max_tokens": 10, "buffer_len": 4, "penalty_factor": 1.0},
    )
    rewards = score_responses(records, completions, config)
    assert rewards["accuracy"] == [1.0, 1.0, 1.0, 0.0]
    # overlong: 0 up to 6 tokens, then -(length - 6) / 4
    assert rewards["overlong"] == [0.0, -1.0, 0.0, -0.5]
    # row 1 has no EOS, row 2 is an EOS alone (last valid index 0 < 1): -0.1 instead of 1.0
    assert rewards["total"] == [1.0, -1.1, -0.1, -0.5]
    plain = score_responses(records, completions, TrajectoryConfig(reward_names=("accuracy",)))
    assert plain == {"accuracy": [1.0, 1.0, 1.0, 0.0], "total": [1.0, 1.0, 1.0, 0.0]}
