"""`VLLMClient`: rollouts from one or more external vLLM servers, with weight sync by files.

Generation: POST /v1/completions with token-id prompts; a batch is cut into requests of at
most `max_prompts_per_request` prompts (each with all n samples, which share the prompt's KV)
sent concurrently, request k to server k % num_servers, failing over to the next server.

Weight sync (docs/vllm.md): the policy is written as HF safetensors to a fresh directory under
`weights_dir` (temp dir + rename, so a server never reads half a checkpoint), then on every
server: POST /pause?mode=wait -> /collective_rpc LOAD_METHOD [dir, version] (the worker
extension in vllm_worker.py) -> /reset_prefix_cache -> /resume, and /collective_rpc
VERSION_METHOD must report the new version on every worker.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Sequence

from prorl_jax.rollout.base import RolloutBatch, RolloutEngine
from prorl_jax.rollout.vllm_http import (HTTPStatusError, VLLMServerError, call_with_retries,
                                         request_json, wait_for_health)
from prorl_jax.rollout.vllm_protocol import (completion_request, first_top_logprobs,
                                             logprobs_mode_verdict, parse_completion_response)
from prorl_jax.rollout.vllm_worker import (EXTENSION_CLS, LOAD_METHOD, VERSION_FILE,
                                           VERSION_METHOD)

log = logging.getLogger(__name__)

WeightWriter = Callable[[Any, str], None]
# The log-prob mode check samples one token at these two temperatures (gap ratio 2).
CHECK_TEMPERATURES = (1.0, 0.5)
CHECK_TOP_LOGPROBS = 5


def default_weight_writer(model: Any, path: str) -> None:
    """Writes `model` (a Qwen2ForCausalLM) as a HF safetensors directory, in bfloat16.

    bfloat16 is the dtype launchers/vllm_server.sh serves in, so nothing is lost and the
    files are half the size of float32 (about 3.5 GB for 1.5B parameters). Pass your own
    `weight_writer` to VLLMClient for another dtype or a params tree.
    """
    from prorl_jax.models import save_pretrained  # lazy: pulls in jax and the model code

    save_pretrained(model, path, dtype="bfloat16")


def write_weights_atomically(weight_writer: WeightWriter, params_or_model: Any,
                             weights_dir: str, version: int) -> str:
    """Writes the policy to `weights_dir`/policy-v{version} and returns that path.

    `weight_writer(params_or_model, tmp)` fills a temp directory next to the target, which
    gets VERSION_FILE and is then renamed into place, so a reader sees a whole checkpoint or
    none. On any failure the temp directory is removed and the error re-raised.
    """
    os.makedirs(weights_dir, exist_ok=True)
    final = os.path.join(weights_dir, f"policy-v{version}")
    tmp = tempfile.mkdtemp(prefix=f".policy-v{version}.tmp-", dir=weights_dir)
    try:
        os.chmod(tmp, 0o755)  # the server may run as another user
        weight_writer(params_or_model, tmp)
        if not any(name.endswith(".safetensors") for name in os.listdir(tmp)):
            raise ValueError(f"weight_writer wrote no *.safetensors file into {tmp}")
        with open(os.path.join(tmp, VERSION_FILE), "w") as f:
            json.dump({"weight_version": version}, f)
        if os.path.exists(final):  # the same version written again
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  max_model_len: int | None) -> None:
    """Raises ValueError naming the first prompt that is empty, not token ids, or too long."""
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got none")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, "
                             f"got {prompt!r:.80}")
        if not all(isinstance(t, int) and t >= 0 for t in map(_as_int, prompt)):
            raise ValueError(f"prompts[{i}]: expected non-negative integer token ids")
        if max_model_len is not None and len(prompt) + max_new_tokens > max_model_len:
            raise ValueError(f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens="
                             f"{max_new_tokens} exceed the server's max_model_len="
                             f"{max_model_len}")


def _as_int(token: Any) -> Any:
    """numpy integers count as ints; anything else is returned as is (and then refused)."""
    return int(token) if hasattr(token, "__index__") and not isinstance(token, bool) else token


class VLLMClient(RolloutEngine):
    """A `RolloutEngine` backed by external vLLM servers (see the module docstring).

    base_urls:               server roots, e.g. ["http://10.0.0.5:8000"].
    weights_dir:             where policy-v{version}/ directories are written; must be
                             readable by the servers (shared storage).
    timeout_s:               per HTTP call; generation calls are not streamed, so it must
                             cover the longest request.
    model:                   the served model id; default: the one /v1/models lists.
    max_prompts_per_request: prompts per /v1/completions request (vLLM caps 1024). The
                             answer costs ~100 bytes of JSON per generated token (ids,
                             "token_id:N" strings, log-probs, top log-probs, text), so 16
                             prompts x n=16 x 8k tokens is already ~200 MB to parse.
    max_retries, backoff_s:  retries after a refused connection, timeout, 429 or 5xx, waiting
                             backoff_s * 2**(attempt-1) seconds before each.
    health_timeout_s:        how long to wait at start-up for every GET /health to be 200.
    weight_writer:           writer(params_or_model, dir) of a HF safetensors directory.
    check_logprobs_mode:     before the first generation, refuse a server whose log-probs are
                             not of the tempered distribution (--logprobs-mode).
    server_weights_dir:      weights_dir as the servers see it, if mounted elsewhere there.
    max_concurrent_requests: requests in flight at once, over all servers.
    """

    def __init__(self, base_urls: Sequence[str], weights_dir: str, timeout_s: float = 1800.0,
                 *, model: str | None = None, max_prompts_per_request: int = 16,
                 max_retries: int = 3, backoff_s: float = 2.0, health_timeout_s: float = 900.0,
                 weight_writer: WeightWriter | None = None, check_logprobs_mode: bool = True,
                 server_weights_dir: str | None = None, max_concurrent_requests: int = 32):
        if isinstance(base_urls, str) or not base_urls:
            raise ValueError(f"base_urls: expected a non-empty list of URLs, got {base_urls!r}")
        for name, value in (("timeout_s", timeout_s), ("health_timeout_s", health_timeout_s),
                            ("max_prompts_per_request", max_prompts_per_request),
                            ("max_concurrent_requests", max_concurrent_requests)):
            if value <= 0:
                raise ValueError(f"{name}: expected > 0, got {value}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries, backoff_s: expected >= 0, got {max_retries}, "
                             f"{backoff_s}")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.weights_dir = weights_dir
        self.server_weights_dir = server_weights_dir
        self.timeout_s = float(timeout_s)
        self.max_prompts_per_request = int(max_prompts_per_request)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.weight_writer = weight_writer or default_weight_writer
        self.weight_version = 0
        self.last_sync_timing: dict[str, float] = {}
        self._logprobs_checked = not check_logprobs_mode
        self._check_lock = threading.Lock()
        self._weights_path: str | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent_requests, thread_name_prefix="vllm-client")
        waits = [self._pool.submit(wait_for_health, u, deadline_s=health_timeout_s)
                 for u in self.base_urls]  # servers load in parallel: wait for all at once
        for url, waited in zip(self.base_urls, waits):
            log.info("%s healthy after %.1fs", url, waited.result())
        self.model, self.max_model_len = self._served_model(model)
        self.server_versions = [self._server_version(u) for u in self.base_urls]

    # ---- start-up -------------------------------------------------------------------------
    def _get(self, url: str, what: str) -> Any:
        return call_with_retries(lambda u: request_json(u, timeout_s=self.timeout_s), [url],
                                 what=what, max_retries=self.max_retries,
                                 backoff_s=self.backoff_s)

    def _served_model(self, model: str | None) -> tuple[str, int | None]:
        """(model id, smallest max_model_len) served by every server, from GET /v1/models."""
        lens = []
        for url in self.base_urls:
            served = {m.get("id"): m for m in (self._get(f"{url}/v1/models",
                                                         f"GET {url}/v1/models") or {}
                                               ).get("data", [])}
            if not served:
                raise VLLMServerError(f"{url}/v1/models lists no model")
            model = model or next(iter(served))
            if model not in served:
                raise ValueError(f"model: {model!r} is not served by {url} (it serves "
                                 f"{sorted(served)})")
            if served[model].get("max_model_len") is not None:
                lens.append(int(served[model]["max_model_len"]))
        return model, min(lens) if lens else None

    def _server_version(self, url: str) -> str | None:
        """The vLLM version string from GET /version, or None where the server lacks it."""
        try:
            return (request_json(f"{url}/version", timeout_s=self.timeout_s) or {}).get("version")
        except VLLMServerError:
            return None

    def verify_processed_logprobs(self, prompt_ids: Sequence[int]) -> None:
        """Refuses servers whose log-probs are raw (pre-temperature) or logits.

        Samples one token of `prompt_ids` with logprobs=5 at temperatures 1.0 and 0.5 on each
        server and compares the gaps of the top log-probs (see `logprobs_mode_verdict`).
        An inconclusive answer only warns.
        """
        for url in self.base_urls:
            tops = []
            for temperature in CHECK_TEMPERATURES:
                body = completion_request(self.model, [prompt_ids], n=1, temperature=temperature,
                                          top_p=1.0, max_new_tokens=1, stop_token_ids=[],
                                          seed=0, top_logprobs=CHECK_TOP_LOGPROBS)
                resp = self._post(url, "/v1/completions", body)
                tops.append(first_top_logprobs(resp, f"{url}/v1/completions"))
            verdict = logprobs_mode_verdict(*tops, *CHECK_TEMPERATURES)
            if verdict in ("raw", "logits"):
                raise VLLMServerError(
                    f"{url} returns {verdict} log-probs, not the tempered (processed) sampling "
                    f"distribution the trainer's importance ratio needs: restart it with "
                    f"--logprobs-mode processed_logprobs (launchers/vllm_server.sh does)")
            if verdict == "inconclusive":
                warnings.warn(f"{url}: could not tell whether the server's log-probs are "
                              f"processed (tempered); make sure it runs with --logprobs-mode "
                              f"processed_logprobs", RuntimeWarning, stacklevel=2)
        self._logprobs_checked = True

    # ---- generation -----------------------------------------------------------------------
    def _post(self, url: str, path: str, body: Any, *, urls: Sequence[str] | None = None) -> Any:
        """POST with retries; on failure the next try goes to the next of `urls` (default url)."""
        return call_with_retries(
            lambda u: request_json(f"{u}{path}", body, timeout_s=self.timeout_s),
            urls or [url], what=f"POST {url}{path}", max_retries=self.max_retries,
            backoff_s=self.backoff_s)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                 seed: int) -> RolloutBatch:
        """Samples n responses per prompt across the servers; rows prompt-major (i*n + j)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n, max_new_tokens: expected >= 1, got {n}, {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature >= 0 and 0 < top_p <= 1 expected, got "
                             f"{temperature}, {top_p}")
        check_prompts(prompts, max_new_tokens, self.max_model_len)
        with self._check_lock:
            if not self._logprobs_checked:
                self.verify_processed_logprobs(prompts[0])
        start = time.perf_counter()
        step, num_servers = self.max_prompts_per_request, len(self.base_urls)
        futures = []
        for k, lo in enumerate(range(0, len(prompts), step)):
            chunk = prompts[lo:lo + step]
            body = completion_request(self.model, chunk, n=n, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens,
                                      stop_token_ids=stop_token_ids, seed=seed)
            urls = self.base_urls[k % num_servers:] + self.base_urls[:k % num_servers]
            futures.append((len(chunk), lo, self._pool.submit(
                self._post, urls[0], "/v1/completions", body, urls=urls)))
        token_ids, logprobs, reasons = [], [], []
        for size, lo, future in futures:
            ids, lps, rs = parse_completion_response(
                future.result(), size, n, max_new_tokens,
                f"/v1/completions for prompts {lo}..{lo + size - 1}")
            token_ids += ids
            logprobs += lps
            reasons += rs
        return RolloutBatch(prompt_ids=[list(map(int, p)) for p in prompts],
                            token_ids=token_ids, logprobs=logprobs, finish_reasons=reasons,
                            n=n, weight_version=self.weight_version,
                            timing={"generate_s": time.perf_counter() - start})

    # ---- weight sync ----------------------------------------------------------------------
    def _rpc(self, url: str, method: str, args: list[str]) -> list[dict]:
        """POST /collective_rpc; returns the per-worker `results`, each a dict."""
        body = {"method": method, "args": args, "kwargs": {}, "timeout": self.timeout_s}
        resp = self._post(url, "/collective_rpc", body)
        results = resp.get("results") if isinstance(resp, dict) else None
        if (not isinstance(results, list) or not results
                or not all(isinstance(r, dict) for r in results)):
            raise VLLMServerError(f"{url}/collective_rpc {method}: expected 'results' with one "
                                  f"object per worker, got {resp!r:.200} (is the server "
                                  f"started with --worker-extension-cls {EXTENSION_CLS}?)")
        return results

    def _sync_server(self, url: str, path: str, version: int) -> None:
        """pause(wait) -> load -> reset_prefix_cache -> resume on one server, then the check."""
        try:
            self._post(url, "/pause?mode=wait", {})
        except HTTPStatusError as e:
            if e.status == 404:
                raise VLLMServerError(f"{url} has no /pause: start it with "
                                      f"VLLM_SERVER_DEV_MODE=1 (launchers/vllm_server.sh), on a "
                                      f"vLLM with the pause/resume endpoints ({e})") from e
            raise
        try:
            loaded = self._rpc(url, LOAD_METHOD, [path, str(version)])
            self._post(url, "/reset_prefix_cache", {})
        finally:
            self._post(url, "/resume", {})
        if any(r.get("num_tensors", 1) == 0 for r in loaded):
            raise VLLMServerError(f"{url}: a worker loaded no tensor from {path}: {loaded}")
        served = [r.get("weight_version") for r in self._rpc(url, VERSION_METHOD, [])]
        if any(v != version for v in served):
            raise VLLMServerError(f"{url}: after loading {path}, workers report weight "
                                  f"versions {served}, expected {version} on every worker")

    def update_weights(self, params_or_model: Any, version: int) -> None:
        """Writes the policy to weights_dir and makes every server load it (module docstring).

        The previous directory is deleted once every server serves the new one. Timings go
        to `last_sync_timing` (write_s, sync_s).
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version: expected a non-negative int, got {version!r}")
        start = time.perf_counter()
        path = write_weights_atomically(self.weight_writer, params_or_model, self.weights_dir,
                                        version)
        written = time.perf_counter()
        server_path = path
        if self.server_weights_dir is not None:
            server_path = os.path.join(self.server_weights_dir, os.path.basename(path))
        futures = [self._pool.submit(self._sync_server, u, server_path, version)
                   for u in self.base_urls]
        for future in futures:
            future.result()
        if self._weights_path not in (None, path):
            shutil.rmtree(self._weights_path, ignore_errors=True)
        self._weights_path, self.weight_version = path, version
        self.last_sync_timing = {"write_s": written - start,
                                 "sync_s": time.perf_counter() - written}
        log.info("weights v%d served by %d server(s): write %.2fs, sync %.2fs", version,
                 len(self.base_urls), *self.last_sync_timing.values())

    def close(self) -> None:
        """Stops the request threads (the servers keep running)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "VLLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
