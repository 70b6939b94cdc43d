"""Paper scale: LoGAH meta-trained on ViTs-1K for CIFAR-100 (LoGAH, arXiv 2405.16287, Sec. 4).

    python train.py --config configs/vit_cifar100.py --workdir $WORKDIR \\
        --config.data.data_dir=/path/to/datasets

Needs CIFAR-100's binary version (cifar-100-binary) under data.data_dir or
$GHN_DATA_DIR (`ghn.data` says where it looked and how to get it if missing).
Hardware: as `configs/vit_cifar10.py` (one 80 GB GPU or a TPU v4/v5 host). Time:
as there, an estimate of ~1 day on one H100. Everything else is that
file's recipe too: this one only changes the number of classes.
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    # Config files are loaded by path, not imported as a package: load the sibling.
    path = Path(__file__).with_name("vit_cifar10.py")
    spec = importlib.util.spec_from_file_location("configs_vit_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(num_classes=100)
