"""Hugging Face weights in and out: parity with `transformers` (torch, float32, CPU) on random
tiny Qwen2 and Qwen3 checkpoints, round trips, shards, bf16 files, shardings and the error
cases."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prorl_jax.models import (CheckpointError, Qwen2Config, Qwen3Config, config_from_hf,
                              config_to_hf, hf_tensors, load_pretrained, save_pretrained)
from prorl_jax.models import hf_io

# name -> (tied, heads, kv heads, hidden, intermediate, vocab, rope_theta, rms_norm_eps,
#          head_dim: None for Qwen2 (hidden / heads), explicit for Qwen3)
VARIANTS = {
    "tied_4to1_odd": (True, 4, 1, 48, 100, 101, 10000.0, 1e-6, None),
    "untied_4to2": (False, 4, 2, 64, 96, 128, 1e6, 1e-6, None),
    "untied_6to3_odd": (False, 6, 3, 48, 100, 101, 5e5, 1e-5, None),
    "tied_4to4": (True, 4, 4, 32, 40, 77, 2e4, 1e-6, None),
    # Qwen3: heads x head_dim = 64 != hidden 48 (as 16 x 128 != 1024 in Qwen3-0.6B)
    "qwen3_tied_4to2_wide": (True, 4, 2, 48, 100, 101, 1e6, 1e-6, 16),
    "qwen3_untied_6to3": (False, 6, 3, 48, 80, 77, 1e4, 1e-5, 8),
}
IDS = np.random.RandomState(0).randint(0, 77, (2, 11))


_FORWARD = jax.jit(lambda model, ids: model(ids))  # one compile per model config


def logits_of(model, ids=IDS) -> np.ndarray:
    return np.asarray(_FORWARD(model, jnp.asarray(ids)))


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def make_hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 transformers Qwen2 or Qwen3 model: every weight, bias and norm (the
    q/k norms included) randomised."""
    tied, heads, kv, hidden, inter, vocab, theta, eps, head_dim = VARIANTS[variant]
    shapes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                  rope_theta=theta, rms_norm_eps=eps, tie_word_embeddings=tied,
                  max_position_embeddings=256)
    torch.manual_seed(seed)
    if head_dim is None:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shapes)).eval()
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **shapes, head_dim=head_dim, attention_bias=False)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (checkpoint dir written by transformers, reference logits [2, 11, V])."""
    out = {}
    for variant in VARIANTS:
        model = make_hf_model(variant)
        path = str(tmp_path_factory.mktemp(variant))
        model.save_pretrained(path, safe_serialization=True)
        out[variant] = (path, hf_logits(model))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    path, ref = checkpoints[variant]
    model = load_pretrained(path)
    cfg = model.config
    tied, heads, kv, hidden, inter, vocab, theta, eps, head_dim = VARIANTS[variant]
    assert (cfg.tie_word_embeddings, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta,
            cfg.rms_norm_eps) == (tied, heads, kv, hidden, inter, vocab, theta, eps)
    assert cfg.family == ("qwen2" if head_dim is None else "qwen3")
    assert cfg.head_dim == (head_dim or hidden // heads)
    assert hasattr(model, "lm_head") == (not tied)
    logits = logits_of(model)
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) < 1e-4


@pytest.mark.parametrize("variant", ["tied_4to1_odd", "untied_6to3_odd", "qwen3_tied_4to2_wide",
                                     "qwen3_untied_6to3"])
def test_round_trip_transformers_loads_same_logits(checkpoints, variant, tmp_path):
    path, ref = checkpoints[variant]
    out = save_pretrained(load_pretrained(path), str(tmp_path / "out"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == ("Qwen2ForCausalLM" if VARIANTS[variant][-1] is None
                                       else "Qwen3ForCausalLM")
    assert reloaded.config.tie_word_embeddings == VARIANTS[variant][0]
    assert rel_err(hf_logits(reloaded), ref) < 1e-6  # float32 bytes copied exactly
    original = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_sharded_save_loads_in_both(checkpoints, tmp_path):
    path, ref = checkpoints["untied_4to2"]
    model = load_pretrained(path)
    out = save_pretrained(model, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, hf_io.INDEX_FILE)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not os.path.exists(os.path.join(out, hf_io.SINGLE_FILE))
    n_params = sum(int(np.prod(t.shape)) for t in transformers.AutoModelForCausalLM
                   .from_pretrained(path).state_dict().values())
    assert index["metadata"]["total_size"] == 4 * n_params
    assert rel_err(logits_of(load_pretrained(out)), ref) < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(hf_logits(hf), ref) < 1e-6


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("untied_4to2", seed=3)
    hf.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="30KB")
    assert os.path.exists(tmp_path / hf_io.INDEX_FILE)
    assert rel_err(logits_of(load_pretrained(str(tmp_path))), hf_logits(hf)) < 1e-4


def test_bf16_checkpoint_reads_and_writes(tmp_path):
    hf = make_hf_model("tied_4to1_odd", seed=1).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    entries = hf_io.checkpoint_tensors(str(tmp_path / "bf16"))
    assert {e.dtype.name for e in entries.values()} == {"bfloat16"}
    # the bf16 weights computed in float32 (hf.float() would keep a bf16-rounded RoPE inv_freq)
    ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "bf16"), dtype=torch.float32))
    model = load_pretrained(str(tmp_path / "bf16"))  # cast to float32 params
    assert model.embed_tokens.embedding[...].dtype == jnp.float32
    assert rel_err(logits_of(model), ref) < 1e-4
    out = save_pretrained(model, str(tmp_path / "out"), dtype=jnp.bfloat16)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rel_err(hf_logits(again), ref) < 1e-6  # bf16 -> f32 -> bf16 is exact


def test_hf_tensors_and_state_save(checkpoints, tmp_path):
    path, ref = checkpoints["untied_6to3_odd"]
    model = load_pretrained(path)
    expected = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    pairs = dict(hf_tensors(model))
    assert sorted(pairs) == sorted(expected)
    for name, array in pairs.items():
        assert np.array_equal(array, expected[name].numpy()), name
    state = nnx.state(model, nnx.Param)
    with pytest.raises(TypeError, match="config"):
        save_pretrained(state, str(tmp_path / "x"))
    out = save_pretrained(state, str(tmp_path / "state"), config=model.config,
                          extra_config={"eos_token_id": 7})
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == 7
    assert rel_err(logits_of(load_pretrained(out)), ref) < 1e-4
    host_state = jax.tree.map(np.asarray, state)  # numpy leaves, as a host-gathered state
    out = save_pretrained(host_state, str(tmp_path / "host"), config=model.config)
    assert rel_err(logits_of(load_pretrained(out)), ref) < 1e-4
    _, bad = hf_io.abstract_params(model.config.replace(intermediate_size=64))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.kernel has shape"):
        save_pretrained(bad, str(tmp_path / "bad"), config=model.config)


def test_load_with_shardings_and_save_gathers(checkpoints, tmp_path):
    path, ref = checkpoints["untied_4to2"]
    mesh = Mesh(np.array(jax.devices()[:4]), ("model",))

    def shardings(param_path):
        spec = P(None, "model") if param_path[-1] == "kernel" else P()
        return NamedSharding(mesh, spec)

    model = load_pretrained(path, shardings=shardings)
    kernel = model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == P(None, "model") and len(kernel.sharding.device_set) == 4
    assert rel_err(logits_of(model), ref) < 1e-4
    out = save_pretrained(model, str(tmp_path / "gathered"))
    assert rel_err(logits_of(load_pretrained(out)), ref) < 1e-4


def test_dtypes_and_overrides(checkpoints):
    path, ref = checkpoints["tied_4to4"]
    model = load_pretrained(path, jnp.bfloat16, param_dtype=jnp.float32, remat="full",
                            max_position_embeddings=64)
    cfg = model.config
    assert (cfg.dtype, cfg.param_dtype, cfg.remat, cfg.max_position_embeddings) == (
        "bfloat16", "float32", "full", 64)
    assert model.layers[1].self_attn.q_proj.kernel[...].dtype == jnp.float32
    assert rel_err(logits_of(model), ref) < 5e-2  # bf16 compute
    with pytest.raises(TypeError, match="unknown Qwen2Config field"):
        load_pretrained(path, num_layers=3)


def test_save_replaces_checkpoint_but_not_other_dirs(checkpoints, tmp_path):
    model = load_pretrained(checkpoints["tied_4to4"][0])
    target = tmp_path / "ckpt"
    save_pretrained(model, str(target), max_shard_bytes=10_000)
    assert os.path.exists(target / hf_io.INDEX_FILE)
    save_pretrained(model, str(target))  # replaces the sharded one with a single file
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dirs left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        save_pretrained(model, str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_config_round_trip_and_old_style_fields():
    cfg = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6,
                      tie_word_embeddings=True)
    hf = config_to_hf(cfg, jnp.bfloat16)
    assert hf["architectures"] == ["Qwen2ForCausalLM"] and hf["model_type"] == "qwen2"
    assert hf["torch_dtype"] == "bfloat16"
    assert config_from_hf(hf) == cfg
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}  # transformers 4 style
    old.update(sliding_window=4096, use_sliding_window=False, num_key_value_heads=None)
    assert config_from_hf(old) == cfg.replace(num_key_value_heads=2)
    qwen3 = Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=6)
    hf = config_to_hf(qwen3)
    assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["model_type"] == "qwen3"
    assert (hf["head_dim"], hf["attention_bias"]) == (6, False)
    assert config_from_hf(hf) == qwen3
    del hf["head_dim"]  # absent: hidden / heads, as transformers does
    assert config_from_hf(hf) == qwen3.replace(head_dim=4)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
     r"model_type='llama' is not supported; expected one of \['qwen2', 'qwen3'\]"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "expected model_type 'qwen2', architectures "
                                              r"\['Qwen2ForCausalLM'\]"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"hidden_size": None}, r"missing required field\(s\) \['hidden_size'\]"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
])
def test_bad_config_errors(change, message):
    hf = config_to_hf(Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=12,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1))
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None or k != "hidden_size"}
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf, "dir/config.json")


def _copy_checkpoint(src: str, dst) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return str(dst)


def _rewrite_tensors(path: str, edit) -> None:
    """Rewrites model.safetensors with edit(dict name -> array) applied."""
    file = os.path.join(path, hf_io.SINGLE_FILE)
    tensors = {k: np.array(hf_io.map_tensor(e)) for k, e in hf_io.read_safetensors_header(
        file).items()}
    edit(tensors)
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    with open(file + ".new", "wb") as f:
        f.write(hf_io._safetensors_header(specs))
        for v in tensors.values():
            f.write(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
    os.replace(file + ".new", file)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"head_dim": 5}, "head_dim=5 must be even"),
])
def test_bad_qwen3_config_errors(change, message):
    hf = config_to_hf(Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=12,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=4))
    hf.update(change)
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf, "dir/config.json")


def test_missing_qwen3_norm_is_named(tmp_path, checkpoints):
    path = _copy_checkpoint(checkpoints["qwen3_untied_6to3"][0], tmp_path / "c")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.1.self_attn.k_norm"
                                              r".weight \(expected shape \[8\]\)"):
        load_pretrained(path)


def test_missing_directory_and_files(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    path = _copy_checkpoint(checkpoints["tied_4to4"][0], tmp_path / "c")
    os.remove(os.path.join(path, hf_io.SINGLE_FILE))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
        load_pretrained(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_pretrained(path)


def test_index_naming_a_missing_shard(tmp_path, checkpoints):
    model = load_pretrained(checkpoints["tied_4to4"][0])
    out = save_pretrained(model, str(tmp_path / "s"), max_shard_bytes=10_000)
    shard = sorted(set(json.load(open(os.path.join(out, hf_io.INDEX_FILE)))["weight_map"]
                       .values()))[1]
    os.remove(os.path.join(out, shard))
    with pytest.raises(CheckpointError, match=r"index.json: shard model-00002-of-\d+"
                                              r"\.safetensors does not exist"):
        load_pretrained(out)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     r"missing tensor model.layers.1.self_attn.k_proj.bias \(expected shape \[32\]\)"),
    (lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}),
     r"model.safetensors: tensor model.norm.weight has shape \[31\], expected \[32\]"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(2, np.float32)}),
     r"unexpected tensor\(s\) \['model.layers.0.mlp.extra.weight'\]"),
])
def test_bad_tensor_errors(tmp_path, checkpoints, edit, message):
    path = _copy_checkpoint(checkpoints["tied_4to4"][0], tmp_path / "c")
    _rewrite_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(path)


def test_tied_checkpoint_with_lm_head_and_inv_freq_is_accepted(tmp_path, checkpoints, caplog):
    path, ref = checkpoints["tied_4to4"]
    path = _copy_checkpoint(path, tmp_path / "c")
    _rewrite_tensors(path, lambda t: t.update({
        "lm_head.weight": t["model.embed_tokens.weight"].copy(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    assert rel_err(logits_of(load_pretrained(path)), ref) < 1e-4
    assert "lm_head.weight differs" not in caplog.text
    _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    load_pretrained(path)
    assert "lm_head.weight differs" in caplog.text


def test_truncated_file_is_reported(tmp_path, checkpoints):
    path = _copy_checkpoint(checkpoints["tied_4to4"][0], tmp_path / "c")
    file = os.path.join(path, hf_io.SINGLE_FILE)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 4)
    with pytest.raises(CheckpointError, match="does not fit its shape"):
        load_pretrained(path)
