"""The embedded JAX sampler against independent references on the tiny Qwen2 model.

References: step-by-step argmax / log_softmax of the model's plain full forward on the unpadded
prompt + response (no cache, no padding, no sampler code), numpy for the nucleus and the
tempered distribution. The `sampler` fixture is the default (continuous batching, one slot per
row); tests/test_continuous_batching.py covers few slots, refills, compaction and the static
path against it. Compile count is kept low: most tests share one sampler and one shape (prompt
bucket 16, 4 prompts, n=2, 8 new tokens).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prorl_jax.models import PRESETS, init_model
from prorl_jax.rollout import JaxSampler, RolloutEngine
from prorl_jax.rollout.jax_sampler import default_prompt_buckets, left_pad, pick_bucket
from prorl_jax.rollout.sampling import nucleus_mask, processed_logprobs, sample_tokens

MAX_NEW = 8
N = 2
PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2], list(range(20, 36)), [42]]
CONFIG = PRESETS["tiny"].replace(tie_word_embeddings=False)  # a tied head favours repeats
LOGIT_SCALE = 10.0  # final-norm scale: the next-token law is far from uniform
QK_SCALE = 5.0  # q/k scale: attention depends sharply on content and position
STAT_SAMPLES = 4096
REF_WIDTH = 32  # >= longest prompt + MAX_NEW


def peaky_model(seed: int = 0):
    """The tiny model with sharper attention and next-token laws than its 0.02-std init."""
    model = init_model(CONFIG, seed)
    model.norm.weight[...] = model.norm.weight[...] * LOGIT_SCALE
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...] * QK_SCALE
    return model


@pytest.fixture(scope="module")
def model():
    return peaky_model(0)


@pytest.fixture(scope="module")
def sampler(model):
    return JaxSampler(model, max_prompt_len=16, max_new_tokens=MAX_NEW, prompt_buckets=(16,),
                      batch_buckets=(1, 4))


@jax.jit
def _full_forward(params, ids):
    return nnx.merge(_GRAPHDEF, params)(ids)[0]


_GRAPHDEF = nnx.split(init_model(CONFIG, 0))[0]


def reference_logits(model, ids):
    """float32[len(ids), V]: the plain full forward of one causal row, no cache. Right padding
    to a fixed width (harmless under the causal mask) keeps it to one compile."""
    padded = np.zeros((1, REF_WIDTH), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(_full_forward(nnx.split(model)[1], jnp.asarray(padded)))[:len(ids)]


@pytest.fixture(scope="module")
def full_logits(model):
    return lambda ids: reference_logits(model, ids)


def greedy_reference(model, prompt):
    ids = list(prompt)
    for _ in range(MAX_NEW):
        ids.append(int(np.argmax(reference_logits(model, ids)[-1])))
    return ids[len(prompt):]


def generate(sampler, prompts=PROMPTS, **kw):
    args = dict(n=N, temperature=1.2, top_p=1.0, max_new_tokens=MAX_NEW, stop_token_ids=(),
                seed=0)
    args.update(kw)
    return sampler.generate(prompts, **args)


# ----------------------------------------------------------------------------- pure sampling
def test_nucleus_mask_hand_numbers():
    logp = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    for top_p, kept in ((0.75, [0, 1, 0, 1]), (0.5, [0, 1, 0, 0]), (0.81, [1, 1, 0, 1]),
                        (1.0, [1, 1, 1, 1])):
        np.testing.assert_array_equal(nucleus_mask(logp, top_p)[0], np.array(kept, bool),
                                      err_msg=f"top_p={top_p}")


def test_processed_logprobs_hand_numbers():
    p = np.array([0.15, 0.5, 0.05, 0.3])
    logits = jnp.log(jnp.asarray([p], jnp.float32)) + 3.0  # a shift must not matter
    got = np.asarray(processed_logprobs(logits, 1.0, 0.75))[0]
    np.testing.assert_allclose(got[[1, 3]], np.log([0.5 / 0.8, 0.3 / 0.8]), rtol=1e-6)
    assert np.all(np.isneginf(got[[0, 2]]))
    tempered = np.sqrt(p) / np.sqrt(p).sum()  # softmax(log p / 2)
    np.testing.assert_allclose(np.asarray(processed_logprobs(logits, 2.0, 1.0))[0],
                               np.log(tempered), rtol=1e-6)
    # greedy (T = 0) reports the T = 1 log-probs, as vLLM does
    np.testing.assert_allclose(np.asarray(processed_logprobs(logits, 0.0, 1.0))[0], np.log(p),
                               rtol=1e-6)


def test_sample_tokens_greedy_and_logp():
    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]])
    keys = jax.random.split(jax.random.key(0), 2)
    tokens, logp = sample_tokens(keys, logits, 0.0, 1.0)
    np.testing.assert_array_equal(tokens, [1, 0])
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], rtol=1e-6)
    tokens, logp = sample_tokens(keys, logits, 0.7, 1.0)
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits / 0.7)[jnp.arange(2), tokens],
                               rtol=1e-6)


def test_buckets_and_left_pad():
    assert default_prompt_buckets(100) == (16, 32, 64, 100)
    assert default_prompt_buckets(16) == (16,)
    assert pick_bucket(17, (16, 32, 64), "x") == 32
    assert pick_bucket(5, None, "x") == 8 and pick_bucket(1, None, "x") == 1
    with pytest.raises(ValueError, match="x: 65 exceeds the largest bucket 64"):
        pick_bucket(65, (16, 64), "x")
    ids, lens = left_pad([[7, 8], [9]], 3, 4, 0)
    np.testing.assert_array_equal(ids, [[0, 0, 7, 8], [0, 0, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(lens, [2, 1, 1])


# ----------------------------------------------------------------------------- the sampler
def test_is_a_rollout_engine(sampler):
    assert isinstance(sampler, RolloutEngine)


def test_greedy_equals_stepwise_argmax_of_full_forward(sampler, model):
    batch = generate(sampler, temperature=0.0)
    assert batch.n == N and batch.num_prompts == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        expected = greedy_reference(model, prompt)
        for j in range(N):  # prompt-major: sample j of prompt i is row i*n+j
            assert batch.token_ids[i * N + j] == expected, f"prompt {i} sample {j}"
            assert batch.finish_reasons[i * N + j] == "length"


def test_logprobs_equal_full_forward_recomputation(sampler, model, full_logits):
    temperature = 1.2
    batch = generate(sampler, temperature=temperature, seed=3)
    for row, (tokens, logps) in enumerate(zip(batch.token_ids, batch.logprobs)):
        prompt = PROMPTS[row // N]
        ids = prompt + tokens
        ref = jax.nn.log_softmax(full_logits(ids) / temperature, axis=-1)
        ref = np.asarray(ref)[len(prompt) - 1:-1][np.arange(len(tokens)), tokens]
        assert logps.dtype == np.float32 and len(logps) == MAX_NEW
        np.testing.assert_allclose(logps, ref, atol=1e-5, err_msg=f"row {row}")


def test_logprobs_equal_trainer_token_logprobs(sampler, model):
    from prorl_jax.loss import token_logprobs
    temperature = 1.2
    graphdef, params = nnx.split(model)

    @jax.jit
    def trainer_logprobs(params, ids):  # ids [1, REF_WIDTH] right-padded; causal, so harmless
        m = nnx.merge(graphdef, params)
        return token_logprobs(m.hidden_states(ids[:, :-1]), m.head_kernel(), ids[:, 1:],
                              temperature=temperature)[0][0]

    batch = generate(sampler, temperature=temperature, seed=4)
    for row in (0, 5):
        prompt, tokens = PROMPTS[row // N], batch.token_ids[row]
        ids = np.zeros((1, REF_WIDTH), np.int32)
        ids[0, :len(prompt) + len(tokens)] = prompt + tokens
        logp = np.asarray(trainer_logprobs(params, jnp.asarray(ids)))
        np.testing.assert_allclose(batch.logprobs[row],
                                   logp[len(prompt) - 1:len(prompt) - 1 + len(tokens)],
                                   atol=1e-5, err_msg=f"row {row}")


def first_token_law(full_logits, prompt, temperature):
    logits = full_logits(prompt)[-1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def chi_square(counts, p, min_expected=5.0):
    """Pearson's statistic with small-expectation cells pooled; returns (stat, df)."""
    expected = p * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep])), int(keep.sum()) - 1


def test_first_token_frequencies_match_tempered_distribution(sampler, full_logits):
    prompt, temperature = PROMPTS[0], 1.2
    batch = generate(sampler, [prompt], n=STAT_SAMPLES, max_new_tokens=1,
                     temperature=temperature, seed=11)
    counts = np.bincount([t[0] for t in batch.token_ids], minlength=CONFIG.vocab_size)
    p = first_token_law(full_logits, prompt, temperature)
    stat, df = chi_square(counts, p)
    threshold = df + 6 * math.sqrt(2 * df)  # ~6 sigma of the chi-square(df) law
    assert stat < threshold, f"chi2={stat:.1f} df={df}"
    assert 0.5 * np.abs(counts / counts.sum() - p).sum() < 0.06
    # the test has power: the untempered law is rejected by the same samples
    wrong_stat, wrong_df = chi_square(counts, first_token_law(full_logits, prompt, 1.0))
    assert wrong_stat > wrong_df + 6 * math.sqrt(2 * wrong_df), wrong_stat
    # and the reported log-probs are those of the tempered law
    np.testing.assert_allclose([lp[0] for lp in batch.logprobs[:50]],
                               np.log(p[[t[0] for t in batch.token_ids[:50]]]), atol=1e-5)


def test_top_p_excludes_tokens_outside_the_nucleus(sampler, full_logits):
    prompt, temperature, top_p = PROMPTS[0], 1.2, 0.6
    batch = generate(sampler, [prompt], n=STAT_SAMPLES, max_new_tokens=1,
                     temperature=temperature, top_p=top_p, seed=12)
    p = first_token_law(full_logits, prompt, temperature)
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = set(order[mass_before < top_p].tolist())
    assert 1 < len(nucleus) < len(p) // 2, "the model must make this test discriminating"
    sampled = {t[0] for t in batch.token_ids}
    assert sampled <= nucleus, f"sampled outside the nucleus: {sampled - nucleus}"
    assert len(sampled) == len(nucleus)
    mass = p[sorted(nucleus)].sum()
    for tokens, logps in zip(batch.token_ids[:50], batch.logprobs[:50]):
        np.testing.assert_allclose(logps[0], np.log(p[tokens[0]] / mass), atol=1e-5)


def test_stop_ids_and_length_set_finish_reasons(sampler):
    greedy = generate(sampler, temperature=0.0)
    stop_id = greedy.token_ids[2][2]  # prompt 1's third greedy token
    batch = generate(sampler, temperature=0.0, stop_token_ids=[stop_id, 127])
    for row, (full, got) in enumerate(zip(greedy.token_ids, batch.token_ids)):
        hits = [k for k, t in enumerate(full) if t in (stop_id, 127)]
        if hits:
            assert got == full[:hits[0] + 1], f"row {row}: the stop id is kept and ends it"
            assert batch.finish_reasons[row] == "stop"
        else:
            assert got == full and batch.finish_reasons[row] == "length"
    assert batch.finish_reasons[2] == "stop" and len(batch.token_ids[2]) <= 3
    assert batch.truncated.tolist() == [r == "length" for r in batch.finish_reasons]
    assert any(r == "length" for r in batch.finish_reasons)


def test_samples_differ_and_are_reproducible_from_the_seed(sampler):
    a = generate(sampler, seed=7)
    b = generate(sampler, PROMPTS[:2] + [[8, 8], [1]], seed=7)  # other prompts, same bucket
    again = generate(sampler, seed=7)
    other = generate(sampler, seed=8)
    assert a.token_ids == again.token_ids
    assert all(np.array_equal(x, y) for x, y in zip(a.logprobs, again.logprobs))
    assert a.token_ids[:4] == b.token_ids[:4], "a row's stream depends on the seed and row only"
    assert a.token_ids != other.token_ids
    for i in range(len(PROMPTS)):
        assert a.token_ids[i * N] != a.token_ids[i * N + 1], f"prompt {i}: samples are equal"


def test_same_bucket_does_not_recompile(sampler):
    generate(sampler, seed=1)
    generate(sampler, [[9] * 16, [2, 3], [1, 1, 1], [7]], temperature=0.7, top_p=0.9, seed=2,
             stop_token_ids=[4, 5, 6])
    counts = dict(sampler.trace_counts)
    jits = (sampler.continuous.prefill_jit, sampler.continuous.chunk_jit)
    sizes = [f._cache_size() for f in jits]
    generate(sampler, [[9] * 16, [2, 3], [1, 1, 1], [7]], temperature=0.7, top_p=0.9, seed=4,
             stop_token_ids=[4, 5, 6])
    generate(sampler, [[1, 2, 3, 4, 5], [6, 6], [12] * 9, [3, 3]], temperature=0.0, seed=3)
    assert counts["chunk"] >= 1 and counts["paged_prefill"] >= 1
    assert sampler.trace_counts == counts
    assert [f._cache_size() for f in jits] == sizes


def test_update_weights_changes_outputs(sampler, model):
    before = generate(sampler, temperature=0.0)
    new_model = peaky_model(seed=1)
    _, new_params = nnx.split(new_model, nnx.Param)
    try:
        sampler.update_weights(new_params, version=3)
        after = generate(sampler, temperature=0.0)
    finally:
        sampler.update_weights(model, version=0)
    assert after.weight_version == 3 and before.weight_version == 0
    assert after.token_ids != before.token_ids
    assert after.token_ids[2] == greedy_reference(new_model, PROMPTS[1]), "greedy, new weights"
    sampler.update_weights(model, version=4)  # a model works too
    back = generate(sampler, temperature=0.0)
    assert back.token_ids == before.token_ids and back.weight_version == 4
    wrong = jax.tree.map(lambda x: x[..., :-1] if x.ndim == 2 else x, new_params)
    with pytest.raises(ValueError, match="update_weights: parameters do not match"):
        sampler.update_weights(wrong, version=5)


def test_sharded_over_a_mesh_equals_unsharded(sampler, model):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    _, params = nnx.split(model, nnx.Param)

    def fsdp(x):  # shard every matrix's first dim, like a trainer's fsdp layout
        spec = PartitionSpec("data") if x.ndim == 2 and x.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = JaxSampler(model, max_prompt_len=16, max_new_tokens=MAX_NEW, prompt_buckets=(16,),
                         batch_buckets=(1, 4), mesh=mesh)
    sharded.update_weights(jax.tree.map(fsdp, params), version=1)
    got = generate(sharded, seed=5)
    ref = generate(sampler, seed=5)
    assert got.token_ids == ref.token_ids
    for x, y in zip(got.logprobs, ref.logprobs):
        np.testing.assert_allclose(x, y, atol=1e-5)
    with pytest.raises(ValueError, match="batch_axes"):
        JaxSampler(model, max_prompt_len=16, max_new_tokens=4, mesh=mesh, batch_axes=("fsdp",))


def test_fp32_master_params_are_cast_inside_jit_for_bf16_compute():
    cfg = CONFIG.replace(dtype="bfloat16", param_dtype="float32")
    model = init_model(cfg, 0)
    sampler = JaxSampler(model, max_prompt_len=16, max_new_tokens=4, prompt_buckets=(16,),
                         batch_buckets=(4,))
    assert sampler.cache_dtype == jnp.bfloat16
    _, params = nnx.split(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    kw = dict(n=N, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    master = sampler.generate(PROMPTS, **kw)
    # fp32 values already rounded to bf16 must give the very same samples (same dtype: no
    # recompile): the sampler computes with the bf16-rounded weights
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    sampler.update_weights(rounded, version=1)
    cast = sampler.generate(PROMPTS, **kw)
    assert master.token_ids == cast.token_ids
    for x, y in zip(master.logprobs, cast.logprobs):
        np.testing.assert_array_equal(x, y)
        assert np.all(np.isfinite(x)) and np.all(x <= 0)
    assert sampler.last_decode_steps == 4


@pytest.mark.parametrize("kw, message", [
    (dict(prompts=[[1] * 17]), r"prompts\[0\] has 17 tokens; expected 1 to max_prompt_len=16"),
    (dict(prompts=[[1], []]), r"prompts\[1\] has 0 tokens"),
    (dict(prompts=[[1, 128]]), r"prompts\[0\] must hold integer token ids in \[0, vocab=128\)"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(n=0), "n must be a positive int"),
    (dict(max_new_tokens=MAX_NEW + 1), r"max_new_tokens must be an int in \[1, 8\]"),
    (dict(stop_token_ids=list(range(9))), "9 stop_token_ids, more than max_stop_ids=8"),
    (dict(stop_token_ids=[200]), r"stop token id 200 is not in \[0, vocab=128\)"),
    (dict(prompts=[[1]] * 5), r"prompt count \(batch_buckets\): 5 exceeds the largest bucket 4"),
])
def test_bad_requests_get_clear_errors(sampler, kw, message):
    prompts = kw.pop("prompts", PROMPTS)
    with pytest.raises(ValueError, match=message):
        generate(sampler, prompts, **kw)
