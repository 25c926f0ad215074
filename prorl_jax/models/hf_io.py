"""Hugging Face checkpoints in and out, for every registered model family: config.json +
safetensors (single file or shards).

Reading (`load_pretrained`) builds the model abstractly (`nnx.eval_shape`), then fills it tensor
by tensor: each tensor is memory-mapped from its safetensors file, transposed to the model's
layout, cast to the parameter dtype, copied once and placed on its device (with its sharding when
given) before the next one is read, so host memory holds at most one tensor beyond the page cache.

Writing (`save_pretrained`) plans the shards from the shapes alone, then pulls one tensor at a
time to host (gathered when sharded) and streams its bytes into the file; everything goes into a
temp directory next to the target, renamed into place at the end.

The family comes from config.json's model_type (reading) or the config's class (writing), via
`registry`; the family's mapping module (`qwen2_params.py`, ...) turns config.json into its
config and back, and its NAME_RULES map each parameter path to its HF tensor name and layout
(`hf_common`: e.g. the `kernel` [in, out] of `layers.3.self_attn.q_proj` is
`model.layers.3.self_attn.q_proj.weight` [out, in]).

Extra tensors in a checkpoint are errors, except rotary `inv_freq` buffers (ignored) and
`lm_head.weight` in a tied checkpoint (ignored, as transformers does; a warning when it differs
from the embedding).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from prorl_jax.models import registry
from prorl_jax.models.hf_common import CheckpointError, apply_name_rules

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default shard size ("5GB")
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)

Path = tuple  # an nnx parameter path, e.g. ('layers', 0, 'mlp', 'up_proj', 'kernel')
Shardings = Callable[[Path], Optional[jax.sharding.Sharding]]


# -- config.json <-> the family's config ---------------------------------------------------------

def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE, **overrides):
    """The model config of a parsed HF config.json (`source` names it in errors), by its
    model_type's family (`registry.FAMILIES`).

    `overrides` set config fields (dtype, param_dtype, remat, attention_impl, ...).
    Raises CheckpointError for an unsupported model_type or architecture, sliding-window
    attention, scaled RoPE, a non-SiLU MLP or missing fields.
    """
    family = registry.family_for_model_type(hf.get("model_type"), source)
    return family.hf.config_from_hf(hf, source, **overrides)


def config_to_hf(config: Any, dtype: Any = None) -> dict[str, Any]:
    """The HF config.json dict of `config`; `dtype` (default param_dtype) is the stored dtype."""
    return registry.family_of(config).hf.config_to_hf(config, dtype)


# -- the safetensors format: 8-byte little-endian header size, JSON header, raw tensor bytes ------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class TensorEntry(NamedTuple):
    """Where one tensor lies in a safetensors file: byte range [start, end) from file start."""
    file: str
    dtype: np.dtype
    shape: tuple
    start: int
    end: int


def read_safetensors_header(file: str) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file by name, checked against the file's size."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{file}: not a safetensors file (header size {n}, file "
                                  f"size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise CheckpointError(f"{file}: unreadable safetensors header: {err}") from err
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {info.get('dtype')!r}; "
                                  f"expected one of {sorted(_ST_DTYPES)}")
        dtype, shape = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != dtype.itemsize * int(np.prod(shape)) or 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name} byte range [{begin}, {end}) does not "
                                  f"fit its shape {list(shape)} {info['dtype']} or the file")
        entries[name] = TensorEntry(file, dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


def map_tensor(entry: TensorEntry) -> np.ndarray:
    """A read-only memory map of one tensor (no bytes are read until used)."""
    if entry.end == entry.start:
        return np.zeros(entry.shape, entry.dtype)
    return np.memmap(entry.file, dtype=entry.dtype, mode="r", offset=entry.start,
                     shape=entry.shape)


def _safetensors_header(specs: list[tuple[str, tuple, np.dtype]]) -> bytes:
    """Header bytes for tensors (name, shape, dtype) stored back to back, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = dtype.itemsize * int(np.prod(shape))
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


# -- parameter paths <-> HF tensor names -------------------------------------------------------

def hf_name(path: Path, config: Any) -> tuple[str, bool]:
    """(HF tensor name, transpose?) of an nnx parameter path, by config's family's NAME_RULES."""
    return apply_name_rules(path, registry.family_of(config).hf.NAME_RULES)


def abstract_params(config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, State of ShapeDtypeStruct params) of config's model, allocating nothing."""
    model = registry.abstract_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if nnx.to_flat_state(rest):
        raise TypeError(f"{type(model).__name__} holds non-parameter state; hf_io maps params "
                        "only")
    return graphdef, params


# -- reading -----------------------------------------------------------------------------------

def checkpoint_tensors(path: str) -> dict[str, TensorEntry]:
    """All tensors of a HF checkpoint directory (single file or index + shards) by name."""
    index_file, single_file = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: expected a 'weight_map' of tensor -> file")
        entries = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = os.path.join(path, shard)
            if not os.path.exists(shard_file):
                raise CheckpointError(f"{index_file}: shard {shard} does not exist")
            entries.update(read_safetensors_header(shard_file))
        absent = sorted(set(weight_map) - set(entries))
        if absent:
            raise CheckpointError(f"{index_file}: tensor {absent[0]} is not in its shard "
                                  f"{weight_map[absent[0]]}")
        return entries
    if os.path.exists(single_file):
        return read_safetensors_header(single_file)
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (expected a Hugging Face "
                          "safetensors checkpoint)")


def read_config(path: str, **overrides):
    """The model config of the HF checkpoint directory `path` (its config.json)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_file):
        raise CheckpointError(f"{config_file}: missing (expected the model's HF config.json)")
    with open(config_file) as f:
        return config_from_hf(json.load(f), config_file, **overrides)


def _check_leftovers(entries: dict[str, TensorEntry], used: set[str],
                     config: Any) -> None:
    """Raises for unexpected tensors; ignores inv_freq buffers and a tied lm_head.weight."""
    extra = sorted(n for n in set(entries) - used if not n.endswith(IGNORED_TENSOR_SUFFIXES))
    head_name = hf_name(("lm_head", "kernel"), config)[0]
    if config.tie_word_embeddings and head_name in extra:
        extra.remove(head_name)
        embed_name = hf_name(("embed_tokens", "embedding"), config)[0]
        head, embed = entries[head_name], entries[embed_name]
        if head.shape != embed.shape or not _equal_rows(map_tensor(head), map_tensor(embed)):
            log.warning("%s: %s differs from %s in a tied checkpoint; it is ignored (the head "
                        "is the embedding)", head.file, head_name, embed_name)
    if extra:
        raise CheckpointError(f"{entries[extra[0]].file}: unexpected tensor(s) {extra[:5]} "
                              f"({len(extra)} in all) for a {config.family} model with "
                              f"tie_word_embeddings={config.tie_word_embeddings}")


def _equal_rows(a: np.ndarray, b: np.ndarray, rows: int = 8192) -> bool:
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, len(a), rows))


def _match_tensors(abstract: nnx.State, entries: dict[str, TensorEntry], path: str,
                   config: Any) -> list:
    """[(param path, Variable, TensorEntry, transpose?)], checked before any tensor is read:
    every parameter present with its HF shape, nothing unexpected left over."""
    plan = []
    for param_path, var in nnx.to_flat_state(abstract):
        name, transpose = hf_name(param_path, config)
        shape = tuple(var.get_value().shape)
        hf_shape = shape[::-1] if transpose else shape
        entry = entries.get(name)
        if entry is None:
            raise CheckpointError(f"{path}: missing tensor {name} (expected shape "
                                  f"{list(hf_shape)})")
        if entry.shape != hf_shape:
            raise CheckpointError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, "
                                  f"expected {list(hf_shape)}")
        plan.append((param_path, var, entry, transpose))
    _check_leftovers(entries, {hf_name(p, config)[0] for p, *_ in plan}, config)
    return plan


def load_pretrained(path: str, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    remat: str = "none", attention_impl: str = "auto",
                    shardings: Optional[Shardings] = None,
                    **config_overrides) -> nnx.Module:
    """Reads a Hugging Face checkpoint directory into its family's model (by model_type).

    dtype: compute dtype; param_dtype: parameter dtype (default: dtype); shardings:
    callable(nnx path) -> Sharding or None (None: the default device); config_overrides: other
    config fields. Raises FileNotFoundError / CheckpointError naming the file or tensor.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    config = read_config(path, dtype=jnp.dtype(dtype).name,
                         param_dtype=jnp.dtype(param_dtype).name, remat=remat,
                         attention_impl=attention_impl, **config_overrides)
    graphdef, abstract = abstract_params(config)
    filled = []
    for param_path, var, entry, transpose in _match_tensors(
            abstract, checkpoint_tensors(path), path, config):
        host = map_tensor(entry)
        host = np.array(host.T if transpose else host, dtype=var.get_value().dtype)  # owned copy
        sharding = shardings(param_path) if shardings is not None else None
        value = jax.device_put(host, sharding).block_until_ready()  # host copy freed next
        filled.append((param_path, var.replace(value)))
        del host
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# -- writing -----------------------------------------------------------------------------------

def _flat_params(model_or_state: Any, config: Any):
    """(config, [(path, array)]) from a model or an nnx.State of its params, checked by shape."""
    if isinstance(model_or_state, nnx.Module):
        config = config or model_or_state.config
        state = nnx.state(model_or_state, nnx.Param)
    elif config is None:
        raise TypeError("save_pretrained/hf_tensors: `config` is required with a params State")
    else:
        state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.State(
            model_or_state)
    given = {p: (v.get_value() if isinstance(v, nnx.Variable) else v)
             for p, v in nnx.to_flat_state(state)}
    _, abstract = abstract_params(config)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in given:
            raise KeyError(f"params: missing {'.'.join(map(str, path))} (shape "
                           f"{list(var.get_value().shape)}) for the given config")
        if tuple(given[path].shape) != tuple(var.get_value().shape):
            raise ValueError(f"params: {'.'.join(map(str, path))} has shape "
                             f"{list(given[path].shape)}, expected "
                             f"{list(var.get_value().shape)}")
        out.append((path, given.pop(path)))
    if given:
        raise KeyError(f"params: unexpected {['.'.join(map(str, p)) for p in given][:5]}")
    return config, out


def _to_host(x: Any, dtype: np.dtype, transpose: bool) -> np.ndarray:
    """One parameter on host in `dtype` (HF layout), gathered if sharded over processes.

    A device array is cast and transposed on its device (half the transfer for bf16, and the
    host does no strided copy: 3-4x faster than numpy's even with the CPU as the device)."""
    if isinstance(x, jax.Array):
        x = x.astype(dtype) if x.dtype != dtype else x
        if transpose:
            x, transpose = jnp.transpose(x), False
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x).astype(dtype, copy=False)
    return np.ascontiguousarray(x.T if transpose else x)


def hf_tensors(model_or_state: Any, config: Any = None,
               dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, host array in HF layout) one tensor at a time.

    model_or_state: a model (any family), or an nnx.State of its params (then `config` is
    required); dtype: stored dtype (default: config.param_dtype).
    """
    config, params = _flat_params(model_or_state, config)
    dtype = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    for path, x in params:
        name, transpose = hf_name(path, config)
        yield name, _to_host(x, dtype, transpose)


def _plan_shards(specs: list, max_shard_bytes: int) -> list[list]:
    """Greedy split of (name, shape, dtype, ...) specs into shards of <= max_shard_bytes each
    (a bigger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = spec[2].itemsize * int(np.prod(spec[1]))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_checkpoint(tmp: str, config: Any, params: list, dtype: np.dtype,
                      max_shard_bytes: int, extra_config: Optional[Mapping]) -> None:
    specs = []
    for path, x in params:
        name, transpose = hf_name(path, config)
        shape = tuple(reversed(x.shape)) if transpose else tuple(x.shape)
        specs.append((name, shape, dtype, x, transpose))
    shards = _plan_shards(specs, max_shard_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        with open(os.path.join(tmp, file), "wb") as f:
            f.write(_safetensors_header([s[:3] for s in shard]))
            for _, _, _, x, transpose in shard:
                f.write(_to_host(x, dtype, transpose).reshape(-1).view(np.uint8))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s[2].itemsize * int(np.prod(s[1]))
                                                for s in specs)},
                 "weight_map": {s[0]: file for file, shard in zip(files, shards) for s in shard}}
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump({**config_to_hf(config, dtype), **(extra_config or {})}, f, indent=2)


def _replaceable(path: str) -> bool:
    """An existing directory may be replaced if empty or if it holds a checkpoint."""
    names = os.listdir(path)
    return not names or CONFIG_FILE in names or any(n.endswith(".safetensors") for n in names)


def save_pretrained(model_or_state: Any, path: str, *, config: Any = None,
                    dtype: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    extra_config: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Writes a HF checkpoint (config.json + safetensors) that transformers/vLLM load; -> path.

    model_or_state: a model (any family) or an nnx.State of its params (with `config`); dtype:
    stored dtype (default config.param_dtype); shards with an index above max_shard_bytes;
    extra_config: more config.json fields (e.g. eos_token_id). Written into a temp dir next to
    `path` and renamed into place; an existing `path` is replaced only if empty or a checkpoint.
    Several processes: arrays not fully addressable are gathered (a collective), so every
    process must call this; process 0 writes and returns the path, the others return None.
    """
    config, params = _flat_params(model_or_state, config)
    dtype = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    if jax.process_index() != 0:
        for path_, x in params:  # take part in the same gathers, in process 0's order
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                _to_host(x, dtype, hf_name(path_, config)[1])
        return None
    path = os.path.abspath(path)
    if os.path.exists(path) and not (os.path.isdir(path) and _replaceable(path)):
        raise FileExistsError(f"{path}: exists and is not an empty directory or a checkpoint; "
                              "refusing to replace it")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        _write_checkpoint(tmp, config, params, dtype, max_shard_bytes, extra_config)
        os.chmod(tmp, 0o755)
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
