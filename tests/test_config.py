"""Run configs: presets build and validate; bad fields and stages are named in the error."""
import pytest

from configs import prorl
from prorl_jax import config as config_lib


def test_paper_preset_builds_and_validates_without_weights():
    cfg = prorl.get_config()
    config_lib.validate(cfg)
    # The paper's recipe (algorithm.md).
    assert cfg.rollout.temperature == 1.2 and cfg.rollout.n == 16
    assert cfg.batch.prompts_per_step == 256 and cfg.batch.mini_batch_prompts == 64
    assert cfg.optim.lr == 2e-6 and cfg.optim.schedule == "constant"
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.beta) == (0.2, 0.4, 1e-4)
    assert cfg.loss.kl_kind == "k3" and cfg.loss.agg_mode == "token-mean"
    assert cfg.batch.dynamic_sampling and cfg.rollout.max_response_tokens == 8192
    files = config_lib.parse_weighted_files(cfg.data.train_files, "data.train_files")
    assert [w for _, w in files] == [40, 24, 25, 37, 10]
    stages = config_lib.parse_stages(cfg)
    assert [s.steps for s in stages] == [2500, 500]
    last = config_lib.stage_config(cfg, stages, 1)
    assert last.rollout.max_response_tokens == 16384
    assert config_lib.stage_config(cfg, stages, 0).rollout.max_response_tokens == 8192


def test_demo_preset_validates():
    config_lib.validate(prorl.get_config("demo"))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        prorl.get_config("nope")


@pytest.mark.parametrize("field,value,match", [
    ("loss.eps_high", -1.0, r"config.loss.eps_high=-1.0: expected > 0"),
    ("loss.kl_kind", "k4", r"config.loss.kl_kind='k4'"),
    ("rollout.top_p", 1.5, r"config.rollout.top_p"),
    ("loss.clip_c", 0.5, r"config.loss.clip_c"),
    ("batch.mini_batch_prompts", 48, r"config.batch.mini_batch_prompts=48 must divide"),
    ("eval.k_values", "1,64", r"config.eval.k_values"),
    ("data.train_files", "a.jsonl@x", r"config.data.train_files: weight 'x'"),
    ("stages", "steps=1500;steps=1500,loss.nope=1", r"stage 1: unknown field 'loss.nope'"),
    ("stages", "steps=3000,bad", r"stage 0: 'bad' is not"),
])
def test_bad_values_name_the_field(field, value, match):
    cfg = prorl.get_config()
    parent, _, leaf = field.rpartition(".")
    (cfg[parent] if parent else cfg)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(cfg)


def test_stage_at():
    stages = [config_lib.Stage(3), config_lib.Stage(2)]
    # Past the last budget the last stage goes on.
    assert [config_lib.stage_at(stages, s) for s in range(7)] == [0, 0, 0, 1, 1, 1, 1]


def test_total_steps_override_keeps_the_paper_stages_valid():
    cfg = prorl.get_config()
    cfg.total_steps = 100  # ends inside the first (8k) stage
    config_lib.validate(cfg)
    stages = config_lib.parse_stages(cfg)
    assert config_lib.stage_at(stages, 99) == 0
