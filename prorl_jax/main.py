"""Entry point: `python -m prorl_jax.main --config=configs/prorl.py[:demo] --workdir=DIR`.

Any config field can be overridden on the command line (`--config.loss.eps_high=0.28`); an
unknown field or an invalid value stops the run at start-up with a message naming the field.
Multi-host: on SLURM / TPU pods jax.distributed starts by itself; elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/prorl.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and plots go here.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in the run (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from prorl_jax.sharding import initialize_distributed
    initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    from prorl_jax import config as config_lib
    from prorl_jax.trainer import NonFiniteError, Trainer
    cfg = _CONFIG.value
    try:
        config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(_WORKDIR.value, exist_ok=True)
    trainer = Trainer(cfg, _WORKDIR.value)
    try:
        metrics = trainer.run()
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    print(f"done at step {trainer.step}: reward/mean {metrics.get('reward/mean', float('nan')):.3f}"
          f" (metrics: {_WORKDIR.value}/metrics.jsonl)", flush=True)
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
