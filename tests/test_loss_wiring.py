"""The new loss options wired end to end: config fields (the v2 preset, validation naming the
field), reward shaping with the cosine length penalty, advantages by estimator, the update with
an off-policy correction (its denominator is the corrected mask of the whole mini-batch), and a
short loop with ProRL v2's algorithm."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import prorl
from fixtures.launcher import load_launcher
from prorl_jax import batching
from prorl_jax import config as config_lib
from prorl_jax import sharding as S
from prorl_jax import update as U
from prorl_jax.rollout.base import RolloutBatch
from prorl_jax.trainer import Trainer
from test_loss_variants import ref_reinforce_pp
from test_trainer import read_metrics, small_config
from test_update import numpy_logprobs
from train_helpers import (FAST_COMPILE, UPDATE_CFG, fresh_state, graphdef_and_tx, make_batch,
                           mesh_for)


# ----------------------------------------------------------------------------- config
def test_v2_preset_is_algorithm_md_s_recipe():
    cfg = prorl.get_config("v2")
    config_lib.validate(cfg)
    s = config_lib.settings(cfg)
    assert s.advantage.estimator == "reinforce_pp_baseline"
    u = s.update
    assert (u.policy_loss, u.eps_low, u.eps_high, u.agg_mode) == ("ppo", 0.2, 0.27, "token-mean")
    assert (u.kl_kind, u.kl_clamp, u.beta) == ("k2", True, 1e-4)
    assert (u.correction, u.correction_bounds()) == ("icepop", (0.5, 5.0))
    assert s.rollout.old_logp_source == "trainer"
    assert s.batch.dynamic_sampling and s.batch.max_generation_rounds == 10
    assert s.batch.prompts_per_round == 768 and s.batch.prompts_per_step == 512
    assert s.rollout.n == 16 and s.rollout.max_response_tokens == 8192
    assert s.reward.truncated_reward == 0.0 and not s.reward.overlong_filter
    assert s.optim.lr == 1e-6 and s.reward.length_penalty == "cosine"
    stages = config_lib.parse_stages(cfg)
    coefs = [config_lib.settings(config_lib.stage_config(cfg, stages, i)).reward
             .length_penalty_coef for i in range(len(stages))]
    assert coefs == [0.0, 0.5, 1.0] and s.reset.on_stage_boundary
    config_lib.validate(prorl.get_config("v2_demo"))


@pytest.mark.parametrize("overrides,match", [
    ({"loss.correction": "clip"}, r"config.loss.correction='clip': expected one of \['none'"),
    ({"loss.policy_loss": "grpo"}, r"config.loss.policy_loss='grpo'"),
    ({"loss.adv_estimator": "ppo"}, r"config.loss.adv_estimator='ppo'"),
    ({"loss.kl_kind": "k2+"}, r"config.loss.kl_kind='k2\+'"),
    ({"reward.length_penalty": "linear"}, r"config.reward.length_penalty='linear'"),
    ({"reward.length_penalty_coef": 1.5}, r"config.reward.length_penalty_coef=1.5: expected in"),
    ({"batch.oversample": 0.5}, r"config.batch.oversample=0.5: expected >= 1"),
    ({"loss.correction_high": 0.0}, r"config.loss.correction_high=0.0: expected > 0"),
    ({"loss.policy_loss": "gspo"}, r"policy_loss='gspo'.*agg_mode='seq-mean-token-mean'"),
    ({"loss.policy_loss": "cispo", "loss.clip_c": 3.0}, r"clip_c=3.0: the dual clip"),
    ({"loss.correction": "icepop", "loss.correction_low": 6.0},
     r"correction_low=6.0 must not exceed config.loss.correction_high=5.0"),
    ({"loss.correction": "tis", "rollout.old_logp_source": "sampler"},
     r"correction='tis'.*needs config.rollout.old_logp_source='trainer'"),
])
def test_bad_or_inconsistent_fields_are_named(overrides, match):
    cfg = prorl.get_config()
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        cfg[parent][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(cfg)


def test_new_fields_are_read_from_their_keys_and_norm_len_0_is_the_response_limit():
    cfg = prorl.get_config()
    cfg.loss.update(policy_loss="cispo", correction="tis", correction_low=0.25,
                    correction_high=3.0, kl_clamp=True, kl_kind="k1+", adv_estimator="rloo",
                    agg_mode="seq-mean-token-sum-norm")
    cfg.reward.update(length_penalty="cosine", length_penalty_coef=0.3,
                      cosine_correct_threshold=0.9, cosine_correct_start=2.0,
                      cosine_correct_end=1.5, cosine_wrong_start=-0.1, cosine_wrong_end=-0.7)
    cfg.batch.oversample = 1.25
    s = config_lib.settings(cfg)
    assert (s.update.policy_loss, s.update.correction, s.update.kl_kind) == ("cispo", "tis", "k1+")
    assert s.update.correction_bounds() == (None, 3.0) and s.update.kl_clamp
    assert s.advantage.estimator == "rloo" and s.batch.prompts_per_round == 320
    w = s.reward
    assert (w.length_penalty, w.length_penalty_coef, w.cosine_correct_threshold) == \
        ("cosine", 0.3, 0.9)
    assert (w.cosine_correct_start, w.cosine_correct_end, w.cosine_wrong_start,
            w.cosine_wrong_end) == (2.0, 1.5, -0.1, -0.7)
    # loss.norm_len = 0 is rollout.max_response_tokens, stage by stage (16k in the last stage)
    assert s.update.norm_len is None and s.update.seq_norm_len == 8192
    stages = config_lib.parse_stages(cfg)
    assert config_lib.settings(config_lib.stage_config(cfg, stages, 1)).update.seq_norm_len \
        == 16384
    cfg.loss.norm_len = 100
    assert config_lib.settings(cfg).update.seq_norm_len == 100


# ----------------------------------------------------------------------------- rewards, advantages
def test_shape_rewards_cosine_penalty_after_stop_properly():
    r = np.array([1.0, 1.0, 0.0, 1.0], np.float32)
    lengths = np.array([0, 50, 50, 100])
    trunc = np.array([False, False, False, True])
    cfg = batching.RewardConfig(truncated_reward=0.0, length_penalty="cosine",
                                length_penalty_coef=0.5)
    out = batching.shape_rewards(r, lengths, trunc, max_len=100, cfg=cfg)
    # cosine: correct 1.0 at L=0, 0.75 at L_max/2; wrong -0.25 at L_max/2; the truncated one
    # got 0 (stop properly) and so counts as wrong at L_max: -0.5. Blended half and half.
    np.testing.assert_allclose(out, [1.0, 0.875, -0.125, -0.25], rtol=1e-6)
    off = batching.shape_rewards(r, lengths, trunc, max_len=100,
                                 cfg=cfg.replace(length_penalty_coef=0.0))
    np.testing.assert_array_equal(off, [1.0, 1.0, 0.0, 0.0])


def _groups(rewards, lengths, reasons):
    n = 2
    batch = RolloutBatch(prompt_ids=[[1]] * (len(rewards) // n), n=n,
                         token_ids=[[3] * length for length in lengths],
                         logprobs=[np.zeros(length, np.float32) for length in lengths],
                         finish_reasons=reasons)
    records = [{"domain": "toy"}] * batch.num_prompts
    rewards = np.asarray(rewards, np.float32)
    return batching.split_groups(batch, records, rewards, rewards)


def test_advantages_by_estimator_weigh_loss_tokens():
    rewards, lengths = [1.0, 0.0, 0.5, 0.0], [2, 6, 4, 3]
    groups = _groups(rewards, lengths, ["stop", "stop", "length", "stop"])
    rpp = batching.AdvantageConfig(estimator="reinforce_pp_baseline")
    # overlong filtering drops the truncated response from the loss: it weighs 0 tokens
    got = batching.advantages(groups, 2, rpp, overlong_filter=True)
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, 2, [2, 6, 0, 3]), rtol=1e-5)
    got = batching.advantages(groups, 2, rpp, overlong_filter=False)
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards, 2, lengths), rtol=1e-5)
    rloo = batching.advantages(groups, 2, batching.AdvantageConfig(estimator="rloo"))
    np.testing.assert_allclose(rloo, [1.0, -1.0, 0.5, -0.5], rtol=1e-6)


# ----------------------------------------------------------------------------- the update
accumulate = jax.jit(U.accumulate_gradients, static_argnums=(1, 3),
                     compiler_options=FAST_COMPILE)


def icepop_batch():
    batch = make_batch(seed=3)
    rng = np.random.default_rng(4)
    batch["sampler_logp"] = (batch["old_logp"] + rng.normal(0, 0.08, batch["old_logp"].shape)
                             ).astype(np.float32)
    return batch


def test_micro_batched_update_with_icepop_matches_numpy():
    """The update's loss (in 4 micro-batches) equals a numpy loss whose mask and denominator are
    icepop's corrected mask of the whole mini-batch."""
    cfg = dataclasses.replace(UPDATE_CFG, correction="icepop", correction_low=0.9,
                              correction_high=1.1, micro_batch_rows=2)
    batch = icepop_batch()
    loss, metrics, _ = accumulate(fresh_state().params, graphdef_and_tx()[0], batch, cfg)
    logp, _ = numpy_logprobs(batch, cfg.temperature)
    r_is = np.exp(batch["old_logp"].astype(np.float64) - batch["sampler_logp"])
    m = batch["loss_mask"] * ((r_is >= 0.9) & (r_is <= 1.1))
    masked_frac = 1 - m.sum() / batch["loss_mask"].sum()
    assert 0.05 < masked_frac < 0.5   # icepop rejects some tokens
    a = batch["advantages"][:, None]
    r = np.exp(np.clip(logp - batch["old_logp"], -20, 20))
    pg = np.maximum(-a * r, -a * np.clip(r, 1 - cfg.eps_low, 1 + cfg.eps_high))
    d = np.clip(batch["ref_logp"] - logp, -20, 20)
    kl = np.clip(np.exp(d) - d - 1, -10, 10)
    np.testing.assert_allclose(loss, ((pg + cfg.beta * kl) * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], (kl * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["correction/masked_frac"], masked_frac, rtol=1e-5)


def test_update_normalizers_and_missing_sampler_logp():
    cfg = dataclasses.replace(UPDATE_CFG, agg_mode="seq-mean-token-sum-norm", norm_len=None,
                              max_response_tokens=7)
    batch = {k: np.asarray(v) for k, v in icepop_batch().items()}
    denominator, counts = U.mini_batch_normalizers(batch, cfg)
    assert float(denominator) == 8 * 7      # rows x rollout.max_response_tokens, not x T = 12
    assert float(counts.num_tokens) == batch["loss_mask"].sum()
    cfg = dataclasses.replace(UPDATE_CFG, correction="seq_mask", correction_low=0.98,
                              correction_high=1.02)
    denominator, counts = U.mini_batch_normalizers(batch, cfg)
    assert 0 < float(counts.num_tokens) < float(counts.num_response_tokens)
    assert float(counts.num_response_tokens) == batch["loss_mask"].sum()
    assert float(denominator) == float(counts.num_tokens)          # token-mean
    del batch["sampler_logp"]
    mesh = mesh_for(1, 1, 1)
    step = U.make_train_step(*graphdef_and_tx(), cfg, mesh=mesh,
                             state_shardings=S.tree_shardings(fresh_state(), mesh))
    with pytest.raises(ValueError, match="needs batch\\['sampler_logp'\\]"):
        step(fresh_state(), batch)


# ----------------------------------------------------------------------------- the sweep
def test_sweep_over_corrections(tmp_path, capsys):
    """--grid 'loss.correction=none,icepop': one valid run per kind, and the summary gains the
    mean correction metrics."""
    sweep = load_launcher("sweep")
    rc = sweep.main(["--config=configs/prorl.py:demo", "--grid", "loss.correction=none,icepop",
                     f"--workdir={tmp_path}", "--dry-run", "--program", "train"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and [line.split()[-1] for line in lines] == [
        "--config.loss.correction=none", "--config.loss.correction=icepop"]
    runs = []
    for kind, frac in (("none", 0.0), ("icepop", 0.25)):
        cfg = prorl.get_config("demo")
        cfg.loss.correction = kind
        config_lib.validate(cfg)
        workdir = tmp_path / f"correction={kind}"
        workdir.mkdir()
        rows = [{"step": s, "reward/mean": 0.5, "correction/masked_frac": frac * s,
                 "correction/mismatch_k3": 1e-3} for s in (1, 2)]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append({"name": f"correction={kind}", "workdir": str(workdir), "returncode": 0})
    summaries = sweep.write_summary(runs, str(tmp_path / "summary.md"))
    assert [s["mean correction/masked_frac"] for s in summaries] == [0.0, 0.375]
    assert "mean correction/mismatch_k3" in (tmp_path / "summary.md").read_text()


# ----------------------------------------------------------------------------- the loop
def test_two_steps_of_the_v2_algorithm_log_the_correction(tmp_path):
    """The demo loop with v2's algorithm (REINFORCE++-baseline, k2 clamped, ICE-POP on the
    sampler's log-probs, cosine penalty, 1.5x over-generation): the new metrics are logged and
    the fp32 sampler agrees with the trainer, so ICE-POP rejects nothing."""
    cfg = prorl.v2_algorithm(small_config(**{"total_steps": 2, "eval.every_steps": 0,
                                             "checkpoint.every_steps": 0}))
    cfg.batch.dynamic_sampling = False
    cfg.reward.length_penalty_coef = 0.5
    trainer = Trainer(cfg, str(tmp_path))
    assert trainer.settings.batch.prompts_per_round == 6   # 1.5 x 4 prompts
    trainer.run()
    trainer.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["correction/masked_frac"] == 0.0
        assert row["correction/weight_mean"] == 1.0
        assert 0 <= row["correction/mismatch_k3"] < 1e-6
        assert row["correction/mismatch_abs"] < 1e-3
        assert np.isfinite(row["loss/total"]) and row["kl"] >= 0
