"""The ProRL loop end to end on the tiny demo: metrics, resume after SIGTERM, resets, stages,
dynamic sampling, non-finite steps, bad overrides."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import prorl
from prorl_jax import config as config_lib
from prorl_jax import resets
from prorl_jax.rollout.base import RolloutBatch, RolloutEngine
from prorl_jax.trainer import NonFiniteError, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("trainer_compile_cache")  # conftest.py


def small_config(**overrides):
    """The demo config shrunk to a few seconds a step."""
    cfg = prorl.get_config("demo")
    cfg.total_steps = 4
    cfg.batch.prompts_per_step = 4
    cfg.batch.mini_batch_prompts = 2
    cfg.rollout.n = 4
    cfg.batch.micro_batch_rows = 8
    cfg.data.toy_train_size = 64
    cfg.data.toy_val_size = 4
    cfg.eval.every_steps = 2
    cfg.eval.n_samples = 2
    cfg.eval.k_values = "1,2"
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    cfg.reset.interval_steps = 0
    cfg.batch.dynamic_sampling = False  # a random policy rarely scores: train on every group
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        node = cfg
        for part in filter(None, parent.split(".")):
            node = node[part]
        node[leaf] = value
    return cfg


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def deterministic(row):
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}


def test_run_writes_metrics_and_resets_and_stages(tmp_path):
    cfg = small_config(**{"stages": "steps=2;steps=2,loss.beta=0.01",
                          "reset.interval_steps": 3})
    trainer = Trainer(cfg, str(tmp_path))
    trainer.run()
    trainer.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward/mean", "entropy", "kl", "loss/policy", "clip_frac/upper",
                "clip_frac/lower", "response_length/mean", "reference_resets", "grad_norm",
                "dynamic_sampling/rounds", "logp_mismatch/abs_mean"):
        assert key in rows[-1], key
    # Stage 2 starts at step index 2 with a reset; the interval counts from it (next at 5).
    assert rows[2]["reset/trigger"] == resets.STAGE and rows[2]["stage"] == 1
    assert rows[-1]["reference_resets"] == 1
    assert trainer.cfg.loss.beta == 0.01
    assert "val/toy/pass@1" in rows[1] and "val/toy/pass@2" in rows[3]
    # The sampler's and the trainer's log-probs agree (fp32, same weights).
    assert rows[0]["logp_mismatch/abs_mean"] < 1e-4


def test_kl_threshold_and_validation_plateau_triggers(tmp_path):
    cfg = small_config(**{"total_steps": 4, "reset.kl_threshold": 1e-12,
                          "eval.every_steps": 1})
    trainer = Trainer(cfg, str(tmp_path / "kl"))
    trainer.run()
    trainer.close()
    triggers = [r.get("reset/trigger") for r in read_metrics(str(tmp_path / "kl"))]
    # Step 0 ends with KL > 0 (its second mini-batch ran on updated weights), so every later
    # step starts with a reset.
    assert triggers == [None, resets.KL, resets.KL, resets.KL]
    cfg = small_config(**{"total_steps": 4, "reset.plateau_patience": 1,
                          "eval.every_steps": 1})
    trainer = Trainer(cfg, str(tmp_path / "plateau"))
    trainer.run()
    trainer.close()
    rows = read_metrics(str(tmp_path / "plateau"))
    scores = [r["val/pass@1"] for r in rows]
    fired = [i for i, r in enumerate(rows) if r.get("reset/trigger") == resets.PLATEAU]
    assert fired, scores
    i = fired[0]  # fired right after a validation that did not beat the best since the reset
    assert i >= 2 and scores[i - 1] <= max(scores[:i - 1]), scores


class _KillAt(Trainer):
    """Sends itself SIGTERM during step `kill_step` (the real handler then stops the run)."""
    kill_step = 2

    def train_step(self, step):
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(step)


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = small_config()
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.run()
    straight.close()
    killed = _KillAt(cfg, str(tmp_path / "b"))
    killed.run()
    killed.close()
    assert killed.step == 3  # the step in flight finishes, is saved, the run exits
    resumed = Trainer(cfg, str(tmp_path / "b"))
    resumed.run(reset_on_resume=True)
    resumed.close()
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    # Steps before the resume are identical; the manual reset at the resume is recorded.
    for ra, rb in zip(a[:3], b[:3]):
        assert deterministic(ra) == deterministic(rb)
    assert b[3]["reset/trigger"] == resets.MANUAL and b[3]["reference_resets"] == 1
    assert resumed.reset_history[-1]["step"] == 3


def test_resume_without_reset_matches_exactly(tmp_path):
    cfg = small_config(**{"total_steps": 3})
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.run()
    straight.close()
    killed = _KillAt(cfg, str(tmp_path / "b"))
    killed.kill_step = 0
    killed.run()
    killed.close()
    resumed = Trainer(cfg, str(tmp_path / "b"))
    resumed.run()
    resumed.close()
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]


class _ScriptedEngine(RolloutEngine):
    """Answers every prompt with scripted responses: prompt i of a round gets all-correct,
    all-wrong or mixed groups, so dynamic sampling has something to filter."""

    def __init__(self, tokenizer, pattern):
        self.tok, self.pattern, self.calls = tokenizer, pattern, 0

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, stop_token_ids, seed):
        self.calls += 1
        ids, lps, reasons = [], [], []
        for i, _ in enumerate(prompts):
            kind = self.pattern[i % len(self.pattern)]
            for j in range(n):
                right = kind == "all" or (kind == "mixed" and j % 2 == 0)
                text = "7" if right else "zz"
                ids.append(self.tok.encode(text, add_special_tokens=False))
                lps.append(np.full(len(ids[-1]), -1.0, np.float32))
                reasons.append("stop")
        return RolloutBatch([list(p) for p in prompts], ids, lps, reasons, n)

    def update_weights(self, params_or_model, version):
        pass


def test_dynamic_sampling_refills_and_is_bounded(tmp_path):
    cfg = small_config(**{"batch.max_generation_rounds": 3, "batch.dynamic_sampling": True})
    trainer = Trainer(cfg, str(tmp_path))
    for rec in trainer.train_data.sources[0].records:
        rec["answer"] = "7"
    engine = trainer.pipeline.engine = _ScriptedEngine(trainer.tokenizer,
                                                       ["all", "none", "mixed", "none"])
    batch = trainer.pipeline.next_batch(0)
    groups, stats = batch.groups, batch.stats
    # One informative group in four per round: 3 rounds (the bound) give 3 of the 4 wanted.
    assert len(groups) == 3 and stats["dynamic_sampling/rounds"] == 3
    assert engine.calls == 3
    assert stats["dynamic_sampling/dropped_frac"] == pytest.approx(1 - 3 / 12)
    assert all(np.ptp(g.rewards) > 0 for g in groups)
    trainer.close()


def test_nonfinite_steps_are_skipped_then_stop_with_checkpoint(tmp_path):
    cfg = small_config(**{"max_nonfinite_steps": 2})
    trainer = Trainer(cfg, str(tmp_path))
    before = np.asarray(trainer.state.params["norm"]["weight"][...]).copy()
    trainer.advantages = lambda groups: np.full(sum(len(g.rewards) for g in groups), np.nan,
                                                np.float32)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        trainer.run()
    np.testing.assert_array_equal(np.asarray(trainer.state.params["norm"]["weight"][...]), before)
    assert trainer.checkpoints.latest_step() is not None
    trainer.close()


def test_bad_override_fails_at_start_naming_the_field(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # An optional field (None by default) takes a value on the command line.
    for flags, expected in ((["--config.reward.truncated_reward=0.0",
                              "--config.loss.eps_high=-1"], "config.loss.eps_high=-1"),
                            (["--config.loss.nope=1"], "nope")):
        out = subprocess.run([sys.executable, "-m", "prorl_jax.main",
                              "--config=configs/prorl.py:demo", f"--workdir={tmp_path}", *flags],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert expected in out.stderr, out.stderr[-2000:]


def test_paper_stages_parse():
    cfg = prorl.get_config()
    assert len(config_lib.parse_stages(cfg)) == 2
