"""A test double of a vLLM OpenAI-compatible server, faithful to docs/vllm.md.

Standard-library HTTP (ThreadingHTTPServer on 127.0.0.1, port 0) in a thread. Generation is
deterministic: a tiny "model" whose logits depend on the last tokens and on the loaded weight
version (`double_logits`); sample j of a request uses its own generator seeded seed + j, as
vLLM does. Weight loading goes through the project's real `WeightSyncExtension` on fake
workers (torch CPU), so /collective_rpc runs the code the real server would.

Switches reproduce what the client must survive: an older server without `token_ids`
(`old_format`), a slow start (`start_delay_s`: connection refused; `unhealthy_for_s`: 503 from
/health), `fail_next_completions` 503s, `completion_delay_s` (past the client's timeout), the
log-prob mode (`logprobs_mode`: raw_logprobs / processed_logprobs / raw_logits /
processed_logits), `stale_weights` (loads succeed but change nothing), `fail_rpc_method`,
`extension=False` (no --worker-extension-cls) and `dev_mode=False` (no dev endpoints).
Every request is recorded in `requests` (method, path, query, body) in arrival order.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch  # noqa: F401  (loaded up front, as in a real server, so no call waits on it)

from prorl_jax.rollout.vllm_worker import WeightSyncExtension

GENERATION_CONFIG_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 16}
WAIT_STEP_S = 0.01


def double_logits(context: list[int], version: int, vocab_size: int) -> np.ndarray:
    """float64[vocab_size]: the double's logits after `context` under weights `version`."""
    key = [int(version), len(context)] + [int(t) for t in context[-3:]]
    return 3.0 * np.random.default_rng(key).standard_normal(vocab_size)


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


def sample_choice(prompt: list[int], seed_j: int | None, p: dict, version: int,
                  vocab_size: int, eos_token_id: int | None, mode: str) -> dict:
    """One completion choice (token_ids, log-probs, top log-probs, finish/stop reason)."""
    rng = np.random.default_rng(seed_j)
    ids, lps, tops, reason, stop_reason = [], [], [], "length", None
    for _ in range(p["max_tokens"]):
        logits = double_logits(prompt + ids, version, vocab_size)
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


class VLLMDouble:
    """The fake server; use as a context manager or call start()/stop(). `url` is its root."""

    def __init__(self, *, model: str = "double-model", vocab_size: int = 32,
                 max_model_len: int = 256, num_workers: int = 2, old_format: bool = False,
                 logprobs_mode: str = "processed_logprobs", start_delay_s: float = 0.0,
                 unhealthy_for_s: float = 0.0, fail_next_completions: int = 0,
                 completion_delay_s: float = 0.0, eos_token_id: int | None = None,
                 stale_weights: bool = False, fail_rpc_method: str | None = None,
                 max_prompts_per_request: int = 1024, dev_mode: bool = True,
                 extension: bool = True,
                 server_version: str | None = "0.11.2"):
        self.model, self.vocab_size, self.max_model_len = model, vocab_size, max_model_len
        self.old_format, self.logprobs_mode = old_format, logprobs_mode
        self.start_delay_s, self.unhealthy_for_s = start_delay_s, unhealthy_for_s
        self.fail_next_completions, self.completion_delay_s = fail_next_completions, completion_delay_s
        self.eos_token_id, self.stale_weights = eos_token_id, stale_weights
        self.fail_rpc_method = fail_rpc_method
        self.max_prompts_per_request, self.server_version = max_prompts_per_request, server_version
        self.dev_mode, self.extension = dev_mode, extension
        self.workers = [_fake_worker(extension) for _ in range(num_workers)]
        self.requests: list[dict] = []
        self.paused = False
        self.prefix_cache_resets = 0
        self.in_flight = self.max_in_flight = 0  # /v1/completions being answered at once
        self._lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
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
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
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

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def weight_version(self) -> int:
        if not self.extension:
            return 0
        return self.workers[0].prorl_weight_version()["weight_version"] or 0

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
            return (200, None) if ready else (503, {"error": "engine not ready"})
        if path == "/v1/models":
            return 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "max_model_len": self.max_model_len}]}
        if path == "/version" and self.server_version:
            return 200, {"version": self.server_version}
        if path == "/v1/completions" and method == "POST":
            return self._completions(body)
        dev = {"/collective_rpc": self._collective_rpc, "/reset_prefix_cache": self._reset,
               "/pause": self._pause, "/resume": self._resume, "/is_paused": self._is_paused}
        if self.dev_mode and path in dev:
            return dev[path](body, query)
        return 404, {"error": f"no route {method} {path}"}

    def _completions(self, body: dict) -> tuple[int, Any]:
        with self._lock:
            if self.fail_next_completions > 0:
                self.fail_next_completions -= 1
                return 503, {"error": "Service Unavailable (switch)"}
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._stopping.wait(self.completion_delay_s) or not self._resumed.wait(5.0):
                return 503, {"error": "server stopping or paused too long"}
            return self._generate(body)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _generate(self, body: dict) -> tuple[int, Any]:
        if body.get("model") != self.model:
            return 404, {"error": f"The model `{body.get('model')}` does not exist."}
        prompts = body.get("prompt")
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts or len(prompts) > self.max_prompts_per_request:
            return 400, {"error": f"expected 1..{self.max_prompts_per_request} prompts"}
        p = {**GENERATION_CONFIG_DEFAULTS, **{k: body[k] for k in
                                              ("temperature", "top_p", "max_tokens") if k in body}}
        p.update(k=int(body.get("logprobs") or 0), stop_token_ids=body.get("stop_token_ids") or [],
                 ignore_eos=bool(body.get("ignore_eos")))
        if any(len(pr) + p["max_tokens"] > self.max_model_len for pr in prompts):
            return 400, {"error": "prompt + max_tokens exceeds max_model_len"}
        n, seed = int(body.get("n", 1)), body.get("seed")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choices, completion_tokens = [], 0
        for i, prompt in enumerate(prompts):
            for j in range(n):
                c = sample_choice(list(prompt), None if seed is None else seed + j, p,
                                  self.weight_version, self.vocab_size, self.eos_token_id,
                                  self.logprobs_mode)
                completion_tokens += len(c["ids"])
                choices.append(self._choice_json(i * n + j, prompt, c, body, as_ids))
        prompt_tokens = sum(len(pr) for pr in prompts)
        return 200, {"id": "cmpl-double", "object": "text_completion", "model": self.model,
                     "choices": choices,
                     "usage": {"prompt_tokens": prompt_tokens,
                               "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}}

    def _choice_json(self, index: int, prompt: list[int], c: dict, body: dict,
                     as_ids: bool) -> dict:
        choice = {"index": index, "text": "".join(token_str(t, False) for t in c["ids"]),
                  "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {
                "tokens": [token_str(t, as_ids) for t in c["ids"]],
                "token_logprobs": c["lps"],
                "top_logprobs": [{token_str(t, as_ids): v for t, v in top.items()}
                                 for top in c["tops"]],
                "text_offset": list(range(len(c["ids"])))}
        if body.get("return_token_ids") and not self.old_format:
            choice["token_ids"] = c["ids"]
            choice["prompt_token_ids"] = list(prompt)
        return choice

    def _collective_rpc(self, body: dict, query: dict) -> tuple[int, Any]:
        method, args = body.get("method"), body.get("args") or []
        if method == self.fail_rpc_method:
            return 500, {"error": f"{method} failed (switch)"}
        if self.stale_weights and method == "prorl_load_weights_from_dir":
            return 200, {"results": [{"weight_version": int(args[1])}] * len(self.workers)}
        try:
            with self._lock:
                results = [getattr(w, method)(*args, **(body.get("kwargs") or {}))
                           for w in self.workers]
        except Exception as e:  # what vLLM does: the worker's error becomes a 500
            return 500, {"error": f"{type(e).__name__}: {e}"}
        if all(r is None for r in results):
            return 200, None  # vLLM answers an empty 200 when every worker returned None
        # vLLM keeps None, dicts and lists, and sends anything else as str(result).
        return 200, {"results": [r if r is None or isinstance(r, (dict, list)) else str(r)
                                 for r in results]}

    def _reset(self, body, query) -> tuple[int, Any]:
        self.prefix_cache_resets += 1
        return 200, None

    def _pause(self, body, query) -> tuple[int, Any]:
        if query.get("mode", "abort") not in ("wait", "abort", "keep"):
            return 400, {"error": f"bad mode {query.get('mode')!r}"}
        self.paused = True
        self._resumed.clear()
        return 200, None

    def _resume(self, body, query) -> tuple[int, Any]:
        self.paused = False
        self._resumed.set()
        return 200, None

    def _is_paused(self, body, query) -> tuple[int, Any]:
        return 200, {"is_paused": self.paused}


class _FakeModel:
    """Stands in for the served torch model: load_weights keeps numpy copies by name."""

    def __init__(self):
        self.weights: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}

    def load_weights(self, weights):
        for name, tensor in weights:  # float32 copies (numpy has no bfloat16)
            self.weights[name] = tensor.float().numpy().copy()
            self.dtypes[name] = str(tensor.dtype)
        return set(self.weights)


def _fake_worker(extension: bool) -> Any:
    """A worker with the project's extension mixed in (or a bare one, as without the flag)."""
    worker = WeightSyncExtension() if extension else types.SimpleNamespace()
    worker.model_runner = types.SimpleNamespace(model=_FakeModel())
    return worker


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
            status, payload = 400, {"error": "body is not JSON"}
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
