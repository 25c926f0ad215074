"""VLLMClient's generation and start-up against the vLLM test double (tests/vllm_double.py),
and the protocol functions on hand-made answers. Weight syncs: test_vllm_sync.py; the real
server: test_vllm_real.py."""
import logging
import os
import threading
import time
import warnings

import numpy as np
import pytest
import safetensors.numpy

from prorl_jax.rollout import VLLMClient
from prorl_jax.rollout.vllm_http import VLLMServerError, request_json, wait_for_health
from prorl_jax.rollout.vllm_protocol import (completion_request, logprobs_mode_verdict,
                                             parse_completion_response, prompt_seeds)
from tests.vllm_double import VLLMDouble, double_logits, sample_choice

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3], [11, 12]]  # 0 and 3 alike on purpose
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
def test_prompt_seeds_are_distinct_reproducible_and_worked_by_hand():
    # splitmix64's first output for state 0 is 0xE220A8397B1DCDAF (Steele et al., 2014)
    base = 0xE220A8397B1DCDAF % 2 ** 61
    assert prompt_seeds(0, 3, 16) == [base, base + 16, base + 32]
    seeds = prompt_seeds(12345, 256, 16)
    samples = {s + j for s in seeds for j in range(16)}  # vLLM: sample j gets seed + j
    assert len(samples) == 256 * 16 and max(samples) < 2 ** 62
    assert seeds == prompt_seeds(12345, 256, 16) and seeds != prompt_seeds(12346, 256, 16)


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
def expected_rows(prompt, seed, n, key, vocab=32):
    """The double's samples of `prompt` with request seed `seed`, worked independently."""
    params = dict(temperature=GEN["temperature"], top_p=1.0, max_tokens=GEN["max_new_tokens"],
                  k=0, stop_token_ids=GEN["stop_token_ids"], ignore_eos=False)
    return [sample_choice(prompt, seed + j, params, key, vocab, None, "processed_logprobs")
            for j in range(n)]


def test_generate_rows_match_double_and_independent_logprobs(servers, tmp_path):
    client = make_client(servers, tmp_path)
    batch = client.generate(PROMPTS, **GEN)
    n, temperature, key = GEN["n"], GEN["temperature"], servers[0].key
    assert batch.n == n and batch.num_prompts == len(PROMPTS) and batch.weight_version == 0
    seeds = prompt_seeds(GEN["seed"], len(PROMPTS), n)
    reasons = set()
    for i, prompt in enumerate(PROMPTS):
        for j, ref in enumerate(expected_rows(prompt, seeds[i], n, key)):
            row = i * n + j
            assert batch.token_ids[row] == ref["ids"], row
            # log-probs recomputed here from the double's logits: log softmax(z / T)[token]
            ctx, expected = list(prompt), []
            for tok in ref["ids"]:
                expected.append(_log_softmax(double_logits(ctx, key, 32) / temperature)[tok])
                ctx.append(tok)
            np.testing.assert_allclose(batch.logprobs[row], expected, rtol=1e-6, atol=1e-6)
            stopped = batch.token_ids[row][-1] in GEN["stop_token_ids"]
            assert batch.finish_reasons[row] == ("stop" if stopped else "length")
            if not stopped:
                assert len(batch.token_ids[row]) == GEN["max_new_tokens"]
            reasons.add(batch.finish_reasons[row])
    assert reasons == {"stop", "length"}  # both paths exercised by this seed
    assert len({tuple(batch.token_ids[j]) for j in range(n)}) > 1  # samples of prompt 0 differ
    assert batch.token_ids[:n] != batch.token_ids[3 * n:4 * n]  # identical prompts, own noise
    assert batch.timing["generate_s"] > 0
    bodies = sorted((b for b in completion_bodies(servers[0]) if b["logprobs"] == 0),
                    key=lambda b: b["seed"])  # they arrive in any order
    assert bodies == [completion_request("double-model", [p], **{**GEN, "seed": s})
                      for p, s in zip(PROMPTS, seeds)]  # one request per prompt, own seed
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
def test_batches_split_across_two_servers_equal_one_server(servers, tmp_path):
    split = make_client(servers, tmp_path)
    whole = make_client(servers[:1], tmp_path, check_logprobs_mode=False)
    a = split.generate(PROMPTS, **GEN)
    counts = [len([b for b in completion_bodies(s) if b["logprobs"] == 0]) for s in servers]
    assert counts == [3, 2]  # prompt i to server i % 2
    b = whole.generate(PROMPTS, **GEN)
    assert a.token_ids == b.token_ids and a.finish_reasons == b.finish_reasons


@pytest.mark.parametrize("servers", [[{"completion_delay_s": 0.5}]], indirect=True)
def test_requests_of_one_batch_are_in_flight_together(servers, tmp_path):
    with make_client(servers, tmp_path, check_logprobs_mode=False) as client:
        client.generate(PROMPTS[:4], **GEN)
    assert len(completion_bodies(servers[0])) == 4 and servers[0].max_in_flight >= 2


@pytest.mark.parametrize("servers", [[{"start_delay_s": 0.4}]], indirect=True)
def test_waits_for_health_while_connection_refused(servers, tmp_path, caplog):
    start = time.monotonic()
    client = make_client(servers, tmp_path)
    assert time.monotonic() - start >= 0.3
    assert client.model == "double-model" and client.max_model_len == 256
    assert client.server_versions == ["0.32.0"]
    assert client.layouts == [{"num_workers": 2, "tensor_parallel_size": 1,
                               "states": [(None, True), (None, True)]}]


@pytest.mark.parametrize("servers", [[{"start_delay_s": 0.6}]], indirect=True)
def test_refused_connection_wait_logs_progress_lines(servers, caplog):
    with caplog.at_level(logging.WARNING):
        waited = wait_for_health(servers[0].url, deadline_s=5.0, poll_s=0.05,
                                 progress_every_s=0.2)
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waited >= 0.5 and 2 <= len(lines) <= 4, lines
    assert all(servers[0].url in m and "connection refused" in m for m in lines)


@pytest.mark.parametrize("servers", [[{"unhealthy_for_s": 30.0}]], indirect=True)
def test_health_deadline_gives_clear_error(servers, tmp_path):
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=rf"{servers[0].url}/health \(health_timeout_s=0.5"
                                              rf"\): not ready after .*HTTP 503"):
        make_client(servers, tmp_path, health_timeout_s=0.5)
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("url, error, match", [
    ("http://no-such-host.invalid:8000", VLLMServerError, "does not resolve"),
    ("ftp://127.0.0.1:8000", ValueError, r"base_urls\[0\]: 'ftp://127.0.0.1:8000' is not an "
                                         r"http:// or https:// URL"),
    ("127.0.0.1:8000", ValueError, "is not an http"),
    ("http://127.0.0.1:99999", ValueError, "bad port"),
    ("http://127.0.0.1:8000/v1", ValueError, "expected the server's root"),
])
def test_bad_urls_fail_at_once(tmp_path, url, error, match):
    start = time.monotonic()
    with pytest.raises(error, match=match):
        VLLMClient([url], str(tmp_path), health_timeout_s=60.0)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("servers", [[{"fail_next_completions": 2}]], indirect=True)
def test_retries_503_then_succeeds(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=2)
    batch = client.generate(PROMPTS[:1], **GEN)
    assert len(batch.token_ids) == GEN["n"]
    assert len(completion_bodies(servers[0])) == 3


@pytest.mark.parametrize("servers", [[{"fail_next_completions": 10}]], indirect=True)
def test_retries_exhausted_give_clear_error(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=2)
    with pytest.raises(VLLMServerError, match=r"v1/completions \(prompt 0\) failed after 3 "
                                              r"attempts "
                                              r"\(max_retries=2\).*HTTP 503"):
        client.generate(PROMPTS[:1], **GEN)
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


@pytest.mark.parametrize("servers", [[{}, {}]], indirect=True)
def test_a_dead_server_is_named_and_its_prompts_fail_over(servers, tmp_path, caplog):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=1)
    servers[1].stop()
    with caplog.at_level(logging.WARNING):
        batch = client.generate(PROMPTS, **GEN)
    assert len(batch.token_ids) == len(PROMPTS) * GEN["n"]
    assert len(completion_bodies(servers[0])) == len(PROMPTS)
    assert any(servers[1].url in r.getMessage() and "connection refused" in r.getMessage()
               for r in caplog.records)


def test_client_errors_are_not_retried(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False)
    with pytest.raises(VLLMServerError, match=r"v1/completions: HTTP 400: .*Token id 40 is out "
                                              r"of vocabulary"):
        client.generate([[40]], **GEN)
    assert len(completion_bodies(servers[0])) == 1


def test_bad_prompts_model_and_temperature_are_refused_by_name(servers, tmp_path):
    client = make_client(servers, tmp_path)
    for prompts, match in [([], "at least one prompt"), ([[1], []], r"prompts\[1\]"),
                           (["abc"], r"prompts\[0\]"), ([[1, -2]], r"prompts\[0\]: expected "
                                                                   "non-negative"),
                           ([[1] * 251], r"prompts\[0\]: 251 prompt tokens.*max_model_len=256")]:
        with pytest.raises(ValueError, match=match):
            client.generate(prompts, **GEN)
    with pytest.raises(ValueError, match=r"temperature in \[0, 2\] \(vLLM's range\)"):
        client.generate(PROMPTS, **{**GEN, "temperature": 2.01})
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


@pytest.mark.parametrize("servers", [[{"server_version": "0.32.0"}],
                                     [{"server_version": "0.33.0"}]], indirect=True)
def test_paused_server_is_waited_for_then_named(servers, tmp_path, caplog):
    """0.32 holds requests sent while paused (0.33 answers 503): the client asks /is_paused
    first, waits up to health_timeout_s, then names the server; a resume lets it through."""
    client = make_client(servers, tmp_path, check_logprobs_mode=False, health_timeout_s=0.6)
    request_json(f"{servers[0].url}/pause?mode=wait", {}, timeout_s=5)
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=rf"{servers[0].url} to resume: not ready after.*"
                                              r"paused"):
        client.generate(PROMPTS[:1], **GEN)
    assert time.monotonic() - start < 2.0 and completion_bodies(servers[0]) == []
    client.health_timeout_s = 10.0
    threading.Timer(0.3, lambda: request_json(f"{servers[0].url}/resume", {}, timeout_s=5)).start()
    assert len(client.generate(PROMPTS[:1], **GEN).token_ids) == GEN["n"]


@pytest.mark.parametrize("servers", [[{"completion_delay_s": 1.0}]], indirect=True)
def test_aborted_request_is_an_error_naming_the_server(servers, tmp_path):
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=0)
    threading.Timer(0.3, lambda: request_json(f"{servers[0].url}/pause?mode=abort", {},
                                              timeout_s=5)).start()
    with pytest.raises(VLLMServerError, match=rf"{servers[0].url}/v1/completions \(prompt 0\) "
                                              r"choice 0: finish_reason 'abort'"):
        client.generate(PROMPTS[:1], **GEN)


@pytest.mark.parametrize("servers", [[{"completion_delay_s": 1.0}, {}]], indirect=True)
def test_aborted_request_fails_over_to_another_server(servers, tmp_path):
    """A server shutting down answers its requests "abort" (seen on the real one): the prompt
    goes to the next server, after checking it is not paused."""
    client = make_client(servers, tmp_path, check_logprobs_mode=False, max_retries=1)
    threading.Timer(0.3, lambda: request_json(f"{servers[0].url}/pause?mode=abort", {},
                                              timeout_s=5)).start()
    batch = client.generate(PROMPTS[:1], **GEN)
    assert len(batch.token_ids) == GEN["n"] and len(completion_bodies(servers[1])) == 1
    assert servers[1].paths("/is_paused")  # the retry checked the next server first


@pytest.mark.parametrize("servers, match", [
    ([{"dp_size": 2}], "data_parallel_size=2.*one server per data-parallel rank"),
    ([{"extension": False}], "--worker-extension-cls prorl_jax.rollout.vllm_worker"),
    ([{"dev_mode": False}], "no /collective_rpc: start it with VLLM_SERVER_DEV_MODE=1"),
], indirect=["servers"])
def test_server_that_cannot_be_synced_is_refused_at_start_up(servers, tmp_path, match):
    with pytest.raises(VLLMServerError, match=match):
        make_client(servers, tmp_path, max_retries=0)
