"""Checkpoints of a run (Orbax); `prorl_jax.export` turns one into a Hugging Face directory.

A checkpoint at step s is a directory <dir>/<s>/ holding two or three items:
    state: the TrainState (policy, reference, optimizer state, step) as sharded arrays;
    extra: a JSON document (the data iterator's state, the reset history, the config dict,
           trainer counters, the rollout pipeline's schedule - whatever the trainer passes);
    batches (optional): host numpy arrays by name, the rollout batches the asynchronous
           pipeline had finished for the next steps (prorl_jax.pipeline: uint8 npz bytes),
           saved with the rest, atomically.
Saves are asynchronous (the arrays are copied off the devices, then written by a background
thread) and atomic: Orbax writes into a temporary directory and renames it into place when
complete, so a crash mid-save leaves the previous checkpoints intact and invisible partial ones.
Retention: the newest keep_last, plus every step divisible by keep_every (0: none).
Restore takes an abstract TrainState whose leaves carry the target shardings, so a run saved on
one mesh resumes on another (8 devices -> 4).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import orbax.checkpoint as ocp

from prorl_jax.fields import Section, field, int_at_least
from prorl_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    """config.checkpoint: every_steps (save interval, 0: only at the end), keep_last (the newest
    N kept), keep_every (and every K-th step forever, 0: none), async_save."""
    every_steps: int = field("checkpoint.every_steps", 50, *int_at_least(0))
    keep_last: int = field("checkpoint.keep_last", 3, *int_at_least(1))
    keep_every: int = field("checkpoint.keep_every", 0, *int_at_least(0))
    async_save: bool = field("checkpoint.async_save", True)


class Checkpointer:
    """A small wrapper over orbax's CheckpointManager for (TrainState, extra JSON) pairs.

    directory: where the step directories go (created); keep_last: newest checkpoints kept
    (>= 1); keep_every: also keep every step divisible by this forever (0: off); async_save:
    write in the background (call wait_until_finished before reading or exiting).
    """

    def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True):
        CheckpointConfig(keep_last=keep_last, keep_every=keep_every, async_save=async_save)
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "extra", "batches"))

    def save(self, step: int, state: TrainState, extra: Optional[Mapping[str, Any]] = None,
             *, batches: Optional[Mapping[str, np.ndarray]] = None, force: bool = True) -> bool:
        """Starts saving `state`, `extra` (JSON-serialisable) and `batches` (name -> a
        non-empty numpy array, the same on every process; None or empty: no such item) as
        checkpoint `step`."""
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as err:
            raise TypeError(f"checkpoint extra must be JSON-serialisable: {err}") from None
        items = dict(state=ocp.args.StandardSave(state._asdict()),
                     extra=ocp.args.JsonSave(extra))
        if batches:
            for name, value in batches.items():
                if not isinstance(value, np.ndarray) or value.size == 0:
                    raise ValueError(f"checkpoint batches[{name!r}]: expected a non-empty "
                                     f"numpy array, got {type(value).__name__}")
            items["batches"] = ocp.args.StandardSave(dict(batches))
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def restore(self, abstract_state: TrainState, step: Optional[int] = None
                ) -> tuple[TrainState, dict]:
        """(TrainState, extra) of checkpoint `step` (default: the latest).

        abstract_state: a TrainState of jax.ShapeDtypeStruct with shardings (see
        train_state.abstract_state); the arrays are read directly into those shardings.
        """
        step = self._complete_step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state._asdict()),
                                  extra=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return TrainState(**restored["state"]), dict(restored["extra"] or {})

    def restore_extra(self, step: Optional[int] = None) -> dict:
        """The extra JSON document of checkpoint `step` (default: the latest), no arrays."""
        step = self._complete_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            extra=ocp.args.JsonRestore()))
        return dict(restored["extra"] or {})

    def restore_batches(self, step: Optional[int] = None) -> dict[str, np.ndarray]:
        """The batches item of checkpoint `step` (default: the latest) as numpy arrays; {}
        when it has none."""
        step = self._complete_step(step)
        if not os.path.isdir(os.path.join(self.directory, str(step), "batches")):
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            batches=ocp.args.StandardRestore()))
        return {k: np.asarray(v) for k, v in dict(restored["batches"]).items()}

    def restore_part(self, name: str, abstract: Any, step: Optional[int] = None) -> Any:
        """One TrainState field ("params", "ref_params", ...) of checkpoint `step`, reading
        only its arrays (not the optimizer state) into `abstract`'s shardings."""
        step = self._complete_step(step)
        item = {name: abstract}
        state = ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(state=state))["state"][name]

    def _complete_step(self, step: Optional[int]) -> int:
        """`step`, or the latest when None; FileNotFoundError naming the directory if there
        is no such complete checkpoint."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} "
                                    f"(have {self.all_steps()})")
        return step

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
