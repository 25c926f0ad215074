"""The models themselves: formulas by hand, padded/packed rows equal to unpadded ones, bf16
compute over fp32 parameters, remat policies, KV-cache decoding, Qwen3's q/k norms, presets of
every family, the partition rules over every family, config checks and the forward benchmark's
smoke run. (Parity with transformers lives in test_hf_io.py.)"""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prorl_jax import sharding as S
from prorl_jax.models import FAMILIES, PRESETS, CausalLM, Qwen2Config, Qwen3Config, init_model
from prorl_jax.models.decoder import REMAT_POLICIES
from prorl_jax.models.layers import attention_mask, rotary_embedding

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
    # row 0: SEQ_A; row 1: SEQ_B left-padded to length 5 (valid False on the padding). Both rows
    # write at the same slots here; test_dense_cache_per_row_index covers rows apart.
    ids = np.stack([SEQ_A, np.r_[0, 0, SEQ_B]])
    pos = np.array([np.arange(5), np.r_[0, 0, np.arange(3)]], np.int32)
    valid = np.array([[True] * 5, [False, False, True, True, True]])
    seg = valid.astype(np.int32)
    full = np.asarray(_hidden_seg(model, ids, pos, seg))
    s_max = 8
    kv_valid = np.zeros((2, s_max), bool)
    kv_valid[:, :3] = valid[:, :3]
    cache = model.init_cache(2, s_max)
    hidden, cache = _decode(model, ids[:, :3], pos[:, :3], cache.replace(valid=kv_valid))
    steps = [hidden]
    for t in (3, 4):
        kv_valid[:, t] = True
        cache = cache.replace(index=jnp.int32(t), valid=kv_valid)  # every row at slot t
        hidden, cache = _decode(model, ids[:, t:t + 1], pos[:, t:t + 1], cache)
        steps.append(hidden)
    got = np.concatenate([np.asarray(h) for h in steps], axis=1)
    np.testing.assert_allclose(got[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, 2:], full[1, 2:], rtol=1e-5, atol=1e-5)
    assert len(cache.k) == 2 and cache.k[0].shape == (2, s_max, 2, 8)
    assert max(np.abs(np.asarray(k[:, 5:])).max() for k in cache.k) == 0  # unwritten: zero


_decode = jax.jit(lambda m, i, p, c: m.decode(i, p, c))


def test_dense_cache_per_row_index(model):
    """Rows written at different slots (index per row) decode as their full forwards."""
    full_a = np.asarray(_hidden_seg(model, SEQ_A[None], np.arange(5)[None], np.ones((1, 5))))
    full_b = np.asarray(_hidden_seg(model, SEQ_B[None], np.arange(3)[None], np.ones((1, 3))))
    # prefill SEQ_A[:4] into row 0 and SEQ_B[:2] into row 1 (right-padded), then one step each
    ids = np.zeros((2, 4), np.int32)
    ids[0], ids[1, :2] = SEQ_A[:4], SEQ_B[:2]
    valid = np.zeros((2, 6), bool)
    valid[0, :5], valid[1, :3] = True, True  # the step's new slot included
    cache = model.init_cache(2, 6).replace(valid=valid)
    _, cache = _decode(model, ids, np.tile(np.arange(4), (2, 1)), cache)
    cache = cache.replace(index=jnp.array([4, 2], jnp.int32))
    hidden, _ = _decode(model, np.array([[SEQ_A[4]], [SEQ_B[2]]]), np.array([[4], [2]]), cache)
    np.testing.assert_allclose(hidden[0, 0], full_a[0, 4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden[1, 0], full_b[0, 2], rtol=1e-5, atol=1e-5)


def test_qwen3_attention_projection_by_hand():
    """q = rope(q_norm(x W_q)) per head, k likewise, v = x W_v; at position 0 rope is the
    identity, so the norms are checked against numpy on their own."""
    cfg = Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=6,
                      rms_norm_eps=1e-5)
    attn = random_model(cfg, seed=4).layers[0].self_attn
    assert not hasattr(attn.q_proj, "bias") or attn.q_proj.bias is None
    x = np.random.RandomState(5).randn(1, 1, 8).astype(np.float32)
    q, k, v = attn.project(jnp.asarray(x), jnp.zeros((1, 1), jnp.int32))

    def head_norm(y, w):  # y [heads, D]
        return y / np.sqrt((y ** 2).mean(-1, keepdims=True) + 1e-5) * w

    wq, wk = np.asarray(attn.q_proj.kernel[...]), np.asarray(attn.k_proj.kernel[...])
    np.testing.assert_allclose(q[0, 0], head_norm((x[0, 0] @ wq).reshape(2, 6),
                                                  np.asarray(attn.q_norm.weight[...])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k[0, 0], head_norm((x[0, 0] @ wk).reshape(1, 6),
                                                  np.asarray(attn.k_norm.weight[...])),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v[0, 0], (x[0, 0] @ np.asarray(attn.v_proj.kernel[...]))
                               .reshape(1, 6), rtol=1e-5, atol=1e-6)
    assert q.shape == (1, 1, 2, 6) and attn.o_proj.kernel[...].shape == (12, 8)


def test_every_family_implements_the_protocol():
    for name, family in FAMILIES.items():
        preset = next(c for c in PRESETS.values() if c.family == name)
        model = nnx.eval_shape(lambda: init_model(preset.replace(num_hidden_layers=1)))
        assert isinstance(model, CausalLM) and isinstance(model, family.model_cls), name
        assert type(model.config) is family.config_cls


def test_partition_rules_place_every_parameter_of_every_family():
    """No parameter of any preset falls through the rules (which name no family)."""
    import re
    for name, cfg in PRESETS.items():
        _, params = nnx.split(nnx.eval_shape(lambda: init_model(
            cfg.replace(num_hidden_layers=1))), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            dotted = ".".join(map(str, path))
            ndim = len(var.get_value().shape)
            assert any(re.search(p, dotted) and len(axes) == ndim
                       for p, axes in S.PARTITION_RULES), f"{name}: {dotted} has no rule"
    mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    _, params = nnx.split(nnx.eval_shape(lambda: init_model(
        PRESETS["qwen3-0.6b"].replace(num_hidden_layers=1))), nnx.Param)
    specs = {S.path_to_str(p): sh.spec for p, sh in
             jax.tree_util.tree_flatten_with_path(S.tree_shardings(params, mesh))[0]}
    assert specs["layers.0.self_attn.q_norm.weight"] == jax.sharding.PartitionSpec(None)
    assert specs["layers.0.self_attn.q_proj.kernel"] == jax.sharding.PartitionSpec(
        "fsdp", "tensor")  # [1024, 16 x 128]
    assert "lm_head.kernel" not in specs  # tied


def test_preset_shapes_and_parameter_counts():
    # Published sizes: Qwen2.5-1.5B 1,543,714,304 params (tied); R1-Distill adds an untied head
    # of 151936 * 1536 = 233,373,696.
    assert PRESETS["qwen2.5-1.5b"].num_params() == 1_543_714_304
    assert PRESETS["r1-distill-qwen-1.5b"].num_params() == 1_543_714_304 + 151936 * 1536
    assert PRESETS["r1-distill-qwen-1.5b"].head_dim == 128
    # Qwen3-0.6B: 0.6B parameters, 0.44B without the (tied) embedding, as published; by hand:
    # per layer 1024 * (2048 + 2 * 1024) + 2048 * 1024 + 3 * 1024 * 3072 + 2 * 128 + 2 * 1024
    layer = 1024 * 4096 + 2048 * 1024 + 3 * 1024 * 3072 + 256 + 2048
    assert layer == 15_730_944
    assert PRESETS["qwen3-0.6b"].num_params() == 151936 * 1024 + 28 * layer + 1024
    assert PRESETS["qwen3-0.6b"].num_params() - 151936 * 1024 == 440_467_456
    for name in ("tiny", "tiny-qwen3"):
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
    for value, grads in results[1:]:  # the value is a mean of ~0.1 logits cancelling to ~2e-3:
        # float32 rounding of the sum is ~1e-9 whatever the fusion, so an absolute bound too
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6, atol=1e-8)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
