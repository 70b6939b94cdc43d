"""Target architectures: ViT, GPT-2, ResNet and cell-network families as NNX models.

An architecture is a frozen, hashable spec; `spec.build(rngs=...)` makes the
model, `nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))` its abstract
version (no allocation, how GPT-2 XL gets traced).

    spec = zoo.get("vit-s", image_size=32, patch_size=4, num_classes=10)
    specs = zoo.sample("vits-1k", 100, seed=0, image_size=28, in_channels=1)
    model = spec.build(rngs=nnx.Rngs(0))
    logits = model(spec.example_input())
    specs = zoo.parse_archs("vit-ti:patch_size=7,archs.json:heldout")  # command-line names
    state = zoo.widen.widen(narrow_state, narrow_spec, wide_spec)  # same function, wider
"""

from ghn.zoo import widen
from ghn.zoo.cellnet import OPS, CellNetSpec
from ghn.zoo.dataset import load_dataset, write_dataset
from ghn.zoo.gpt2 import GPT2Spec
from ghn.zoo.parse import parse_arch, parse_archs, parse_overrides
from ghn.zoo.pools import Pools, make_pools
from ghn.zoo.presets import get, presets
from ghn.zoo.resnet import ResNetSpec
from ghn.zoo.samplers import SAMPLERS, sample, space
from ghn.zoo.spec import ArchSpec, spec_from_json
from ghn.zoo.vit import ViTSpec

__all__ = [
    "OPS",
    "Pools",
    "SAMPLERS",
    "ArchSpec",
    "CellNetSpec",
    "GPT2Spec",
    "ResNetSpec",
    "ViTSpec",
    "get",
    "load_dataset",
    "make_pools",
    "parse_arch",
    "parse_archs",
    "parse_overrides",
    "presets",
    "sample",
    "space",
    "spec_from_json",
    "widen",
    "write_dataset",
]
