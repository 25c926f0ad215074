"""Device mesh, partition rules for the model parameters, batch sharding and multi-host start-up.

The mesh has three axes, ("data", "fsdp", "tensor"):
    data:   pure data parallelism (parameters replicated across it);
    fsdp:   data parallelism with parameters and optimizer state sharded across it (ZeRO-3);
    tensor: tensor (model) parallelism inside a matmul.
Batch rows are split over ("data", "fsdp"). Parameters are mapped to PartitionSpecs by a regex on
their dotted path (`layers.3.self_attn.q_proj.kernel`), written for the parameter names of the
causal-LM protocol (`prorl_jax/models/protocol.py`), which every family follows, so no rule
names a family; the optimizer state mirrors the parameters (its leaf paths end with the
parameter's path), so the same rules place it. A dimension not divisible by the size of its
mesh axes is replicated instead (tiny models on many devices).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from prorl_jax.fields import ConfigError, Section, field

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
_AUTO = (AxisType.Auto,) * len(AXES)  # GSPMD propagation (not explicit-sharding types)


def _axis_size(v) -> bool:
    return v == -1 or v >= 1


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Mesh axis sizes (config.mesh); exactly one may be -1 (it takes the remaining devices).

    data:   data-parallel replicas (default 1).
    fsdp:   fully sharded data parallel (default -1: all remaining devices).
    tensor: tensor parallel (default 1).
    """
    data: int = field("mesh.data", 1, "a positive size or -1 (fill)", _axis_size)
    fsdp: int = field("mesh.fsdp", -1, "a positive size or -1 (fill)", _axis_size)
    tensor: int = field("mesh.tensor", 1, "a positive size or -1 (fill)", _axis_size)

    def check(self):
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError(f"config.mesh: at most one axis may be -1, got data={self.data}, "
                              f"fsdp={self.fsdp}, tensor={self.tensor}")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 in (data, fsdp, tensor) so that the product is num_devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]  # each checked by MeshConfig
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' "
                             f"product {known} (data={cfg.data}, fsdp={cfg.fsdp}, "
                             f"tensor={cfg.tensor})")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {known} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, across hosts), with
    Auto axis types: shardings are given at jit boundaries and propagated by the compiler."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        try:  # topology-aware placement (ICI / NVLink neighbours on the tensor axis)
            return jax.make_mesh(shape, AXES, axis_types=_AUTO, devices=devices)
        except Exception:  # noqa: BLE001 - fall back to plain order on odd topologies
            pass
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=_AUTO)


# (regex on the dotted parameter path, mesh axes per dimension). First match wins. Names: the
# causal-LM protocol's (`prorl_jax/models/protocol.py`); tests/test_model.py checks that every
# parameter of every family's presets is placed by a rule.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.embedding$", ("tensor", "fsdp")),           # [V, H]
    (r"self_attn\.[qkv]_proj\.kernel$", ("fsdp", "tensor")),     # [H, heads*D]
    (r"self_attn\.[qkv]_proj\.bias$", ("tensor",)),              # [heads*D]
    (r"self_attn\.o_proj\.kernel$", ("tensor", "fsdp")),         # [heads*D, H]
    (r"mlp\.(gate|up)_proj\.kernel$", ("fsdp", "tensor")),       # [H, F]
    (r"mlp\.down_proj\.kernel$", ("tensor", "fsdp")),            # [F, H]
    (r"lm_head\.kernel$", ("fsdp", "tensor")),                   # [H, V]
    (r"self_attn\.[qk]_norm\.weight$", (None,)),                 # [D] replicated (Qwen3)
    (r"(layernorm|norm)\.weight$", (None,)),                     # [H] replicated
)


def path_to_str(path: Sequence[Any]) -> str:
    """A jax key path -> dotted name ('layers.0.mlp.up_proj.kernel'); nnx's '.value' dropped."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(path: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, tuple]] = PARTITION_RULES) -> P:
    """PartitionSpec of one array: the first rule whose regex matches `path`, with every
    dimension whose size its axes do not divide replicated. No match (scalars, counts): P()."""
    for pattern, axes in rules:
        if re.search(pattern, path) and len(axes) == len(shape):
            fitted = [a if dim % _axis_size(mesh, a) == 0 else None
                      for a, dim in zip(axes, shape)]
            return P(*fitted)
    return P()


def tree_shardings(tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, tuple]] = PARTITION_RULES) -> Any:
    """A pytree of NamedShardings for `tree` (parameters, optimizer state, a train state):
    each array leaf placed by `spec_for` on its path; scalars and unmatched leaves replicated."""
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(path_to_str(path), shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (dim 0) split over ("data", "fsdp"); other dims whole. Fits every batch array."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways batch rows are split (data * fsdp)."""
    return _axis_size(mesh, BATCH_AXES)


# -- multi-host --------------------------------------------------------------------------------

def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Starts jax.distributed when the run spans several processes; returns True if it did.

    With no arguments, JAX's cluster auto-detection is used when a cluster is visible (SLURM
    with more than one task, a multi-host TPU slice, Open MPI, or JAX_COORDINATOR_ADDRESS set);
    otherwise (a single process) nothing happens.
    Explicit: coordinator_address 'host:port' of process 0, num_processes, process_id.
    Call before any other JAX call that touches devices.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("initialize_distributed: give all of coordinator_address, "
                             "num_processes and process_id, or none of them (auto-detect); got "
                             f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"initialize_distributed: process_id={process_id} must be in "
                             f"[0, num_processes={num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids)
        return True
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def _cluster_detected() -> bool:
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")


def host_row_slice(global_rows: int) -> slice:
    """The rows [start, stop) of a global batch that this process loads (its equal share)."""
    n, i = jax.process_count(), jax.process_index()
    if global_rows % n:
        raise ValueError(f"global batch of {global_rows} rows does not split evenly over "
                         f"{n} processes")
    per = global_rows // n
    return slice(i * per, (i + 1) * per)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host arrays (this host's rows, `host_row_slice`) -> global arrays sharded by rows.

    Every array's dim 0 is rows; the global batch has process_count x the local rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
