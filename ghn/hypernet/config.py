"""`GHNConfig`: every size and switch of the hypernetwork, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ghn.errors import ConfigError

DECODERS = ("lowrank", "tiled")
FACTORS = ("view", "transpose")
PAST_MAX_DIM = ("error", "wrap")
EMBEDDING_SCALES = ("fan_in", "init")
POSITION_SCALES = ("stream", "init")

# Named sizes. LoGAH-Tiny is the paper's (d=64, 3 layers, 8 heads, r=32).
# The larger ones are our choice: the width d grows ~1.5-2x per step, depth
# follows GHN-3 (3 -> 5 -> 8 -> 12 layers), head width stays 16, and the rank
# follows the reference code's r = d / 2. The decoder's last layer
# (8d x 2r^2 = 4 d^3 weights) and W2 (r x K) dominate the count: 3.0M, 13.3M,
# 38.1M and 85.5M parameters at K = 50304 (see `ghn.hypernet.num_params`).
NAMED: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, num_layers=3, num_heads=8, rank=32),
    "small": dict(d_model=128, num_layers=5, num_heads=8, rank=64),
    "base": dict(d_model=192, num_layers=8, num_heads=12, rank=96),
    "large": dict(d_model=256, num_layers=12, num_heads=16, rank=128),
}


@dataclasses.dataclass(frozen=True)
class GHNConfig:
    """Hyperparameters of a `GHN`.

    Attributes:
      d_model: node embedding width d (divisible by 4 and by `num_heads`).
      num_layers / num_heads / mlp_ratio: the graph transformer encoder.
      rank: r of the low-rank decoder; every predicted matrix has rank <= r.
      max_dim: K, the widest parameter dimension (c_out*k_h or c_in*k_w) the
        low-rank decoder produces without repeating columns. 50304 covers
        GPT-2's 50257-token vocabulary and every width of GPT-2 XL.
      decoder: "lowrank" (LoGAH) or "tiled" (the GHN-3 baseline).
      factors: how the decoded Z (2r x K) becomes the factors A, B of W = A @ B.
        "view" (the default, as in the reference code): Z's halves read
        row-major as (K, r) matrices, so row i of A is its own slice of W2's
        columns and the node embedding modulates a learned bank of row
        templates; a matrix's row and column spaces differ from node to node.
        "transpose" (LoGAH's equations): A = Z[:r, :rows]^T, B = Z[r:, :cols],
        so every matrix of a given shape has its row and column spaces in the
        same (r+1)-dimensional spans of [W2; b2]'s rows; a predicted network
        wider than r+1 then uses an (r+1)-dimensional subspace of its residual
        stream. Measured (RESULTS.md) on ViTs and GPT-2s, the view trains faster
        and predicts held-out architectures better.
      center_factors: with "transpose" factors, subtract per half of ReLU(M)
        the mean over its r rows before W2. ReLU(M) >= 0, so without it the r
        rows share a large common component and every decoded W = A @ B is
        dominated by one rank-1 term (measured: 85-89% of a predicted matrix's
        energy in its top singular value at init, 20-40% centered). Unused by
        the view, which reads each row of ReLU(M) on its own.
      past_max_dim: a dimension larger than K is an error ("error"), or
        row/column j reuses decoder column j mod K ("wrap", i.e. tiling).
      tile: chunk size of the tiled decoder.
      max_spd: shortest-path distances >= max_spd share one bucket; an
        unreachable pair has its own id, max_spd + 1.
      max_degree: in/out degrees are clipped to this.
      attention_shapes: encode each attention node's (heads, head width) like a
        parameter's shape. Without it, models differing only in their head count
        are the same graph to the GHN and get the same prediction. GHNs recorded
        before this field existed were trained without it (`from_json` reads a
        missing field as False), so their predictions do not change.
      embedding_scale: the std predicted token embeddings are scaled to: "fan_in"
        (1 / sqrt(width), LeCun over the embedding width, which is a tied output
        head's fan-in) or "init" (GPT-2's init std 0.02). With "init", a tied head's
        logits are capped near 0.02 * width and a GPT-2 GHN stays on the unigram
        plateau (`ghn.hypernet.normalize`; RESULTS.md). GHNs recorded before this
        field existed were trained with "init" (`from_json` reads a missing field so).
      position_scale: the std predicted positional embeddings are scaled to:
        "stream" (that of the stream they are added to: the token embedding's std,
        or 1 when the model embeds real-valued inputs with a kernel) or "init"
        (the random init's 0.02, at which a ViT's positions are ~1% of its patch
        features). Measured (RESULTS.md): "stream" fits and predicts ViTs far
        better; on GPT-2s it predicts wider targets better with no training but
        held-out ones fine-tune worse, so the GPT-2 configs keep "init". GHNs
        recorded before this field existed were trained with "init" (`from_json`
        reads a missing field so).
    """

    d_model: int = 64
    num_layers: int = 3
    num_heads: int = 8
    mlp_ratio: int = 4
    rank: int = 32
    max_dim: int = 50304
    decoder: str = "lowrank"
    factors: str = "view"
    center_factors: bool = True
    past_max_dim: str = "error"
    tile: int = 64
    max_spd: int = 50
    max_degree: int = 32
    attention_shapes: bool = True
    embedding_scale: str = "fan_in"
    position_scale: str = "stream"

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.factors not in FACTORS:
            raise ConfigError(f"factors must be one of {FACTORS}, got {self.factors!r}")
        if self.embedding_scale not in EMBEDDING_SCALES:
            raise ConfigError(
                f"embedding_scale must be one of {EMBEDDING_SCALES}, got {self.embedding_scale!r}"
            )
        if self.position_scale not in POSITION_SCALES:
            raise ConfigError(
                f"position_scale must be one of {POSITION_SCALES}, got {self.position_scale!r}"
            )
        if self.past_max_dim not in PAST_MAX_DIM:
            raise ConfigError(
                f"past_max_dim must be one of {PAST_MAX_DIM}, got {self.past_max_dim!r}"
            )
        if self.d_model % 4 or self.d_model % self.num_heads:
            raise ConfigError(
                f"d_model={self.d_model} must be divisible by 4 (shape encoding) and by "
                f"num_heads={self.num_heads}"
            )
        for name in ("d_model", "num_layers", "num_heads", "mlp_ratio", "rank", "max_dim", "tile"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_spd < 1 or self.max_degree < 1:
            raise ConfigError("max_spd and max_degree must be >= 1")

    @classmethod
    def named(cls, name: str, **overrides: Any) -> GHNConfig:
        """A named size ("tiny", "small", "base", "large"), optionally overridden."""
        if name not in NAMED:
            raise ConfigError(f"unknown GHN size {name!r}; choose from {sorted(NAMED)}")
        return cls(**{**NAMED[name], **overrides})

    def replace(self, **changes: Any) -> GHNConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> GHNConfig:
        """Inverse of `to_json`; also takes an already-parsed dict."""
        d = json.loads(data) if isinstance(data, str | bytes) else dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"paper_parity"})
        if unknown:
            raise ConfigError(f"unknown GHNConfig keys {unknown}; known keys are {sorted(known)}")
        d.setdefault("attention_shapes", False)
        d.setdefault("embedding_scale", "init")
        d.setdefault("position_scale", "init")
        # Recorded before `factors` existed: the transpose unless the (then opt-in)
        # reference view was asked for with `paper_parity`.
        legacy_view = d.pop("paper_parity", False)
        d.setdefault("factors", "view" if legacy_view else "transpose")
        return cls(**d)
