"""The vLLM worker extension that loads new policy weights from a safetensors directory.

Start the server with
    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls prorl_jax.rollout.vllm_worker.WeightSyncExtension ...
(launchers/vllm_server.sh does). vLLM mixes the class into every GPU worker, so its methods see
`self.model_runner`, and `POST /collective_rpc {"method": LOAD_METHOD, "args": [dir, version]}`
runs `prorl_load_weights_from_dir(dir, version)` on each worker.

This module runs inside the vLLM server process, where jax may be absent: it imports only the
standard library at module level (torch and safetensors inside the methods), so it also
imports where neither vLLM nor torch is installed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

EXTENSION_CLS = "prorl_jax.rollout.vllm_worker.WeightSyncExtension"
LOAD_METHOD = "prorl_load_weights_from_dir"
VERSION_METHOD = "prorl_weight_version"
# Written by the client into each weights directory: {"weight_version": int}.
VERSION_FILE = "prorl_weight_version.json"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_shards(path: str) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint directory, in load order.

    Uses model.safetensors.index.json (its weight_map's files) when present, else every
    *.safetensors file sorted by name. Raises FileNotFoundError naming the directory when
    there is none, or when the index names a file that is missing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights directory {path!r} does not exist (or is not a "
                                f"directory) on this server")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' object")
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"weights directory {path!r} holds no *.safetensors file")
    files = [os.path.join(path, n) for n in names]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
    return files


def read_version_file(path: str) -> int | None:
    """The weight version recorded in `path`/VERSION_FILE, or None when there is no such file."""
    marker = os.path.join(path, VERSION_FILE)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        value = json.load(f).get("weight_version")
    if not isinstance(value, int):
        raise ValueError(f"{marker}: expected an integer 'weight_version', got {value!r}")
    return value


def iter_safetensors(files: list[str], device: str = "cpu") -> Iterator[tuple[str, Any]]:
    """Yields (name, torch.Tensor) one tensor at a time, so a shard is never held whole."""
    from safetensors import safe_open  # lazy: torch is needed only here

    for file in files:
        with safe_open(file, framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker; reached through POST /collective_rpc.

    Relies on the worker attribute `self.model_runner.model.load_weights(weights=iterable of
    (hf_name, tensor))`, which copies each tensor into the served model (handling the fused
    qkv / gate_up layouts itself).
    """

    def prorl_load_weights_from_dir(self, path: str, version: int) -> int:
        """Loads every tensor of the HF safetensors directory `path`; returns `version`.

        When the directory records a weight version (VERSION_FILE) it must equal `version`,
        so a stale or half-replaced directory is refused rather than served.
        """
        recorded = read_version_file(path)
        if recorded is not None and recorded != version:
            raise ValueError(f"{path}/{VERSION_FILE} records weight_version={recorded}, "
                             f"but version {version} was requested")
        files = safetensors_shards(path)
        model = self.model_runner.model
        model.load_weights(weights=iter_safetensors(files))
        _synchronize_device()
        self._prorl_weight_version = int(version)
        return self._prorl_weight_version

    def prorl_weight_version(self) -> int | None:
        """The version last loaded by `prorl_load_weights_from_dir`; None before the first."""
        return getattr(self, "_prorl_weight_version", None)


def _synchronize_device() -> None:
    """Waits for the copies into GPU memory to finish (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
