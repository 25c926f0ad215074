"""Validation: pass@k per domain on held-out prompts (algorithm.md, "Evaluation").

For each problem, n samples are drawn and scored; a sample is correct when its reward is >= the
`correct_threshold` (1.0: fully correct, as binary verifiers give; continuous-reward domains
count only full marks). pass@k = mean over problems of 1 - C(n-c, k) / C(n, k).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from prorl_jax import loss
from prorl_jax.fields import ConfigError, Section, above, field, int_at_least, parse_ints
from prorl_jax.data import Prompt
from prorl_jax.rollout.base import RolloutEngine


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Validation (config.eval; documented in configs/prorl.py): every_steps (0: never),
    n_samples per problem, k_values (comma-separated, each in [1, n_samples]), temperature,
    max_problems per validation file."""
    every_steps: int = field("eval.every_steps", 50, *int_at_least(0))
    n_samples: int = field("eval.n_samples", 16, *int_at_least(1))
    k_values: str = field("eval.k_values", "1,8,16")
    temperature: float = field("eval.temperature", 0.6, *above(0))
    max_problems: int = field("eval.max_problems", 512, *int_at_least(1))

    def check(self):
        if any(k < 1 or k > self.n_samples for k in self.ks):
            raise ConfigError(f"config.eval.k_values={self.k_values!r}: each k must be in "
                              f"[1, eval.n_samples={self.n_samples}]")

    @property
    def ks(self) -> list[int]:
        return parse_ints(self.k_values, "eval.k_values")


def pass_at_k_by_domain(domains: Sequence[str], rewards: np.ndarray, n: int,
                        k_values: Sequence[int], *,
                        correct_threshold: float = 1.0) -> dict[str, float]:
    """`val/<domain>/pass@k` and `val/<domain>/reward` from rewards f32[P*n] (prompt-major),
    plus `val/pass@1` (mean of the domains' pass@1: the plateau trigger's score)."""
    correct = (np.asarray(rewards).reshape(-1, n) >= correct_threshold - 1e-6).sum(axis=1)
    mean_r = np.asarray(rewards, np.float32).reshape(-1, n).mean(axis=1)
    domains = np.asarray(domains)
    out = {}
    for d in sorted(set(domains.tolist())):
        sel = domains == d
        for k in k_values:
            out[f"val/{d}/pass@{k}"] = float(np.mean(loss.pass_at_k(n, correct[sel], k)))
        out[f"val/{d}/reward"] = float(mean_r[sel].mean())
    firsts = [v for key, v in out.items() if key.endswith("/pass@1")]
    if firsts:
        out["val/pass@1"] = float(np.mean(firsts))
    return out


def validate(engine: RolloutEngine, prompts: Sequence[Prompt],
             score: Callable[[list[dict], list[list[int]]], np.ndarray], *, n: int,
             k_values: Sequence[int], temperature: float, top_p: float, max_new_tokens: int,
             stop_token_ids: Sequence[int], seed: int, batch_prompts: int) -> dict[str, float]:
    """Samples n responses per validation prompt (in batches), scores them, returns pass@k.

    score(records, response_token_ids) -> rewards f32[len(records)] (one record per response).
    """
    records, rewards = [], []
    for start in range(0, len(prompts), batch_prompts):
        part = list(prompts[start:start + batch_prompts])
        rollout = engine.generate([p.prompt_ids for p in part], n=n, temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_new_tokens,
                                  stop_token_ids=stop_token_ids, seed=seed + start)
        recs = [p.record for p in part for _ in range(n)]
        rewards.append(np.asarray(score(recs, rollout.token_ids), np.float32))
        records.extend(p.record for p in part)
    if not records:
        return {}
    return pass_at_k_by_domain([r.get("domain", "?") for r in records],
                               np.concatenate(rewards), n, k_values)
