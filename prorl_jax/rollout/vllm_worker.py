"""The vLLM worker extension that loads new policy weights from a safetensors directory.

Start the server with
    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls prorl_jax.rollout.vllm_worker.WeightSyncExtension ...
(launchers/vllm_server.sh does). vLLM mixes the class into every GPU worker, so its methods see
`self.model_runner`, and `POST /collective_rpc {"method": LOAD_METHOD, "args": [dir, "7"]}`
runs `prorl_load_weights_from_dir(dir, "7")` on each worker. vLLM's endpoint passes args as
they come (meant as strings: methods deserialise them) and answers `{"results": [...]}`, one
per worker, keeping dicts, lists and None but turning anything else into str(result); hence
the version travels as a string and the methods return dicts.

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

    def prorl_load_weights_from_dir(self, path: str, version: int | str) -> dict:
        """Loads every tensor of the HF safetensors directory `path`.

        Returns {"weight_version": int(version), "num_tensors": count loaded}.

        When the directory records a weight version (VERSION_FILE) it must equal `version`,
        so a stale or half-replaced directory is refused rather than served.
        """
        version = int(version)
        recorded = read_version_file(path)
        if recorded is not None and recorded != version:
            raise ValueError(f"{path}/{VERSION_FILE} records weight_version={recorded}, "
                             f"but version {version} was requested")
        files = safetensors_shards(path)
        model = self.model_runner.model
        counted = _Counted(iter_safetensors(files))
        model.load_weights(weights=counted)
        _synchronize_device()
        self._prorl_weight_version = version
        return {"weight_version": version, "num_tensors": counted.count}

    def prorl_weight_version(self) -> dict:
        """{"weight_version": the version last loaded here, or None before the first load}."""
        return {"weight_version": getattr(self, "_prorl_weight_version", None)}


class _Counted:
    """Wraps an iterator of (name, tensor) and counts what was consumed."""

    def __init__(self, items: Iterator[tuple[str, Any]]):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def _synchronize_device() -> None:
    """Waits for the copies into GPU memory to finish (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
