"""`VLLMSettings`: the run config's vLLM part (config.rollout.*), checked once at start-up.

Built by prorl_jax/build.py from the config and each stage's overrides, so a temperature vLLM
would refuse (HTTP 400 above 2) or a URL that cannot work stops the run before the model is
loaded, naming the field, instead of failing at the first rollout hours later. The fields are
documented where they are defined (configs/prorl.py).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from prorl_jax.rollout.vllm_http import check_base_url
from prorl_jax.rollout.vllm_protocol import MAX_TEMPERATURE


@dataclasses.dataclass(frozen=True)
class VLLMSettings:
    """urls: server roots; weights_dir / server_weights_dir: the hand-over directory as the
    trainer and (when mounted elsewhere, else "") the servers see it; timeout_s: per HTTP
    call; health_timeout_s: wait for a server that is loading or paused; temperatures: every
    sampling temperature of the run, (field name, value), all in [0, MAX_TEMPERATURE]."""
    urls: tuple[str, ...]
    weights_dir: str
    server_weights_dir: str = ""
    timeout_s: float = 3600.0
    health_timeout_s: float = 900.0
    temperatures: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not self.urls:
            raise ValueError("config.rollout.vllm_urls: expected one or more comma-separated "
                             "server URLs (launchers/vllm_server.sh), got none")
        checked = tuple(check_base_url(u, "config.rollout.vllm_urls") for u in self.urls)
        object.__setattr__(self, "urls", checked)
        for name in ("timeout_s", "health_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config.rollout.{name}={getattr(self, name)!r}: expected > 0")
        for field, value in self.temperatures:
            if not 0 <= value <= MAX_TEMPERATURE:
                raise ValueError(f"{field}={value!r}: vLLM samples at temperatures in "
                                 f"[0, {MAX_TEMPERATURE:g}] only (it answers HTTP 400 above)")

    @classmethod
    def from_config(cls, cfg, stage_cfgs: Sequence = (), *, workdir: str) -> "VLLMSettings":
        """From the run config `cfg` and its stages' configs (their temperatures too)."""
        r = cfg.rollout
        temps = [("config.rollout.temperature", r.temperature)]
        if "eval" in cfg and "temperature" in cfg.eval:
            temps.append(("config.eval.temperature", cfg.eval.temperature))
        for i, stage in enumerate(stage_cfgs):
            temps += [(f"config.stages[{i}] rollout.temperature", stage.rollout.temperature)]
            if "eval" in stage and "temperature" in stage.eval:
                temps.append((f"config.stages[{i}] eval.temperature", stage.eval.temperature))
        return cls(urls=tuple(u.strip() for u in r.vllm_urls.split(",") if u.strip()),
                   weights_dir=r.weights_dir or f"{workdir}/vllm_weights",
                   server_weights_dir=r.get("server_weights_dir", ""),
                   timeout_s=float(r.timeout_s),
                   health_timeout_s=float(r.get("health_timeout_s", 900.0)),
                   temperatures=tuple((k, float(v)) for k, v in temps))
