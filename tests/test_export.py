"""`python -m prorl_jax.export`: a demo run's policy (at a chosen step) and reference as Hugging
Face directories; transformers loads them with the JAX model's float32 logits, and the weights
are byte for byte what the vLLM weight sync writes."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from prorl_jax import export as export_lib
from prorl_jax.models import save_pretrained
from prorl_jax.trainer import Trainer
from test_trainer import small_config

pytestmark = pytest.mark.usefixtures("trainer_compile_cache")  # conftest.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Keeps(Trainer):
    """Keeps the host policy after every step (`kept[s]`: the params of checkpoint s)."""

    def train_step(self, step):
        metrics = super().train_step(step)
        self.kept[step + 1] = jax.device_get(self.state.params)
        return metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two demo steps, a checkpoint after each; the reference stays the initial policy."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = small_config(**{"total_steps": 2, "eval.every_steps": 0,
                          "checkpoint.every_steps": 1})
    trainer = _Keeps(cfg, workdir)
    trainer.kept = {}
    trainer.run()
    trainer.close()
    return workdir, trainer


def _hf_logits(path, ids):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def _jax_logits(trainer, params, ids):
    return np.asarray(nnx.merge(trainer.graphdef, params)(ids))


def _ids(trainer):
    return np.asarray([trainer.tokenizer.encode("next 7 next 41")] * 2, np.int32)


def test_cli_exports_the_policy_of_a_step_that_transformers_loads(run, tmp_path):
    import tokenizers
    workdir, trainer = run
    out = str(tmp_path / "policy_step1")
    done = subprocess.run([sys.executable, "-m", "prorl_jax.export", workdir, "--step", "1",
                           out], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(step 1)" in done.stdout
    ids = _ids(trainer)
    want = _jax_logits(trainer, trainer.kept[1], ids)
    np.testing.assert_allclose(_hf_logits(out, ids), want, rtol=1e-4, atol=1e-4)
    later = _jax_logits(trainer, trainer.kept[2], ids)
    assert np.abs(later - want).max() > 1e-3  # step 1, not the latest
    # The run's tokenizer files. (transformers 5's AutoTokenizer reads any tokenizer next to
    # a qwen2 config.json as Qwen2Tokenizer, which drops the demo's character vocabulary's
    # spaces - true of the shipped demo tokenizer directory too - so read the files as such.)
    tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert tok.encode("next 7").ids == trainer.tokenizer.encode("next 7")
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["eos_token"] == trainer.tokenizer.eos_token
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"


def test_reference_export_and_the_weight_sync_format(run, tmp_path):
    workdir, trainer = run
    ids = _ids(trainer)
    ref, step = export_lib.export(workdir, str(tmp_path / "ref"), reference=True)
    assert step == 2  # the latest
    want = _jax_logits(trainer, jax.device_get(trainer.state.ref_params), ids)
    np.testing.assert_allclose(_hf_logits(ref, ids), want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - _jax_logits(trainer, trainer.kept[2], ids)).max() > 1e-3
    # bf16, as the vLLM weight sync writes it (build.build_engine's writer): the same files.
    bf16, _ = export_lib.export(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
    synced = save_pretrained(trainer.state.params, str(tmp_path / "sync"),
                             config=trainer.model_config, dtype="bfloat16")
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(bf16, name), "rb") as a, open(os.path.join(synced, name),
                                                             "rb") as b:
            assert a.read() == b.read(), name
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(bf16))


def test_bad_workdir_step_and_output_are_named(run, tmp_path):
    workdir, _ = run
    out = str(tmp_path / "out")
    with pytest.raises(export_lib.ExportError, match="nope: no such directory"):
        export_lib.export(str(tmp_path / "nope"), out)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(export_lib.ExportError, match="empty/checkpoints: missing"):
        export_lib.export(str(tmp_path / "empty"), out)
    with pytest.raises(export_lib.ExportError,
                       match=r"--step 7: .*checkpoints has no checkpoint for it \(steps \[1, 2\]"):
        export_lib.export(workdir, out, step=7)
    os.makedirs(tmp_path / "notes")
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(export_lib.ExportError, match="notes: exists and is not"):
        export_lib.export(workdir, str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert export_lib.main([workdir, out, "--dtype", "float16"]) == 2
    assert not os.path.exists(out)
