"""A run's trained policy (or its reference) as a Hugging Face directory.

    python -m prorl_jax.export WORKDIR [--step N] [--reference] [--dtype D] OUT_DIR

Reads checkpoint N (default: the latest) of WORKDIR/checkpoints - only the policy's (or, with
--reference, the reference's) arrays, not the optimizer state - and writes OUT_DIR in the
format the vLLM weight sync writes (config.json + safetensors, `prorl_jax.models
.save_pretrained`) plus the run's tokenizer files, so that `transformers` and vLLM load it as
they load the base model. The model's architecture comes from the checkpoint itself (the
trainer stores `models.config_to_hf(model.config)` in it), the tokenizer from the run config
stored with it (tokenizer_path, else model.path, else the shipped demo tokenizer). D: the
stored dtype ("float32" or "bfloat16"; default: the checkpoint's own, param_dtype for the
policy and ref_dtype for the reference). OUT_DIR is written atomically (a temp directory
renamed into place); an existing OUT_DIR is replaced only if empty or a model directory.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional

import jax
import ml_collections
from flax import nnx

from prorl_jax.checkpoint import Checkpointer
from prorl_jax.train_state import DTYPES, PrecisionConfig, abstract_state, split_params


class ExportError(ValueError):
    """A workdir, step or output directory that cannot be exported; the message names it."""


def _checkpointer(workdir: str) -> Checkpointer:
    if not os.path.isdir(workdir):
        raise ExportError(f"{workdir}: no such directory (expected a run's workdir)")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ExportError(f"{directory}: missing; {workdir} is not a run's workdir or the run "
                          "saved no checkpoint yet")
    return Checkpointer(directory, async_save=False)


def _pick_step(ckpt: Checkpointer, step: Optional[int]) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise ExportError(f"{ckpt.directory}: no complete checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"--step {step}: {ckpt.directory} has no checkpoint for it (steps "
                          f"{steps})")
    return step


def read_policy(workdir: str, *, step: Optional[int] = None, reference: bool = False):
    """(params nnx.State on the first device, model config, run ConfigDict, step) of a run's
    checkpoint: the policy's parameters, or the reference's with `reference`."""
    from prorl_jax.models import config_from_hf, init_model
    with _checkpointer(workdir) as ckpt:
        step = _pick_step(ckpt, step)
        extra = ckpt.restore_extra(step)
        where = f"{ckpt.directory}/{step}"
        if "model" not in extra or "config" not in extra:
            raise ExportError(f"{where}: the checkpoint records no model config (saved by an "
                              "older prorl_jax): it cannot be exported")
        run_cfg = ml_collections.ConfigDict(extra["config"])
        precision = PrecisionConfig.from_config(run_cfg)
        dtype = precision.ref_dtype if reference else precision.param_dtype
        config = config_from_hf(extra["model"], f"{where} (extra.model)", dtype="float32",
                                param_dtype=dtype)
        _, abstract = split_params(nnx.eval_shape(lambda: init_model(config)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = abstract_state(abstract, jax.tree.map(lambda _: device, abstract))
        params = ckpt.restore_part("ref_params" if reference else "params", abstract, step)
    return params, config, run_cfg, step


def _write_tokenizer(run_cfg, out: str) -> Optional[str]:
    """Saves the run's tokenizer into `out`; returns where it came from (None: none found)."""
    from prorl_jax import build
    try:
        tokenizer = build.load_tokenizer(run_cfg)
    except (OSError, ValueError) as e:
        print(f"warning: no tokenizer written ({e})", file=sys.stderr)
        return None
    tokenizer.save_pretrained(out)
    return tokenizer.name_or_path


def export(workdir: str, out_dir: str, *, step: Optional[int] = None, reference: bool = False,
           dtype: Optional[str] = None) -> tuple[str, int]:
    """Writes checkpoint `step` (default: the latest) of `workdir` as a Hugging Face
    directory at `out_dir` (see the module docstring); returns (out_dir, step)."""
    from prorl_jax.models import save_pretrained
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {list(DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    _check_replaceable(out_dir)
    params, config, run_cfg, step = read_policy(workdir, step=step, reference=reference)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    try:
        model_dir = os.path.join(tmp, "model")
        save_pretrained(params, model_dir, config=config, dtype=dtype)
        _write_tokenizer(run_cfg, model_dir)
        _move_into_place(model_dir, out_dir, os.path.join(tmp, "replaced"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, step


def _check_replaceable(path: str) -> None:
    """An existing output directory is replaced only if it is empty or a model directory."""
    if not os.path.exists(path):
        return
    names = os.listdir(path) if os.path.isdir(path) else None
    if names is None or (names and "config.json" not in names):
        raise ExportError(f"{path}: exists and is not an empty directory or a model "
                          "directory; refusing to replace it")


def _move_into_place(new: str, path: str, aside: str) -> None:
    """Renames `new` to `path`; an existing `path` is moved `aside` first and put back if the
    rename fails, so `path` is always either the old directory or the new one."""
    if not os.path.exists(path):
        os.rename(new, path)
        return
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prorl_jax.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the run's --workdir (holds checkpoints/)")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: "
                        "the latest)")
    parser.add_argument("--reference", action="store_true", help="export the reference "
                        "policy instead of the trained one")
    parser.add_argument("--dtype", default=None, help=f"stored dtype, one of {list(DTYPES)} "
                        "(default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        out, step = export(args.workdir, args.out_dir, step=args.step,
                           reference=args.reference, dtype=args.dtype)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    which = "reference" if args.reference else "policy"
    print(f"wrote the {which} of {args.workdir} (step {step}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
