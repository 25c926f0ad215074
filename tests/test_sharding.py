"""Mesh, partition rules, batch sharding, and the update's invariance to the mesh."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from prorl_jax import sharding as S
from prorl_jax import train_state as TS
from prorl_jax.models import PRESETS, init_model
from train_helpers import assert_same_update, fresh_state, make_batch, mesh_for, train_step_for

# (mesh (data, fsdp, tensor), micro_batch_rows), each against one device, whole batch:
# FSDP 8 in one pass; FSDP 4 x tensor 2 accumulating over 4 micro-batches of 2 rows.
MESHES = [((1, 8, 1), 0), ((1, 4, 2), 2)]


def test_mesh_shape_fills_one_axis_and_rejects_bad_sizes():
    assert S.mesh_shape(S.MeshConfig(), 8) == (1, 8, 1)
    assert S.mesh_shape(S.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert S.mesh_shape(S.MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        S.mesh_shape(S.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        S.mesh_shape(S.MeshConfig(fsdp=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 4"):
        S.mesh_shape(S.MeshConfig(data=1, fsdp=2, tensor=2), 8)
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        S.mesh_shape(S.MeshConfig(tensor=0), 8)
    mesh = S.make_mesh(S.MeshConfig(fsdp=-1, tensor=2), jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert S.MeshConfig.from_config({"mesh": {"data": 1, "fsdp": 4, "tensor": 2}}) == \
        S.MeshConfig(1, 4, 2)


def test_rules_place_every_qwen2_parameter_of_the_1_5b_shape():
    cfg = PRESETS["r1-distill-qwen-1.5b"].replace(num_hidden_layers=2)  # every layer alike
    _, params = TS.split_params(nnx.eval_shape(lambda: init_model(cfg)))
    mesh = mesh_for(1, 4, 2)
    specs = {S.path_to_str(p): sh.spec for p, sh in
             jax.tree_util.tree_flatten_with_path(S.tree_shardings(params, mesh))[0]}
    expected = {
        "embed_tokens.embedding": P("tensor", "fsdp"),        # [151936, 1536]
        "layers.0.self_attn.q_proj.kernel": P("fsdp", "tensor"),
        "layers.0.self_attn.k_proj.kernel": P("fsdp", "tensor"),  # [1536, 256]
        "layers.0.self_attn.q_proj.bias": P("tensor"),
        "layers.0.self_attn.o_proj.kernel": P("tensor", "fsdp"),
        "layers.1.mlp.gate_proj.kernel": P("fsdp", "tensor"),
        "layers.1.mlp.up_proj.kernel": P("fsdp", "tensor"),
        "layers.1.mlp.down_proj.kernel": P("tensor", "fsdp"),
        "layers.1.input_layernorm.weight": P(None),
        "layers.1.post_attention_layernorm.weight": P(None),
        "norm.weight": P(None),
        "lm_head.kernel": P("fsdp", "tensor"),
    }
    for path, spec in expected.items():
        assert specs[path] == spec, path
    # Every matrix is sharded on both dims at this size: nothing falls through to P().
    assert all(spec != P() for spec in specs.values())
    assert len(specs) == 2 + 2 * 12 + 1  # embedding, final norm, lm_head; 12 per layer


def test_indivisible_dimension_falls_back_to_replicated():
    mesh = mesh_for(1, 4, 2)
    assert S.spec_for("mlp.up_proj.kernel", (64, 176), mesh) == P("fsdp", "tensor")
    assert S.spec_for("mlp.up_proj.kernel", (6, 176), mesh) == P(None, "tensor")
    assert S.spec_for("mlp.up_proj.kernel", (64, 7), mesh) == P("fsdp", None)
    assert S.spec_for("self_attn.q_proj.bias", (5,), mesh) == P(None)
    assert S.spec_for("something.else", (8, 8), mesh) == P()


def test_optimizer_state_mirrors_the_parameters():
    state = fresh_state()
    mesh = mesh_for(1, 4, 2)
    sh = S.tree_shardings(state, mesh)
    adam = sh.opt_state[1][0]
    q = ["layers", 0, "self_attn", "q_proj", "kernel"]

    def get(tree):
        for k in q:
            tree = tree[k]
        return tree.get_value() if isinstance(tree, nnx.Variable) else tree
    assert get(sh.params).spec == P("fsdp", "tensor")
    assert get(adam.mu).spec == get(sh.params).spec == get(adam.nu).spec
    assert get(sh.ref_params).spec == get(sh.params).spec
    assert adam.count.spec == P() and sh.step.spec == P()


def test_batch_sharding_and_host_slices_on_one_process():
    mesh = mesh_for(2, 2, 2)
    assert S.batch_shards(mesh) == 4
    batch = make_batch()
    g = S.global_batch(batch, mesh)
    for k, v in batch.items():
        np.testing.assert_array_equal(np.asarray(g[k]), v)
        assert g[k].sharding.spec == P(("data", "fsdp"))
    assert S.host_row_slice(8) == slice(0, 8)
    with pytest.raises(ValueError, match="coordinator_address"):
        S.initialize_distributed("127.0.0.1:1234", None, None)
    with pytest.raises(ValueError, match="process_id=2"):
        S.initialize_distributed("127.0.0.1:1234", 2, 2)
    assert S.initialize_distributed() is False  # no cluster visible: single process


@pytest.fixture(scope="module")
def one_device_result():
    step, sh = train_step_for((1, 1, 1))
    state, metrics = step(jax.device_put(fresh_state(), sh), make_batch())
    return jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("mesh_shape,micro_batch_rows", MESHES)
def test_update_is_the_same_on_every_mesh(mesh_shape, micro_batch_rows, one_device_result):
    ref_state, ref_metrics = one_device_result
    step, sh = train_step_for(mesh_shape, micro_batch_rows)
    state, metrics = step(jax.device_put(fresh_state(), sh), make_batch())
    assert metrics["nonfinite"] == 0.0
    for k in ("loss", "grad_norm", "kl", "pg_loss", "entropy", "clip_frac_lower"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5, atol=1e-7, err_msg=k)
    changed = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params,
                           fresh_state().params)
    assert max(jax.tree.leaves(changed)) > 1e-4  # the step moved the parameters
    assert_same_update(state, ref_state)
    # The state comes back with the shardings it went in with.
    kernel = state.params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    want = sh.params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.sharding.is_equivalent_to(want, 2)


def test_rows_not_divisible_by_the_batch_axes_is_a_clear_error():
    step, _ = train_step_for((1, 8, 1))
    batch = {k: v[:4] for k, v in make_batch().items()}
    with pytest.raises(ValueError, match="multiple of data\\*fsdp = 8"):
        step(fresh_state(), batch)
