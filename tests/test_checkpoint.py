"""Checkpoints: exact resume, retention, a killed save, restore onto another mesh, restoring
one part (the export's read)."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from prorl_jax import sharding as S
from prorl_jax import train_state as TS
from prorl_jax.checkpoint import Checkpointer
from train_helpers import fresh_state, make_batch, mesh_for, train_step_for

ONE = (1, 1, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_state(mesh):
    return TS.abstract_state(fresh_state(), S.tree_shardings(fresh_state(), mesh))


def assert_bitwise_equal(a, b):
    equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(jax.tree.leaves(equal))


def test_resume_is_bitwise_identical(tmp_path):
    step, sh = train_step_for(ONE)
    batches = [make_batch(seed=i) for i in range(3)]
    straight = jax.device_put(fresh_state(), sh)
    for batch in batches:
        straight, _ = step(straight, batch)

    state = jax.device_put(fresh_state(), sh)
    state, _ = step(state, batches[0])
    extra = {"data": {"epoch": 0, "position": 16}, "resets": [{"step": 0, "trigger": "start"}]}
    with Checkpointer(str(tmp_path), keep_last=2) as ckpt:
        ckpt.save(1, state, extra)
        ckpt.wait_until_finished()
    del state
    with Checkpointer(str(tmp_path)) as ckpt:  # a new process would do just this
        assert ckpt.latest_step() == 1
        resumed, extra_back = ckpt.restore(abstract_state(mesh_for(*ONE)))
    assert extra_back == extra
    for batch in batches[1:]:
        resumed, _ = step(resumed, batch)
    assert int(resumed.step) == 3
    assert_bitwise_equal(resumed, straight)


def test_keep_last_n_plus_every_k(tmp_path):
    state = fresh_state()
    with Checkpointer(str(tmp_path), keep_last=2, keep_every=3) as ckpt:
        for s in range(1, 8):
            ckpt.save(s, state, {"s": s})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 6, 7]
        assert ckpt.latest_step() == 7
        _, extra = ckpt.restore(abstract_state(mesh_for(*ONE)), step=3)
        assert extra == {"s": 3}
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
            ckpt.restore(abstract_state(mesh_for(*ONE)), step=4)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np
    from prorl_jax.checkpoint import Checkpointer
    from train_helpers import fresh_state
    state = fresh_state()
    state = state._replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt = Checkpointer(sys.argv[1], keep_last=5, async_save=True)
    ckpt.save(2, state, {"s": 2})   # returns while the background thread writes
    os.kill(os.getpid(), signal.SIGKILL)  # crash mid-save
""")


def test_a_killed_save_leaves_the_last_checkpoint_restorable(tmp_path):
    state = fresh_state()
    with Checkpointer(str(tmp_path), keep_last=5) as ckpt:
        ckpt.save(1, state, {"s": 1})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    debris = [n for n in os.listdir(tmp_path) if n.startswith("2")]
    assert debris and "2" not in debris, debris  # killed mid-save: only a temporary dir of 2
    with Checkpointer(str(tmp_path), keep_last=5) as ckpt:
        assert ckpt.all_steps() == [1]  # the partial step 2 is not a checkpoint
        restored, extra = ckpt.restore(abstract_state(mesh_for(*ONE)))
    assert extra == {"s": 1}
    assert_bitwise_equal(restored, state)
    # Saving again over the debris works.
    with Checkpointer(str(tmp_path), keep_last=5) as ckpt:
        ckpt.save(2, state, {"s": 2})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]


def test_saved_on_8_devices_restores_on_4(tmp_path):
    mesh8, mesh4 = mesh_for(1, 8, 1), mesh_for(1, 2, 2)
    state = fresh_state()
    state8 = jax.device_put(state, S.tree_shardings(state, mesh8))
    up8 = state8.params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert len(up8.sharding.device_set) == 8
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(5, state8)
        ckpt.wait_until_finished()
        restored, extra = ckpt.restore(abstract_state(mesh4))
    assert extra == {}
    up4 = restored.params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert up4.sharding.mesh.devices.size == 4 and up4.sharding.spec == P("fsdp", "tensor")
    assert_bitwise_equal(restored, state)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0"):
        Checkpointer(str(tmp_path), keep_last=0)
    with Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(abstract_state(mesh_for(*ONE)))
        with pytest.raises(TypeError, match="JSON-serialisable"):
            ckpt.save(1, fresh_state(), {"bad": object()})



def test_restore_one_part_and_the_extra_alone(tmp_path):
    """What the export reads: the policy's (or the reference's) arrays and the extra JSON,
    not the optimizer state."""
    state = fresh_state()
    state = state._replace(ref_params=jax.tree.map(lambda p: p * 0.5, state.ref_params))
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(4, state, {"model": {"x": 1}})
    mesh = mesh_for(*ONE)
    with Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.restore_extra() == {"model": {"x": 1}}
        for name in ("params", "ref_params"):
            part = getattr(state, name)
            back = ckpt.restore_part(name, TS.abstract_state(part, S.tree_shardings(part, mesh)))
            assert_bitwise_equal(back, part)
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
            ckpt.restore_extra(5)
