"""Reward for the CPU demo's procedurally generated task (domain "toy", see prorl_jax/toy_task.py).

    R = 1.0                               if the stripped response equals the answer exactly
        PREFIX_REWARD * len(answer)/len(text) if it starts with the answer but goes on
        0.0                                   otherwise
(text = the stripped response; lengths in characters, i.e. tokens of the demo tokenizer.)

The partial credit gives a random policy a small but non-zero signal (the right first token);
scaling it by the share of the response that is the answer makes every earlier stop worth more
("8xy" < "8x" < "8"), so the policy is pushed toward emitting the stop token right after the
answer, which alone earns the full reward.
"""
from __future__ import annotations

from rewards.registry import register

EXACT_REWARD = 1.0
PREFIX_REWARD = 0.5


def score_toy(answer: str, response_text: str) -> float:
    """Reward in [0, 1] of `response_text` (decoded, special tokens removed) for `answer`."""
    text = response_text.strip()
    answer = str(answer).strip()
    if not answer:
        raise ValueError("toy record field 'answer': expected a non-empty string")
    if text == answer:
        return EXACT_REWARD
    if text.startswith(answer):
        return PREFIX_REWARD * len(answer) / len(text)
    return 0.0


@register("toy", required_fields=("answer",))
def toy_reward(record: dict, answer_text: str) -> float:
    """Registry entry: record["answer"] (a string) against the decoded response."""
    return score_toy(record["answer"], answer_text)
