"""Meta-training of graph hypernetworks: `run(config, workdir)` and its parts.

from ghn.train import base_config, run
config = base_config()            # or configs/vit_mnist.py's get_config()
summary = run(config, "/tmp/w")   # resumes if /tmp/w holds a checkpoint
"""

from ghn.checkpoint import Checkpointer, CheckpointError
from ghn.tasks import Task
from ghn.train.archs import ArchSampler
from ghn.train.compile_cache import enable as enable_compilation_cache
from ghn.train.compile_cache import persistent_cache_counts
from ghn.train.config import base_config, ghn_config, validate
from ghn.train.distributed import initialize_distributed, make_mesh
from ghn.train.metrics import MetricWriter, read_metrics, versions
from ghn.train.programs import Programs
from ghn.train.step import make_optimizer, make_schedule
from ghn.train.trainer import NonFiniteError, Trainer, run
from ghn.zoo.pools import Pools, make_pools, pools_of

__all__ = [
    "ArchSampler",
    "CheckpointError",
    "Checkpointer",
    "MetricWriter",
    "NonFiniteError",
    "Pools",
    "Programs",
    "Task",
    "Trainer",
    "base_config",
    "enable_compilation_cache",
    "ghn_config",
    "initialize_distributed",
    "make_mesh",
    "make_optimizer",
    "make_pools",
    "make_schedule",
    "pools_of",
    "persistent_cache_counts",
    "read_metrics",
    "run",
    "validate",
    "versions",
]
