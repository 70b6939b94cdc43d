"""Closed-form, data-free initializations to compare a GHN's prediction against.

    state = baselines.mimetic_init(model, spec, seed=0)   # nnx.state(model, nnx.Param)'s tree
    nnx.update(model, state)

Mimetic initialization (Trockman & Kolter, ICML 2023, arXiv 2305.09828) makes
each self-attention layer look like a pre-trained one: per head the query-key
product is about +identity, and the layer's value-projection product is about
-identity, both blurred by a random matrix:

    W_q^h W_k^hᵀ ≈ α1 Z1^h + β1 I   (best rank-A approximation, A = D / H)
    W_v W_o      = α2 Z2   - β2 I   (exact: both are D x D)

with Z entries N(0, 1/D), factored by SVD (W_q = U_A sqrt(S_A), W_k = V_A sqrt(S_A);
W_v = U sqrt(S), W_o = sqrt(S) Vᵀ). Everything else (MLPs, embeddings, norms,
head, every bias) keeps the family's random init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from ghn.errors import ConfigError
from ghn.zoo import ArchSpec
from ghn.zoo.layers import CausalSelfAttention, SelfAttention

# The fused [q | k | v] projection and the output projection of each attention module
# (both lay out heads as `multi_head_attention` does: column s * D + h * A + a).
ATTENTION_LAYERS = {SelfAttention: ("qkv", "proj"), CausalSelfAttention: ("c_attn", "c_proj")}
MIMETIC_FAMILIES = ("vit", "gpt2")


def mimetic_init(
    model: nnx.Module,
    spec: ArchSpec,
    *,
    seed: int,
    alpha1: float = 0.7,
    beta1: float = 0.7,
    alpha2: float = 0.4,
    beta2: float = 0.4,
) -> nnx.State:
    """`model`'s parameters with every self-attention layer mimetically initialized.

    The defaults are the paper's values for ViTs as we were given them
    (α1 = β1 = 0.7, α2 = β2 = 0.4); we could not read the paper's text to verify
    them, but a public re-implementation uses the same (with Z drawn uniform of
    the same variance; we draw it normal). We use them for GPT-2 as well. Pre-trained
    GPT-2 reportedly has the opposite signs (query-key about -identity, value-output
    about +identity); whether the paper flips them for language models is
    unverified. Negative `beta1` / `beta2` flip them. As in the paper, the targets
    are the weight products themselves: the logits are x W_q W_kᵀ yᵀ / sqrt(A), and
    the target excludes that 1/sqrt(A); GPT-2's 1/sqrt(2·depth) scaling of residual
    projections is not applied to W_o either.

    `model` is the family's random init (`spec.build(rngs=nnx.Rngs(seed))`), left
    unchanged; the result has exactly the tree, shapes and dtypes of
    `nnx.state(model, nnx.Param)` and depends only on `seed` and the model's
    random init.
    """
    check_baseline("mimetic", spec)
    # A copy: the model's own parameters stay as they are.
    state = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    pure = nnx.to_pure_dict(state)
    layers = [(path, m) for path, m in nnx.iter_modules(model) if type(m) in ATTENTION_LAYERS]
    if not layers:
        raise ConfigError(f"{spec.name} has no self-attention layer to initialize mimetically")
    for i, (path, attn) in enumerate(layers):
        qkv_name, out_name = ATTENTION_LAYERS[type(attn)]
        node = pure
        for p in path:
            node = node[p]
        qkv_DxD3, out_DxD = node[qkv_name]["kernel"], node[out_name]["kernel"]
        d = out_DxD.shape[0]
        qk_HxDxD, vo_DxD = mimetic_targets(
            layer_key(seed, i), d, attn.num_heads, alpha1, beta1, alpha2, beta2
        )
        qkv, out = mimetic_kernels(qk_HxDxD, vo_DxD)
        node[qkv_name]["kernel"] = jnp.asarray(qkv, qkv_DxD3.dtype)
        node[out_name]["kernel"] = jnp.asarray(out, out_DxD.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return state


_STREAM = 0x6D696D  # "mim"


def layer_key(seed: int, layer: int) -> jax.Array:
    """The key of the `layer`-th attention layer's targets (in `nnx.iter_modules` order).

    Its own stream: `nnx.Rngs(seed)` draws the model's random init from
    fold_in(key(seed), 0), fold_in(key(seed), 1), ...; these keys must differ from those.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), layer)


def mimetic_targets(
    key: jax.Array,
    width: int,
    num_heads: int,
    alpha1: float,
    beta1: float,
    alpha2: float,
    beta2: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The products one attention layer is set to: per head α1 Z1 + β1 I, and α2 Z2 - β2 I.

    Drawn with `jax.random` in float32, then factored in float64.
    """
    k1, k2 = jax.random.split(key)
    d = width
    z1_HxDxD = np.asarray(jax.random.normal(k1, (num_heads, d, d)), np.float64) / np.sqrt(d)
    z2_DxD = np.asarray(jax.random.normal(k2, (d, d)), np.float64) / np.sqrt(d)
    eye_DxD = np.eye(d)
    return alpha1 * z1_HxDxD + beta1 * eye_DxD, alpha2 * z2_DxD - beta2 * eye_DxD


def mimetic_kernels(qk_HxDxD: np.ndarray, vo_DxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flax kernels (in, out) realizing the targets: the fused qkv (D, 3D) and the output (D, D).

    Head h's query and key are columns h*A:(h+1)*A of the q and k thirds, so that
    W_q^h W_k^hᵀ is the best rank-A approximation of qk_HxDxD[h]; W_v W_o = vo_DxD.
    """
    h, d, _ = qk_HxDxD.shape
    a = d // h
    q_DxHxA, k_DxHxA = np.empty((d, h, a)), np.empty((d, h, a))
    for i, m_DxD in enumerate(qk_HxDxD):
        q_DxHxA[:, i], k_DxHxA[:, i] = top_singular_factors(m_DxD, a)
    # Head-major columns (h * A + a), as `multi_head_attention` reshapes them.
    q_DxD, k_DxD = q_DxHxA.reshape(d, d), k_DxHxA.reshape(d, d)
    u_DxD, s_D, vt_DxD = np.linalg.svd(vo_DxD)
    root_D = np.sqrt(s_D)
    v_DxD = u_DxD * root_D
    out_DxD = root_D[:, None] * vt_DxD
    return np.concatenate([q_DxD, k_DxD, v_DxD], axis=1), out_DxD


def top_singular_factors(m_DxD: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """L (D, rank), R (D, rank) with L Rᵀ the best rank-`rank` approximation of m_DxD.

    L = U_r sqrt(S_r), R = V_r sqrt(S_r) from the top `rank` eigenpairs of m mᵀ:
    half the time of a full SVD (measured at D = 768, rank 64), and as accurate for
    the top singular values, which here are all >= about β1.
    """
    d = m_DxD.shape[0]
    s2_R, u_DxR = scipy.linalg.eigh(m_DxD @ m_DxD.T, subset_by_index=[d - rank, d - 1])
    root_R = np.sqrt(np.sqrt(np.maximum(s2_R, 0.0)))
    # R = mᵀ U_r / sqrt(S_r): then L Rᵀ = U_r U_rᵀ m, m projected on its top singular vectors.
    # (A zero singular value, e.g. α1 = β1 = 0, contributes nothing: zero columns.)
    safe_R = np.where(root_R > 0, root_R, 1.0)
    return u_DxR * root_R, (m_DxD.T @ u_DxR) / safe_R * (root_R > 0)


BASELINES = {"mimetic": mimetic_init}


def check_baseline(name: str, spec: ArchSpec) -> None:
    """`ConfigError` when `name` is no baseline or does not apply to `spec`."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    if name == "mimetic" and spec.family not in MIMETIC_FAMILIES:
        raise ConfigError(
            f"mimetic init sets self-attention layers, which only the "
            f"{' and '.join(MIMETIC_FAMILIES)} families have; {spec.name} is a {spec.family} "
            "(leave it out of the targets, or leave out the baseline)"
        )


def baseline_init(name: str, model: nnx.Module, spec: ArchSpec, *, seed: int) -> nnx.State:
    """The parameters of baseline `name` for `model` (the family's random init of `spec`)."""
    check_baseline(name, spec)
    return BASELINES[name](model, spec, seed=seed)
