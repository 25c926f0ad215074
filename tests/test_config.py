"""Run configs: presets build and validate; bad fields and stages are named in the error."""
import pytest

from configs import prorl
from prorl_jax import config as config_lib
from prorl_jax.train_state import OptimConfig
from prorl_jax.update import UpdateConfig


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
    ("stages", "steps=10;steps=5,loss.eps_low=1.5",
     r"config.stages: stage 1: config.loss.eps_low=1.5: expected in \[0, 1\)"),
    ("loss.agg_mode", "sum", r"config.loss.agg_mode='sum': expected one of \['token-mean'"),
    ("loss.adv_std_scope", "all", r"config.loss.adv_std_scope='all'"),
    ("loss.norm_len", -3, r"config.loss.norm_len=-3: expected 0 \(off\)"),
    ("optim.schedule", "linear", r"config.optim.schedule='linear'"),
    ("optim.schedule", "cosine", r"config.optim.decay_steps=0: the cosine schedule"),
    ("optim.max_grad_norm", 0.0, r"config.optim.max_grad_norm=0.0: expected > 0"),
    ("mesh.fsdp", 0, r"config.mesh.fsdp=0: expected a positive size or -1"),
    ("mesh.data", -1, r"config.mesh: at most one axis may be -1"),
    ("model.ref_dtype", "float16", r"config.model.ref_dtype='float16'"),
    ("model.remat", "some", r"config.model.remat='some'"),
    ("rollout.engine", "vllm", r"config.rollout.engine='vllm' needs config.rollout.vllm_urls"),
    ("rollout.old_logp_source", "engine", r"config.rollout.old_logp_source='engine'"),
    ("batch.length_bucket", 0, r"config.batch.length_bucket=0: expected an integer >= 1"),
    ("batch.micro_batch_rows", 7, r"config.batch.micro_batch_rows=7 must divide"),
    ("reward.think_mode", "never", r"config.reward.think_mode='never'"),
    ("reward.soft_overlong_buffer", 9000, r"soft_overlong_buffer=9000 must not exceed"),
    ("reset.kl_threshold", -0.1, r"config.reset.kl_threshold=-0.1: expected >= 0"),
    ("eval.temperature", 0.0, r"config.eval.temperature=0.0: expected > 0"),
    ("checkpoint.keep_last", 0, r"config.checkpoint.keep_last=0: expected an integer >= 1"),
    ("log.every_steps", 0, r"config.log.every_steps=0: expected an integer >= 1"),
    ("total_steps", 0, r"config.total_steps=0: expected an integer >= 1"),
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


def test_settings_read_every_field_from_its_own_key():
    """Distinct values in the run config land in the matching dataclass fields (a swapped or
    dropped key fails here)."""
    cfg = prorl.get_config()
    values = {"eps_low": 0.11, "eps_high": 0.33, "beta": 0.05, "kl_kind": "k2",
              "agg_mode": "seq-mean-token-sum", "clip_c": 3.5, "entropy_coef": 0.01,
              "norm_len": 77}
    for key, value in values.items():
        cfg.loss[key] = value
    cfg.rollout.temperature, cfg.batch.micro_batch_rows, cfg.model.logprob_chunk = 0.7, 16, 96
    s = config_lib.settings(cfg)
    assert s.update == UpdateConfig(**values, temperature=0.7, micro_batch_rows=16,
                                    logprob_chunk=96)
    cfg.loss.clip_c, cfg.loss.norm_len = 0.0, 0  # 0: off
    s = config_lib.settings(cfg)
    assert s.update.clip_c is None and s.update.norm_len is None
    assert s.optim == OptimConfig(lr=2e-6, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                                  max_grad_norm=1.0, warmup_steps=0, schedule="constant")
    assert (s.batch.prompts_per_step, s.batch.mini_batch_prompts) == (256, 64)
    assert (s.rollout.n, s.rollout.temperature, s.rollout.max_response_tokens) == (16, 0.7, 8192)
    assert s.precision.ref_dtype == "bfloat16" and s.mesh.fsdp == -1


def test_truncated_reward_is_optional():
    cfg = prorl.get_config()
    assert cfg.reward.truncated_reward is None
    assert config_lib.settings(cfg).reward.truncated_reward is None  # off: the verifier's
    cfg.stages = "steps=10;steps=5,reward.truncated_reward=0.0"
    config_lib.validate(cfg)
    stages = config_lib.parse_stages(cfg)
    assert config_lib.settings(config_lib.stage_config(cfg, stages, 1)).reward \
        .truncated_reward == 0.0
    cfg.reward.truncated_reward = -0.5  # a penalty below 0 is allowed now
    assert config_lib.settings(cfg).reward.truncated_reward == -0.5

