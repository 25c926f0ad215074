"""`VLLMClient`: rollouts from one or more external vLLM servers, with weight sync by files.

Start-up: every URL is checked (scheme, host that resolves) at once; a refused connection is
waited for (a progress line every 30 s, up to health_timeout_s); every server must run the
worker extension (vllm_worker.py) and no data parallelism (vllm_sync.check_layout).

Generation: POST /v1/completions with token-id prompts, one request per prompt (all n samples,
which share the prompt's KV), because vLLM seeds a request, not a prompt: prompt i gets the
seed `prompt_seeds(seed, P, n)[i]`, and vLLM seeds its sample j with that + j, so every sample
of a call has its own noise and the same call gives the same samples. Requests are sent
concurrently, request i to server i % num_servers, failing over to the next server;
`generate_groups` yields each prompt's group as its request returns (scoring starts while
the others generate).

Weight sync (docs/vllm.md): the policy is written as HF safetensors to a fresh directory under
`weights_dir` (temp dir + rename, so a server never reads half a checkpoint), then every server
is synced atomically by `vllm_sync.sync_server`: the new weights verified, or the last good
ones restored and verified, or the server left paused and named in a `WeightSyncError`. After a
failed sync `generate` refuses until a sync succeeds. `update_weights(..., wait=False)` returns
once the write has started in a background thread; the servers are synced (a short pause +
reload) by `finish_update()`, which the next `generate` or `update_weights` calls first.
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
from typing import Any, Callable, Iterator, Sequence

from prorl_jax.rollout.base import RolloutBatch, RolloutEngine
from prorl_jax.rollout.vllm_http import (VLLMServerError, call_with_retries, check_base_url,
                                         request_json, wait_for_health, wait_until)
from prorl_jax.rollout.vllm_protocol import (MAX_TEMPERATURE, completion_request,
                                             first_top_logprobs, logprobs_mode_verdict,
                                             parse_completion_response, prompt_seeds)
from prorl_jax.rollout.vllm_sync import WeightSyncError, check_layout, sync_server
from prorl_jax.rollout.vllm_worker import VERSION_FILE

log = logging.getLogger(__name__)

WeightWriter = Callable[[Any, str], None]
# The log-prob mode check samples one token at these two temperatures (gap ratio 2).
CHECK_TEMPERATURES = (1.0, 0.5)
CHECK_TOP_LOGPROBS = 5
# Statuses worth retrying for the sync calls: not 500, which is a worker's exception.
SYNC_RETRY_STATUS = frozenset({429, 502, 503, 504})


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
                             cover the longest request (and a reload of the weights).
    model:                   the served model id; default: the one /v1/models lists.
    max_retries, backoff_s:  retries after a refused connection, timeout, 429 or 5xx, waiting
                             backoff_s * 2**(attempt-1) seconds before each.
    health_timeout_s:        how long to wait for a server that refuses connections or
                             answers 503 (at start-up), or that is paused (before a request).
    weight_writer:           writer(params_or_model, dir) of a HF safetensors directory.
    check_logprobs_mode:     before the first generation, refuse a server whose log-probs are
                             not of the tempered distribution (--logprobs-mode).
    server_weights_dir:      weights_dir as the servers see it, if mounted elsewhere there.
    max_concurrent_requests: requests in flight at once, over all servers.
    """

    def __init__(self, base_urls: Sequence[str], weights_dir: str, timeout_s: float = 1800.0,
                 *, model: str | None = None, max_retries: int = 3, backoff_s: float = 2.0,
                 health_timeout_s: float = 900.0, weight_writer: WeightWriter | None = None,
                 check_logprobs_mode: bool = True, server_weights_dir: str | None = None,
                 max_concurrent_requests: int = 32):
        if isinstance(base_urls, str) or not base_urls:
            raise ValueError(f"base_urls: expected a non-empty list of URLs, got {base_urls!r}")
        for name, value in (("timeout_s", timeout_s), ("health_timeout_s", health_timeout_s),
                            ("max_concurrent_requests", max_concurrent_requests)):
            if value <= 0:
                raise ValueError(f"{name}: expected > 0, got {value}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries, backoff_s: expected >= 0, got {max_retries}, "
                             f"{backoff_s}")
        self.base_urls = [check_base_url(u, f"base_urls[{i}]") for i, u in enumerate(base_urls)]
        self.weights_dir = weights_dir
        self.server_weights_dir = server_weights_dir
        self.timeout_s, self.health_timeout_s = float(timeout_s), float(health_timeout_s)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.weight_writer = weight_writer or default_weight_writer
        self.weight_version = 0
        self.last_sync_timing: dict[str, float] = {}
        self._logprobs_checked = not check_logprobs_mode
        self._lock = threading.RLock()  # one update at a time; generate waits for it
        self._pending: tuple[concurrent.futures.Future, int, float] | None = None
        self._broken: str | None = None  # why the servers' weights are not the policy's
        self._weights_path: str | None = None  # last good directory (here) and its version
        self._good: tuple[str, int | None] = ("", None)  # ... as the servers see it
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent_requests, thread_name_prefix="vllm-client")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vllm-write")
        waits = [self._pool.submit(wait_for_health, u, deadline_s=health_timeout_s)
                 for u in self.base_urls]  # servers load in parallel: wait for all at once
        for url, waited in zip(self.base_urls, waits):
            log.info("%s healthy after %.1fs", url, waited.result())
        self.model, self.max_model_len = self._served_model(model)
        self.server_versions = [self._server_version(u) for u in self.base_urls]
        self.layouts = [check_layout(self._poster(u), u) for u in self.base_urls]

    # ---- HTTP -----------------------------------------------------------------------------
    def _get(self, url: str) -> Any:
        return call_with_retries(lambda u: request_json(u, timeout_s=self.timeout_s), [url],
                                 what=f"GET {url}", max_retries=self.max_retries,
                                 backoff_s=self.backoff_s)

    def _post(self, path: str, body: Any, urls: Sequence[str],
              retry_status: frozenset | None = None) -> Any:
        """POST with retries; on failure the next try goes to the next of `urls`."""
        return call_with_retries(
            lambda u: request_json(f"{u}{path}", body, timeout_s=self.timeout_s),
            urls, what=f"POST {urls[0]}{path}", max_retries=self.max_retries,
            backoff_s=self.backoff_s, retry_status=retry_status)

    def _poster(self, url: str) -> Callable[[str, Any], Any]:
        """post(path, body) to `url` for the sync calls (a 500 is not retried)."""
        return lambda path, body: self._post(path, body, [url], SYNC_RETRY_STATUS)

    # ---- start-up -------------------------------------------------------------------------
    def _served_model(self, model: str | None) -> tuple[str, int | None]:
        """(model id, smallest max_model_len) served by every server, from GET /v1/models."""
        lens = []
        for url in self.base_urls:
            served = {m.get("id"): m for m in (self._get(f"{url}/v1/models") or {}
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
                resp = self._post("/v1/completions", body, [url])
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
    def _wait_until_resumed(self, url: str) -> None:
        """Waits (progress lines, up to health_timeout_s) while `url` reports is_paused, since
        vLLM 0.32 holds a request sent to a paused server until /resume, however long. A
        server that cannot be asked is only logged: its requests fail over to the others."""
        def check() -> str | None:
            try:
                paused = (request_json(f"{url}/is_paused", timeout_s=self.timeout_s) or {}
                          ).get("is_paused")
            except VLLMServerError as e:
                log.warning("%s: cannot ask /is_paused (%s); its requests go to the other "
                            "servers", url, e)
                return None
            return "paused (POST /resume, or restart it)" if paused else None

        wait_until(check, what=f"{url} to resume", deadline_s=self.health_timeout_s)

    def _ready_version(self) -> int:
        """Finishes a pending update, refuses after a failed sync, waits out paused servers;
        returns the weight version the servers now serve."""
        with self._lock:
            self.finish_update()
            if self._broken is not None:
                raise WeightSyncError(f"the servers do not serve the policy's weights (an "
                                      f"earlier sync failed: {self._broken}); a successful "
                                      f"update_weights must come first", {})
            for url in self.base_urls:
                self._wait_until_resumed(url)
            return self.weight_version

    def _sample_prompt(self, body: dict, urls: Sequence[str], index: int) -> tuple:
        """One prompt's request and its parsed answer, on urls[0] first. A failure (no
        connection, 5xx, an unusable answer, choices ended "abort" by a server shutting down
        or paused) is retried on the next server; a retry first waits out a paused server,
        since vLLM 0.32 would hold the request until /resume."""
        tried: list[str] = []

        def attempt(url: str) -> tuple:
            if tried:
                self._wait_until_resumed(url)
            tried.append(url)
            resp = request_json(f"{url}/v1/completions", body, timeout_s=self.timeout_s)
            return parse_completion_response(resp, 1, body["n"], body["max_tokens"],
                                             f"{url}/v1/completions (prompt {index})")

        return call_with_retries(attempt, urls, what=f"POST {urls[0]}/v1/completions (prompt "
                                 f"{index})", max_retries=self.max_retries,
                                 backoff_s=self.backoff_s)

    def _submit(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                seed: int) -> tuple[list[concurrent.futures.Future], int, float]:
        """Checks the request, sends one request per prompt (concurrently); returns (their
        futures, the weight version served, the start time)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n, max_new_tokens: expected >= 1, got {n}, {max_new_tokens}")
        if not 0 <= temperature <= MAX_TEMPERATURE or not 0 < top_p <= 1:
            raise ValueError(f"temperature in [0, {MAX_TEMPERATURE:g}] (vLLM's range) and "
                             f"0 < top_p <= 1 expected, got {temperature}, {top_p}")
        check_prompts(prompts, max_new_tokens, self.max_model_len)
        version = self._ready_version()
        with self._lock:
            if not self._logprobs_checked:
                self.verify_processed_logprobs(prompts[0])
        start = time.perf_counter()
        num_servers = len(self.base_urls)
        futures = []
        for i, (prompt, prompt_seed) in enumerate(zip(prompts, prompt_seeds(seed, len(prompts),
                                                                            n))):
            body = completion_request(self.model, [prompt], n=n, temperature=temperature,
                                      top_p=top_p, max_new_tokens=max_new_tokens,
                                      stop_token_ids=stop_token_ids, seed=prompt_seed)
            urls = self.base_urls[i % num_servers:] + self.base_urls[:i % num_servers]
            futures.append(self._pool.submit(self._sample_prompt, body, urls, i))
        return futures, version, start

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                 seed: int) -> RolloutBatch:
        """Samples n responses per prompt across the servers; rows prompt-major (i*n + j)."""
        futures, version, start = self._submit(
            prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, seed=seed)
        token_ids, logprobs, reasons = [], [], []
        for future in futures:
            ids, lps, rs = future.result()
            token_ids += ids
            logprobs += lps
            reasons += rs
        return RolloutBatch(prompt_ids=[list(map(int, p)) for p in prompts],
                            token_ids=token_ids, logprobs=logprobs, finish_reasons=reasons,
                            n=n, weight_version=version,
                            timing={"generate_s": time.perf_counter() - start})

    def generate_groups(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                        top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                        seed: int) -> Iterator[tuple[int, RolloutBatch]]:
        """`generate`'s requests, each prompt's group yielded as its request returns (the
        same rows; `RolloutEngine.generate_groups`)."""
        futures, version, start = self._submit(
            prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, seed=seed)
        index = {future: i for i, future in enumerate(futures)}
        for future in concurrent.futures.as_completed(futures):
            ids, lps, rs = future.result()
            i = index[future]
            yield i, RolloutBatch(prompt_ids=[list(map(int, prompts[i]))], token_ids=ids,
                                  logprobs=lps, finish_reasons=rs, n=n, weight_version=version,
                                  timing={"generate_s": time.perf_counter() - start})

    # ---- weight sync ----------------------------------------------------------------------
    def update_weights(self, params_or_model: Any, version: int, *, wait: bool = True) -> None:
        """Writes the policy to weights_dir and makes every server serve it (module docstring).

        wait=False: returns once the write has started in a background thread (then
        `params_or_model` must stay valid until it ends: pass host arrays where the next step
        donates the device buffers); `finish_update()` (called by the next generate or
        update_weights) syncs the servers. Raises `WeightSyncError` naming the servers that
        failed, after which generate refuses until a sync succeeds. Timings go to
        `last_sync_timing` (write_s, sync_s, total_s, max over servers of pause_s / load_s /
        resume_s).
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version: expected a non-negative int, got {version!r}")
        with self._lock:
            self.finish_update()
            start = time.perf_counter()
            write = self._writer.submit(write_weights_atomically, self.weight_writer,
                                        params_or_model, self.weights_dir, version)
            self._pending = (write, version, start)
            if wait:
                self.finish_update()

    def finish_update(self) -> None:
        """Waits for a pending write, then syncs every server to it (no-op when none)."""
        with self._lock:
            if self._pending is None:
                return
            (write, version, start), self._pending = self._pending, None
            path = write.result()  # a failed write raises here; no server was touched
            written = time.perf_counter()
            self._sync_all(path, version)
            done = time.perf_counter()
            self.last_sync_timing.update(write_s=written - start, sync_s=done - written,
                                         total_s=done - start)
            log.info("weights v%d served by %d server(s): write %.2fs, sync %.2fs", version,
                     len(self.base_urls), written - start, done - written)

    def _sync_all(self, path: str, version: int) -> None:
        """Syncs every server in parallel; keeps the last good directory until all succeed."""
        server_path = path
        if self.server_weights_dir is not None:
            server_path = os.path.join(self.server_weights_dir, os.path.basename(path))
        futures = {u: self._pool.submit(sync_server, self._poster(u), u, server_path, version,
                                        self._good) for u in self.base_urls}
        failed, timings = {}, []
        for url, future in futures.items():
            try:
                timings.append(future.result())
            except WeightSyncError as e:
                failed[url] = str(e)
            except VLLMServerError as e:
                failed[url] = f"{url}: {e} (weights v{version} not loaded)"
        self.last_sync_timing = ({k: max(t[k] for t in timings) for k in timings[0]}
                                 if timings else {})
        if failed:
            if path != self._weights_path:
                shutil.rmtree(path, ignore_errors=True)
            self._broken = "; ".join(failed.values())
            raise WeightSyncError(f"weight sync to v{version} failed on {len(failed)} of "
                                  f"{len(self.base_urls)} server(s): {self._broken}", failed)
        if self._weights_path not in (None, path):
            shutil.rmtree(self._weights_path, ignore_errors=True)
        self._weights_path, self._good = path, (server_path, version)
        self.weight_version, self._broken = version, None

    def close(self) -> None:
        """Stops the request and writer threads (the servers keep running)."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "VLLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
