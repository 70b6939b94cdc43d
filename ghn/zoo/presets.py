"""Named architectures: the evaluation targets of the paper and the classic CNNs."""

from __future__ import annotations

from typing import Any

from ghn.zoo.gpt2 import GPT2Spec
from ghn.zoo.resnet import ResNetSpec
from ghn.zoo.spec import ArchSpec, check
from ghn.zoo.vit import ViTSpec

_PRESETS: dict[str, tuple[type[ArchSpec], dict[str, Any]]] = {
    "vit-ti": (ViTSpec, dict(depth=12, width=192, num_heads=3)),
    "vit-s": (ViTSpec, dict(depth=12, width=384, num_heads=6)),
    "vit-b": (ViTSpec, dict(depth=12, width=768, num_heads=12)),
    "vit-l": (ViTSpec, dict(depth=24, width=1024, num_heads=16)),
    "gpt2": (GPT2Spec, dict(depth=12, width=768, num_heads=12)),
    "gpt2-medium": (GPT2Spec, dict(depth=24, width=1024, num_heads=16)),
    "gpt2-large": (GPT2Spec, dict(depth=36, width=1280, num_heads=20)),
    "gpt2-xl": (GPT2Spec, dict(depth=48, width=1600, num_heads=25)),
    "resnet18": (ResNetSpec, dict(block="basic", layers=(2, 2, 2, 2))),
    "resnet50": (ResNetSpec, dict(block="bottleneck", layers=(3, 4, 6, 3))),
}


def presets() -> list[str]:
    return list(_PRESETS)


def get(name: str, **overrides: Any) -> ArchSpec:
    """The preset `name`, with any spec field overridden, e.g. `get("vit-b", image_size=32)`."""
    check(name in _PRESETS, f"unknown preset {name!r}; valid: {presets()}")
    cls, fields = _PRESETS[name]
    return cls(**fields).replace(**overrides)
