"""The rollout batch of one training step (algorithm.md "One iteration", steps 1-4), built in
generation rounds: draw prompts, roll them out, score each prompt's group as it comes back,
shape the rewards, keep the informative groups (dynamic sampling) and draw more prompts until
the batch is full or `max_generation_rounds` rounds have run.

`BatchBuilder` does this for one step in whichever thread runs it: `start_round` sends a
round's prompts to the engine and hands every finished group to the `GroupScorer` (a thread
over the RewardPool, whose verifiers run in other processes), so the scoring of the first
groups overlaps the generation of the rest; `finish_round` waits for the scores and applies
dynamic sampling; `result` is the `ScoredBatch`. Every round of a batch runs on the same
engine weights (the batch's weight version) with the seed `round_seed(run seed, step, round)`,
so a batch depends only on (seed, step, the prompts drawn, its weights), never on timing.

A ScoredBatch travels in checkpoints as `pack_batch` (numpy arrays, as npz bytes) plus its
`meta` (JSON); the problem records are referred to by (source, index) in the dataset.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

from prorl_jax import batching
from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine


def round_seed(seed: int, step: int, salt: int) -> int:
    """A deterministic 31-bit sampling seed per (run seed, step, round or other salt)."""
    return int(np.random.default_rng([seed, step, salt]).integers(2**31 - 1))


@dataclasses.dataclass
class ScoredBatch:
    """The groups training step `step` trains on, and where they came from.

    weight_version: the policy version (updates applied) that generated every round of it;
    groups: the kept `batching.Group`s; refs: (source, index) of each group's prompt in the
    dataset; stats: its metrics (reward/..., dynamic_sampling/..., response_length/...,
    rollout/generated_tokens, time/rollout, time/reward); data_state: the prompt iterator's
    state right after the batch's last round was drawn.
    """
    step: int
    weight_version: int
    groups: list
    refs: list
    stats: dict
    data_state: dict

    @property
    def staleness(self) -> int:
        """step - weight_version: how many updates behind the trainer its weights are."""
        return self.step - self.weight_version

    def meta(self) -> dict:
        """The JSON part of the batch in a checkpoint (the arrays: `pack_batch`)."""
        return {"step": self.step, "weight_version": self.weight_version,
                "stats": self.stats, "data_state": self.data_state}


class GroupScorer:
    """Scores (records, response ids) in a background thread: whatever is queued when the
    thread is free goes to the scorer in one call (`score_items(records, ids) -> (rewards
    f32[N], failed bool[N])`, e.g. build.RewardScorer.score_items); `submit` returns a
    future of (rewards f32[n], failures int) for its items."""

    def __init__(self, score_items: Callable[[list, list], tuple[np.ndarray, np.ndarray]]):
        self._score_items = score_items
        self._queue: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def submit(self, records: Sequence[dict], response_ids: Sequence[Sequence[int]]
               ) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("GroupScorer.submit: the scorer is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="reward-scorer",
                                            daemon=True)
            self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((list(records), list(response_ids), future))
        return future

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            stop = any(item is None for item in items)
            items = [item for item in items if item is not None]
            if items:
                self._score(items)
            if stop:
                return

    def _score(self, items: list) -> None:
        records = [r for recs, _, _ in items for r in recs]
        responses = [ids for _, resp, _ in items for ids in resp]
        try:
            rewards, failed = self._score_items(records, responses)
        except BaseException as e:  # the waiting round re-raises it
            for _, _, future in items:
                future.set_exception(e)
            return
        start = 0
        for recs, _, future in items:
            end = start + len(recs)
            future.set_result((rewards[start:end], int(failed[start:end].sum())))
            start = end

    def close(self) -> None:
        """Scores what is queued, then stops the thread."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)


@dataclasses.dataclass
class _Round:
    prompts: list          # data.Prompt, the round's P prompts
    parts: list            # one-prompt RolloutBatch per prompt, in prompt order
    scores: list           # a GroupScorer future per prompt


class BatchBuilder:
    """Builds the ScoredBatch of step `step` with weight version `version` (see the module
    docstring). settings: the config.Settings of the step's stage; prompts: the
    data.PromptIterator the rounds draw from; scorer: a GroupScorer."""

    def __init__(self, step: int, version: int, settings, *, seed: int, prompts,
                 scorer: GroupScorer, stop_ids: Sequence[int]):
        self.step, self.version, self.settings = step, version, settings
        self.seed, self.prompts, self.scorer, self.stop_ids = seed, prompts, scorer, stop_ids
        self.kept, self.refs, self.stats = [], [], {}
        self.rounds = self.generated = self.tokens = 0
        self.rollout_s = self.reward_s = 0.0
        self.done = False
        self._round: Optional[_Round] = None

    def start_round(self, engine: RolloutEngine) -> None:
        """Draws the round's prompts and generates them; each prompt's group goes to the
        scorer as the engine returns it. Returns when the whole round is generated."""
        r = self.settings.rollout
        prompts = self.prompts.next_batch(self.settings.batch.prompts_per_round)
        start = time.perf_counter()
        parts, scores = {}, {}
        for i, part in engine.generate_groups(
                [p.prompt_ids for p in prompts], n=r.n, temperature=r.temperature,
                top_p=r.top_p, max_new_tokens=r.max_response_tokens,
                stop_token_ids=self.stop_ids,
                seed=round_seed(self.seed, self.step, self.rounds)):
            parts[i] = part
            scores[i] = self.scorer.submit([prompts[i].record] * r.n, part.token_ids)
        if sorted(parts) != list(range(len(prompts))):
            raise RuntimeError(f"engine.generate_groups returned groups {sorted(parts)} for "
                               f"{len(prompts)} prompts")
        self.rollout_s += time.perf_counter() - start
        self._round = _Round(prompts, [parts[i] for i in range(len(prompts))],
                             [scores[i] for i in range(len(prompts))])

    def finish_round(self) -> bool:
        """Waits for the round's scores, shapes them, keeps the informative groups; True when
        the batch is complete (full, no dynamic sampling, or out of rounds)."""
        rnd, self._round = self._round, None
        r, b = self.settings.rollout, self.settings.batch
        start = time.perf_counter()
        scored = [future.result() for future in rnd.scores]
        raw = np.concatenate([rewards for rewards, _ in scored]).astype(np.float32)
        rollout = RolloutBatch.join(rnd.parts)
        shaped = batching.shape_rewards(raw, rollout.response_lengths, rollout.truncated,
                                        max_len=r.max_response_tokens, cfg=self.settings.reward)
        records = [p.record for p in rnd.prompts]
        groups = batching.split_groups(rollout, records, shaped, raw)
        self.reward_s += time.perf_counter() - start
        if self.rounds == 0:  # the policy's own performance, before any filtering
            self.stats.update(batching.reward_stats(records, raw, r.n))
            self.stats.update(batching.rollout_stats(groups, r.max_response_tokens))
            self.stats["reward/failures"] = sum(failures for _, failures in scored)
        self.rounds += 1
        self.generated += len(groups)
        self.tokens += int(rollout.response_lengths.sum())
        refs = [(p.source, p.index) for p in rnd.prompts]
        if b.dynamic_sampling:
            keep = batching.informative_groups(shaped, r.n)
            groups = [g for g, k in zip(groups, keep) if k]
            refs = [ref for ref, k in zip(refs, keep) if k]
        room = b.prompts_per_step - len(self.kept)
        self.kept.extend(groups[:room])
        self.refs.extend(refs[:room])
        self.done = (not b.dynamic_sampling or len(self.kept) >= b.prompts_per_step
                     or self.rounds >= b.max_generation_rounds)
        return self.done

    def result(self, data_state: dict) -> ScoredBatch:
        """The finished batch; data_state: the iterator's state now (after its last draw)."""
        pps = self.settings.batch.prompts_per_step
        self.stats.update({"dynamic_sampling/rounds": self.rounds,
                           "dynamic_sampling/kept_groups": len(self.kept),
                           "dynamic_sampling/dropped_frac":
                               1.0 - len(self.kept) / max(self.generated, 1),
                           "rollout/generated_tokens": self.tokens,
                           "time/rollout": round(self.rollout_s, 4),
                           "time/reward": round(self.reward_s, 4)})
        if len(self.kept) < pps:
            logging.info("step %d: %d of %d groups after %d generation rounds; training on "
                         "what survived", self.step, len(self.kept), pps, self.rounds)
        return ScoredBatch(self.step, self.version, self.kept, self.refs, self.stats,
                           data_state)

    def run(self, engine: RolloutEngine) -> ScoredBatch:
        """Every round, one after the other; the finished batch."""
        self.start_round(engine)
        while not self.finish_round():
            self.start_round(engine)
        return self.result(self.prompts.state_dict())


# ---- checkpoints ---------------------------------------------------------------------------

def _ragged(rows: Sequence[Sequence], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated values, lengths int32[len(rows)])."""
    lengths = np.array([len(r) for r in rows], np.int32)
    flat = [np.asarray(r, dtype) for r in rows]
    return (np.concatenate(flat) if flat else np.zeros((0,), dtype)), lengths


def _split(values: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def pack_batch(batch: ScoredBatch) -> np.ndarray:
    """The batch's arrays as npz bytes (uint8[...]; Orbax refuses zero-size arrays, an npz of
    an empty batch is not empty): prompt and response tokens int32, sampler log-probs f32,
    shaped and raw rewards f32, truncation flags, the groups' (source, index)."""
    groups = batch.groups
    prompts, prompt_lens = _ragged([g.prompt_ids for g in groups], np.int32)
    responses, response_lens = _ragged([r for g in groups for r in g.response_ids], np.int32)
    logprobs, _ = _ragged([lp for g in groups for lp in g.logprobs], np.float32)
    arrays = dict(
        n=np.int32(len(groups[0].rewards) if groups else 0), prompt_tokens=prompts,
        prompt_lens=prompt_lens, response_tokens=responses, response_lens=response_lens,
        logprobs=logprobs,
        truncated=np.array([f == FINISH_LENGTH for g in groups for f in g.finish_reasons], bool),
        rewards=np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0, np.float32),
        raw_rewards=(np.concatenate([g.raw_rewards for g in groups]) if groups
                     else np.zeros(0, np.float32)),
        refs=np.array(batch.refs, np.int32).reshape(-1, 2))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return np.frombuffer(buf.getvalue(), np.uint8)


def unpack_batch(blob: np.ndarray, meta: dict, dataset) -> ScoredBatch:
    """The ScoredBatch of `pack_batch(batch)` and `batch.meta()`; records from `dataset` (a
    data.PromptDataset) by (source, index)."""
    with np.load(io.BytesIO(np.asarray(blob, np.uint8).tobytes())) as z:
        a = {k: z[k] for k in z.files}
    n = int(a["n"])
    prompts = _split(a["prompt_tokens"], a["prompt_lens"])
    responses = _split(a["response_tokens"], a["response_lens"])
    logprobs = _split(a["logprobs"], a["response_lens"])
    refs = [(int(s), int(j)) for s, j in a["refs"]]
    groups = []
    for g, (source, index) in enumerate(refs):
        rows = slice(g * n, (g + 1) * n)
        groups.append(batching.Group(
            dataset.sources[source].records[index], prompts[g].tolist(),
            [r.tolist() for r in responses[rows]], [lp.copy() for lp in logprobs[rows]],
            [FINISH_LENGTH if t else FINISH_STOP for t in a["truncated"][rows]],
            a["rewards"][rows].copy(), a["raw_rewards"][rows].copy()))
    return ScoredBatch(int(meta["step"]), int(meta["weight_version"]), groups, refs,
                       dict(meta["stats"]), dict(meta["data_state"]))

