"""From rollouts to training rows: reward shaping, dynamic sampling, padded token batches.

Host-side numpy (no JAX): the trainer collects prompt groups here across generation rounds
and turns the survivors into the dict of arrays the jitted update consumes:

    input_ids  int32[B, T]   prompt + response, right-padded with pad_id
    targets    int32[B, T]   input_ids shifted left by one (targets[:, t] = input_ids[:, t+1])
    loss_mask  f32[B, T]     1 where targets[:, t] is a response token that counts in the loss
    advantages f32[B]        group-normalised advantage of each response
    sampler_logp f32[B, T]   the engine's log-probs of the targets (0 elsewhere)

B = groups * n rows (prompt-major), T = a multiple of `length_bucket` (one compile per bucket).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

from prorl_jax import loss
from prorl_jax.fields import ConfigError, Section, above, at_least, field, int_at_least
from prorl_jax.rollout.base import FINISH_LENGTH, RolloutBatch
from rewards.extract import THINK_MODES


@dataclasses.dataclass(frozen=True)
class BatchConfig(Section):
    """Prompts per step and their split (config.batch; documented in configs/prorl.py):
    prompts_per_step, mini_batch_prompts (must divide it), dynamic_sampling,
    max_generation_rounds (the refill bound), length_bucket (T is a multiple of it),
    oversample (prompts rolled out per generation round, as a multiple of prompts_per_step)."""
    prompts_per_step: int = field("batch.prompts_per_step", 256, *int_at_least(1))
    mini_batch_prompts: int = field("batch.mini_batch_prompts", 64, *int_at_least(1))
    dynamic_sampling: bool = field("batch.dynamic_sampling", True)
    max_generation_rounds: int = field("batch.max_generation_rounds", 4, *int_at_least(1))
    length_bucket: int = field("batch.length_bucket", 512, *int_at_least(1))
    oversample: float = field("batch.oversample", 1.0, *at_least(1))

    @property
    def prompts_per_round(self) -> int:
        """ceil(oversample * prompts_per_step): the prompts of one generation round (rounded to
        6 decimals first, so that 1.1 * 10 is 11)."""
        return math.ceil(round(self.oversample * self.prompts_per_step, 6))

    def check(self):
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(f"config.batch.mini_batch_prompts={self.mini_batch_prompts} must "
                              f"divide config.batch.prompts_per_step={self.prompts_per_step}")


@dataclasses.dataclass(frozen=True)
class RewardConfig(Section):
    """Scoring and the overlong rules of algorithm.md (config.reward): think_mode
    (rewards THINK_MODES), overlong_filter (truncated responses out of the loss),
    truncated_reward (the reward of a truncated response, "stop properly"; None: the
    verifier's), soft_overlong_buffer / soft_overlong_factor (DAPO; buffer 0: off),
    num_workers (scoring processes, 0: all cores), timeout_s (per response),
    length_penalty (loss.LENGTH_PENALTIES: "cosine" is loss.cosine_length_reward, blended in by
    length_penalty_coef), cosine_* (its correctness threshold and (r_start, r_end) ranges)."""
    think_mode: str = field("reward.think_mode", "require", choices=THINK_MODES)
    overlong_filter: bool = field("reward.overlong_filter", True)
    truncated_reward: Optional[float] = field("reward.truncated_reward", None, "a number or "
                                              "None (off)", lambda v: True, off=None)
    soft_overlong_buffer: int = field("reward.soft_overlong_buffer", 0, *int_at_least(0))
    soft_overlong_factor: float = field("reward.soft_overlong_factor", 1.0, *at_least(0))
    num_workers: int = field("reward.num_workers", 0, *int_at_least(0))
    timeout_s: float = field("reward.timeout_s", 10.0, *above(0))
    length_penalty: str = field("reward.length_penalty", "none", choices=loss.LENGTH_PENALTIES)
    length_penalty_coef: float = field("reward.length_penalty_coef", 1.0, "in [0, 1]",
                                       lambda v: 0 <= v <= 1)
    cosine_correct_threshold: float = field("reward.cosine_correct_threshold", 1.0, "a number",
                                            lambda v: True)
    cosine_correct_start: float = field("reward.cosine_correct_start", 1.0, "a number",
                                        lambda v: True)
    cosine_correct_end: float = field("reward.cosine_correct_end", 0.5, "a number",
                                      lambda v: True)
    cosine_wrong_start: float = field("reward.cosine_wrong_start", 0.0, "a number",
                                      lambda v: True)
    cosine_wrong_end: float = field("reward.cosine_wrong_end", -0.5, "a number", lambda v: True)


@dataclasses.dataclass(frozen=True)
class AdvantageConfig(Section):
    """Advantages (config.loss.adv_*): estimator (loss.ADVANTAGE_ESTIMATORS: grpo, rloo,
    reinforce_pp_baseline), and grpo's std_normalize (False: Dr.GRPO) and std_scope
    (loss.STD_SCOPES: the group's std or the batch's)."""
    estimator: str = field("loss.adv_estimator", "grpo",
                           choices=tuple(loss.ADVANTAGE_ESTIMATORS))
    std_normalize: bool = field("loss.adv_std_normalize", True)
    std_scope: str = field("loss.adv_std_scope", "group", choices=loss.STD_SCOPES)


def advantages(groups: Sequence["Group"], n: int, cfg: AdvantageConfig, *,
               overlong_filter: bool = False) -> np.ndarray:
    """f32[groups * n]: the advantages of the groups' shaped rewards (algorithm.md step 5),
    by cfg.estimator; each response's length in loss tokens (0 when overlong filtering drops
    it) weighs it in reinforce_pp_baseline's whitening."""
    rewards = np.concatenate([g.rewards for g in groups])
    lengths = np.array([0 if overlong_filter and reason == FINISH_LENGTH else len(resp)
                        for g in groups for resp, reason in zip(g.response_ids,
                                                                g.finish_reasons)], np.int32)
    return np.asarray(loss.compute_advantages(cfg.estimator, rewards, n, lengths=lengths,
                                              std_normalize=cfg.std_normalize,
                                              std_scope=cfg.std_scope))


def shape_rewards(rewards: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, *,
                  max_len: int, cfg: RewardConfig) -> np.ndarray:
    """Applies the overlong and length rules of algorithm.md to verifier rewards f32[N], in
    this order (lengths in tokens, max_len = rollout.max_response_tokens):

    1. cfg.truncated_reward (not None): the reward of a response cut at max_len ("stop
       properly"; ProRL v2: 0).
    2. cfg.length_penalty "cosine": R <- (1 - c) R + c cosine_length_reward(R, L, max_len) with
       c = cfg.length_penalty_coef (a stage can switch it on, or ramp c stage by stage); a
       truncated response's stop-properly reward counts as wrong.
    3. cfg.soft_overlong_buffer > 0: adds DAPO's `loss.soft_overlong_penalty` of each length.
    """
    out = np.asarray(rewards, np.float32).copy()
    if cfg.truncated_reward is not None:
        out = np.where(truncated, np.float32(cfg.truncated_reward), out)
    if cfg.length_penalty == "cosine" and cfg.length_penalty_coef > 0:
        cosine = np.asarray(loss.cosine_length_reward(
            out, lengths, max_len, correct_threshold=cfg.cosine_correct_threshold,
            correct_range=(cfg.cosine_correct_start, cfg.cosine_correct_end),
            wrong_range=(cfg.cosine_wrong_start, cfg.cosine_wrong_end)))
        out = (1.0 - cfg.length_penalty_coef) * out + cfg.length_penalty_coef * cosine
    if cfg.soft_overlong_buffer > 0:
        out += np.asarray(loss.soft_overlong_penalty(lengths, max_len, cfg.soft_overlong_buffer,
                                                     cfg.soft_overlong_factor))
    return out.astype(np.float32)


def informative_groups(rewards: np.ndarray, n: int) -> np.ndarray:
    """bool[P]: groups (rows g*n .. g*n+n-1) whose n rewards are not all equal."""
    return np.asarray(loss.group_signal_mask(np.asarray(rewards, np.float32), n))


@dataclasses.dataclass
class Group:
    """One prompt and its n responses (with their rewards)."""
    record: dict
    prompt_ids: list[int]
    response_ids: list[list[int]]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    rewards: np.ndarray          # f32[n], shaped
    raw_rewards: np.ndarray      # f32[n], as the verifier gave them


def split_groups(batch: RolloutBatch, records: Sequence[dict], rewards: np.ndarray,
                 raw_rewards: np.ndarray) -> list[Group]:
    """Cuts a prompt-major rollout batch into per-prompt groups."""
    n = batch.n
    return [Group(records[i], list(batch.prompt_ids[i]),
                  [list(t) for t in batch.token_ids[i * n:(i + 1) * n]],
                  list(batch.logprobs[i * n:(i + 1) * n]),
                  list(batch.finish_reasons[i * n:(i + 1) * n]),
                  np.asarray(rewards[i * n:(i + 1) * n], np.float32),
                  np.asarray(raw_rewards[i * n:(i + 1) * n], np.float32))
            for i in range(batch.num_prompts)]


def pad_length(length: int, bucket: int) -> int:
    """Smallest multiple of `bucket` that holds `length` tokens (at least one bucket)."""
    return max(bucket, -(-length // bucket) * bucket)


def build_train_batch(groups: Sequence[Group], advantages: np.ndarray, *, pad_id: int,
                      length_bucket: int, overlong_filter: bool,
                      num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Training rows for `groups` (see the module docstring).

    advantages f32[len(groups) * n]. Responses that hit max length get loss_mask 0 when
    `overlong_filter` (loss.overlong_filter_mask). `num_rows` pads the batch with all-masked rows up to that many (so a
    short batch after dynamic sampling keeps the compiled shape); they carry no loss.
    """
    rows = [(g.prompt_ids, resp, lp, reason)
            for g in groups for resp, lp, reason in zip(g.response_ids, g.logprobs,
                                                        g.finish_reasons)]
    b = len(rows) if num_rows is None else num_rows
    if b < len(rows):
        raise ValueError(f"build_train_batch: num_rows={num_rows} < {len(rows)} rows")
    longest = max((len(p) + len(r) for p, r, _, _ in rows), default=1)
    t = pad_length(longest, length_bucket)
    input_ids = np.full((b, t), pad_id, np.int32)
    loss_mask = np.zeros((b, t), np.float32)
    sampler_logp = np.zeros((b, t), np.float32)
    adv = np.zeros((b,), np.float32)
    truncated = np.zeros((b,), bool)
    adv[: len(rows)] = advantages
    for i, (prompt, resp, lp, reason) in enumerate(rows):
        p, r = len(prompt), len(resp)
        input_ids[i, :p] = prompt
        input_ids[i, p:p + r] = resp
        # Position t predicts token t+1: response token j (at p+j) is predicted at p+j-1.
        sampler_logp[i, p - 1:p - 1 + r] = lp
        loss_mask[i, p - 1:p - 1 + r] = 1.0
        truncated[i] = reason == FINISH_LENGTH
    if overlong_filter:
        loss_mask = np.asarray(loss.overlong_filter_mask(loss_mask, truncated))
    targets = np.concatenate([input_ids[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
    return dict(input_ids=input_ids, targets=targets, loss_mask=loss_mask,
                advantages=adv, sampler_logp=sampler_logp)


def mini_batches(batch: dict[str, np.ndarray], rows_per_mini_batch: int) -> list[dict]:
    """Splits the rows (in order) into equal mini-batches; the last is padded with masked rows."""
    b = next(iter(batch.values())).shape[0]
    count = -(-b // rows_per_mini_batch)
    out = []
    for k in range(count):
        part = {}
        for key, value in batch.items():
            chunk = value[k * rows_per_mini_batch:(k + 1) * rows_per_mini_batch]
            short = rows_per_mini_batch - chunk.shape[0]
            if short:
                fill = np.zeros((short,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, fill])
            part[key] = chunk
        out.append(part)
    return out


def rollout_stats(groups: Sequence[Group], max_len: int) -> dict[str, Any]:
    """Response-length and per-domain reward metrics of the groups kept for training."""
    lengths = np.array([len(r) for g in groups for r in g.response_ids], np.float32)
    truncated = np.array([f == FINISH_LENGTH for g in groups for f in g.finish_reasons])
    out = {}
    if lengths.size:
        out.update({"response_length/mean": float(lengths.mean()),
                    "response_length/max": float(lengths.max()),
                    "response_length/clip_ratio": float(truncated.mean()),
                    "response_length/limit": max_len})
    return out


def reward_stats(records: Sequence[dict], rewards: np.ndarray, n: int,
                 prefix: str = "reward") -> dict[str, float]:
    """Mean/std of rewards f32[P*n] overall and per domain (records has P entries)."""
    r = np.asarray(rewards, np.float32)
    out = {f"{prefix}/mean": float(r.mean()) if r.size else 0.0,
           f"{prefix}/std": float(r.std()) if r.size else 0.0}
    domains = np.repeat([rec.get("domain", "?") for rec in records], n)
    for d in sorted(set(domains.tolist())):
        sel = r[domains == d]
        out[f"{prefix}/{d}/mean"] = float(sel.mean())
        out[f"{prefix}/{d}/std"] = float(sel.std())
    return out
