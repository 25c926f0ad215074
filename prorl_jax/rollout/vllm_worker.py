"""The vLLM worker extension that loads new policy weights from a safetensors directory.

Start the server with
    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls prorl_jax.rollout.vllm_worker.WeightSyncExtension ...
(launchers/vllm_server.sh does). vLLM adds the class to its worker's bases (refusing names the
worker already has, hence the prorl_ prefix), so its methods see the worker, and
`POST /collective_rpc {"method": LOAD_METHOD, "args": [dir, "7"]}` runs
`prorl_load_weights(dir, "7")` on each worker. vLLM's endpoint passes args as they come (meant
as strings: methods deserialise them) and answers `{"results": [...]}`, one per worker of the
first data-parallel engine, keeping dicts, lists and None but turning anything else into
str(result); an exception in a worker is HTTP 500 naming it.

Loading goes through vLLM's own layer-wise reload (`Worker.reload_weights(weights_path=...)`,
vLLM >= 0.32), which runs each layer's post-load processing (CPU repacking, fused or quantized
layouts); a raw `model.load_weights` does not (it fails on the CPU backend). Around it:
  before: the directory's tensor names and shapes (read from the safetensors headers, no data)
          must equal those of the server's own checkpoint, because vLLM's reload keeps the old
          values of any layer the files lack: a partial directory would serve a mix. A refusal
          here leaves the weights untouched (UNTOUCHED in the error);
  after:  every served parameter stored as in the files (same name and shape: embeddings, the
          head, norms; fused or repacked ones cannot be compared) must equal its file tensor.
The worker records the version only after both; from the moment the reload starts until then it
reports `intact: false` (UNKNOWN in the error), so the client never resumes on such weights.

This module runs inside the vLLM server process, where jax may be absent: it imports only the
standard library at module level (torch and safetensors inside the methods), so it also
imports where neither vLLM nor torch is installed.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

EXTENSION_CLS = "prorl_jax.rollout.vllm_worker.WeightSyncExtension"
INFO_METHOD = "prorl_server_info"
LOAD_METHOD = "prorl_load_weights"
VERSION_METHOD = "prorl_weight_version"
# Written by the client into each weights directory: {"weight_version": int}.
VERSION_FILE = "prorl_weight_version.json"
INDEX_FILE = "model.safetensors.index.json"
UNTOUCHED = "[weights untouched]"  # in a load error: the served weights did not change
UNKNOWN = "[weights unknown]"      # in a load error: the reload started and did not finish

Manifest = dict  # {tensor name: [shape...]} of a checkpoint directory


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


def read_manifest(path: str) -> Manifest:
    """{tensor name: shape list} of the checkpoint directory `path`, from the safetensors
    headers alone (8-byte little-endian header length, then a JSON header); no tensor is read.
    Raises ValueError naming the file when a header is unreadable or the file is shorter or
    longer than its header says (a shard cut short)."""
    manifest: Manifest = {}
    for file in safetensors_shards(path):
        with open(file, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(size) if 0 < size < 1 << 30 else b""
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        if not isinstance(header, dict) or len(raw) != size:
            raise ValueError(f"{file}: not a safetensors file (header unreadable or cut short)")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if os.path.getsize(file) != 8 + size + end:
            raise ValueError(f"{file}: {os.path.getsize(file)} bytes, but its header describes "
                             f"{8 + size + end} (cut short or overwritten?)")
        manifest.update({name: list(v["shape"]) for name, v in tensors.items()})
    return manifest


def manifest_difference(reference: Manifest, new: Manifest) -> str | None:
    """A description of how `new` differs from `reference` (missing or extra tensors, other
    shapes), or None when they hold the same tensors with the same shapes."""
    missing = sorted(set(reference) - set(new))
    extra = sorted(set(new) - set(reference))
    shapes = sorted(n for n in set(reference) & set(new) if reference[n] != new[n])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
    if shapes:
        parts.append("other shapes: " + ", ".join(f"{n} {new[n]} (expected {reference[n]})"
                                                  for n in shapes[:3]))
    return "; ".join(parts) or None


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


def compare_with_files(named_parameters: Any, path: str,
                       manifest: Manifest) -> tuple[int, str | None]:
    """(how many served parameters were compared, why the first bad one is bad, or None).

    A parameter is compared when the files hold a tensor of its name and shape; it must be
    finite and equal that tensor cast to the parameter's dtype (the cast the load made).
    """
    import torch  # lazy: only inside the server
    from safetensors import safe_open

    wanted = {name: p for name, p in named_parameters
              if list(p.shape) == manifest.get(name, None)}
    compared = 0
    for file in safetensors_shards(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in wanted:
                    continue
                served = wanted[name].detach().to("cpu")
                if not torch.isfinite(served).all():
                    return compared, f"parameter {name!r} is not finite"
                if not torch.equal(served, f.get_tensor(name).to(served.dtype)):
                    return compared, f"parameter {name!r} differs from the file"
                compared += 1
    return compared, None


class WeightSyncExtension:
    """Mixed into vLLM's worker; reached through POST /collective_rpc (module docstring).

    Uses the worker's `reload_weights`, `vllm_config` and `model_runner`; keeps its own state
    in `_prorl_*` attributes: the version served, whether the weights are intact, the start-up
    checkpoint's path and manifest (the reference every later directory must match).
    """

    def _prorl_state(self) -> dict:
        if not hasattr(self, "_prorl"):
            self._prorl = {"version": None, "intact": True,
                           "initial_path": self.vllm_config.model_config.model,
                           "reference": None}
        return self._prorl

    def _prorl_reference(self, path: str) -> Manifest:
        """The start-up checkpoint's manifest; where it is not a local directory (a hub id),
        the first directory loaded becomes the reference."""
        state = self._prorl_state()
        if state["reference"] is None:
            initial = state["initial_path"]
            state["reference"] = read_manifest(initial if os.path.isdir(initial) else path)
        return state["reference"]

    def prorl_server_info(self) -> dict:
        """The parallel layout and the weight state of this worker."""
        state = self._prorl_state()
        parallel = self.vllm_config.parallel_config
        return {"data_parallel_size": parallel.data_parallel_size,
                "tensor_parallel_size": parallel.tensor_parallel_size,
                "pipeline_parallel_size": parallel.pipeline_parallel_size,
                "weight_version": state["version"], "intact": state["intact"]}

    def prorl_load_weights(self, path: str, version: int | str) -> dict:
        """Reloads the served weights from the HF safetensors directory `path`, tagged
        `version` ("" with path "": the server's start-up checkpoint, version None).

        Returns {"weight_version", "num_tensors" (in the files), "num_verified" (served
        parameters found equal to the files)}. Errors carry UNTOUCHED or UNKNOWN.
        """
        state = self._prorl_state()
        path = path or state["initial_path"]
        version = int(version) if str(version) != "" else None
        try:
            recorded = read_version_file(path)
            if recorded is not None and recorded != version:
                raise ValueError(f"{path}/{VERSION_FILE} records weight_version={recorded}, "
                                 f"but version {version} was requested")
            manifest = read_manifest(path)
            difference = manifest_difference(self._prorl_reference(path), manifest)
            if difference:
                raise ValueError(f"{path} does not hold the served model's tensors: "
                                 f"{difference}")
        except Exception as e:
            raise ValueError(f"{UNTOUCHED} {type(e).__name__}: {e}") from e
        state["intact"] = False
        try:
            self.reload_weights(weights_path=path, is_checkpoint_format=True)
            _synchronize_device()
            compared, bad = compare_with_files(self.model_runner.model.named_parameters(),
                                                   path, manifest)
        except Exception as e:
            raise RuntimeError(f"{UNKNOWN} reload of {path} failed: {type(e).__name__}: "
                               f"{e}") from e
        if bad is not None or compared == 0:
            raise RuntimeError(f"{UNKNOWN} after the reload of {path}, " + (
                bad or "no served parameter could be compared with the files"))
        state["version"], state["intact"] = version, True
        return {"weight_version": version, "num_tensors": len(manifest),
                "num_verified": compared}

    def prorl_weight_version(self) -> dict:
        """{"weight_version": the version last loaded (None: the start-up weights),
        "intact": False while (or after) a reload did not finish}."""
        state = self._prorl_state()
        return {"weight_version": state["version"], "intact": state["intact"]}


def _synchronize_device() -> None:
    """Waits for the copies into GPU memory to finish (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
