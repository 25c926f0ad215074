"""Reward for the CPU demo's procedurally generated task (domain "toy", see prorl_jax/toy_task.py).

    R = 1.0   if the stripped response equals the answer exactly
        0.5   if it starts with the answer but goes on (right answer, then junk / no stop)
        0.0   otherwise

The partial credit gives a random policy a small but non-zero signal (the right first token),
while full reward needs the exact answer followed by the stop token.
"""
from __future__ import annotations

from rewards.registry import register

EXACT_REWARD = 1.0
PREFIX_REWARD = 0.5


def score_toy(answer: str, response_text: str) -> float:
    """Reward in {0, 0.5, 1} of `response_text` (decoded, special tokens removed) for `answer`."""
    text = response_text.strip()
    answer = str(answer).strip()
    if not answer:
        raise ValueError("toy record field 'answer': expected a non-empty string")
    if text == answer:
        return EXACT_REWARD
    if text.startswith(answer):
        return PREFIX_REWARD
    return 0.0


@register("toy", required_fields=("answer",))
def toy_reward(record: dict, answer_text: str) -> float:
    """Registry entry: record["answer"] (a string) against the decoded response."""
    return score_toy(record["answer"], answer_text)
