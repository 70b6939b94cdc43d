"""Architecture specs: small frozen, hashable dataclasses that build NNX models.

A spec is the unit of the zoo: samplers draw specs, datasets store them as
JSON, graphs and compiled programs are cached by them. A spec never holds
arrays, so it is cheap to hash, compare and serialize.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ghn.errors import ConfigError
from ghn.params import count_params

_FAMILIES: dict[str, type[ArchSpec]] = {}
_SCALAR_TYPES = {"int": int, "bool": bool, "str": str}


def as_tuple(value: Any) -> Any:
    """Lists (e.g. from JSON or a command line) become tuples, so specs stay hashable."""
    if isinstance(value, list | tuple):
        return tuple(as_tuple(v) for v in value)
    return value


def as_list(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [as_list(v) for v in value]
    return value


class SpecError(ConfigError):
    """An architecture spec, preset name or sampler range that no model can be built from."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


class ArchSpec:
    """Base of all spec dataclasses; subclasses are `@dataclass(frozen=True)`."""

    family: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        family = cls.__dict__.get("family")
        if family is not None:
            _FAMILIES[family] = cls

    def __post_init__(self):
        # Specs arrive from JSON, command lines and NumPy draws: normalize lists and
        # NumPy integers so equal specs hash equal, and reject wrong scalar types early.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                value = as_tuple(value)
            elif f.type == "int" and isinstance(value, numbers.Integral):
                value = value if isinstance(value, bool) else int(value)
            expected = _SCALAR_TYPES.get(f.type)
            ok = expected is None or (
                isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            )
            check(ok, f"{type(self).__name__}.{f.name} must be {f.type}, got {value!r}")
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError for an inconsistent spec; called on construction."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def build(self, *, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def input_spec(self, batch_size: int = 2) -> jax.ShapeDtypeStruct:
        raise NotImplementedError

    def example_input(self, batch_size: int = 2, *, seed: int = 0) -> jax.Array:
        s = self.input_spec(batch_size)
        return jax.random.normal(jax.random.key(seed), s.shape, s.dtype)

    def num_params(self) -> int:
        """Number of `nnx.Param` scalars (BatchNorm running statistics excluded).

        By arithmetic where the family has a closed form (summaries and pool
        checks run over thousands of specs, and an abstract build costs ~0.1 s),
        else counted on an abstract build.
        """
        try:
            return self.closed_form_num_params()
        except NotImplementedError:
            return self.counted_num_params()

    def counted_num_params(self) -> int:
        """`num_params()` counted on an abstract build (the tests pin the closed forms to it)."""
        return _count_params(self)

    def closed_form_num_params(self) -> int:
        """`num_params()` by arithmetic; families that have one override this."""
        raise NotImplementedError

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides: Any) -> ArchSpec:
        _check_fields(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def kwargs(self) -> dict[str, Any]:
        """Fields as keyword arguments of the family's model constructor."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, **{k: as_list(v) for k, v in self.kwargs().items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ArchSpec:
        """Inverse of `to_json`; on `ArchSpec` itself it dispatches on "family"."""
        d = dict(d)
        family = d.pop("family", None)
        if cls is ArchSpec:
            check(
                family in _FAMILIES,
                f"unknown architecture family {family!r}; valid: {sorted(_FAMILIES)}",
            )
            cls = _FAMILIES[family]
        else:
            check(
                family in (None, cls.family),
                f"{cls.__name__}.from_json got family {family!r}, expected {cls.family!r}",
            )
        _check_fields(cls, d)
        return cls(**{k: as_tuple(v) for k, v in d.items()})


def spec_from_json(d: Mapping[str, Any]) -> ArchSpec:
    return ArchSpec.from_json(d)


def _check_fields(cls: type[ArchSpec], names: Mapping[str, Any]) -> None:
    valid = cls.field_names()
    unknown = sorted(set(names) - set(valid))
    check(not unknown, f"unknown {cls.__name__} field(s) {unknown}; valid: {list(valid)}")


class ImageSpec(ArchSpec):
    """Shared input handling for image classifiers (NHWC float32)."""

    image_size: int
    in_channels: int

    def input_spec(self, batch_size: int = 2) -> jax.ShapeDtypeStruct:
        shape = (batch_size, self.image_size, self.image_size, self.in_channels)
        return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.lru_cache(maxsize=8192)
def _count_params(spec: ArchSpec) -> int:
    return count_params(nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0))))
