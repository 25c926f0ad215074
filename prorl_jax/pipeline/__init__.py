"""The rollout pipeline: the scored batches of the training steps, generated up to
rollout.max_staleness steps ahead (schedule.py: the schedule, the checkpoint rule;
batches.py: one batch's rounds, scoring and dynamic sampling; threaded.py: the producer
thread for external engines).

What overlaps with what:
  vLLM servers, k >= 1: generation and scoring of the next batches overlap the trainer's
      log-probs and updates (a producer thread); within a round each prompt's group is
      scored while the others generate. The weights reach the servers when a batch needs
      them: the servers stop for the sync (write + reload) only.
  vLLM servers, k = 0: the synchronous loop; scoring still overlaps the round's generation.
  embedded JaxSampler (the trainer's devices), k >= 1: only scoring and host work overlap
      training - the first round of batch t + k is generated before step t's update and
      scored in the reward pool's processes while it runs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from absl import logging

from prorl_jax.pipeline.batches import BatchBuilder, GroupScorer, ScoredBatch, round_seed
from prorl_jax.pipeline.schedule import InlinePipeline, Pipeline, StaleBatchError
from prorl_jax.pipeline.threaded import ThreadedPipeline, host_copy
from prorl_jax.rollout.base import RolloutEngine

__all__ = ["BatchBuilder", "GroupScorer", "InlinePipeline", "Pipeline", "ScoredBatch",
           "StaleBatchError", "ThreadedPipeline", "check_correction", "host_copy",
           "make_pipeline", "round_seed"]


def make_pipeline(engine: RolloutEngine, prompts, score_items: Callable,
                  settings_at: Callable[[int], Any], *, max_staleness: int, total_steps: int,
                  seed: int, stop_ids: Sequence[int], host_dtype=None) -> Pipeline:
    """The schedule for this engine: InlinePipeline at k = 0 and for the embedded JaxSampler
    (its copies of the weights in its compute dtype), ThreadedPipeline otherwise (process 0
    drives the servers of a ProcessZeroEngine; host copies in `host_dtype`)."""
    from prorl_jax.rollout.jax_sampler import JaxSampler
    from prorl_jax.rollout.multihost import ProcessZeroEngine
    from prorl_jax.train_state import cast_tree

    common = dict(max_staleness=max_staleness, total_steps=total_steps, seed=seed,
                  stop_ids=stop_ids)
    if max_staleness == 0 or isinstance(engine, JaxSampler):
        copy = None  # k = 0 syncs the engine itself
        if isinstance(engine, JaxSampler):
            copy = lambda params: cast_tree(params, engine.compute_dtype)  # noqa: E731
        return InlinePipeline(engine, prompts, score_items, settings_at, copy_weights=copy,
                              **common)
    producer = engine
    if isinstance(engine, ProcessZeroEngine):
        producer = engine.engine if engine.is_zero else None
    return ThreadedPipeline(engine, prompts, score_items, settings_at, producer_engine=producer,
                            host_dtype=host_dtype, broadcast=jax.process_count() > 1, **common)


def check_correction(max_staleness: int, correction: str) -> None:
    """Warns when k >= 1 meets loss.correction "none": the samples then come from a policy
    up to k updates older than the one the update starts from, and nothing corrects for it
    (algorithm.md: decoupled PPO weights the policy term by pi_prox / pi_behav - "tis" - or
    masks by it - "icepop" / "seq_mask" - on the sampler's log-probs). Not changed silently:
    an uncorrected asynchronous run is a legitimate ablation."""
    if max_staleness > 0 and correction == "none":
        logging.warning("rollout.max_staleness=%d with loss.correction='none': the rollouts of "
                        "a step come from weights up to %d update(s) old and the loss does not "
                        "correct for it; consider loss.correction='tis' (or 'icepop')",
                        max_staleness, max_staleness)
