"""Meta-trains a GHN: flags only; the work is `ghn.train.run`.

    python train.py --config configs/vit_mnist.py --workdir /tmp/w [--config.num_steps=50]

Several processes (one per host, or per GPU): pass --coordinator_address,
--num_processes and --process_id, or launch under SLURM / on a TPU pod slice
and let JAX detect them.

Exit status: 0 when done; 128 + the signal's number when stopped by SIGTERM or
SIGINT (after saving a checkpoint, if enabled); 2 with one `error:` line for a
problem with the input (a flag, config key or value, missing dataset, unusable
checkpoint); 1 with a traceback for anything else, which is a bug.
"""

import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from ghn.errors import run_absl

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file; override keys with --config.a.b=value.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, config and versions.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save at INFO; progress and metrics have their own outputs.
        logging.set_verbosity(logging.WARNING)
    # Before any JAX device is touched: jax.distributed must start first.
    import ghn.train

    ghn.train.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    summary = ghn.train.run(_CONFIG.value, _WORKDIR.value)
    logging.warning("done: %s", summary)
    if summary["stopped_by"]:
        # A scheduler should see an interrupted job, not a finished one.
        sys.exit(128 + signal.Signals[summary["stopped_by"]].value)


if __name__ == "__main__":
    run_absl(main)
