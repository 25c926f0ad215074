"""Weight syncs against the vLLM test double (fault injection: failed and partial loads,
stale weights, {"success": false} answers), the worker extension on fake workers, the
multi-process error hand-off, the trainer's stop on a failed sync, and the launchers."""
import json
import os
import subprocess
import threading
import time
import types

import numpy as np
import pytest
import safetensors.numpy

from prorl_jax.rollout.base import RolloutEngine
from prorl_jax.rollout.vllm_http import VLLMServerError
from prorl_jax.rollout.vllm_sync import WeightSyncError
from prorl_jax.rollout.vllm_worker import (EXTENSION_CLS, LOAD_METHOD, UNKNOWN, UNTOUCHED,
                                           VERSION_FILE, VERSION_METHOD, manifest_difference,
                                           read_manifest)
from tests.test_vllm_client import (GEN, PARAMS_V1, PROMPTS, make_client, npz_writer,
                                    servers)  # noqa: F401  (servers: a fixture)
from tests.vllm_double import VLLMDouble, weights_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS_V2 = {k: v + 1.0 for k, v in PARAMS_V1.items()}
SYNC_PATHS = ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache", "/collective_rpc",
              "/resume"]


def sync_paths(double):
    return double.paths("/pause", "/collective_rpc", "/reset_prefix_cache", "/resume")


# ---- the sync and its checks ----------------------------------------------------------------
@pytest.mark.parametrize("servers", [[{}, {"num_workers": 3}]], indirect=True)
def test_weight_sync_order_files_and_version(servers, tmp_path):
    client = make_client(servers, tmp_path)
    before = client.generate(PROMPTS[:2], **GEN)
    client.update_weights(PARAMS_V1, 1)
    path = str(tmp_path / "weights" / "policy-v1")
    assert sorted(os.listdir(tmp_path / "weights")) == ["policy-v1"]  # no temp dir left
    assert json.load(open(os.path.join(path, VERSION_FILE))) == {"weight_version": 1}
    for s in servers:
        rpcs = [r["body"] for r in s.requests if r["path"] == "/collective_rpc"]
        assert sync_paths(s)[1:] == SYNC_PATHS  # after the start-up layout check
        assert [b["method"] for b in rpcs[1:]] == [LOAD_METHOD, VERSION_METHOD]
        assert rpcs[1]["args"] == [path, "1"]
        assert not s.paused and s.prefix_cache_resets == 1
        for w in s.workers:
            assert w.prorl_weight_version() == {"weight_version": 1, "intact": True}
            assert s.key == weights_key(PARAMS_V1)
    after = client.generate(PROMPTS[:2], **GEN)
    assert after.weight_version == 1 and client.weight_version == 1
    assert after.token_ids != before.token_ids  # the double's logits follow its weights
    assert set(client.last_sync_timing) == {"write_s", "sync_s", "total_s", "pause_s",
                                            "load_s", "resume_s"}
    client.update_weights(PARAMS_V2, 2)
    assert sorted(os.listdir(tmp_path / "weights")) == ["policy-v2"]  # v1 removed once synced


def test_update_without_wait_overlaps_the_write_and_syncs_before_generating(servers, tmp_path):
    release, started = threading.Event(), threading.Event()

    def slow_writer(params, path):
        started.set()
        release.wait(5)
        npz_writer(params, path)

    client = make_client(servers, tmp_path, weight_writer=slow_writer)
    t0 = time.monotonic()
    client.update_weights(PARAMS_V1, 1, wait=False)
    assert time.monotonic() - t0 < 0.5 and started.wait(2)  # returned while writing
    assert servers[0].paths("/pause") == [] and client.weight_version == 0
    threading.Timer(0.3, release.set).start()
    batch = client.generate(PROMPTS[:1], **GEN)  # finishes the update first
    assert batch.weight_version == 1 and servers[0].key == weights_key(PARAMS_V1)
    assert client.last_sync_timing["write_s"] >= 0.2


@pytest.mark.parametrize("servers", [[{"load_fault": "stale"}]], indirect=True)
def test_a_load_that_changes_nothing_is_caught_and_the_start_up_weights_restored(servers,
                                                                                 tmp_path):
    client = make_client(servers, tmp_path)
    with pytest.raises(WeightSyncError, match=rf"{UNKNOWN}.*differs from the file.*the "
                                              r"start-up weights reloaded.*resumed"):
        client.update_weights(PARAMS_V1, 3)
    assert client.weight_version == 0 and not servers[0].paused
    assert os.listdir(tmp_path / "weights") == []  # the failed directory is not kept


@pytest.mark.parametrize("servers", [[{}, {}]], indirect=True)
def test_half_loaded_server_is_restored_to_the_last_good_weights(servers, tmp_path):
    """A reload that fails midway leaves a mix of weights (a real half-loaded engine dies on
    its next forward): the client reloads the last good version, verifies it and resumes;
    generation refuses until a sync succeeds."""
    client = make_client(servers, tmp_path)
    client.update_weights(PARAMS_V1, 1)
    for w in servers[1].workers:
        w.load_fault = "midway_once"
    with pytest.raises(WeightSyncError) as failure:
        client.update_weights(PARAMS_V2, 2)
    assert list(failure.value.servers) == [servers[1].url]
    assert "weights v1 reloaded from" in str(failure.value) and UNKNOWN in str(failure.value)
    assert servers[1].key == weights_key(PARAMS_V1) and not servers[1].paused
    assert servers[0].key == weights_key(PARAMS_V2)  # the other server synced
    assert sorted(os.listdir(tmp_path / "weights")) == ["policy-v1"]  # last good kept
    with pytest.raises(WeightSyncError, match="earlier sync failed"):
        client.generate(PROMPTS, **GEN)
    client.update_weights(PARAMS_V2, 3)
    assert client.generate(PROMPTS[:2], **GEN).weight_version == 3 and not servers[1].dead


@pytest.mark.parametrize("servers", [[{"load_fault": "midway"}]], indirect=True)
def test_server_left_paused_when_the_last_good_weights_cannot_be_restored(servers, tmp_path):
    client = make_client(servers, tmp_path)
    with pytest.raises(WeightSyncError, match=r"restoring the start-up weights failed too.*left "
                                              r"PAUSED with unknown weights; restart it"):
        client.update_weights(PARAMS_V1, 1)  # the restore fails midway as well
    assert servers[0].paused and servers[0].paths("/resume") == []


def test_partial_directory_is_refused_untouched_and_resumed(servers, tmp_path):
    client = make_client(servers, tmp_path)
    client.update_weights(PARAMS_V1, 1)
    with pytest.raises(WeightSyncError, match=rf"{UNTOUCHED}.*1 tensor\(s\) missing, e.g. "
                                              r"\['lm_head.weight'\].*untouched \(still "
                                              r"weights v1\); resumed"):
        client.update_weights({"model.embed_tokens.weight": PARAMS_V2[
            "model.embed_tokens.weight"]}, 2)
    assert servers[0].key == weights_key(PARAMS_V1) and not servers[0].paused
    loads = [r["body"]["args"][1] for r in servers[0].requests
             if r["path"] == "/collective_rpc" and r["body"]["method"] == LOAD_METHOD]
    assert loads == ["1", "2"]  # untouched weights need no restore


@pytest.mark.parametrize("servers", [[{"reset_fails": 2}], [{"reset_fails": 99}]],
                         indirect=True)
def test_reset_prefix_cache_false_is_retried_then_an_error(servers, tmp_path):
    client = make_client(servers, tmp_path)
    if servers[0].reset_fails == 2:
        client.update_weights(PARAMS_V1, 1)
        assert servers[0].prefix_cache_resets == 3 and client.weight_version == 1
        return
    with pytest.raises(WeightSyncError, match=r"reset_prefix_cache answered \{'success': "
                                              r"False\} 5 times"):
        client.update_weights(PARAMS_V1, 1)
    assert client.weight_version == 0


@pytest.mark.parametrize("servers", [[{"fail_rpc_method": LOAD_METHOD}]], indirect=True)
def test_load_error_is_not_retried_and_the_server_resumes(servers, tmp_path):
    client = make_client(servers, tmp_path, max_retries=3)
    with pytest.raises(WeightSyncError, match=rf"{servers[0].url}: loading weights v1 .*HTTP 500"
                                              r".*untouched \(still the start-up weights\)"):
        client.update_weights(PARAMS_V1, 1)
    loads = [r for r in servers[0].requests if r["path"] == "/collective_rpc"
             and r["body"]["method"] == LOAD_METHOD]
    assert len(loads) == 1 and not servers[0].paused and servers[0].paths("/resume")


def test_failed_writer_leaves_nothing_and_calls_no_server(servers, tmp_path):
    def broken_writer(params, path):
        open(os.path.join(path, "model.safetensors"), "w").write("half")
        raise OSError("disk full")

    client = make_client(servers, tmp_path, weight_writer=broken_writer)
    with pytest.raises(OSError, match="disk full"):
        client.update_weights(PARAMS_V1, 1)
    assert os.listdir(tmp_path / "weights") == []
    assert servers[0].paths("/pause") == [] and len(servers[0].paths("/collective_rpc")) == 1
    with pytest.raises(ValueError, match="version: expected a non-negative int"):
        client.update_weights(PARAMS_V1, -1)


def test_server_weights_dir_is_the_path_sent(servers, tmp_path):
    (tmp_path / "weights").mkdir()
    os.symlink(tmp_path / "weights", tmp_path / "mnt")  # the servers' view of weights_dir
    client = make_client(servers, tmp_path, server_weights_dir=str(tmp_path / "mnt"))
    client.update_weights(PARAMS_V1, 4)
    load = [r for r in servers[0].requests if r["path"] == "/collective_rpc"][1]
    assert load["body"]["args"] == [str(tmp_path / "mnt" / "policy-v4"), "4"]
    assert servers[0].weight_version == 4


def test_default_writer_syncs_a_qwen2_model_in_bfloat16(tmp_path):
    import ml_dtypes
    from prorl_jax.models import PRESETS, hf_tensors, init_model

    model = init_model(PRESETS["tiny"].replace(num_hidden_layers=1), seed=0)
    expected = dict(hf_tensors(model, dtype=np.float32))
    with VLLMDouble(tensors={n: np.zeros_like(x) for n, x in expected.items()}) as double:
        client = make_client([double], tmp_path, weight_writer=None)  # save_pretrained, bf16
        client.update_weights(model, 2)
        assert "config.json" in os.listdir(tmp_path / "weights" / "policy-v2")
        for w in double.workers:
            got = w.model_runner.model
            assert sorted(got.params) == sorted(expected)
            assert set(got.dtypes.values()) == {"torch.bfloat16"}
            for name, x in expected.items():
                bf16 = x.astype(ml_dtypes.bfloat16).astype(np.float32)
                np.testing.assert_array_equal(got.params[name].numpy(), bf16, err_msg=name)


# ---- the worker extension's own checks ---------------------------------------------------
def test_manifest_is_read_from_headers_and_refuses_cut_shards(tmp_path):
    a = {"a.weight": np.arange(4, dtype=np.float32)}
    b = {"b.weight": np.full((2, 2), 3.5, np.float32), "c.bias": np.zeros(3, np.float32)}
    safetensors.numpy.save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    safetensors.numpy.save_file({"x": np.ones(1, np.float32)}, str(tmp_path / "stray.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors",
                  "c.bias": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    manifest = read_manifest(str(tmp_path))
    assert manifest == {"a.weight": [4], "b.weight": [2, 2], "c.bias": [3]}  # index decides
    assert manifest_difference(manifest, manifest) is None
    assert manifest_difference(manifest, {"a.weight": [5], "d": [1]}) == (
        "2 tensor(s) missing, e.g. ['b.weight', 'c.bias']; 1 unexpected tensor(s), e.g. ['d']; "
        "other shapes: a.weight [5] (expected [4])")
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: \d+ bytes, but its "
                                         r"header describes \d+ \(cut short"):
        read_manifest(str(tmp_path))
    shard.write_bytes(b"\x05\x00\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_manifest(str(tmp_path))


def test_extension_refuses_missing_or_mismatched_directories_untouched(servers, tmp_path):
    worker = servers[0].workers[0]
    key = servers[0].key
    for path, match in [(tmp_path / "nope", "does not exist"),
                        (tmp_path, r"holds no \*.safetensors")]:
        with pytest.raises(ValueError, match=rf"^\{UNTOUCHED} FileNotFoundError.*{match}"):
            worker.prorl_load_weights(str(path), "1")
    npz_writer(PARAMS_V1, str(tmp_path))
    (tmp_path / VERSION_FILE).write_text(json.dumps({"weight_version": 5}))
    with pytest.raises(ValueError, match="records weight_version=5, but version 6"):
        worker.prorl_load_weights(str(tmp_path), "6")
    assert worker.prorl_weight_version() == {"weight_version": None, "intact": True}
    assert servers[0].key == key
    assert worker.prorl_load_weights(str(tmp_path), "5") == {
        "weight_version": 5, "num_tensors": 2, "num_verified": 2}


def test_worker_and_client_import_without_vllm_torch_or_jax():
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('vllm', 'torch', 'jax', 'flax', 'safetensors'):\n"
               "            raise ImportError('blocked ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import importlib\n"
               f"mod, cls = {EXTENSION_CLS!r}.rsplit('.', 1)\n"
               "print(getattr(importlib.import_module(mod), cls).__name__)\n"
               "from prorl_jax.rollout import VLLMClient\n")
    out = subprocess.run(["python", "-c", blocker], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "WeightSyncExtension"


# ---- the launchers ---------------------------------------------------------------------------
def _fake_vllm(tmp_path):
    fake = tmp_path / "vllm"  # prints what `vllm` would have been started with
    fake.write_text('#!/usr/bin/env bash\necho "DEV=$VLLM_SERVER_DEV_MODE PYTHONPATH=$PYTHONPATH"'
                    '\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return str(fake)


def _pairs(args):
    return {(args[k], args[k + 1]) for k in range(len(args) - 1)}


def test_launcher_passes_every_flag_and_binds_localhost_by_default(tmp_path):
    script = os.path.join(REPO, "launchers", "vllm_server.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "HOST"}
    env.update(VLLM=_fake_vllm(tmp_path), PORT="8123", TP_SIZE="2", MAX_MODEL_LEN="1024")
    out = subprocess.run(["bash", script, "/ckpt/qwen", "--enforce-eager"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    first, *args = out.stdout.splitlines()
    assert first.startswith("DEV=1 PYTHONPATH=" + REPO)
    assert args[:2] == ["serve", "/ckpt/qwen"] and args[-1] == "--enforce-eager"
    for flag in [("--worker-extension-cls", EXTENSION_CLS),
                 ("--logprobs-mode", "processed_logprobs"), ("--generation-config", "vllm"),
                 ("--port", "8123"), ("--tensor-parallel-size", "2"),
                 ("--max-model-len", "1024"), ("--host", "127.0.0.1")]:
        assert flag in _pairs(args), flag
    host = subprocess.run(["bash", script, "/m"], env=dict(env, HOST="10.1.2.3"),
                          capture_output=True, text=True, timeout=30)
    assert ("--host", "10.1.2.3") in _pairs(host.stdout.splitlines()[1:])
    dp = subprocess.run(["bash", script, "/m"], env=dict(env, DP_SIZE="2"),
                        capture_output=True, text=True, timeout=30)
    assert dp.returncode == 2 and "one server per data-parallel rank" in dp.stderr
    usage = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "Usage:" in usage.stdout and "SAFETY" in usage.stdout


def test_slurm_servers_bind_the_cluster_address_never_all_interfaces(tmp_path):
    text = open(os.path.join(REPO, "launchers", "slurm_h100.sbatch")).read()
    serve = text.split("SERVE='", 1)[1].split("'\n", 1)[0]  # the server nodes' command
    env = dict(os.environ, VLLM=_fake_vllm(tmp_path), SPN="1", TP="1", BASE="8000",
               MODEL="/m", LOGDIR=str(tmp_path), NODE="localhost")
    env.pop("VLLM_HOST", None)
    run = lambda **kw: subprocess.run(["bash", "-c", serve], env=dict(env, **kw), cwd=REPO,
                                      capture_output=True, text=True, timeout=30)
    for host in (None, "0.0.0.0"):  # localhost resolves to 127.0.0.1: not reachable
        out = run(**({"VLLM_HOST": host} if host else {}))
        assert out.returncode == 2 and "set VLLM_HOST" in out.stderr, out.stderr
    assert run(VLLM_HOST="10.1.2.3").returncode == 0
    log = open(next(tmp_path.glob("vllm-*-0.log"))).read().splitlines()
    assert ("--host", "10.1.2.3") in _pairs(log)


def test_slurm_job_stops_at_once_when_a_server_node_cannot_bind(tmp_path):
    """A node name that resolves to nothing (or loopback) there: the server step refuses to
    start, and the job says so instead of waiting SERVER_WAIT_S for its health."""
    from tests.test_plot_sweep import _fake_bin

    path = _fake_bin(tmp_path, {
        "scontrol": "printf 'gpu01\\ngpu02\\n'\n",
        "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; '
                'esac; done\nexec "$@"\n',
        "curl": "exit 7\n", "getent": "exit 2\n"})
    env = dict(os.environ, PATH=path, SLURM_JOB_NODELIST="gpu[01-02]", SLURM_SUBMIT_DIR=REPO,
               MODEL_PATH="/models/m", WORKDIR=str(tmp_path / "run"), TRAIN_NODES="1",
               GPUS_PER_NODE="1")
    env.pop("VLLM_HOST", None)
    start = time.monotonic()
    out = subprocess.run(["bash", os.path.join(REPO, "launchers", "slurm_h100.sbatch")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and time.monotonic() - start < 20
    assert 'gpu02 resolves to "" here: set VLLM_HOST' in out.stderr
    assert "a vLLM server step exited before http://gpu02:8000 was healthy" in out.stderr


# ---- failures reach every trainer process, and stop the trainer -------------------------
SERVER = "http://10.0.0.7:8000"


class _SyncFails(RolloutEngine):
    """Generates with `inner`; every weight sync fails as a server left paused would."""

    def __init__(self, inner=None):
        self.inner = inner

    def generate(self, *args, **kwargs):
        if self.inner is None:
            raise VLLMServerError(f"{SERVER}: connection refused")
        return self.inner.generate(*args, **kwargs)

    def update_weights(self, params_or_model, version):
        raise WeightSyncError(f"{SERVER}: loading weights v{version} failed: boom; left PAUSED",
                              {SERVER: "left PAUSED"})


def test_process_zero_engine_raises_the_servers_error_on_every_process():
    from prorl_jax.rollout.multihost import ProcessZeroEngine

    engine = ProcessZeroEngine(_SyncFails)  # one process: the broadcast path still runs
    with pytest.raises(WeightSyncError, match="left PAUSED") as failure:
        engine.update_weights({}, 1)
    assert failure.value.servers == {SERVER: "left PAUSED"}
    with pytest.raises(VLLMServerError, match="connection refused"):
        engine.generate([[1]], n=1, temperature=1.0, top_p=1.0, max_new_tokens=1,
                        stop_token_ids=[0], seed=0)


def test_trainer_stops_with_a_checkpoint_naming_the_server():
    from prorl_jax.trainer import Trainer

    saved, waited = [], []
    engine = _SyncFails()
    trainer = types.SimpleNamespace(  # what Trainer._sync_weights touches
        pipeline=types.SimpleNamespace(  # k = 0: publish syncs the engine at once
            publish=lambda params, version, changed: engine.update_weights(params, version)),
        state=types.SimpleNamespace(params={}), workdir="/runs/a", step=4,
        save=saved.append, checkpoints=types.SimpleNamespace(
            wait_until_finished=lambda: waited.append(saved[:])))
    trainer._stop_on_sync_error = lambda version, e: Trainer._stop_on_sync_error(trainer,
                                                                                 version, e)
    with pytest.raises(WeightSyncError, match=rf"{SERVER}: loading weights v5 failed.*Stopped "
                                              r"with a checkpoint of step 5 in /runs/a/checkpoints"
                                              r": restart") as failure:
        Trainer._sync_weights(trainer, 5)
    assert saved == [5] and waited == [[5]] and trainer.step == 5  # saved, then raised
    assert failure.value.servers == {SERVER: "left PAUSED"}


# ---- the run config's vLLM part ----------------------------------------------------------
def _vllm_config(**overrides):
    from configs import prorl

    cfg = prorl.get_config()
    cfg.rollout.vllm_urls = "http://127.0.0.1:8000, http://localhost:8001/"
    for key, value in overrides.items():
        *section, field = key.split(".")
        (cfg[section[0]] if section else cfg)[field] = value
    return cfg


def test_vllm_settings_refuse_what_vllm_would_refuse_naming_the_field():
    from prorl_jax import config as config_lib
    from prorl_jax.rollout.vllm_settings import VLLMSettings

    def settings(cfg):
        stages = config_lib.parse_stages(cfg)
        return VLLMSettings.from_config(
            cfg, [config_lib.stage_config(cfg, stages, i) for i in range(len(stages))],
            workdir="/runs/a")

    ok = settings(_vllm_config())
    assert ok.urls == ("http://127.0.0.1:8000", "http://localhost:8001")
    assert ok.weights_dir == "/runs/a/vllm_weights" and ok.health_timeout_s == 900.0
    for overrides, match in [
        ({"rollout.temperature": 2.5}, r"config.rollout.temperature=2.5: vLLM samples at "
                                       r"temperatures in \[0, 2\]"),
        ({"eval.temperature": 3.0}, "config.eval.temperature=3.0"),
        ({"stages": "steps=10;steps=5,rollout.temperature=2.2"},
         r"config.stages\[1\] rollout.temperature=2.2"),
        ({"rollout.vllm_urls": "localhost:8000"}, "config.rollout.vllm_urls: 'localhost:8000' "
                                                  "is not an http"),
        ({"rollout.vllm_urls": " , "}, "config.rollout.vllm_urls: expected one or more"),
        ({"rollout.health_timeout_s": 0.0}, r"config.rollout.health_timeout_s=0.0: expected > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            settings(_vllm_config(**overrides))


def test_build_engine_refuses_a_temperature_over_two_before_any_server_call():
    from prorl_jax import build

    cfg = _vllm_config(**{"rollout.temperature": 2.5, "rollout.engine": "vllm"})
    with pytest.raises(ValueError, match="config.rollout.temperature=2.5"):
        build.build_engine(cfg, types.SimpleNamespace(config=None), None, pad_id=0,
                           workdir="/runs/a", max_new_tokens=8)
