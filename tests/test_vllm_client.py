"""VLLMClient against the vLLM test double (tests/vllm_double.py), the protocol functions on
hand-made answers, the worker extension on a fake model runner, and the server launcher."""
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import safetensors.numpy

from prorl_jax.rollout import VLLMClient
from prorl_jax.rollout.vllm_http import VLLMServerError, request_json
from prorl_jax.rollout.vllm_protocol import (completion_request, logprobs_mode_verdict,
                                             parse_completion_response)
from prorl_jax.rollout.vllm_worker import (EXTENSION_CLS, LOAD_METHOD, VERSION_FILE,
                                           VERSION_METHOD, WeightSyncExtension)
from tests.vllm_double import VLLMDouble, double_logits, sample_choice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
GEN = dict(n=3, temperature=1.2, top_p=1.0, max_new_tokens=6, stop_token_ids=[0, 1, 2],
           seed=7)
PARAMS_V1 = {"model.embed_tokens.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "lm_head.weight": np.ones((3, 2), np.float32)}


def npz_writer(params, path):
    safetensors.numpy.save_file(params, os.path.join(path, "model.safetensors"))


@pytest.fixture
def servers(request):
    """Started doubles; parametrize indirectly with a list of VLLMDouble kwargs."""
    doubles = [VLLMDouble(**kw).start() for kw in getattr(request, "param", [{}])]
    yield doubles
    for d in doubles:
        d.stop()


def make_client(servers, tmp_path, **kw):
    args = dict(timeout_s=5.0, backoff_s=0.01, max_retries=2, health_timeout_s=5.0,
                weight_writer=npz_writer)
    args.update(kw)
    return VLLMClient([s.url for s in servers], str(tmp_path / "weights"), **args)


def completion_bodies(double):
    return [r["body"] for r in double.requests if r["path"] == "/v1/completions"]


# ---- the protocol on hand-made answers ---------------------------------------------------
def test_completion_request_sends_every_sampling_field():
    body = completion_request("m", [[1, 2]], n=16, temperature=1.2, top_p=1.0,
                              max_new_tokens=8, stop_token_ids=[151643], seed=3)
    assert body == {
        "model": "m", "prompt": [[1, 2]], "n": 16, "temperature": 1.2, "top_p": 1.0,
        "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "max_tokens": 8, "min_tokens": 0, "seed": 3,
        "stop_token_ids": [151643], "ignore_eos": False, "logprobs": 0,
        "return_token_ids": True, "return_tokens_as_token_ids": True,
        "skip_special_tokens": False, "echo": False, "stream": False}


def _choice(index, ids, lps, reason, new_format=True):
    c = {"index": index, "finish_reason": reason,
         "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": lps}}
    if new_format:
        c["token_ids"] = ids
    return c


@pytest.mark.parametrize("new_format", [True, False])
def test_parse_puts_choices_prompt_major_by_index(new_format):
    # 2 prompts x n=2, sent out of order: index 3 = prompt 1 sample 1.
    rows = {0: ([5, 9], [-0.5, -1.0], "length"), 1: ([7], [-2.0], "stop"),
            2: ([8, 0], [-0.25, -3.0], "stop"), 3: ([1, 1], [-1.5, -0.75], "length")}
    resp = {"choices": [_choice(i, *rows[i], new_format=new_format) for i in (3, 1, 0, 2)]}
    ids, lps, reasons = parse_completion_response(resp, 2, 2, 2, "test")
    assert ids == [[5, 9], [7], [8, 0], [1, 1]]
    assert reasons == ["length", "stop", "stop", "length"]
    np.testing.assert_array_equal(lps[2], np.float32([-0.25, -3.0]))
    assert all(lp.dtype == np.float32 for lp in lps)


@pytest.mark.parametrize("choice, match", [
    (_choice(0, [5, 9], [-0.5], "length"), "2 token ids but 1 log-probs"),
    ({"index": 0, "finish_reason": "stop", "logprobs": {"tokens": ["hello"],
                                                        "token_logprobs": [-1.0]}},
     "not of the form 'token_id:N'"),
    (_choice(0, [5], [-0.5], "abort"), "finish_reason 'abort'"),
    ({**_choice(0, [5], [-0.5], "stop"), "token_ids": [6]}, "disagree"),
    ({"index": 0, "finish_reason": "stop", "token_ids": [5]}, "no logprobs.token_logprobs"),
    (_choice(0, [1, 2, 3], [-1.0, -1.0, -1.0], "length"), "more than max_tokens=2"),
    (_choice(0, [5, 9], [-0.5, None], "length"), "a log-prob is null"),
    ({**_choice(0, [5, 9], [-0.5, -1.0], "stop"), "token_ids": [5]}, "disagree"),
])
def test_parse_fails_loudly_on_bad_choices(choice, match):
    with pytest.raises(VLLMServerError, match=match):
        parse_completion_response({"choices": [choice]}, 1, 1, 2, "test")


def test_parse_checks_choice_count_and_indices():
    good = _choice(0, [5], [-0.5], "stop")
    with pytest.raises(VLLMServerError, match=r"expected 2 choices \(1 prompts x n=2\), got 1"):
        parse_completion_response({"choices": [good]}, 1, 2, 4, "test")
    with pytest.raises(VLLMServerError, match="repeated index 0"):
        parse_completion_response({"choices": [good, good]}, 1, 2, 4, "test")


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def test_logprobs_mode_verdict_on_worked_logits():
    z = np.array([2.0, 1.0, 0.0, -1.5])
    top = lambda v: dict(enumerate(v.tolist()))
    processed = top(_log_softmax(z)), top(_log_softmax(z / 0.5))
    # Gap of token 1 to token 0: 1.0 at T=1, 2.0 at T=0.5 -> ratio 2 = T_a / T_b.
    assert logprobs_mode_verdict(*processed, 1.0, 0.5) == "processed"
    assert logprobs_mode_verdict(top(_log_softmax(z)), top(_log_softmax(z)), 1.0, 0.5) == "raw"
    assert logprobs_mode_verdict(top(z), top(z / 0.5), 1.0, 0.5) == "logits"
    assert logprobs_mode_verdict({3: -0.1}, {3: -0.05}, 1.0, 0.5) == "inconclusive"
    flat = {0: np.log(0.5), 1: np.log(0.5)}  # a uniform top: temperature cannot show
    assert logprobs_mode_verdict(flat, flat, 1.0, 0.5) == "inconclusive"


# ---- generation against the double -------------------------------------------------------
def test_generate_rows_match_double_and_independent_logprobs(servers, tmp_path):
    client = make_client(servers, tmp_path)
    batch = client.generate(PROMPTS, **GEN)
    n, temperature = GEN["n"], GEN["temperature"]
    assert batch.n == n and batch.num_prompts == len(PROMPTS) and batch.weight_version == 0
    params = dict(temperature=temperature, top_p=1.0, max_tokens=GEN["max_new_tokens"], k=0,
                  stop_token_ids=GEN["stop_token_ids"], ignore_eos=False)
    reasons = set()
    for i, prompt in enumerate(PROMPTS):
        for j in range(n):
            row = i * n + j
            ref = sample_choice(prompt, GEN["seed"] + j, params, 0, 32, None,
                                "processed_logprobs")
            assert batch.token_ids[row] == ref["ids"], row
            # log-probs recomputed here from the double's logits: log softmax(z / T)[token]
            ctx, expected = list(prompt), []
            for tok in ref["ids"]:
                expected.append(_log_softmax(double_logits(ctx, 0, 32) / temperature)[tok])
                ctx.append(tok)
            np.testing.assert_allclose(batch.logprobs[row], expected, rtol=1e-6, atol=1e-6)
            stopped = batch.token_ids[row][-1] in GEN["stop_token_ids"]
            assert batch.finish_reasons[row] == ("stop" if stopped else "length")
            if not stopped:
                assert len(batch.token_ids[row]) == GEN["max_new_tokens"]
            reasons.add(batch.finish_reasons[row])
    assert reasons == {"stop", "length"}  # both paths exercised by this seed
    assert len({tuple(batch.token_ids[j]) for j in range(n)}) > 1  # samples of prompt 0 differ
    assert batch.timing["generate_s"] > 0
    body = completion_bodies(servers[0])[-1]
    assert body == completion_request("double-model", PROMPTS, **GEN)
    client.close()


@pytest.mark.parametrize("servers", [[{}, {"old_format": True}]], indirect=True)
def test_older_server_without_token_ids_gives_the_same_batch(servers, tmp_path):
    new, old = (make_client([s], tmp_path) for s in servers)
    a, b = new.generate(PROMPTS, **GEN), old.generate(PROMPTS, **GEN)
    raw = request_json(f"{servers[1].url}/v1/completions",
                       completion_request("double-model", PROMPTS[:1], **GEN), timeout_s=5)
    assert "token_ids" not in raw["choices"][0]  # the older format really is older
    assert a.token_ids == b.token_ids and a.finish_reasons == b.finish_reasons
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("servers", [[{}, {}]], indirect=True)
def test_batches_split_across_two_servers_equal_one_request(servers, tmp_path):
    split = make_client(servers, tmp_path, max_prompts_per_request=2)
    whole = make_client(servers[:1], tmp_path, check_logprobs_mode=False)
    a = split.generate(PROMPTS, **GEN)
    sizes = [[len(b["prompt"]) for b in completion_bodies(s) if b["logprobs"] == 0]
             for s in servers]
    assert sorted(sizes[0] + sizes[1]) == [1, 2, 2] and sizes[0] and sizes[1]
    b = whole.generate(PROMPTS, **GEN)
    assert a.token_ids == b.token_ids and a.finish_reasons == b.finish_reasons


@pytest.mark.parametrize("servers", [[{"completion_delay_s": 0.5}]], indirect=True)
def test_requests_of_one_batch_are_in_flight_together(servers, tmp_path):
    with make_client(servers, tmp_path, check_logprobs_mode=False,
                     max_prompts_per_request=1) as client:
        client.generate(PROMPTS[:4], **GEN)
    assert len(completion_bodies(servers[0])) == 4 and servers[0].max_in_flight >= 2


@pytest.mark.parametrize("servers", [[{"start_delay_s": 0.4}]], indirect=True)
def test_waits_for_health_while_connection_refused(servers, tmp_path):
    start = time.monotonic()
    client = make_client(servers, tmp_path)
    assert time.monotonic() - start >= 0.3
    assert client.model == "double-model" and client.max_model_len == 256
    assert client.server_versions == ["0.11.2"]


@pytest.mark.parametrize("servers", [[{"unhealthy_for_s": 30.0}]], indirect=True)
def test_health_deadline_gives_clear_error(servers, tmp_path):
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=rf"{servers[0].url}/health not ready.*HTTP 503"):
        make_client(servers, tmp_path, health_timeout_s=0.5)
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("servers", [[{"fail_next_completions": 2}]], indirect=True)
def test_retries_503_then_succeeds(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=2)
    batch = client.generate(PROMPTS[:2], **GEN)
    assert len(batch.token_ids) == 2 * GEN["n"]
    assert len(completion_bodies(servers[0])) == 3


@pytest.mark.parametrize("servers", [[{"fail_next_completions": 10}]], indirect=True)
def test_retries_exhausted_give_clear_error(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=2)
    with pytest.raises(VLLMServerError, match=r"v1/completions failed after 3 attempts "
                                              r"\(max_retries=2\).*HTTP 503"):
        client.generate(PROMPTS[:2], **GEN)
    assert len(completion_bodies(servers[0])) == 3


@pytest.mark.parametrize("servers", [[{"completion_delay_s": 3.0}]], indirect=True)
def test_timeout_is_retried_then_reported(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=1,
                         timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=r"after 2 attempts.*timeout_s=0.3"):
        client.generate(PROMPTS[:1], **GEN)
    assert time.monotonic() - start < 2.0
    assert len(completion_bodies(servers[0])) == 2


@pytest.mark.parametrize("servers", [[{"fail_next_completions": 1}, {}]], indirect=True)
def test_failed_request_fails_over_to_the_next_server(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=1)
    client.generate(PROMPTS[:1], **GEN)  # one request, first to server 0, then server 1
    assert [len(completion_bodies(s)) for s in servers] == [1, 1]


@pytest.mark.parametrize("servers", [[{"max_prompts_per_request": 2}]], indirect=True)
def test_client_errors_are_not_retried(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False,
                         max_prompts_per_request=3)
    with pytest.raises(VLLMServerError, match=r"v1/completions: HTTP 400: .*expected 1..2 prompts"):
        client.generate(PROMPTS[:3], **GEN)
    assert len(completion_bodies(servers[0])) == 1


def test_bad_prompts_and_model_are_refused_by_name(servers, tmp_path):
    client = make_client(servers, tmp_path)
    for prompts, match in [([], "at least one prompt"), ([[1], []], r"prompts\[1\]"),
                           (["abc"], r"prompts\[0\]"), ([[1, -2]], r"prompts\[0\]: expected "
                                                                   "non-negative"),
                           ([[1] * 251], r"prompts\[0\]: 251 prompt tokens.*max_model_len=256")]:
        with pytest.raises(ValueError, match=match):
            client.generate(prompts, **GEN)
    with pytest.raises(ValueError, match=r"model: 'other' is not served.*double-model"):
        make_client(servers, tmp_path, model="other")
    assert completion_bodies(servers[0]) == []


@pytest.mark.parametrize("servers", [[{"logprobs_mode": "raw_logprobs"}],
                                     [{"logprobs_mode": "raw_logits"}]], indirect=True)
def test_server_without_processed_logprobs_is_refused(servers, tmp_path):
    client = make_client(servers, tmp_path)
    with pytest.raises(VLLMServerError, match=r"returns (raw|logits) log-probs.*"
                                              r"--logprobs-mode processed_logprobs"):
        client.generate(PROMPTS, **GEN)
    unchecked = make_client(servers, tmp_path, check_logprobs_mode=False)
    assert len(unchecked.generate(PROMPTS[:1], **GEN).token_ids) == GEN["n"]


def test_logprobs_check_runs_once_at_two_temperatures(servers, tmp_path):
    client = make_client(servers, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the double's processed log-probs are recognised
        client.generate(PROMPTS[:1], **GEN)
    client.generate(PROMPTS[:1], **GEN)
    bodies = completion_bodies(servers[0])
    assert [(b["logprobs"], b["temperature"], b["max_tokens"]) for b in bodies] == [
        (5, 1.0, 1), (5, 0.5, 1), (0, 1.2, 6), (0, 1.2, 6)]


# ---- weight sync -------------------------------------------------------------------------
SYNC_PATHS = ["/pause?mode=wait", "/collective_rpc", "/reset_prefix_cache", "/resume",
              "/collective_rpc"]


@pytest.mark.parametrize("servers", [[{}, {"num_workers": 3}]], indirect=True)
def test_weight_sync_order_files_and_version(servers, tmp_path):
    client = make_client(servers, tmp_path)
    before = client.generate(PROMPTS[:2], **GEN)
    client.update_weights(PARAMS_V1, 1)
    path = str(tmp_path / "weights" / "policy-v1")
    assert sorted(os.listdir(tmp_path / "weights")) == ["policy-v1"]  # no temp dir left
    assert json.load(open(os.path.join(path, VERSION_FILE))) == {"weight_version": 1}
    for s in servers:
        sync = [r for r in s.requests if r["path"] in ("/pause", "/collective_rpc",
                                                       "/reset_prefix_cache", "/resume")]
        assert s.paths(*SYNC_PATHS[:4]) == SYNC_PATHS
        assert [r["body"]["method"] for r in sync if r["path"] == "/collective_rpc"] == [
            LOAD_METHOD, VERSION_METHOD]
        assert sync[1]["body"]["args"] == [path, "1"]
        assert not s.paused and s.prefix_cache_resets == 1
        for w in s.workers:
            assert w.prorl_weight_version() == {"weight_version": 1}
            assert sorted(w.model_runner.model.weights) == sorted(PARAMS_V1)
            np.testing.assert_array_equal(w.model_runner.model.weights["lm_head.weight"],
                                          PARAMS_V1["lm_head.weight"])
    after = client.generate(PROMPTS[:2], **GEN)
    assert after.weight_version == 1 and client.weight_version == 1
    assert after.token_ids != before.token_ids  # the double's logits depend on the version
    assert set(client.last_sync_timing) == {"write_s", "sync_s"}
    client.update_weights(PARAMS_V1, 2)
    assert sorted(os.listdir(tmp_path / "weights")) == ["policy-v2"]  # v1 removed once synced


@pytest.mark.parametrize("servers", [[{"stale_weights": True}]], indirect=True)
def test_server_still_on_old_version_is_an_error(servers, tmp_path):
    client = make_client(servers, tmp_path)
    with pytest.raises(VLLMServerError, match=r"workers report weight versions \[None, None\], "
                                              r"expected 3"):
        client.update_weights(PARAMS_V1, 3)
    assert client.weight_version == 0


@pytest.mark.parametrize("servers", [[{"fail_rpc_method": LOAD_METHOD}]], indirect=True)
def test_failed_load_still_resumes_and_reports(servers, tmp_path):
    client = make_client(servers, tmp_path, max_retries=1)
    with pytest.raises(VLLMServerError, match=r"collective_rpc failed after 2 attempts"):
        client.update_weights(PARAMS_V1, 1)
    assert servers[0].paths("/resume") == ["/resume"] and not servers[0].paused
    assert servers[0].paths("/reset_prefix_cache") == []
    assert client.weight_version == 0


@pytest.mark.parametrize("servers", [[{"extension": False}], [{"dev_mode": False}]],
                         indirect=True)
def test_server_without_extension_or_dev_mode_is_named(servers, tmp_path):
    client = make_client(servers, tmp_path, max_retries=0)
    match = ("AttributeError.*prorl_load_weights_from_dir" if servers[0].dev_mode else
             "no /pause: start it with VLLM_SERVER_DEV_MODE=1")
    with pytest.raises(VLLMServerError, match=match):
        client.update_weights(PARAMS_V1, 1)
    assert not servers[0].paused


def test_failed_writer_leaves_nothing_and_calls_no_server(servers, tmp_path):
    def broken_writer(params, path):
        open(os.path.join(path, "model.safetensors"), "w").write("half")
        raise OSError("disk full")

    client = make_client(servers, tmp_path, weight_writer=broken_writer)
    with pytest.raises(OSError, match="disk full"):
        client.update_weights(PARAMS_V1, 1)
    assert os.listdir(tmp_path / "weights") == []
    assert servers[0].paths("/pause", "/collective_rpc") == []
    with pytest.raises(ValueError, match="version: expected a non-negative int"):
        client.update_weights(PARAMS_V1, -1)


def test_server_weights_dir_is_the_path_sent(servers, tmp_path):
    (tmp_path / "weights").mkdir()
    os.symlink(tmp_path / "weights", tmp_path / "mnt")  # the servers' view of weights_dir
    client = make_client(servers, tmp_path, server_weights_dir=str(tmp_path / "mnt"))
    client.update_weights(PARAMS_V1, 4)
    load = [r for r in servers[0].requests if r["path"] == "/collective_rpc"][0]
    assert load["body"]["args"] == [str(tmp_path / "mnt" / "policy-v4"), "4"]
    assert servers[0].weight_version == 4


def test_default_writer_syncs_a_qwen2_model_in_bfloat16(servers, tmp_path):
    import ml_dtypes
    from prorl_jax.models import PRESETS, hf_tensors, init_model

    model = init_model(PRESETS["tiny"].replace(num_hidden_layers=1), seed=0)
    client = make_client(servers, tmp_path, weight_writer=None)  # save_pretrained, bf16
    client.update_weights(model, 2)
    assert "config.json" in os.listdir(tmp_path / "weights" / "policy-v2")
    expected = dict(hf_tensors(model, dtype=np.float32))
    for w in servers[0].workers:
        got = w.model_runner.model
        assert sorted(got.weights) == sorted(expected)
        assert set(got.dtypes.values()) == {"torch.bfloat16"}
        for name, x in expected.items():
            bf16 = x.astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(got.weights[name], bf16, err_msg=name)


# ---- the worker extension ----------------------------------------------------------------
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
    out = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "WeightSyncExtension"


class _Model:
    def __init__(self):
        self.loaded = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.numpy()


def _worker():
    import types
    worker = WeightSyncExtension()
    worker.model_runner = types.SimpleNamespace(model=_Model())
    return worker


def test_worker_loads_sharded_directory_with_index(tmp_path):
    a = {"a.weight": np.arange(4, dtype=np.float32)}
    b = {"b.weight": np.full((2, 2), 3.5, np.float32), "c.bias": np.zeros(3, np.float32)}
    safetensors.numpy.save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    safetensors.numpy.save_file({"x": np.ones(1, np.float32)}, str(tmp_path / "stray.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors",
                  "c.bias": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    worker = _worker()
    assert worker.prorl_weight_version() == {"weight_version": None}
    assert worker.prorl_load_weights_from_dir(str(tmp_path), "9") == {"weight_version": 9,
                                                                      "num_tensors": 3}
    loaded = worker.model_runner.model.loaded
    assert sorted(loaded) == ["a.weight", "b.weight", "c.bias"]  # index decides, not the glob
    np.testing.assert_array_equal(loaded["b.weight"], b["b.weight"])
    assert worker.prorl_weight_version() == {"weight_version": 9}


def test_worker_refuses_missing_empty_or_mismatched_directories(tmp_path):
    worker = _worker()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        worker.prorl_load_weights_from_dir(str(tmp_path / "nope"), 1)
    with pytest.raises(FileNotFoundError, match=r"holds no \*.safetensors"):
        worker.prorl_load_weights_from_dir(str(tmp_path), 1)
    npz_writer(PARAMS_V1, str(tmp_path))
    (tmp_path / VERSION_FILE).write_text(json.dumps({"weight_version": 5}))
    with pytest.raises(ValueError, match="records weight_version=5, but version 6"):
        worker.prorl_load_weights_from_dir(str(tmp_path), 6)
    assert worker.prorl_weight_version() == {"weight_version": None}
    assert worker.model_runner.model.loaded == {}


# ---- the launcher ------------------------------------------------------------------------
def test_launcher_passes_every_flag_the_client_relies_on(tmp_path):
    script = os.path.join(REPO, "launchers", "vllm_server.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    fake = tmp_path / "vllm"  # prints what `vllm` would have been started with
    fake.write_text('#!/usr/bin/env bash\necho "DEV=$VLLM_SERVER_DEV_MODE PYTHONPATH=$PYTHONPATH"'
                    '\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, VLLM=str(fake), PORT="8123", TP_SIZE="2", DP_SIZE="3",
               MAX_MODEL_LEN="1024")
    out = subprocess.run(["bash", script, "/ckpt/qwen", "--enforce-eager"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    first, *args = out.stdout.splitlines()
    assert first.startswith("DEV=1 PYTHONPATH=" + REPO)
    pairs = {(args[k], args[k + 1]) for k in range(len(args) - 1)}
    assert args[:2] == ["serve", "/ckpt/qwen"] and args[-1] == "--enforce-eager"
    for flag in [("--worker-extension-cls", EXTENSION_CLS),
                 ("--logprobs-mode", "processed_logprobs"), ("--generation-config", "vllm"),
                 ("--port", "8123"), ("--tensor-parallel-size", "2"),
                 ("--data-parallel-size", "3"), ("--max-model-len", "1024")]:
        assert flag in pairs, flag
    usage = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "Usage:" in usage.stdout
