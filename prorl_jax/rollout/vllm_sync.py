"""The weight sync of one vLLM server, made atomic: the server serves the new weights, verified,
or the last good ones, verified, or it is left paused and named in the error.

    pause(mode=wait) -> /collective_rpc LOAD_METHOD [dir, version] -> /reset_prefix_cache
      -> every worker reports (version, intact) -> resume

On a failure after the pause (`recover`): when every worker still reports the last good
version intact (the extension refused the directory before touching anything) the server is
resumed; otherwise the last good directory (or, before the first sync, the server's start-up
checkpoint) is reloaded and verified the same way and the server resumed; when that fails too,
or the workers cannot be asked, the server stays PAUSED, so nothing is generated from unknown
weights. Either way a `WeightSyncError` names the server and what was done.

`post(path, body)` is the caller's POST to one server (JSON in, JSON out, timeouts and retries
of connection failures included; vllm_client.py binds it). Facts: docs/vllm.md.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from prorl_jax.rollout.vllm_http import HTTPStatusError, VLLMServerError
from prorl_jax.rollout.vllm_worker import EXTENSION_CLS, INFO_METHOD, LOAD_METHOD, VERSION_METHOD

Post = Callable[[str, Any], Any]
RESET_ATTEMPTS, RESET_WAIT_S = 5, 0.2  # /reset_prefix_cache fails while blocks are still held


class WeightSyncError(VLLMServerError):
    """A weight sync failed; `servers` maps each failed server's URL to the state it was left
    in ("resumed on v3", "left PAUSED ...")."""

    def __init__(self, message: str, servers: dict[str, str]):
        super().__init__(message)
        self.servers = dict(servers)


def version_name(version: int | None) -> str:
    return "the start-up weights" if version is None else f"weights v{version}"


def rpc(post: Post, url: str, method: str, args: list[str]) -> list[dict]:
    """POST /collective_rpc; returns the per-worker results, each a dict.

    vLLM answers one result per worker of its first data-parallel engine (hence DP > 1 is
    refused at start-up, see `check_layout`).
    """
    try:
        resp = post("/collective_rpc", {"method": method, "args": args, "kwargs": {}})
    except HTTPStatusError as e:
        if e.status == 404:
            raise VLLMServerError(f"{url} has no /collective_rpc: start it with "
                                  f"VLLM_SERVER_DEV_MODE=1 (launchers/vllm_server.sh)") from e
        if "has no attribute" in e.body and "prorl_" in e.body:
            raise VLLMServerError(f"{url}: the worker lacks {method}: start the server with "
                                  f"--worker-extension-cls {EXTENSION_CLS} and prorl_jax "
                                  f"importable ({e})") from e
        raise
    results = resp.get("results") if isinstance(resp, dict) else None
    if (not isinstance(results, list) or not results
            or not all(isinstance(r, dict) for r in results)):
        raise VLLMServerError(f"{url}/collective_rpc {method}: expected 'results' with one "
                              f"object per worker, got {resp!r:.200}")
    return results


def check_layout(post: Post, url: str) -> dict:
    """The server's parallel layout from INFO_METHOD; refuses data parallelism (DP > 1),
    whose other engines /collective_rpc does not report, so their versions cannot be checked."""
    info = rpc(post, url, INFO_METHOD, [])
    dp = max(int(w.get("data_parallel_size", 1)) for w in info)
    if dp > 1:
        raise VLLMServerError(
            f"{url} runs data_parallel_size={dp}: its /collective_rpc reports only the first "
            f"engine, so a weight sync could not be verified on the others. Start one server "
            f"per data-parallel rank instead (DP_SIZE=1, one port each) and list every URL")
    return {"num_workers": len(info), "tensor_parallel_size": info[0].get("tensor_parallel_size"),
            "states": [(w.get("weight_version"), w.get("intact")) for w in info]}


def pause(post: Post, url: str) -> None:
    """POST /pause?mode=wait: requests in flight finish, new ones wait (0.32: hang; 0.33: 503)."""
    try:
        resp = post("/pause?mode=wait", {})
    except HTTPStatusError as e:
        if e.status == 404:
            raise VLLMServerError(f"{url} has no /pause: start it with VLLM_SERVER_DEV_MODE=1 "
                                  f"(launchers/vllm_server.sh), on a vLLM with the pause/resume "
                                  f"endpoints ({e})") from e
        raise
    if resp != {"status": "paused"}:
        raise VLLMServerError(f"{url}/pause answered {resp!r:.200}, expected "
                              f"{{'status': 'paused'}}")


def resume(post: Post, url: str) -> None:
    resp = post("/resume", {})
    if resp != {"status": "resumed"}:
        raise VLLMServerError(f"{url}/resume answered {resp!r:.200}, expected "
                              f"{{'status': 'resumed'}}")


def reset_prefix_cache(post: Post, url: str) -> None:
    """POST /reset_prefix_cache until it answers {"success": true}; false (blocks still held)
    is retried RESET_ATTEMPTS times, then an error: a stale prefix cache would serve KV
    computed with the old weights."""
    for attempt in range(RESET_ATTEMPTS):
        resp = post("/reset_prefix_cache", {})
        if resp == {"success": True}:
            return
        if attempt + 1 < RESET_ATTEMPTS:
            time.sleep(RESET_WAIT_S)
    raise VLLMServerError(f"{url}/reset_prefix_cache answered {resp!r:.200} "
                          f"{RESET_ATTEMPTS} times, expected {{'success': true}}")


def load_and_verify(post: Post, url: str, path: str, version: int | None) -> None:
    """LOAD_METHOD on every worker, the prefix-cache reset, then every worker must report
    `version` and intact weights (the extension compared what it could with the files)."""
    loaded = rpc(post, url, LOAD_METHOD, [path, "" if version is None else str(version)])
    if any(r.get("weight_version") != version or not r.get("num_verified") for r in loaded):
        raise VLLMServerError(f"{url}: loading {path} answered {loaded!r:.300}, expected "
                              f"weight_version={version} and num_verified >= 1 per worker")
    reset_prefix_cache(post, url)
    states = rpc(post, url, VERSION_METHOD, [])
    if any(s.get("weight_version") != version or s.get("intact") is not True for s in states):
        raise VLLMServerError(f"{url}: after loading {path}, workers report {states}, "
                              f"expected weight_version={version} and intact on every worker")


def recover(post: Post, url: str, last_good: tuple[str, int | None]) -> str:
    """After a failed load: resumes on the last good weights when they are untouched or could
    be reloaded and verified; else leaves the server paused. Returns what was done."""
    good_path, good_version = last_good
    good = version_name(good_version)
    try:
        states = rpc(post, url, VERSION_METHOD, [])
    except VLLMServerError as e:
        return f"its weights could not be checked ({e}): left PAUSED; restart it"
    try:
        if all(s.get("intact") is True and s.get("weight_version") == good_version
               for s in states):
            resume(post, url)
            return f"its weights were untouched (still {good}); resumed"
        load_and_verify(post, url, good_path, good_version)
    except VLLMServerError as e:
        return (f"restoring {good} failed too ({e}): left PAUSED with unknown weights; "
                f"restart it")
    try:
        resume(post, url)
    except VLLMServerError as e:
        return f"{good} reloaded and verified, but /resume failed ({e}): left PAUSED"
    return f"{good} reloaded from {good_path or 'its start-up checkpoint'}, verified; resumed"


def sync_server(post: Post, url: str, path: str, version: int,
                last_good: tuple[str, int | None]) -> dict[str, float]:
    """Makes the server at `url` serve the directory `path` as `version` (module docstring).

    last_good: (directory as the server sees it, version) of the weights to fall back to;
    ("", None) for the server's start-up checkpoint. Returns seconds per phase (pause_s,
    load_s: reload + reset + version check, resume_s). Raises `WeightSyncError`.
    """
    start = time.perf_counter()
    pause(post, url)
    paused = time.perf_counter()
    try:
        load_and_verify(post, url, path, version)
    except VLLMServerError as e:
        outcome = recover(post, url, last_good)
        raise WeightSyncError(f"{url}: loading weights v{version} from {path} failed: {e}; "
                              f"{outcome}", {url: outcome}) from e
    loaded = time.perf_counter()
    resume(post, url)
    return {"pause_s": paused - start, "load_s": loaded - paused,
            "resume_s": time.perf_counter() - loaded}
