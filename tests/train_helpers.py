"""Shared set-up for the update / sharding / checkpoint tests, and the two-process worker.

A one-layer tiny Qwen2 in float32, a deterministic mini-batch of 8 rows, and jitted train steps
cached per (mesh shape, micro_batch_rows) so each compiles once per test session.

As a script (the two-process test): `python tests/train_helpers.py COORD NPROC PID OUT` starts
jax.distributed on localhost, runs TWO_PROCESS_STEPS updates on a mesh over all processes'
devices with every process feeding its own rows, saves and restores a checkpoint across the
processes onto another mesh, writes the policy as a HF directory `hf/` beside OUT from both
processes (save_pretrained gathers the sharded arrays), and (process 0) writes the metrics to OUT
as JSON and the parameters to params.npz beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prorl_jax import sharding as S
from prorl_jax import train_state as TS
from prorl_jax import update as U
from prorl_jax.models import PRESETS, init_model

MODEL_CFG = PRESETS["tiny"].replace(num_hidden_layers=1)
OPTIM_CFG = TS.OptimConfig(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
UPDATE_CFG = U.UpdateConfig(eps_low=0.2, eps_high=0.4, beta=0.1, temperature=1.2,
                            logprob_chunk=48)
ROWS, TIME = 8, 12
TWO_PROCESS_STEPS = 2
# Tests compile with XLA's backend optimisations off: half the compile time, same program.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_model():
    return init_model(MODEL_CFG, seed=0)


@functools.lru_cache(maxsize=None)
def graphdef_and_tx():
    graphdef, _ = TS.split_params(nnx.eval_shape(make_model))
    return graphdef, TS.make_optimizer(OPTIM_CFG), TS.make_schedule(OPTIM_CFG)


def random_params(seed: int = 0) -> nnx.State:
    """Params drawn on host with numpy (no compilation): norms 1 + N(0, 0.1), the rest
    N(0, 0.02) - biases included, so every parameter matters."""
    _, abstract = TS.split_params(nnx.eval_shape(make_model))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = S.path_to_str(path)
        base, scale = (1.0, 0.1) if name.endswith("norm.weight") else (0.0, 0.02)
        return jnp.asarray(base + scale * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def fresh_state() -> TS.TrainState:
    """The step-0 state (unsharded, float32 reference), the same on every call and process.
    Shared between tests: jax arrays are immutable and the tests' steps do not donate."""
    return TS.init_train_state(random_params(), graphdef_and_tx()[1], ref_dtype="float32")


forward_logits = jax.jit(lambda params, ids: nnx.merge(graphdef_and_tx()[0], params)(ids),
                         compiler_options=FAST_COMPILE)
"""(params, input_ids [B, T]) -> the model's float32 logits [B, T, V]."""


def make_batch(seed: int = 0, rows: int = ROWS, time: int = TIME) -> dict[str, np.ndarray]:
    """Right-padded rows: a 4-token prompt, a response of varying length, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, MODEL_CFG.vocab_size, (rows, time)).astype(np.int32)
    ends = 6 + (np.arange(rows) % (time - 6))              # one past the last response token
    t = np.arange(time)[None, :]
    mask = ((t >= 3) & (t < ends[:, None] - 1)).astype(np.float32)  # targets t+1 in response
    return dict(
        input_ids=ids, targets=np.roll(ids, -1, axis=1).astype(np.int32), loss_mask=mask,
        advantages=rng.normal(size=rows).astype(np.float32),
        old_logp=(-4.8 + 0.3 * rng.normal(size=(rows, time))).astype(np.float32),
        ref_logp=(-4.8 + 0.3 * rng.normal(size=(rows, time))).astype(np.float32))


@functools.lru_cache(maxsize=None)
def mesh_for(data: int, fsdp: int, tensor: int):
    n = data * fsdp * tensor
    return S.make_mesh(S.MeshConfig(data, fsdp, tensor), jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def train_step_for(mesh_shape: tuple, micro_batch_rows: int = 0, donate: bool = False):
    """(train_step, state_shardings) on the mesh of mesh_shape (data, fsdp, tensor)."""
    mesh = mesh_for(*mesh_shape)
    graphdef, tx, schedule = graphdef_and_tx()
    shardings = S.tree_shardings(fresh_state(), mesh)
    cfg = dataclasses.replace(UPDATE_CFG, micro_batch_rows=micro_batch_rows)
    step = U.make_train_step(graphdef, tx, schedule, cfg, mesh=mesh, state_shardings=shardings,
                             donate=donate, compiler_options=FAST_COMPILE)
    return step, shardings


@functools.lru_cache(maxsize=None)
def logprob_fn_for(mesh_shape: tuple, micro_batch_rows: int = 0):
    mesh = mesh_for(*mesh_shape)
    cfg = dataclasses.replace(UPDATE_CFG, micro_batch_rows=micro_batch_rows)
    shardings = S.tree_shardings(fresh_state().params, mesh)
    return U.make_logprob_fn(graphdef_and_tx()[0], cfg, mesh=mesh, param_shardings=shardings,
                             compiler_options=FAST_COMPILE)


def assert_same_update(a, b):
    """Parameters equal to a small fraction of one learning-rate step (the first Adam step is
    ~lr * g / |g|, sensitive to round-off where |g| is tiny), optimizer moments to float noise."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                                                         atol=OPTIM_CFG.lr * 1e-2),
                 a.params, b.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                                         atol=1e-9),
                 a.opt_state, b.opt_state)


def _replicated_host(tree, mesh):
    """Gathers a (possibly multi-process) sharded tree onto every host as numpy arrays."""
    gather = jax.jit(lambda t: t, out_shardings=S.replicated(mesh))
    return jax.tree.map(np.asarray, gather(tree))


def _checkpoint_round_trip(state, host_params, directory: str) -> bool:
    """Saves the multi-process state, restores it onto another mesh over the same devices
    (FSDP 2 x tensor 2), and says whether the step and every parameter came back exactly."""
    from prorl_jax.checkpoint import Checkpointer
    other = S.make_mesh(S.MeshConfig(fsdp=-1, tensor=2))
    abstract = TS.abstract_state(state, S.tree_shardings(state, other))
    with Checkpointer(os.path.join(directory, "ckpt")) as ckpt:
        ckpt.save(int(state.step), state, {"processes": jax.process_count()})
        ckpt.wait_until_finished()
        restored, extra = ckpt.restore(abstract)
    back = _replicated_host(restored.params, other)
    same = jax.tree.map(np.array_equal, back, host_params)
    return (all(jax.tree.leaves(same)) and extra == {"processes": jax.process_count()}
            and int(_replicated_host(restored.step, other)) == int(state.step))


def two_process_worker(coordinator: str, num_processes: int, process_id: int, out: str):
    S.initialize_distributed(coordinator, num_processes, process_id)
    mesh = S.make_mesh(S.MeshConfig(fsdp=-1))
    graphdef, tx, schedule = graphdef_and_tx()
    state = fresh_state()
    shardings = S.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = U.make_train_step(graphdef, tx, schedule, UPDATE_CFG, mesh=mesh,
                             state_shardings=shardings, compiler_options=FAST_COMPILE)
    metrics = []
    for i in range(TWO_PROCESS_STEPS):
        rows = S.host_row_slice(ROWS)
        local = {k: v[rows] for k, v in make_batch(seed=i).items()}
        state, m = step(state, S.global_batch(local, mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    params = _replicated_host(state.params, mesh)
    restored_equal = _checkpoint_round_trip(state, params, os.path.dirname(out))
    from prorl_jax.models import save_pretrained  # the weight sync's writer: sharded over both
    save_pretrained(state.params, os.path.join(os.path.dirname(out), "hf"), config=MODEL_CFG,
                    dtype=jnp.bfloat16)
    if process_id == 0:
        leaves = {f"leaf{i}": x for i, x in enumerate(jax.tree.leaves(params))}
        np.savez(os.path.join(os.path.dirname(out), "params.npz"), **leaves)
        with open(out, "w") as f:
            json.dump({"metrics": metrics, "num_devices": jax.device_count(),
                       "processes": jax.process_count(), "restored_equal": restored_equal}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    two_process_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
