"""The Qwen2 model itself: formulas by hand, padded/packed rows equal to unpadded ones, bf16
compute over fp32 parameters, remat policies, KV-cache decoding, presets, config checks and the
forward benchmark's smoke run. (Parity with transformers lives in test_hf_io.py.)"""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prorl_jax.models import PRESETS, Qwen2Config, init_model
from prorl_jax.models.qwen2 import REMAT_POLICIES, attention_mask, rotary_embedding

# Untied, odd widths, 3 query heads per kv head.
CFG = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, rope_theta=5e4,
                  max_position_embeddings=64, tie_word_embeddings=False)
SEQ_A = np.array([5, 17, 88, 3, 42], np.int32)
SEQ_B = np.array([60, 9, 71], np.int32)


def graphdef_of(config: Qwen2Config) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: init_model(config)))


def random_model(config: Qwen2Config, seed: int = 0):
    """A model with every weight, bias and norm scale random (numpy: no init compile)."""
    rng = np.random.RandomState(seed)
    abstract = nnx.eval_shape(lambda: init_model(config))

    filled = []
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        x = var.get_value()
        base = 1.0 if path[-1] == "weight" else 0.0  # RMSNorm scales
        filled.append((path, var.replace(jnp.asarray(base + 0.1 * rng.randn(*x.shape),
                                                     x.dtype))))
    return nnx.merge(nnx.graphdef(abstract), nnx.from_flat_state(filled))


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


_logits = jax.jit(lambda m, ids: m(ids))
_logits_seg = jax.jit(lambda m, ids, pos, seg: m(ids, pos, seg))
_hidden_seg = jax.jit(lambda m, ids, pos, seg: m.hidden_states(ids, pos, seg))


def test_rotary_embedding_by_hand():
    # D = 2: one frequency, inv_freq = theta^0 = 1, so position p rotates (x1, x2) by p radians:
    # x' = x*cos(p) + (-x2, x1)*sin(p).
    x = jnp.array([[[[1.0, 2.0]]], [[[1.0, 2.0]]]])  # [B=2, T=1, heads=1, D=2]
    out = rotary_embedding(x, jnp.array([[0], [1]]), theta=1e4)
    c, s = math.cos(1.0), math.sin(1.0)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], [c - 2 * s, 2 * c + s], atol=1e-6)
    # D = 4, theta = 100: inv_freq = [1, 100^(-1/2)] = [1, 0.1]; pairs are (x0, x2), (x1, x3).
    x4 = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
    out4 = rotary_embedding(x4, jnp.array([[2]]), theta=100.0)[0, 0, 0]
    expect = [math.cos(2.0), -math.sin(0.2), math.sin(2.0), math.cos(0.2)]
    np.testing.assert_allclose(out4, expect, atol=1e-6)


def test_attention_mask_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 0]])  # two packed sequences and one padding slot
    idx = jnp.arange(5)[None]
    expect = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(attention_mask(seg, seg, idx, idx)[0, 0], expect)


def test_rms_norm_against_numpy(model):
    x = np.random.RandomState(1).randn(2, 3, CFG.hidden_size).astype(np.float32)
    weight = np.random.RandomState(2).randn(CFG.hidden_size).astype(np.float32)
    norm = model.norm
    old = norm.weight[...]
    norm.weight[...] = jnp.asarray(weight)
    try:
        out = norm(jnp.asarray(x))
    finally:
        norm.weight[...] = old
    expect = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + CFG.rms_norm_eps) * weight
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


def test_padded_and_packed_rows_match_unpadded(model):
    ref_a = np.asarray(_logits(model, SEQ_A[None]))[0]
    ref_b = np.asarray(_logits(model, SEQ_B[None]))[0]
    t = 8
    # row 0: a and b packed; row 1: b left-padded; row 2: a right-padded (segment 0 = padding).
    ids = np.zeros((3, t), np.int32)
    pos = np.zeros((3, t), np.int32)
    seg = np.zeros((3, t), np.int32)
    ids[0], pos[0], seg[0] = np.r_[SEQ_A, SEQ_B], np.r_[0:5, 0:3], [1] * 5 + [2] * 3
    ids[1, 5:], pos[1, 5:], seg[1, 5:] = SEQ_B, np.arange(3), 1
    ids[2, :5], pos[2, :5], seg[2, :5] = SEQ_A, np.arange(5), 1
    out = np.asarray(_logits_seg(model, ids, pos, seg))
    for got, ref in ((out[0, :5], ref_a), (out[0, 5:], ref_b), (out[1, 5:], ref_b),
                     (out[2, :5], ref_a)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # plain causal rows (segment_ids None): right padding leaves the real tokens unchanged
    right = np.zeros((2, t), np.int32)
    right[0, :5], right[1, :3] = SEQ_A, SEQ_B
    out = np.asarray(_logits(model, right))
    np.testing.assert_allclose(out[0, :5], ref_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, :3], ref_b, rtol=1e-5, atol=1e-5)
    assert np.abs(out[0, 5:] - out[0, 4]).max() > 1e-3  # the padded slots are real positions


def test_bf16_compute_over_fp32_params_is_close(model):
    mixed_cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    abstract = nnx.eval_shape(lambda: init_model(mixed_cfg))
    assert abstract.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.float32
    mixed = nnx.merge(nnx.graphdef(abstract), nnx.state(model))  # the same fp32 params
    ids = np.r_[SEQ_A, SEQ_B][None]
    hidden = jax.eval_shape(lambda m: m.hidden_states(jnp.asarray(ids)), mixed)
    assert hidden.dtype == jnp.bfloat16
    got, ref = np.asarray(_logits(mixed, ids)), np.asarray(_logits(model, ids))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() < 3e-2
    assert np.abs(got - ref).max() > 0  # it really computed in bf16


def _loss_grads(config: Qwen2Config, params, ids):
    graphdef = graphdef_of(config)

    def loss(p):
        logits = nnx.merge(graphdef, p)(ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_give_identical_gradients(model):
    config = CFG.replace(num_hidden_layers=1)  # one layer: a quarter of the compile time
    params = nnx.state(model, nnx.Param)
    del params["layers"][1]
    ids = jnp.asarray(np.r_[SEQ_A, SEQ_B, SEQ_A][None])
    ref_loss, ref_grads = _loss_grads(config, params, ids)
    assert float(ref_loss) > 0
    ref_leaves = jax.tree.leaves(ref_grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in ref_leaves)
    for policy in REMAT_POLICIES[1:]:
        loss, grads = _loss_grads(config.replace(remat=policy), params, ids)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), policy
        for g, r in zip(jax.tree.leaves(grads), ref_leaves):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_kv_cache_decode_matches_full_forward(model):
    # row 0: SEQ_A; row 1: SEQ_B left-padded to length 5 (kv_valid False on the padding)
    ids = np.stack([SEQ_A, np.r_[0, 0, SEQ_B]])
    pos = np.array([np.arange(5), np.r_[0, 0, np.arange(3)]], np.int32)
    valid = np.array([[True] * 5, [False, False, True, True, True]])
    seg = valid.astype(np.int32)
    full = np.asarray(_hidden_seg(model, ids, pos, seg))
    decode = jax.jit(lambda m, i, p, c, idx, kv: m.decode(i, p, c, idx, kv))
    s_max = 8
    kv_valid = np.zeros((2, s_max), bool)
    kv_valid[:, :3] = valid[:, :3]
    cache = model.init_cache(2, s_max)
    hidden, cache = decode(model, ids[:, :3], pos[:, :3], cache, jnp.int32(0), kv_valid)
    steps = [hidden]
    for t in (3, 4):
        kv_valid[:, t] = True
        hidden, cache = decode(model, ids[:, t:t + 1], pos[:, t:t + 1], cache, jnp.int32(t),
                               kv_valid)
        steps.append(hidden)
    got = np.concatenate([np.asarray(h) for h in steps], axis=1)
    np.testing.assert_allclose(got[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, 2:], full[1, 2:], rtol=1e-5, atol=1e-5)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, s_max, 2, 8)
    assert max(np.abs(np.asarray(k[:, 5:])).max() for k in cache.k) == 0  # unwritten: zero


def test_preset_shapes_and_parameter_counts():
    # Published sizes: Qwen2.5-1.5B 1,543,714,304 params (tied); R1-Distill adds an untied head
    # of 151936 * 1536 = 233,373,696.
    assert PRESETS["qwen2.5-1.5b"].num_params() == 1_543_714_304
    assert PRESETS["r1-distill-qwen-1.5b"].num_params() == 1_543_714_304 + 151936 * 1536
    assert PRESETS["r1-distill-qwen-1.5b"].head_dim == 128
    for name in ("tiny",):
        cfg = PRESETS[name].replace(tie_word_embeddings=False)
        for c in (PRESETS[name], cfg, CFG):
            abstract = nnx.state(nnx.eval_shape(lambda: init_model(c)), nnx.Param)
            assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == \
                c.num_params()


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 50}, "hidden_size=50 must be divisible by num_attention_heads=6"),
    ({"num_key_value_heads": 4}, "multiple of num_key_value_heads=4"),
    ({"remat": "some"}, "remat='some'"),
    ({"attention_impl": "flash"}, "attention_impl='flash'"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(**change)
    with pytest.raises(TypeError):
        CFG.replace(dtype="float13")


def test_forward_bench_smoke(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "forward.py")
    spec = importlib.util.spec_from_file_location("bench_forward", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--preset", "tiny", "--batch", "2", "--seq", "16", "--dtype",
                         "float32", "--warmup", "1", "--iters", "2"])
    assert result["output_shape"] == [2, 16, PRESETS["tiny"].vocab_size]
    assert result["step_s"] > 0 and len(result["step_s_all"]) == 2
    assert result["tokens_per_s"] == pytest.approx(32 / result["step_s"])
    assert '"bench": "forward"' in capsys.readouterr().out
    # 2 * (layers * (2H^2 + 2H*KV + 3HF) + HV) + 2 * L * seq * H, by hand for the tiny preset
    h, kv, f, v, layers = 64, 32, 176, 128, 2
    expect = 2 * (layers * (2 * h * h + 2 * h * kv + 3 * h * f) + h * v) + 2 * layers * 16 * h
    assert bench.forward_flops_per_token(PRESETS["tiny"], 16) == expect


def test_remat_under_map_inside_jit_matches_plain():
    """Remat layers work whatever trace level the parameters come from (jit -> map -> grad)."""
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 128, (3, 2, 7)))
    results = []
    for remat in ("none", "full", "dots_no_batch"):
        graphdef, params = nnx.split(init_model(PRESETS["tiny"].replace(remat=remat), 0),
                                     nnx.Param)

        @jax.jit
        def value_and_grad(params, ids):
            def total(params):
                return jax.lax.map(lambda x: nnx.merge(graphdef, params)(x).mean(), ids).sum()
            return jax.value_and_grad(total)(params)

        results.append(value_and_grad(params, ids))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
