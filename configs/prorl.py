"""ProRL run configurations.

    python -m prorl_jax.main --config=configs/prorl.py            # the paper's recipe
    python -m prorl_jax.main --config=configs/prorl.py:demo       # tiny CPU demo that learns
    python -m prorl_jax.main --config=configs/prorl.py:v2         # NVIDIA's ProRL v2 recipe
    python -m prorl_jax.main --config=configs/prorl.py:v2_demo    # the demo with v2's algorithm
    python -m prorl_jax.main --config=configs/prorl.py --config.loss.eps_high=0.28

Every field is documented here, where it is defined, with the paper's value (ProRL, arXiv
2505.24864; see shared/docs/algorithm.md). `prorl_jax.config.validate` checks every field at
start-up and names the one that is wrong; each field's choices or range are declared on the
dataclass of the component that reads it (the table in prorl_jax/config.py).
"""
import ml_collections


def paper_config() -> ml_collections.ConfigDict:
    """The ProRL recipe: DeepSeek-R1-Distill-Qwen-1.5B, GRPO + DAPO tricks, KL with resets."""
    c = ml_collections.ConfigDict()
    c.seed = 0                        # RNG seed for init, sampling and data order
    c.total_steps = 3000              # training steps (one rollout batch + its mini-batch updates
                                      # each), across all stages; the paper trained ~3k steps
    # Stages: ';'-separated; each `steps=N` plus comma-separated `dotted.field=value` overrides
    # applied from that stage on; every stage after the first starts with a reference reset.
    # Empty: one stage. total_steps decides the run's length: past the last budget the last
    # stage goes on; a shorter run ends inside an earlier stage.
    c.stages = ("steps=2500;"
                "steps=500,rollout.max_response_tokens=16384")

    c.model = m = ml_collections.ConfigDict()
    m.path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # HF model dir (or a hub id already in
                                      # the local HF cache); empty: random init from `preset`
    m.preset = "r1-distill-qwen-1.5b"  # prorl_jax.models.PRESETS name (used when path is empty)
    m.vocab_size = 0                  # random init only: 0 = the preset's, -1 = the tokenizer's
    m.dtype = "bfloat16"              # compute dtype of the policy
    m.param_dtype = "float32"         # master weights
    m.ref_dtype = "bfloat16"          # the reference policy's stored dtype
    m.remat = "dots_no_batch"         # gradient checkpointing policy per layer
    m.attention_impl = "auto"         # "auto" (cuDNN flash on GPU), "xla", "cudnn"
    m.logprob_chunk = 4096            # tokens per chunk of the fused LM-head log-softmax

    c.tokenizer_path = ""             # tokenizer dir; empty: model.path

    c.data = d = ml_collections.ConfigDict()
    # Comma-separated `path@weight` (jsonl/json/parquet of problem records); weight = the
    # domain-mix sampling weight. Paper mix (136K problems): math 40k, code 24k, STEM 25k,
    # logic 37k, instruction following 10k.
    d.train_files = ("data/math.jsonl@40,data/code.jsonl@24,data/stem.jsonl@25,"
                     "data/logic.jsonl@37,data/ifeval.jsonl@10")
    d.val_files = ""                  # held-out files for validation (same format)
    d.max_prompt_tokens = 1024        # longer prompts are dropped (and counted)
    d.toy_task = ""                   # demo only: a prorl_jax.toy_task task name instead of files
    d.toy_train_size = 0              # demo only: procedurally generated training problems
    d.toy_val_size = 0                # demo only: held-out generated problems

    c.rollout = r = ml_collections.ConfigDict()
    r.engine = "auto"                 # "vllm", "jax" (embedded sampler) or "auto" (vllm iff urls)
    r.vllm_urls = ""                  # comma-separated server base URLs (launchers/vllm_server.sh)
    r.weights_dir = ""                # where the policy is written for the servers (shared FS;
                                      # default <workdir>/vllm_weights)
    r.server_weights_dir = ""         # weights_dir as the servers see it, if mounted elsewhere
    r.timeout_s = 3600.0              # per HTTP request (a generation request is not streamed)
    r.health_timeout_s = 900.0        # how long to wait for a server that refuses connections
                                      # (still loading) or is paused; a line every 30 s
    r.n = 16                          # responses per prompt (group size)
    r.temperature = 1.2               # sampling temperature (also used for the trainer's log-probs;
                                      # vLLM engines take [0, 2])
    r.top_p = 1.0                     # nucleus; <1 biases the importance ratio
    r.max_response_tokens = 8192      # 8k, then 16k in the last stage
    r.old_logp_source = "trainer"     # "trainer" (recompute) or "sampler" (the engine's own)
    r.max_staleness = 0               # asynchronous rollouts (prorl_jax/pipeline): the batch of
                                      # step t is generated by the weights after max(0, t - k)
                                      # updates, while the steps before it train; 0: the
                                      # synchronous loop (the paper's); ProRL v2 preset: 1. k > 0
                                      # needs old_logp_source "trainer" (the proximal policy)
                                      # and wants a loss.correction on the sampler's log-probs
                                      # ("tis"/"icepop"); not a stage override
    # The embedded JAX sampler (engine "jax"); prorl_jax/rollout/scheduler.py BatchingConfig.
    r.batching = "continuous"         # "continuous" (slots refilled as rows finish, paged KV) or
                                      # "static" (all rows in one batch until the longest ends)
    r.decode_slots = 0                # decode slots; 0: as many as kv_cache_gb allows (or one
                                      # per row when kv_cache_gb is 0)
    r.kv_cache_gb = 24.0              # KV pool per device in GiB (each slot reserves a row of
                                      # max prompt + max response tokens); 0: no budget
    r.kv_block_size = 16              # tokens per KV block
    r.decode_chunk_steps = 32         # most decode steps per device call between refills
    r.min_decode_slots = 16           # smallest slot bucket when the last rows drain (each
                                      # bucket compiles once; on GPU/TPU a step costs about the
                                      # same below a few dozen rows)

    c.batch = b = ml_collections.ConfigDict()
    b.prompts_per_step = 256          # prompts per rollout batch
    b.mini_batch_prompts = 64         # prompts per optimizer step (256/64 = 4 updates per step)
    b.micro_batch_rows = 8            # rows per gradient-accumulation micro-batch (memory)
    b.dynamic_sampling = True         # drop groups whose rewards are all equal, refill
    b.max_generation_rounds = 4       # bound on refill rounds; past it train on what survived
    b.length_bucket = 512             # sequences are padded to a multiple of this
    b.oversample = 1.0                # prompts rolled out per generation round, as a multiple
                                      # of prompts_per_step (rounded up; ProRL v2: 1.5)

    c.loss = l = ml_collections.ConfigDict()
    l.eps_low = 0.2                   # clip ratio below: r >= 1 - eps_low
    l.eps_high = 0.4                  # clip-higher (DAPO): r <= 1 + eps_high
    l.clip_c = 0.0                    # dual clip c (>1) for A < 0; 0 disables
    l.beta = 1e-4                     # KL coefficient
    l.kl_kind = "k3"                  # "k1", "k2", "k3" (low-variance KL, ProRL); "k1+",
                                      # "k3+": that value with k2's gradient (straight-through,
                                      # verl's "kl+"/"low_var_kl+"; "k2+" would be k2 itself)
    l.kl_clamp = False                # clamp d to [-20, 20] and the estimate to [-10, 10] for
                                      # every kind (k3 always is; ProRL v2's k2: True)
    l.policy_loss = "ppo"             # "ppo": token-level clip (ProRL); "gspo": clipped
                                      # length-normalised sequence ratio (Zheng et al. 2025;
                                      # needs agg_mode seq-mean-token-mean; paper eps 3e-4/4e-4);
                                      # "cispo": clipped stop-gradient IS weight x log-prob
                                      # (MiniMax-M1 2025); prorl_jax.loss.POLICY_LOSSES
    l.agg_mode = "token-mean"         # token-mean | seq-mean-token-mean | seq-mean-token-sum |
                                      # seq-mean-token-sum-norm
    l.norm_len = 0                    # the fixed length of seq-mean-token-sum-norm (0:
                                      # rollout.max_response_tokens)
    l.correction = "none"             # off-policy correction of the sampler/trainer gap, on the
                                      # engine's log-probs: "none" | "tis" (weight min(r, high))
                                      # | "icepop" (mask tokens with r outside [low, high];
                                      # ProRL v2) | "seq_mask" (mask responses whose geometric
                                      # mean r is outside [low, high]); needs
                                      # rollout.old_logp_source = "trainer"
    l.correction_low = 0.5            # its lower bound on r (icepop, seq_mask; v2's ICE-POP 0.5;
                                      # seq_mask e.g. 0.999)
    l.correction_high = 5.0           # its upper bound (tis e.g. 2; v2's ICE-POP 5; seq_mask
                                      # e.g. 1.002)
    l.adv_estimator = "grpo"          # "grpo" (ProRL), "rloo" (leave-one-out baseline) or
                                      # "reinforce_pp_baseline" (ProRL v2: group mean, then
                                      # whitened over the batch's tokens)
    l.entropy_coef = 0.0              # entropy bonus (paper: 0)
    l.adv_std_normalize = True        # grpo: divide by the std (False: Dr.GRPO)
    l.adv_std_scope = "group"         # grpo: "group" or "batch"

    c.reward = w = ml_collections.ConfigDict()
    w.think_mode = "require"          # "require": no </think> -> unanswered (0); "optional"
    w.overlong_filter = True          # truncated responses are masked out of the loss
    w.truncated_reward = ml_collections.config_dict.placeholder(float)  # the reward of a
                                      # truncated response ("stop properly" penalty, e.g. 0.0);
                                      # None: keep the verifier's reward
    w.soft_overlong_buffer = 0        # DAPO soft overlong penalty buffer in tokens (0: off)
    w.soft_overlong_factor = 1.0      # its maximum penalty
    w.length_penalty = "none"         # "cosine": the cosine length-scaling reward of Yeo et al.
                                      # 2025 (ProRL v2's length penalty): r_end + (r_start -
                                      # r_end) (1 + cos(pi L / L_max)) / 2, L_max =
                                      # rollout.max_response_tokens
    w.length_penalty_coef = 1.0       # its weight c in [0, 1]: reward = (1 - c) R + c cosine.
                                      # Stages switch the penalty on (reward.length_penalty=
                                      # cosine) or ramp c stage by stage; within a stage c is
                                      # constant
    w.cosine_correct_threshold = 1.0  # a reward >= this is "correct" (partial credit is wrong)
    w.cosine_correct_start = 1.0      # (r_start, r_end) of a correct answer: at L = 0, at L_max
    w.cosine_correct_end = 0.5
    w.cosine_wrong_start = 0.0        # (r_start, r_end) of a wrong one
    w.cosine_wrong_end = -0.5
    w.num_workers = 0                 # scoring processes (0: all cores)
    w.timeout_s = 10.0                # per response

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 2e-6                       # AdamW learning rate (constant in the paper)
    o.weight_decay = 0.01
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.max_grad_norm = 1.0             # global-norm gradient clipping
    o.warmup_steps = 0                # linear warm-up (restarts after every reset)
    o.schedule = "constant"           # "constant" or "cosine"
    o.decay_steps = 0                 # cosine: steps to decay over

    c.mesh = x = ml_collections.ConfigDict()
    x.data = 1                        # data-parallel axis
    x.fsdp = -1                       # fully sharded axis (-1: the remaining devices)
    x.tensor = 1                      # tensor-parallel axis

    c.reset = z = ml_collections.ConfigDict()
    z.interval_steps = 0              # reset every N steps (0: off)
    z.on_stage_boundary = True        # reset at the start of every stage after the first
    z.plateau_patience = 0            # reset when validation has not improved for N evals (0: off)
    z.kl_threshold = 0.0              # reset when the step's mean KL exceeds this (0: off)
    z.on_resume = False               # reset once when resuming (by hand: set on the command line)

    c.eval = e = ml_collections.ConfigDict()
    e.every_steps = 50                # validation interval (0: never)
    e.n_samples = 16                  # samples per validation problem
    e.k_values = "1,8,16"             # pass@k reported
    e.temperature = 0.6               # validation sampling temperature
    e.max_problems = 512              # per validation file

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 50                # save interval
    k.keep_last = 3                   # keep the newest N
    k.keep_every = 500                # and every K-th step forever (0: none)
    k.async_save = True

    c.log = g = ml_collections.ConfigDict()
    g.every_steps = 1                 # console log interval
    g.tensorboard = True              # also write TensorBoard events when installed

    c.max_nonfinite_steps = 3         # stop (with a checkpoint) after this many bad steps in a row
    return c


def demo_config() -> ml_collections.ConfigDict:
    """A tiny Qwen2 learning a procedurally generated task on 2 CPU cores in a few minutes.

    The task ("next 7" -> "8", prorl_jax/toy_task.py) is answered by one digit and a stop token:
    a random policy scores about 0.01, a trained one about 1.0.
    """
    c = paper_config()
    c.total_steps = 100
    c.stages = ""
    c.model.path = ""
    c.model.preset = "tiny"
    c.model.vocab_size = -1           # exactly the demo tokenizer's tokens
    c.model.dtype = "float32"
    c.model.ref_dtype = "float32"
    c.model.remat = "none"
    c.model.logprob_chunk = 512
    c.tokenizer_path = ""             # empty with no model path: the shipped demo tokenizer
    c.data.train_files = ""
    c.data.toy_task = "successor"
    c.data.toy_train_size = 2000
    c.data.toy_val_size = 100
    c.data.max_prompt_tokens = 32
    c.rollout.engine = "jax"
    c.rollout.n = 16
    c.rollout.temperature = 1.2           # the paper's
    c.rollout.max_response_tokens = 2  # the digit and the stop token
    c.batch.prompts_per_step = 32
    c.batch.mini_batch_prompts = 16
    c.batch.micro_batch_rows = 256
    c.batch.length_bucket = 16
    c.batch.max_generation_rounds = 2
    c.loss.beta = 1e-3
    c.reward.think_mode = "optional"
    c.reward.overlong_filter = False
    c.reward.num_workers = 1
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.0
    c.mesh.fsdp = 1
    c.reset.interval_steps = 50
    c.eval.every_steps = 25
    c.eval.n_samples = 4
    c.eval.k_values = "1,4"
    c.eval.temperature = 1.0
    c.eval.max_problems = 32
    c.checkpoint.every_steps = 25
    c.checkpoint.keep_every = 0
    c.log.every_steps = 5
    c.log.tensorboard = False
    return c


def v2_algorithm(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """ProRL v2's algorithm (NVIDIA, Aug 2025; the published NeMo-RL/OpenRLHF recipes, as
    shared/docs/algorithm.md "ProRL v2" lists it) applied to config `c`, in place."""
    c.loss.adv_estimator = "reinforce_pp_baseline"  # REINFORCE++-baseline advantages
    c.loss.policy_loss = "ppo"        # PPO clip, token level ...
    c.loss.eps_low = 0.2              # ... 0.2 below
    c.loss.eps_high = 0.27            # ... 0.27 above
    c.loss.agg_mode = "token-mean"
    c.loss.kl_kind = "k2"             # k2 KL ...
    c.loss.kl_clamp = True            # ... d clamped to [-20, 20] before, the estimate to
                                      # [-10, 10] after
    c.loss.beta = 1e-4                # ... with beta 1e-4
    c.batch.dynamic_sampling = True   # dynamic sampling ...
    c.batch.oversample = 1.5          # ... with 1.5x over-generation ...
    c.batch.max_generation_rounds = 10  # ... and at most 10 generation rounds
    c.reward.truncated_reward = 0.0   # truncated responses rewarded 0 ("stop properly") ...
    c.reward.overlong_filter = False  # ... and kept in the loss, so that the 0 teaches stopping
    c.loss.correction = "icepop"      # ICE-POP ...
    c.loss.correction_low = 0.5       # ... [0.5, 5] ...
    c.loss.correction_high = 5.0
    c.rollout.old_logp_source = "trainer"  # ... on the sampler's log-probs (old_logp: trainer's)
    c.reward.length_penalty = "cosine"  # the "scheduled cosine length penalty" (Yeo et al.);
                                      # its schedule is the stages' (see v2_config)
    return c


def v2_config() -> ml_collections.ConfigDict:
    """NVIDIA's ProRL v2 recipe: v2_algorithm on the paper's model and data, with v2's batch
    (512 prompts x 16 samples), lr 1e-6 and 8k response tokens.

    Not published, so chosen here (documented, not v2's numbers): the cosine penalty's schedule
    and when the reference is reset; rollouts one step off (rollout.max_staleness = 1, the
    NeMo-RL recipes' asynchronous GRPO; v2_demo keeps the synchronous loop). Three stages of
    1000 steps ramp the penalty's coefficient 0 -> 0.5 -> 1 (reward.length_penalty_coef), and
    each stage boundary resets the reference (v2 resets it; reset.on_stage_boundary). Not
    stated for v2 and kept from ProRL: the mini-batch (64 prompts, 8 updates per step),
    temperature 1.2, AdamW's other settings, the validation settings.
    """
    c = v2_algorithm(paper_config())
    c.optim.lr = 1e-6                 # v2: 1e-6 (constant)
    c.batch.prompts_per_step = 512    # v2: 512 prompts ...
    c.rollout.n = 16                  # ... x 16 samples
    c.rollout.max_response_tokens = 8192  # v2: 8k response tokens (no 16k stage)
    c.total_steps = 3000
    c.stages = ("steps=1000,reward.length_penalty_coef=0.0;"
                "steps=1000,reward.length_penalty_coef=0.5;"
                "steps=1000,reward.length_penalty_coef=1.0")
    c.reset.on_stage_boundary = True  # a reference reset at each stage boundary
    c.rollout.max_staleness = 1       # one-step-off asynchronous rollouts (NeMo-RL's async GRPO
                                      # age limit), corrected by v2's ICE-POP
    return c


def v2_demo_config() -> ml_collections.ConfigDict:
    """The CPU demo (demo_config) trained with ProRL v2's algorithm (v2_algorithm): the demo's
    model, task and batch sizes, and demo-sized choices of its own. lr 1e-3, not the demo's
    3e-3: with REINFORCE++-baseline advantages 3e-3 collapses the entropy at a reward of ~0.65
    (GRPO's advantages got 0.94 there). 150 steps, the cosine penalty scheduled as in v2_config:
    off (coefficient 0) for 75 steps, then on at 1.0 after a stage boundary with its reference
    reset. (Switched on while the reward is still low - from step 0, or at step 50 - it drives
    the policy to the shortest wrong answer, a 1-token stop scoring above a 2-token wrong digit,
    and the reward falls to 0 for good.)"""
    c = v2_algorithm(demo_config())
    c.optim.lr = 1e-3
    c.total_steps = 150
    c.reset.interval_steps = 0        # the stage boundary at step 75 resets instead
    c.stages = ("steps=75,reward.length_penalty_coef=0.0;"
                "steps=75,reward.length_penalty_coef=1.0")
    return c


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    """`configs/prorl.py` -> the paper's recipe; `:demo` -> the CPU demo; `:v2` -> ProRL v2;
    `:v2_demo` -> the CPU demo with v2's algorithm."""
    presets = {"paper": paper_config, "demo": demo_config, "v2": v2_config,
               "v2_demo": v2_demo_config}
    if preset not in presets:
        raise ValueError(f"configs/prorl.py: unknown preset {preset!r}; expected one of "
                         f"{sorted(presets)}")
    return presets[preset]()
