"""The ProRL training loop, in the order of shared/docs/algorithm.md:

    a scored batch (prompts, rollouts, rewards, dynamic sampling: prorl_jax.pipeline)
    -> advantages -> old and reference log-probs -> mini-batch updates -> publish the new
    weights -> metrics -> maybe validate, reset the reference, checkpoint.

With rollout.max_staleness = k >= 1 the pipeline generates the batches of the next k steps
while this one trains (the batch of step t by the weights after max(0, t - k) updates).

`Trainer(cfg, workdir).run()` trains for `cfg.total_steps` steps over the config's stages,
resuming from the workdir's latest checkpoint when there is one. Each stage's run config is
turned once into `config.Settings` (every component's self-validating dataclass); the loop
reads those, never the raw config.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prorl_jax import batching, build, evaluation, resets
from prorl_jax import config as config_lib
from prorl_jax import pipeline as pipeline_lib
from prorl_jax.checkpoint import Checkpointer
from prorl_jax.metrics import MetricsWriter, PhaseTimer, console_line
from prorl_jax.models import config_to_hf
from prorl_jax.rollout.vllm_sync import WeightSyncError
from prorl_jax.sharding import (MeshConfig, global_batch, host_row_slice, make_mesh,
                                tree_shardings)
from prorl_jax.train_state import (abstract_state, init_train_state, make_optimizer,
                                   make_schedule, reset_reference, split_params)
from prorl_jax.update import make_logprob_fn, make_train_step

_UPDATE_METRICS = {"pg_loss": "loss/policy", "loss": "loss/total", "kl": "kl",
                   "entropy": "entropy", "clip_frac_upper": "clip_frac/upper",
                   "clip_frac_lower": "clip_frac/lower", "clip_frac_dual": "clip_frac/dual",
                   "approx_kl": "approx_kl", "grad_norm": "grad_norm", "lr": "lr",
                   **{k: k for k in ("correction/masked_frac", "correction/weight_mean",
                                     "correction/mismatch_abs", "correction/mismatch_k3")}}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    """Owns the run's state; `run()` is the loop, `train_step(step)` one iteration."""

    def __init__(self, cfg, workdir: str):
        config_lib.validate(cfg)
        self.base_cfg, self.workdir = cfg, workdir
        self.stages = config_lib.parse_stages(cfg)
        self.total_steps = config_lib.RunConfig.from_config(cfg).total_steps
        self.is_main = jax.process_index() == 0
        self.tokenizer = build.load_tokenizer(cfg)
        self.stop_ids = build.stop_token_ids(self.tokenizer)
        self.pad_id = build.pad_token_id(self.tokenizer)
        self.mesh = _make_mesh(MeshConfig.from_config(cfg))
        model = build.build_model(cfg, self.tokenizer)
        self.model_config = model.config
        self.graphdef, params = split_params(model)
        params = jax.device_put(params, tree_shardings(params, self.mesh))
        self.stage_index = -1
        self._enter_stage(0)
        self.state = init_train_state(params, self.tx, ref_dtype=self.settings.precision.ref_dtype)
        self.state_shardings = tree_shardings(self.state, self.mesh)
        self._build_step_functions()
        self.train_data, self.val_data = build.build_datasets(cfg, self.tokenizer)
        self.stage_settings = [config_lib.settings(config_lib.stage_config(cfg, self.stages, i))
                               for i in range(len(self.stages))]
        longest = max(s.rollout.max_response_tokens for s in self.stage_settings)
        self.engine = build.build_engine(cfg, model, self.mesh, pad_id=self.pad_id,
                                         workdir=workdir, max_new_tokens=longest)
        self.score = build.RewardScorer(cfg, self.tokenizer)
        k = self.settings.rollout.max_staleness
        self.pipeline = pipeline_lib.make_pipeline(
            self.engine, self.train_data.iterator(), self.score.score_items, self.settings_at,
            max_staleness=k, total_steps=self.total_steps, seed=self.settings.run.seed,
            stop_ids=self.stop_ids, host_dtype=build.host_weights_dtype(cfg))
        self.pipeline.publish(self.state.params, 0)
        self.resets = resets.ResetTracker.from_config(self.settings.reset)
        self.reset_history: list[dict] = []
        self.step, self.last_kl, self.bad_steps = 0, None, 0
        ck = self.settings.checkpoint
        self.checkpoints = Checkpointer(f"{workdir}/checkpoints", keep_last=ck.keep_last,
                                        keep_every=ck.keep_every, async_save=ck.async_save)
        self._stop_signal: Optional[int] = None

    # -- set-up ----------------------------------------------------------------------------

    def _enter_stage(self, index: int) -> None:
        """Switches to stage `index`'s config (its overrides), settings and optimizer."""
        self.stage_index = index
        self.cfg = config_lib.stage_config(self.base_cfg, self.stages, index)
        self.settings = config_lib.settings(self.cfg)
        self.tx = make_optimizer(self.settings.optim)
        self.schedule = make_schedule(self.settings.optim)
        pipeline_lib.check_correction(self.settings.rollout.max_staleness,
                                      self.settings.update.correction)

    def settings_at(self, step: int) -> config_lib.Settings:
        """The settings of training step `step`'s stage (what its rollout batch is made with)."""
        return self.stage_settings[config_lib.stage_at(self.stages, step)]

    def _build_step_functions(self) -> None:
        upd = self.settings.update
        self.update_fn = make_train_step(self.graphdef, self.tx, self.schedule, upd,
                                         mesh=self.mesh, state_shardings=self.state_shardings)
        self.policy_logprobs = make_logprob_fn(self.graphdef, upd, mesh=self.mesh,
                                               param_shardings=self.state_shardings.params)
        self.ref_logprobs = make_logprob_fn(self.graphdef, upd, mesh=self.mesh,
                                            param_shardings=self.state_shardings.ref_params)

    # -- one iteration (algorithm.md, "One iteration") ---------------------------------------

    def train_step(self, step: int) -> dict[str, Any]:
        """One ProRL iteration; returns its metrics."""
        timer, start = PhaseTimer(), time.perf_counter()
        with timer("wait_rollout"):                           # 1-4: prompts, rollouts, scores,
            batch = self._next_batch(step)                    # dynamic sampling (the pipeline)
        metrics = {**batch.stats, **self.pipeline.batch_metrics(batch)}
        if not batch.groups:
            return self._skipped(step, metrics, timer, "every group had equal rewards")
        adv = self.advantages(batch.groups)                   # 5: group-normalised advantages
        minis, tokens = self.mini_batches(batch.groups, adv)  # 8: the mini-batches
        if not minis:
            return self._skipped(step, metrics, timer, "no response token counts in the loss")
        with timer("logprobs"):                               # 6, 7: old and reference log-probs
            self.add_logprobs(minis)
        with timer("update"):                                 # 8: one optimizer step each
            updates = self.update(minis)
        with timer("sync"):                                   # the pipeline gets the new policy
            self._sync_weights(step + 1)
        metrics.update(_mean_update_metrics(updates, tokens))
        metrics["loss_tokens"] = sum(tokens)
        metrics.update(_mismatch_metrics(minis))
        metrics.update({"advantage/mean": float(adv.mean()), "advantage/std": float(adv.std()),
                        "advantage/abs_mean": float(np.abs(adv).mean())})
        elapsed = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["rollout/generated_tokens"] / max(elapsed, 1e-9)
        metrics.update(timer.pop())
        return metrics

    def _next_batch(self, step: int):
        """The pipeline's batch of `step`; a failed weight sync on its way stops the run."""
        try:
            return self.pipeline.next_batch(step)
        except WeightSyncError as e:  # (k >= 1: the producer syncs the servers)
            self._stop_on_sync_error(step, e)

    def advantages(self, groups) -> np.ndarray:
        """f32[groups * n]: the advantages of the kept groups' shaped rewards."""
        return batching.advantages(groups, self.settings.rollout.n, self.settings.advantage,
                                   overlong_filter=self.settings.reward.overlong_filter)

    def mini_batches(self, groups, adv: np.ndarray) -> tuple[list[dict], list[float]]:
        """(device mini-batches, their loss-token counts). Mini-batches made only of padding
        rows (dynamic sampling came up short) are left out: an optimizer step on them would
        still decay the weights and Adam's moments."""
        b, n = self.settings.batch, self.settings.rollout.n
        full = batching.build_train_batch(
            groups, adv, pad_id=self.pad_id, length_bucket=b.length_bucket,
            overlong_filter=self.settings.reward.overlong_filter,
            num_rows=b.prompts_per_step * n)
        host = [m for m in batching.mini_batches(full, b.mini_batch_prompts * n)
                if m["loss_mask"].any()]
        return [self._device_batch(m) for m in host], [float(m["loss_mask"].sum()) for m in host]

    def _device_batch(self, mini: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        rows = mini["input_ids"].shape[0]
        local = {k: v[host_row_slice(rows)] for k, v in mini.items()}
        return global_batch(local, self.mesh)

    def add_logprobs(self, minis: list[dict]) -> None:
        """Adds old_logp (pi_old), ref_logp (pi_ref) and trainer_logp to every mini-batch, all
        before the first update: pi_old is the policy the step starts from (the proximal
        policy; the sampler's, which may be older, is sampler_logp, used by loss.correction),
        or the engine's own log-probs with rollout.old_logp_source="sampler"."""
        sampler_old = self.settings.rollout.old_logp_source == "sampler"
        for mb in minis:
            mb["trainer_logp"], _ = self.policy_logprobs(self.state.params, mb)
            mb["ref_logp"], _ = self.ref_logprobs(self.state.ref_params, mb)
            mb["old_logp"] = mb["sampler_logp"] if sampler_old else mb["trainer_logp"]
        jax.block_until_ready(minis)

    def update(self, minis: list[dict]) -> list[dict]:
        """One optimizer step per mini-batch; returns their metrics."""
        updates = []
        for mb in minis:
            self.state, m = self.update_fn(self.state, mb)
            updates.append(m)
        jax.block_until_ready(self.state)  # async dispatch: charge the time to this phase
        return updates

    def _sync_weights(self, version: int, changed: bool = True) -> None:
        """Publishes the policy as weight `version` (the engine serves it when a batch needs
        it: at once with k = 0); a failed sync stops the run (`_stop_on_sync_error`)."""
        try:
            self.pipeline.publish(self.state.params, version, changed=changed)
        except WeightSyncError as e:
            self._stop_on_sync_error(version, e)

    def _stop_on_sync_error(self, version: int, e: WeightSyncError) -> None:
        """Servers on other or unknown weights: a checkpoint of version `version` (this
        step's state), then an error naming them."""
        self.step = version
        self.save(version)
        self.checkpoints.wait_until_finished()
        raise WeightSyncError(f"{e}. Stopped with a checkpoint of step {version} in "
                              f"{self.workdir}/checkpoints: restart the server(s) named and "
                              f"resume", e.servers) from e

    def _skipped(self, step: int, metrics: dict, timer: PhaseTimer, why: str) -> dict:
        logging.warning("step %d: %s; no update", step, why)
        self._sync_weights(step + 1, changed=False)  # the same weights, as version step + 1
        return {**metrics, **timer.pop(), "skipped": 1}

    # -- between iterations: stages, resets, validation, checkpoints -------------------------

    def enter_stage_at(self, step: int) -> bool:
        """Switches to the stage of training step `step` if it is not the current one; True
        when `step` is the first step of a stage after the first (a stage boundary)."""
        index = config_lib.stage_at(self.stages, step)
        if index != self.stage_index:
            self._enter_stage(index)
            self._build_step_functions()
        return index > 0 and step == sum(s.steps for s in self.stages[:index])

    def maybe_reset(self, step: int, *, stage_start: bool = False,
                    manual: bool = False) -> Optional[dict]:
        """Hard-resets the reference before step `step` when a trigger fires (or `manual`);
        returns the reset's record, or None."""
        on_boundary = stage_start and self.settings.reset.on_stage_boundary
        trigger = resets.MANUAL if manual else self.resets.check_step(
            step, kl=self.last_kl, stage_start=on_boundary)
        if trigger is None:
            return None
        return self.reset_reference(step, trigger)

    def reset_reference(self, step: int, trigger: str) -> dict:
        """pi_ref <- pi_theta and a fresh optimizer state (ProRL); recorded in the history."""
        self.state, record = reset_reference(self.state, self.tx, step=step, trigger=trigger,
                                             metrics={"kl": self.last_kl or 0.0})
        self.reset_history.append(record)
        self.resets.record_reset(step)
        logging.warning("step %d: reference reset (%s)", step, trigger)
        return record

    def validate(self, step: int) -> dict[str, float]:
        if self.val_data is None:
            return {}
        e, r = self.settings.eval, self.settings.rollout
        prompts = self.val_data.all_prompts()[: e.max_problems]
        with self.pipeline.engine_at(self.state.params, step) as engine:
            out = evaluation.validate(
                engine, prompts, self.score, n=e.n_samples, k_values=e.ks,
                temperature=e.temperature, top_p=r.top_p, max_new_tokens=r.max_response_tokens,
                stop_token_ids=self.stop_ids,
                seed=pipeline_lib.round_seed(self.settings.run.seed, step, 997),
                batch_prompts=self.settings.batch.prompts_per_step)
        if "val/pass@1" in out:
            self.resets.record_validation(out["val/pass@1"])
        return out

    def maybe_validate(self, step: int) -> dict[str, float]:
        """Validation metrics after `step` steps when it is due (every eval.every_steps and at
        the end), else {}."""
        every = self.settings.eval.every_steps
        if not every or (step % every and step != self.total_steps):
            return {}
        start = time.perf_counter()
        out = self.validate(step)
        out["time/validate"] = time.perf_counter() - start
        return out

    def save(self, step: int) -> None:
        """A checkpoint of step `step`: the state, the counters and the pipeline's finished
        batches of steps step .. step+k-1 (those in flight are waited for)."""
        if self.checkpoints.latest_step() == step:
            return
        data, pipeline, batches = self.pipeline.state_dict(step)
        extra = {"data": data, "pipeline": pipeline, "resets": self.reset_history,
                 "reset_tracker": self.resets.state_dict(), "last_kl": self.last_kl,
                 "bad_steps": self.bad_steps, "config": self.base_cfg.to_dict(),
                 "model": config_to_hf(self.model_config)}
        self.checkpoints.save(step, self.state, extra, batches=batches)

    def restore(self) -> bool:
        """Restores the latest checkpoint in the workdir, if any; True if it did. The stage
        of the restored step is entered by the loop (with its boundary reset if it is due)."""
        step = self.checkpoints.latest_step()
        if step is None:
            return False
        self.state, extra = self.checkpoints.restore(
            abstract_state(self.state, self.state_shardings), step=step)
        meta = extra.get("pipeline")
        batches = self.checkpoints.restore_batches(step) if meta and meta["batches"] else {}
        self.pipeline.load_state_dict(step, extra["data"], meta, batches)
        self.reset_history = list(extra["resets"])
        self.resets.load_state_dict(extra["reset_tracker"])
        self.last_kl, self.bad_steps, self.step = extra["last_kl"], extra["bad_steps"], step
        self.pipeline.publish(self.state.params, step)
        logging.warning("resumed from step %d", step)
        return True

    def _on_signal(self, signum, frame) -> None:
        logging.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
        self._stop_signal = signum

    def run(self, *, reset_on_resume: bool = False) -> dict[str, Any]:
        """Trains to total_steps; returns the last step's metrics."""
        resumed = self.restore()
        writer = MetricsWriter(self.workdir, tensorboard=self.settings.run.tensorboard,
                               truncate_after=self.step, is_main=self.is_main)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        manual = resumed and (reset_on_resume or self.settings.reset.on_resume)
        t0, done, metrics = time.perf_counter(), 0, {}
        try:
            while self.step < self.total_steps and self._stop_signal is None:
                step = self.step
                stage_start = self.enter_stage_at(step)
                record = self.maybe_reset(step, stage_start=stage_start, manual=manual)
                manual = False
                metrics = self.train_step(step)
                self._check_finite(step, metrics)
                self.last_kl = metrics.get("kl")
                self.step = step + 1
                metrics.update({"stage": self.stage_index,
                                "reference_resets": len(self.reset_history)})
                if record is not None:
                    metrics["reset/trigger"] = record["trigger"]
                metrics.update(self.maybe_validate(self.step))
                writer.write(self.step, metrics)
                done += 1
                self._log(metrics, time.perf_counter() - t0, done)
                every = self.settings.checkpoint.every_steps
                if every and self.step % every == 0:
                    self.save(self.step)
            self.save(self.step)
        finally:
            self.checkpoints.wait_until_finished()
            writer.close()
            for s, handler in old.items():
                signal.signal(s, handler)
        return metrics

    def _log(self, metrics: dict, elapsed_s: float, done: int) -> None:
        if self.is_main and (self.step % self.settings.run.log_every_steps == 0
                             or self.step == 1):
            print(console_line(self.step, self.total_steps, metrics, elapsed_s, done),
                  flush=True)

    def _check_finite(self, step: int, metrics: dict) -> None:
        if metrics.get("nonfinite", 0) > 0:
            self.bad_steps += 1
            logging.warning("step %d: non-finite loss or gradient; update not applied (%d in a "
                            "row)", step, self.bad_steps)
            limit = self.settings.run.max_nonfinite_steps
            if self.bad_steps >= limit:
                self.save(self.step)
                self.checkpoints.wait_until_finished()
                raise NonFiniteError(
                    f"{self.bad_steps} consecutive steps with a non-finite loss or gradient "
                    f"(config.max_nonfinite_steps={limit}); stopped at "
                    f"step {step} with the last good weights saved in "
                    f"{self.workdir}/checkpoints (step {self.step})")
        else:
            self.bad_steps = 0

    def close(self) -> None:
        self.pipeline.close()
        self.score.close()
        self.engine.close()


def _make_mesh(mesh_cfg: MeshConfig):
    """The run's mesh; a fully specified mesh smaller than a one-process machine takes the
    first devices (e.g. the 1-device demo on a host with 8 CPU devices)."""
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    wanted = int(np.prod(sizes))
    if -1 not in sizes and jax.process_count() == 1 and wanted < jax.device_count():
        return make_mesh(mesh_cfg, devices=jax.devices()[:wanted])
    return make_mesh(mesh_cfg)


def _mean_update_metrics(updates: list[dict], tokens: list[float]) -> dict[str, float]:
    """Metrics of the step's mini-batch updates, weighted by their loss tokens."""
    host = jax.device_get(updates)
    weights = np.asarray(tokens, np.float64) / max(sum(tokens), 1.0)
    out = {}
    for key, name in _UPDATE_METRICS.items():
        if all(key in u for u in host):
            out[name] = float(sum(w * float(u[key]) for w, u in zip(weights, host)))
    out["nonfinite"] = float(sum(float(u.get("nonfinite", 0)) for u in host))
    return out


@jax.jit
def _mismatch_sums(trainer_logp, sampler_logp, mask):
    diff = trainer_logp - sampler_logp
    ratio = jnp.exp(jnp.clip(diff, -20.0, 20.0))
    outside = (ratio < 0.9) | (ratio > 1.1)
    return jnp.sum(jnp.abs(diff) * mask), jnp.sum(outside * mask), jnp.sum(mask)


def _mismatch_metrics(minis: list[dict]) -> dict[str, float]:
    """Sampler vs trainer log-prob mismatch on the loss tokens (bf16/engine numerics)."""
    sums = [_mismatch_sums(mb["trainer_logp"], mb["sampler_logp"], mb["loss_mask"])
            for mb in minis]
    abs_sum, outside, total = (float(sum(float(s[i]) for s in sums)) for i in range(3))
    if total == 0:
        return {}
    return {"logp_mismatch/abs_mean": abs_sum / total,
            "logp_mismatch/ratio_outside_0.9_1.1": outside / total}
