"""ProRL's own mechanism through the real loop (the demo's Trainer, a few steps): the reference
reset, the reference log-probs, the run config reaching the loss, gradient clipping, and the
reset triggers across a resume.

Each test watches what the jitted update receives (`update_fn` wrapped): the state it starts
from and the mini-batch, with its old and reference log-probs."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from prorl_jax import resets
from prorl_jax import update as update_lib
from prorl_jax.trainer import Trainer
from prorl_jax.update import UpdateConfig
from test_trainer import _KillAt, read_metrics, small_config

pytestmark = pytest.mark.usefixtures("trainer_compile_cache")  # conftest.py


class _Watched(Trainer):
    """Records every call of the jitted update: (host state before, host mini-batch, host
    metrics after)."""

    def _build_step_functions(self):
        super()._build_step_functions()
        inner = self.update_fn
        self.calls = getattr(self, "calls", [])

        def watched(state, mb):
            before = jax.device_get(state)  # before the call: the update donates its input
            state, metrics = inner(state, mb)
            self.calls.append((before, jax.device_get(mb), jax.device_get(metrics)))
            return state, metrics
        self.update_fn = watched


def _adam(opt_state):
    """The ScaleByAdamState inside clip_by_global_norm -> adamw."""
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu"))


def _reference_logp(trainer, params, mb):
    """log pi(targets) under `params` from the model's full logits (float32 log_softmax of
    logits / T): another path than the trainer's chunked fused log-softmax."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    logits = nnx.merge(trainer.graphdef, params)(jnp.asarray(mb["input_ids"]))
    logp = jax.nn.log_softmax(logits / trainer.settings.rollout.temperature, axis=-1)
    return np.take_along_axis(np.asarray(logp), mb["targets"][..., None], -1)[..., 0]


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_reset_copies_the_policy_restarts_adam_and_the_reference_logp_are_the_references(
        tmp_path):
    """Steps 0, 1, reset (interval 2), step 2; two mini-batches a step, a bf16 reference, a
    4-step warm-up."""
    cfg = small_config(**{"total_steps": 3, "reset.interval_steps": 2, "eval.every_steps": 0,
                          "model.ref_dtype": "bfloat16", "optim.warmup_steps": 4})
    trainer = _Watched(cfg, str(tmp_path))
    trainer.run()
    trainer.close()
    calls, lr = trainer.calls, cfg.optim.lr
    assert len(calls) == 6 and [r["trigger"] for r in trainer.reset_history] == ["interval"]
    assert trainer.reset_history[0]["step"] == 2
    start = [calls[0][0], calls[2][0], calls[4][0]]  # the state each step starts from
    # Before the reset: the reference is the initial policy, in bf16, and stays put.
    assert jax.tree.leaves(start[0].ref_params)[0].dtype == ml_dtypes.bfloat16
    assert _leaves_equal(start[0].ref_params, jax.tree.map(
        lambda p: p.astype(ml_dtypes.bfloat16), start[0].params))
    assert _leaves_equal(start[1].ref_params, start[0].ref_params)
    assert int(_adam(start[1].opt_state).count) == 2
    # After the reset: reference = policy cast to bf16, Adam's moments and count zero, and
    # the warm-up starts again (lr 0, lr/4 as at step 0).
    assert not _leaves_equal(start[2].params, start[0].params)
    assert _leaves_equal(start[2].ref_params, jax.tree.map(
        lambda p: p.astype(ml_dtypes.bfloat16), start[2].params))
    adam = _adam(start[2].opt_state)
    assert int(adam.count) == 0
    assert all(not np.any(x) for x in jax.tree.leaves((adam.mu, adam.nu)))
    lrs = [float(m["lr"]) for _, _, m in calls]
    np.testing.assert_allclose(lrs, [0, lr / 4, lr / 2, 3 * lr / 4, 0, lr / 4], rtol=1e-6)
    # The reference log-probs the update gets are the reference's, not the policy's.
    for i in (2, 3, 4):
        state, mb, _ = calls[i]
        mask = mb["loss_mask"] > 0
        want = _reference_logp(trainer, state.ref_params, mb)
        np.testing.assert_allclose(mb["ref_logp"][mask], want[mask], atol=2e-5)
    state, mb, _ = calls[2]  # step 1: the policy has moved away from the reference
    mask = mb["loss_mask"] > 0
    policy = _reference_logp(trainer, state.params, mb)
    np.testing.assert_allclose(mb["old_logp"][mask], policy[mask], atol=2e-5)
    assert np.abs(mb["ref_logp"] - mb["old_logp"])[mask].max() > 1e-3


def test_run_config_reaches_the_loss_and_clipping_bounds_the_gradient(tmp_path, monkeypatch):
    """Every loss field reaches compute_loss as configured (seen where the jitted update
    calls it); the first Adam moment after one step is (1 - b1) * the clipped gradient, whose
    norm is max_grad_norm (Adam's first step itself, lr * sign(g), would hide the scale)."""
    loss_fields = {"eps_low": 0.13, "eps_high": 0.37, "beta": 0.021, "kl_kind": "k2",
                   "agg_mode": "seq-mean-token-mean", "clip_c": 2.5,
                   "entropy_coef": 0.003, "norm_len": 6, "kl_clamp": True,
                   "policy_loss": "gspo", "correction": "icepop", "correction_low": 0.05,
                   "correction_high": 20.0}
    assert set(loss_fields) == {f.name for f in dataclasses.fields(UpdateConfig)
                                if f.metadata["key"].startswith("loss.")}, \
        "a new loss field: add it here with a value that differs from its default"
    cfg = small_config(**{"total_steps": 1, "eval.every_steps": 0,
                          "optim.max_grad_norm": 1e-3, "rollout.temperature": 0.9,
                          "batch.micro_batch_rows": 4, "model.logprob_chunk": 8,
                          **{f"loss.{k}": v for k, v in loss_fields.items()}})
    seen = {}
    real_loss, real_logprobs = update_lib.compute_loss, update_lib.token_logprobs

    def spy_loss(*args, **kwargs):
        seen.setdefault("loss", kwargs)
        return real_loss(*args, **kwargs)

    def spy_logprobs(*args, **kwargs):
        seen.setdefault("logprobs", kwargs)
        return real_logprobs(*args, **kwargs)
    monkeypatch.setattr(update_lib, "compute_loss", spy_loss)
    monkeypatch.setattr(update_lib, "token_logprobs", spy_logprobs)
    trainer = _Watched(cfg, str(tmp_path))
    trainer.run()
    trainer.close()
    assert {k: seen["loss"][k] for k in loss_fields} == loss_fields
    assert seen["logprobs"]["temperature"] == 0.9 and seen["logprobs"]["chunk_size"] == 8
    assert trainer.calls[0][1]["input_ids"].shape[0] == 8  # 2 micro-batches of 4 rows
    grad_norm = float(trainer.calls[0][2]["grad_norm"])
    assert grad_norm > 10 * cfg.optim.max_grad_norm  # clipping is active
    after_first = trainer.calls[1][0]
    mu = _adam(after_first.opt_state).mu
    np.testing.assert_allclose(float(optax.global_norm(mu)),
                               (1 - cfg.optim.b1) * cfg.optim.max_grad_norm, rtol=1e-4)


# (overrides, step during which the run is killed, the straight run's reset triggers).
RESUME_CASES = {
    # A reset before the kill (step 2) and after it (4): the interval counts from the last.
    "interval": ({"reset.interval_steps": 2}, 2, [None, None, resets.INTERVAL, None,
                                                  resets.INTERVAL]),
    # The checkpoint is at stage 1's first step: its boundary reset runs after the resume.
    "stage": ({"stages": "steps=2;steps=1", "total_steps": 3}, 1, [None, None, resets.STAGE]),
    # Validation pass@1 stays 0 (a random policy): no new best for 1 eval -> reset.
    "plateau": ({"reset.plateau_patience": 1, "eval.every_steps": 1}, 2,
                [None, None, resets.PLATEAU, None, resets.PLATEAU]),
    # The step-3 KL (saved with the checkpoint at step 4) fires the reset at step 4.
    "kl": ({"reset.kl_threshold": 0.02}, 3, [None, None, resets.KL, None, resets.KL]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_a_resumed_run_fires_the_resets_a_straight_run_fires(tmp_path, case):
    """Killed during a step (SIGTERM: checkpoint, exit), resumed: the reset history and the
    trigger state come back, so the later resets fire at the same steps."""
    overrides, kill_step, expected = RESUME_CASES[case]
    cfg = small_config(**{"total_steps": 5, "eval.every_steps": 0, **overrides})
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.run()
    straight.close()
    killed = _KillAt(cfg, str(tmp_path / "b"))
    killed.kill_step = kill_step
    killed.run()
    killed.close()
    assert killed.step == kill_step + 1
    resumed = Trainer(cfg, str(tmp_path / "b"))
    resumed.run()
    resumed.close()
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [r.get("reset/trigger") for r in a] == expected
    assert [r.get("reset/trigger") for r in b] == expected
    assert [r["reference_resets"] for r in b] == [r["reference_resets"] for r in a]
    assert resumed.reset_history == straight.reset_history
    assert resumed.resets.state_dict() == straight.resets.state_dict()
