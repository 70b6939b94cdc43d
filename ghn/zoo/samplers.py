"""Deterministic architecture samplers (ViTs-1K, GPTs-1K, CNNs-1K).

`sample(name, n, seed=0, **ranges)` draws `n` specs from a NumPy Generator
seeded with `seed`, so the same arguments always give the same list. Keyword
arguments are either the sampler's ranges (`depth=(3, 9)`: inclusive bounds;
`patch_size=(2, 4)`, `norms=(...)`: choices; an int means that single value)
or any spec field the sampler does not draw, passed to every spec unchanged
(`image_size=28, in_channels=1, num_classes=10`, `vocab_size=256`, ...).

A draw repeats no architecture while unseen ones can still be found: after
`_MAX_MISSES` consecutive repeats the range counts as exhausted and the rest of
the draw allows repeats (GPTs-1K's default ranges hold only 7 x 24 = 168
distinct architectures).

vits-1k: depth uniform in `depth`; width uniform over the multiples of
`width_multiple` in [width[0], cap(depth)], where the cap falls linearly from
width[1] at the smallest depth to width[1] - narrowing * (width[1] - width[0])
at the largest (320 for the defaults), so deeper nets are narrower and
parameter counts stay in a narrower band; heads uniform over the divisors of the
width with head dim >= `min_head_dim` and at most `max_heads` heads; patch
uniform in `patch_size`; MLP ratio 4. Task defaults are CIFAR-10's (32x32x3,
10 classes).

gpts-1k: depth uniform in `depth`, width uniform over the multiples of
`width_multiple` in `width` that some choice of `num_heads` divides, heads
uniform over the choices of `num_heads` that divide the width (default 8, the
paper's; `num_heads=(1, 2, 4, 8)` gives 4x the architectures), GPT-2's
vocabulary and context by default.

cnns-1k: CellNetSpecs. Number of cells uniform in `num_cells` with
`num_reductions` evenly spaced reduction cells (DARTS), width uniform over the
multiples of `width_multiple` in `width`, norm uniform in `norms`, merge uniform
in `merges`; normal and reduction genotypes each have a node count uniform in
`nodes`, every node an op uniform in `ops` reading a uniformly chosen earlier
node. A genotype with no parametric op (only pools and identities) is redrawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ghn.zoo.cellnet import MERGES, NORMS, OPS, CellNetSpec, darts_reductions
from ghn.zoo.gpt2 import GPT2Spec
from ghn.zoo.spec import ArchSpec, as_tuple, check
from ghn.zoo.vit import ViTSpec

_MAX_MISSES = 1000
_PARAM_FREE_OPS = ("max_pool3x3", "avg_pool3x3", "identity")


def _interval(name: str, value: Any) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else as_tuple(value)
    check(lo <= hi, f"range {name}={value!r} needs low <= high")
    return int(lo), int(hi)


def _choices(name: str, value: Any) -> tuple:
    choices = (value,) if isinstance(value, int | str) else as_tuple(value)
    check(len(choices) >= 1, f"{name} needs at least one choice")
    return choices


def _multiples(lo: int, hi: float, multiple: int) -> list[int]:
    return [w for w in range(lo, int(hi) + 1) if w % multiple == 0]


def _pick(rng: np.random.Generator, options) -> Any:
    return options[int(rng.integers(len(options)))]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A family's sampler: defaults, which spec fields it draws, and one draw."""

    name: str
    spec_cls: type[ArchSpec]
    ranges: Mapping[str, Any]
    task: Mapping[str, Any]
    drawn: tuple[str, ...]
    draw_fn: Callable[[np.random.Generator, dict[str, Any]], dict[str, Any]]
    check_fn: Callable[[dict[str, Any]], None]
    # Every draw `draw_fn` can make, for samplers whose space is small enough to list.
    space_fn: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None

    def resolve(self, **overrides: Any) -> dict[str, Any]:
        """Every range and pass-through field, defaults filled in, validated."""
        passthrough = [f for f in self.spec_cls.field_names() if f not in self.drawn]
        valid = [*self.ranges, *passthrough]
        unknown = sorted(set(overrides) - set(valid))
        check(not unknown, f"unknown {self.name} argument(s) {unknown}; valid: {valid}")
        defaults = {f.name: f.default for f in dataclasses.fields(self.spec_cls)}
        cfg = {
            **self.ranges,
            **{f: self.task.get(f, defaults[f]) for f in passthrough},
            **overrides,
        }
        cfg = {k: as_tuple(v) for k, v in cfg.items()}
        self.check_fn(cfg)
        return cfg

    def space(self, **ranges: Any) -> list[ArchSpec]:
        """Every architecture a draw with these ranges can give, in a fixed order."""
        check(self.space_fn is not None, f"{self.name}'s architecture space is too large to list")
        cfg = self.resolve(**ranges)
        fixed = {k: v for k, v in cfg.items() if k not in self.ranges}
        return [self.spec_cls(**fixed, **drawn) for drawn in self.space_fn(cfg)]

    def __call__(self, n: int, *, seed: int | Sequence[int] = 0, **ranges: Any) -> list[ArchSpec]:
        check(n >= 0, f"n must be >= 0, got {n}")
        cfg = self.resolve(**ranges)
        fixed = {k: v for k, v in cfg.items() if k not in self.ranges}
        rng = np.random.default_rng(seed)
        specs: list[ArchSpec] = []
        seen: set[ArchSpec] = set()
        misses, exhausted = 0, False
        while len(specs) < n:
            spec = self.spec_cls(**fixed, **self.draw_fn(rng, cfg))
            if spec in seen and not exhausted:
                misses += 1
                exhausted = misses >= _MAX_MISSES
                continue
            misses = 0
            seen.add(spec)
            specs.append(spec)
        return specs


def vit_width_cap(depth: int, cfg: Mapping[str, Any]) -> float:
    """Largest width vits-1k draws at `depth` (see the module docstring)."""
    (d_lo, d_hi), (w_lo, w_hi) = cfg["depth"], cfg["width"]
    frac = (depth - d_lo) / (d_hi - d_lo) if d_hi > d_lo else 0.0
    return w_hi - cfg["narrowing"] * (w_hi - w_lo) * frac


def _vit_heads(width: int, cfg: Mapping[str, Any]) -> list[int]:
    return [
        h
        for h in range(1, cfg["max_heads"] + 1)
        if width % h == 0 and width // h >= cfg["min_head_dim"]
    ]


def _check_vits(cfg: dict[str, Any]) -> None:
    cfg["depth"] = _interval("depth", cfg["depth"])
    cfg["width"] = _interval("width", cfg["width"])
    cfg["patch_size"] = _choices("patch_size", cfg["patch_size"])
    check(0.0 <= cfg["narrowing"] <= 1.0, f"narrowing must be in [0, 1], got {cfg['narrowing']}")
    for p in cfg["patch_size"]:
        check(
            cfg["image_size"] % p == 0,
            f"patch size {p} does not divide image_size {cfg['image_size']}",
        )
    for d in range(cfg["depth"][0], cfg["depth"][1] + 1):
        widths = _multiples(cfg["width"][0], vit_width_cap(d, cfg), cfg["width_multiple"])
        check(widths, f"vits-1k has no width multiple of {cfg['width_multiple']} at depth {d}")
        for w in widths:
            check(_vit_heads(w, cfg), f"vits-1k width {w} has no valid head count")


def _draw_vit(rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict[str, Any]:
    depth = int(rng.integers(cfg["depth"][0], cfg["depth"][1] + 1))
    widths = _multiples(cfg["width"][0], vit_width_cap(depth, cfg), cfg["width_multiple"])
    width = _pick(rng, widths)
    return dict(
        depth=depth,
        width=width,
        num_heads=_pick(rng, _vit_heads(width, cfg)),
        patch_size=int(_pick(rng, cfg["patch_size"])),
    )


def _vit_space(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        dict(depth=d, width=w, num_heads=h, patch_size=int(p))
        for d in range(cfg["depth"][0], cfg["depth"][1] + 1)
        for w in _multiples(cfg["width"][0], vit_width_cap(d, cfg), cfg["width_multiple"])
        for h in _vit_heads(w, cfg)
        for p in cfg["patch_size"]
    ]


def _gpt_heads(width: int, cfg: Mapping[str, Any]) -> list[int]:
    return [h for h in cfg["num_heads"] if width % h == 0]


def _gpt_widths(cfg: Mapping[str, Any]) -> list[int]:
    lo, hi = cfg["width"]
    return [w for w in _multiples(lo, hi, cfg["width_multiple"]) if _gpt_heads(w, cfg)]


def _check_gpts(cfg: dict[str, Any]) -> None:
    cfg["depth"] = _interval("depth", cfg["depth"])
    cfg["width"] = _interval("width", cfg["width"])
    cfg["num_heads"] = _choices("num_heads", cfg["num_heads"])
    check(
        all(isinstance(h, int) and h >= 1 for h in cfg["num_heads"]),
        f"gpts-1k num_heads must be positive ints, got {cfg['num_heads']}",
    )
    check(_gpt_widths(cfg), f"gpts-1k has no width in {cfg['width']} for these multiples")


def _draw_gpt(rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict[str, Any]:
    depth = int(rng.integers(cfg["depth"][0], cfg["depth"][1] + 1))
    width = _pick(rng, _gpt_widths(cfg))
    heads = _gpt_heads(width, cfg)
    # A single head count draws nothing, so the default (8 heads) keeps its draws.
    return dict(
        depth=depth, width=width, num_heads=heads[0] if len(heads) == 1 else _pick(rng, heads)
    )


def _gpt_space(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        dict(depth=d, width=w, num_heads=h)
        for d in range(cfg["depth"][0], cfg["depth"][1] + 1)
        for w in _gpt_widths(cfg)
        for h in _gpt_heads(w, cfg)
    ]


def _check_cnns(cfg: dict[str, Any]) -> None:
    for key in ("num_cells", "nodes", "width"):
        cfg[key] = _interval(key, cfg[key])
    for key, valid in (("ops", OPS), ("norms", NORMS), ("merges", MERGES)):
        cfg[key] = _choices(key, cfg[key])
        bad = sorted(set(cfg[key]) - set(valid))
        check(not bad, f"unknown {key} {bad}; valid: {valid}")
    check(
        any(op not in _PARAM_FREE_OPS for op in cfg["ops"]),
        f"cnns-1k ops need at least one op with parameters, got {cfg['ops']}",
    )
    check(cfg["nodes"][0] >= 1, "cnns-1k genotypes need at least one node")
    darts_reductions(cfg["num_cells"][0], cfg["num_reductions"])
    check(
        _multiples(*cfg["width"], cfg["width_multiple"]),
        f"cnns-1k has no width multiple of {cfg['width_multiple']} in {cfg['width']}",
    )


def _draw_genotype(rng: np.random.Generator, cfg: Mapping[str, Any]) -> tuple:
    num_nodes = int(rng.integers(cfg["nodes"][0], cfg["nodes"][1] + 1))
    while True:
        genotype = tuple(
            (str(_pick(rng, cfg["ops"])), int(rng.integers(i))) for i in range(1, num_nodes + 1)
        )
        if any(op not in _PARAM_FREE_OPS for op, _ in genotype):
            return genotype


def _draw_cnn(rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict[str, Any]:
    num_cells = int(rng.integers(cfg["num_cells"][0], cfg["num_cells"][1] + 1))
    return dict(
        normal=_draw_genotype(rng, cfg),
        reduce=_draw_genotype(rng, cfg),
        num_cells=num_cells,
        reductions=darts_reductions(num_cells, cfg["num_reductions"]),
        width=_pick(rng, _multiples(*cfg["width"], cfg["width_multiple"])),
        norm=str(_pick(rng, cfg["norms"])),
        merge=str(_pick(rng, cfg["merges"])),
    )


SAMPLERS: dict[str, Sampler] = {
    "vits-1k": Sampler(
        name="vits-1k",
        spec_cls=ViTSpec,
        ranges=dict(
            depth=(3, 9),
            width=(128, 512),
            width_multiple=16,
            narrowing=0.5,
            min_head_dim=16,
            max_heads=16,
            patch_size=(2, 4),
        ),
        task=dict(image_size=32, in_channels=3, num_classes=10),
        drawn=("depth", "width", "num_heads", "patch_size"),
        draw_fn=_draw_vit,
        check_fn=_check_vits,
        space_fn=_vit_space,
    ),
    "gpts-1k": Sampler(
        name="gpts-1k",
        spec_cls=GPT2Spec,
        ranges=dict(depth=(3, 9), width=(72, 256), width_multiple=8, num_heads=8),
        task=dict(),
        drawn=("depth", "width", "num_heads"),
        draw_fn=_draw_gpt,
        check_fn=_check_gpts,
        space_fn=_gpt_space,
    ),
    "cnns-1k": Sampler(
        name="cnns-1k",
        spec_cls=CellNetSpec,
        ranges=dict(
            num_cells=(3, 8),
            num_reductions=2,
            nodes=(2, 5),
            width=(16, 64),
            width_multiple=8,
            ops=OPS,
            norms=NORMS,
            merges=MERGES,
        ),
        task=dict(image_size=32, in_channels=3, num_classes=10),
        drawn=("normal", "reduce", "num_cells", "reductions", "width", "norm", "merge"),
        draw_fn=_draw_cnn,
        check_fn=_check_cnns,
    ),
}


def get_sampler(name: str) -> Sampler:
    check(name in SAMPLERS, f"unknown sampler {name!r}; valid: {list(SAMPLERS)}")
    return SAMPLERS[name]


def sample(name: str, n: int, *, seed: int | Sequence[int] = 0, **ranges: Any) -> list[ArchSpec]:
    """`n` architectures from sampler `name`; see the module docstring for `ranges`.

    `seed`: an int or a sequence of ints (NumPy's SeedSequence entropy).
    """
    return get_sampler(name)(n, seed=seed, **ranges)


def space(name: str, **ranges: Any) -> list[ArchSpec]:
    """Every architecture `sample(name, ..., **ranges)` can draw (ViTs and GPT-2s only)."""
    return get_sampler(name).space(**ranges)
