"""The /v1/completions protocol of vLLM as pure functions: request bodies, response parsing,
and the check that the server returns processed (tempered) log-probs. Facts: docs/vllm.md."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP
from prorl_jax.rollout.vllm_http import VLLMServerError

TOKEN_ID_PREFIX = "token_id:"  # logprob tokens with return_tokens_as_token_ids
MIN_LOGPROB = -9999.0          # vLLM clamps log-probs here
MAX_TEMPERATURE = 2.0          # vLLM refuses a temperature above this with HTTP 400
_SEED_SPAN = 2 ** 61           # request seeds stay below 2**62: vLLM wants int64 seeds


def prompt_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """The request seed of each of `num_prompts` prompts sampled n times with call seed `seed`.

    vLLM seeds a request (all its prompts alike) and gives sample j the seed + j, so prompt i
    gets base + i*n with base = splitmix64(seed) mod 2**61: the num_prompts*n samples of one
    call all get distinct seeds (two identical prompts get independent samples), and the same
    (seed, i) always the same seed.
    """
    z = (int(seed) + 0x9E3779B97F4A7C15) % 2 ** 64  # splitmix64 (Steele et al. 2014)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    base = (z ^ (z >> 31)) % _SEED_SPAN
    return [base + i * n for i in range(num_prompts)]


def completion_request(model: str, prompts: Sequence[Sequence[int]], *, n: int,
                       temperature: float, top_p: float, max_new_tokens: int,
                       stop_token_ids: Sequence[int], seed: int | None,
                       top_logprobs: int = 0) -> dict[str, Any]:
    """The POST /v1/completions body for token-id `prompts` ([P][prompt_len] ints).

    Every sampling field is sent, since fields left out are filled from the model's
    generation_config on the server. `logprobs=top_logprobs` (0: the sampled token only).
    vLLM seeds sample j with seed + j and every prompt of the request alike: send one prompt
    per seeded request (seeds from `prompt_seeds`), so that no two prompts share noise.
    """
    return {
        "model": model,
        "prompt": [list(map(int, p)) for p in prompts],
        "n": int(n),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(max_new_tokens),
        "min_tokens": 0,
        "seed": None if seed is None else int(seed),
        "stop_token_ids": [int(t) for t in stop_token_ids],
        "ignore_eos": False,
        "logprobs": int(top_logprobs),
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
        "echo": False,
        "stream": False,
    }


def parse_token_id(token: Any, where: str) -> int:
    """The id in a "token_id:N" logprob token; raises naming `where` for anything else."""
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
        try:
            return int(token[len(TOKEN_ID_PREFIX):])
        except ValueError:
            pass
    raise VLLMServerError(f"{where}: logprob token {token!r} is not of the form "
                          f"'token_id:N' (was return_tokens_as_token_ids ignored?)")


def parse_choice(choice: dict, max_new_tokens: int,
                 where: str) -> tuple[list[int], np.ndarray, str]:
    """(token_ids, float32[len] log-probs, finish_reason) of one response choice.

    Uses `choice["token_ids"]` when the server sends it (newer vLLM) and otherwise parses the
    ids out of the "token_id:N" strings of logprobs.tokens (older servers); checks that ids
    and log-probs agree in length, and ids and tokens in length and last token.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise VLLMServerError(f"{where}: no logprobs.token_logprobs in the choice "
                              f"(was logprobs=0 sent?)")
    try:
        lps = np.asarray(logprobs["token_logprobs"], np.float32)
    except (TypeError, ValueError):
        lps = None
    if lps is None or lps.ndim != 1 or not np.isfinite(lps).all():  # None arrives as nan
        raise VLLMServerError(f"{where}: a log-prob is null or not a finite number")
    tokens = logprobs.get("tokens")
    ids = choice.get("token_ids")
    if ids is None:
        if tokens is None:
            raise VLLMServerError(f"{where}: neither token_ids nor logprobs.tokens present")
        ids = [parse_token_id(t, f"{where} logprobs.tokens[{k}]") for k, t in enumerate(tokens)]
    elif tokens is not None and (len(tokens) != len(ids) or (ids and parse_token_id(
            tokens[-1], f"{where} logprobs.tokens[-1]") != ids[-1])):
        # a cheap alignment check (the last token), not a full re-parse of every string
        raise VLLMServerError(f"{where}: token_ids {ids[-8:]} disagree with logprobs.tokens "
                              f"{tokens[-8:]}")
    if len(ids) != len(lps):
        raise VLLMServerError(f"{where}: {len(ids)} token ids but {len(lps)} log-probs")
    if len(ids) > max_new_tokens:
        raise VLLMServerError(f"{where}: {len(ids)} tokens generated, more than "
                              f"max_tokens={max_new_tokens}")
    reason = choice.get("finish_reason")
    if reason not in (FINISH_STOP, FINISH_LENGTH):
        raise VLLMServerError(f"{where}: finish_reason {reason!r}, expected 'stop' or "
                              f"'length' (an 'abort' means the server dropped the request: it "
                              f"is shutting down, or was paused with mode=abort)")
    return list(ids), lps, reason


def parse_completion_response(resp: Any, num_prompts: int, n: int, max_new_tokens: int,
                              where: str) -> tuple[list[list[int]], list[np.ndarray], list[str]]:
    """Token ids, log-probs and finish reasons of the num_prompts*n choices, prompt-major.

    Choices are put in order by their `index` (prompt = index // n, sample = index % n);
    every index 0..num_prompts*n-1 must occur exactly once.
    """
    choices = resp.get("choices") if isinstance(resp, dict) else None
    expected = num_prompts * n
    if not isinstance(choices, list) or len(choices) != expected:
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise VLLMServerError(f"{where}: expected {expected} choices ({num_prompts} prompts x "
                              f"n={n}), got {got}")
    ordered: list[Any] = [None] * expected
    for pos, choice in enumerate(choices):
        index = choice.get("index", pos)
        if not isinstance(index, int) or not 0 <= index < expected or ordered[index]:
            raise VLLMServerError(f"{where}: choice {pos} has a bad or repeated index {index!r}")
        ordered[index] = parse_choice(choice, max_new_tokens, f"{where} choice {index}")
    ids, lps, reasons = zip(*ordered)
    return list(ids), list(lps), list(reasons)


def first_top_logprobs(resp: Any, where: str) -> dict[int, float]:
    """{token id: log-prob} of the first generated position of choice 0 (logprobs=k > 0)."""
    try:
        top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        raise VLLMServerError(f"{where}: no choices[0].logprobs.top_logprobs[0] in the "
                              f"answer") from None
    return {parse_token_id(tok, f"{where} top_logprobs"): float(lp) for tok, lp in top.items()}


def logprobs_mode_verdict(top_a: dict[int, float], top_b: dict[int, float],
                          temperature_a: float, temperature_b: float) -> str:
    """Which distribution the server's log-probs come from: "processed", "raw", "logits" or
    "inconclusive", from the top log-probs of one position sampled at two temperatures.

    Processed log-probs obey lp_T(i) - lp_T(k) = (z_i - z_k) / T, so the gap between two
    tokens scales by T_a / T_b between the two answers; raw log-probs keep it (ratio 1).
    Log-probs also satisfy logsumexp(lp) <= 0, which logits need not ("logits").
    """
    for top in (top_a, top_b):
        values = np.array(list(top.values()), np.float64)
        if values.size and (values.max() > 1e-3 or np.logaddexp.reduce(values) > 1e-3):
            return "logits"
    common = [t for t in top_a if t in top_b and min(top_a[t], top_b[t]) > MIN_LOGPROB / 10]
    if len(common) < 2:
        return "inconclusive"
    best = max(common, key=lambda t: top_a[t])
    ratios = [(top_b[best] - top_b[t]) / (top_a[best] - top_a[t])
              for t in common if top_a[best] - top_a[t] >= 0.1]
    if not ratios:
        return "inconclusive"
    ratio = float(np.median(ratios))
    expected = temperature_a / temperature_b
    if math.isclose(ratio, expected, rel_tol=0.15):
        return "processed"
    if math.isclose(ratio, 1.0, rel_tol=0.15):
        return "raw"
    return "inconclusive"
