"""The rollout-engine interface: every engine (external vLLM servers, the embedded JAX sampler)
takes token-id prompts and returns a `RolloutBatch`; the trainer never knows which it has."""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Sequence

import numpy as np

from prorl_jax.fields import ConfigError, Section, above, field, int_at_least

FINISH_STOP = "stop"      # ended on a stop id (EOS)
FINISH_LENGTH = "length"  # cut at max_new_tokens


@dataclasses.dataclass
class RolloutBatch:
    """Responses for P prompts x n samples, prompt-major: sample j of prompt i is row i*n+j.

    prompt_ids:     P lists of prompt token ids (as given).
    token_ids:      P*n lists of generated token ids (the stop id, when hit, is included).
    logprobs:       P*n float32 arrays, log pi(token) under the *tempered* (processed)
                    sampling distribution, one per generated token.
    finish_reasons: P*n strings, "stop" or "length".
    n:              samples per prompt.
    weight_version: the policy version that generated these (as given to update_weights).
    timing:         seconds per phase (at least "generate_s").
    """
    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    n: int
    weight_version: int = 0
    timing: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        expected = len(self.prompt_ids) * self.n
        for name in ("token_ids", "logprobs", "finish_reasons"):
            got = len(getattr(self, name))
            if got != expected:
                raise ValueError(f"RolloutBatch.{name}: expected {expected} rows "
                                 f"({len(self.prompt_ids)} prompts x n={self.n}), got {got}")
        for i, (ids, lps) in enumerate(zip(self.token_ids, self.logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"RolloutBatch row {i}: {len(ids)} token ids but "
                                 f"{len(lps)} log-probs")
        for i, reason in enumerate(self.finish_reasons):
            if reason not in (FINISH_STOP, FINISH_LENGTH):
                raise ValueError(f"RolloutBatch row {i}: finish_reason {reason!r}, "
                                 f"expected 'stop' or 'length'")

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lengths(self) -> np.ndarray:
        """int32[P*n]: generated tokens per sample."""
        return np.array([len(t) for t in self.token_ids], np.int32)

    @property
    def truncated(self) -> np.ndarray:
        """bool[P*n]: True where the response was cut at max_new_tokens."""
        return np.array([r == FINISH_LENGTH for r in self.finish_reasons])


ENGINES = ("auto", "jax", "vllm")
OLD_LOGP_SOURCES = ("trainer", "sampler")
SAMPLING_TEMPERATURE = above(0)  # (expected, ok) of rollout.temperature (also the update's)


@dataclasses.dataclass(frozen=True)
class RolloutConfig(Section):
    """How rollouts are drawn (config.rollout; documented in configs/prorl.py).

    engine: ENGINES ("auto": vLLM iff vllm_urls); vllm_urls: comma-separated server URLs;
    weights_dir: where the policy is written for the servers; timeout_s: per HTTP request;
    n: responses per prompt; temperature, top_p: sampling; max_response_tokens: the response
    cap; old_logp_source: OLD_LOGP_SOURCES, whose log-probs are pi_old in the loss.
    """
    engine: str = field("rollout.engine", "auto", choices=ENGINES)
    vllm_urls: str = field("rollout.vllm_urls", "")
    weights_dir: str = field("rollout.weights_dir", "")
    timeout_s: float = field("rollout.timeout_s", 3600.0, *above(0))
    n: int = field("rollout.n", 16, *int_at_least(1))
    temperature: float = field("rollout.temperature", 1.2, *SAMPLING_TEMPERATURE)
    top_p: float = field("rollout.top_p", 1.0, "in (0, 1]", lambda v: 0 < v <= 1)
    max_response_tokens: int = field("rollout.max_response_tokens", 8192, *int_at_least(1))
    old_logp_source: str = field("rollout.old_logp_source", "trainer", choices=OLD_LOGP_SOURCES)

    def check(self):
        if self.engine == "vllm" and not self.urls:
            raise ConfigError("config.rollout.engine='vllm' needs config.rollout.vllm_urls")

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.vllm_urls.split(",") if u.strip()]


class RolloutEngine(abc.ABC):
    """Generates responses with the current policy weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                 seed: int) -> RolloutBatch:
        """Samples n responses for each prompt (token-id lists); see `RolloutBatch`."""

    @abc.abstractmethod
    def update_weights(self, params_or_model: Any, version: int) -> None:
        """Makes the engine sample from these policy weights from now on, tagged `version`."""

    def close(self) -> None:
        """Releases servers, threads or device memory; the default holds none."""
