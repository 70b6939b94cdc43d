"""GHN building blocks: config, graph batching, encoder, low-rank and tiled decoders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_models import Llama
from flax import nnx
from tolerances import assert_close, encoder_reduction

import ghn
from ghn.errors import ConfigError
from ghn.hypernet import init
from ghn.hypernet.batch import SHAPE_VOCAB, GraphBatch, make_batch, padded_size, shape_bucket
from ghn.hypernet.config import GHNConfig
from ghn.hypernet.decoder import LowRankDecoder, TiledDecoder
from ghn.hypernet.encoder import Encoder
from ghn.hypernet.model import GHN, num_params
from ghn.params import count_params

# The real default config, shrunk: fast on 2 CPU cores.
SMALL = GHNConfig(d_model=16, num_layers=2, num_heads=2, rank=4, max_dim=64, tile=8)


@pytest.fixture(scope="module")
def graphs():
    """A 17-node and a 43-node Llama graph (padded to 32 and 64 nodes)."""
    ids = jnp.zeros((2, 8), jnp.int32)
    small = ghn.trace(Llama(depth=1, rngs=nnx.Rngs(0)), ids)
    big = ghn.trace(Llama(depth=3, rngs=nnx.Rngs(0)), ids)
    assert small.num_nodes == 17 and big.num_nodes == 43
    return small, big


@pytest.fixture(scope="module")
def small_ghn():
    return GHN(SMALL, rngs=nnx.Rngs(0))


@nnx.jit
def encode(model, batch):
    return model.encode(batch)


def embeddings(g, d, seed=0):
    # NumPy, not jax.random: every new shape would cost a PRNG compilation.
    return jnp.asarray(np.random.default_rng(seed).normal(size=(g, d)), jnp.float32)


def test_attention_shapes_reach_the_encoder_only_when_configured(graphs):
    small, _ = graphs
    attn = np.asarray(small.node_ops) == "attn"
    new = make_batch([small], SMALL).shape_ids_BxNx4[0, : small.num_nodes]
    old = make_batch([small], SMALL.replace(attention_shapes=False)).shape_ids_BxNx4[0]
    # Llama(heads=4, dim=32): 4 heads of width 8 on the attention node.
    np.testing.assert_array_equal(new[attn], [shape_bucket([4, 8, 1, 1])])
    assert not old[: small.num_nodes][attn].any()
    np.testing.assert_array_equal(new[~attn], old[: small.num_nodes][~attn])
    # GHNs recorded before the field existed were trained without it.
    recorded = {k: v for k, v in SMALL.to_dict().items() if k != "attention_shapes"}
    assert not GHNConfig.from_json(recorded).attention_shapes
    assert GHNConfig.from_json(SMALL.to_json()).attention_shapes


@pytest.mark.parametrize(
    ("field", "default", "bad"),
    [("embedding_scale", "fan_in", "xavier"), ("position_scale", "stream", "fan_in")],
)
def test_embedding_scales_of_recorded_configs(field, default, bad):
    # Recorded before the field existed: trained with the random init's std 0.02.
    recorded = {k: v for k, v in SMALL.to_dict().items() if k != field}
    assert getattr(GHNConfig.from_json(recorded), field) == "init"
    other = SMALL.replace(**{field: "init"})
    assert GHNConfig.from_json(other.to_json()) == other
    assert getattr(GHNConfig(), field) == default
    with pytest.raises(ConfigError, match=field):
        GHNConfig(**{field: bad})


def test_config_json_round_trip_and_named_sizes():
    cfg = GHNConfig.named("small", factors="transpose", past_max_dim="wrap")
    assert GHNConfig.from_json(cfg.to_json()) == cfg
    assert GHNConfig.from_json(cfg.to_dict()) == cfg
    tiny = GHNConfig.named("tiny")
    assert (tiny.d_model, tiny.num_layers, tiny.num_heads, tiny.rank) == (64, 3, 8, 32)
    assert tiny.max_dim >= 50257 and tiny.max_dim >= 4 * 1600
    with pytest.raises(ValueError, match="unknown GHNConfig keys"):
        GHNConfig.from_json('{"d_modle": 64}')
    with pytest.raises(ValueError, match="decoder"):
        GHNConfig(decoder="dense")
    with pytest.raises(ValueError, match="past_max_dim"):
        GHNConfig(past_max_dim="tile")
    with pytest.raises(ValueError, match="unknown GHN size"):
        GHNConfig.named("huge")


def test_param_count_close_to_reference_logah_tiny(small_ghn):
    # The reference LoGAH-Tiny (d=64, r=32, K = 16 * 2048) has 2.54M parameters.
    # Ours has 2,446,528: the decoder is identical (2,280,192); the encoder
    # has no edge MLP in its first layer (reference: 25,224) and smaller
    # degree / input-distance tables (33 and 52 rows instead of 101 and 1001).
    n = num_params(GHNConfig.named("tiny", max_dim=32768))
    assert n == 2_446_528
    assert abs(n - 2.54e6) / 2.54e6 < 0.05
    assert num_params(SMALL) == count_params(small_ghn)


def test_shape_bucket_is_nearest_in_log_space():
    vocab = np.asarray(SHAPE_VOCAB)
    assert np.all(np.diff(vocab) > 0) and vocab[0] == 0
    assert {1, 3, 768, 1000, 1600, 3072, 6400, 50257} <= set(SHAPE_VOCAB)
    sizes = np.concatenate([np.arange(0, 3000), np.random.default_rng(0).integers(1, 70000, 3000)])
    ids = shape_bucket(sizes)
    assert ids.dtype == np.int32 and ids.shape == sizes.shape
    assert ids[0] == 0
    pos = sizes > 0
    err = np.abs(np.log(sizes[pos])[:, None] - np.log(vocab[1:])[None, :])
    # Chosen entry is the log-nearest (ties broken either way).
    chosen = np.abs(np.log(sizes[pos]) - np.log(vocab[ids[pos]]))
    # Float64 logs of the same integers (|log| < 12): equal up to a few float64 ulps
    # (~1e-15); a wrong choice is off by a log ratio of distinct vocabulary entries.
    np.testing.assert_allclose(chosen, err.min(axis=1), atol=1e-12)
    assert vocab[shape_bucket([50257, 1000, 1, 10**6])].tolist() == [50257, 1000, 1, 65536]
    assert shape_bucket(np.zeros((2, 4), int)).shape == (2, 4)


def test_make_batch_buckets_masks_and_ids(graphs):
    small, big = graphs
    assert padded_size(17) == 32 and padded_size(64) == 64 and padded_size(1025) == 1280
    assert padded_size(17, buckets=(8, 16)) == 256

    batch = make_batch([small], SMALL)
    assert batch.mask_BxN.shape == (1, 32) and batch.mask_BxN.sum() == 17
    batch = make_batch([small, big], SMALL)
    assert isinstance(batch, GraphBatch) and (batch.num_graphs, batch.num_nodes) == (2, 64)
    assert batch.mask_BxN.sum(axis=1).tolist() == [17, 43]
    assert batch.op_ids_BxN.dtype == np.int32
    np.testing.assert_array_equal(batch.op_ids_BxN[1, :43], big.op_ids)
    np.testing.assert_array_equal(batch.shape_ids_BxNx4[0, :17], shape_bucket(small.node_shapes))
    n_spd = SMALL.max_spd
    assert np.all(np.diagonal(batch.spd_fwd_BxNxN[:, :17, :17], axis1=1, axis2=2) == 0)
    assert np.all(batch.spd_fwd_BxNxN[0, 17:] == n_spd + 1)
    assert np.all(batch.spd_fwd_BxNxN[0, :, 17:] == n_spd + 1)
    np.testing.assert_array_equal(batch.spd_bwd_BxNxN, batch.spd_fwd_BxNxN.transpose(0, 2, 1))
    fwd = big.spd_fwd
    np.testing.assert_array_equal(
        batch.spd_fwd_BxNxN[1, :43, :43], np.where(fwd < 0, n_spd + 1, fwd)
    )
    np.testing.assert_array_equal(batch.input_dist_BxN[1, :43], big.input_distance)

    # Clipping: distances past max_spd share a bucket, unreachable has its own id.
    clipped = make_batch([big], GHNConfig(max_spd=3, max_degree=1))
    spd = clipped.spd_fwd_BxNxN[0, :43, :43]
    np.testing.assert_array_equal(spd, np.where(fwd < 0, 4, np.minimum(fwd, 3)))
    np.testing.assert_array_equal(clipped.input_dist_BxN[0, :43], np.minimum(big.input_distance, 3))
    np.testing.assert_array_equal(clipped.in_degree_BxN[0, :43], np.minimum(big.in_degree, 1))
    assert clipped.out_degree_BxN.max() == 1 and big.out_degree.max() > 1


def test_encoder_padding_and_batching_do_not_change_outputs(graphs, small_ghn):
    small, big = graphs
    alone_small = encode(small_ghn, make_batch([small], SMALL))
    alone_big = encode(small_ghn, make_batch([big], SMALL))
    both = encode(small_ghn, make_batch([big, small], SMALL))
    assert alone_small.shape == (1, 32, 16) and both.shape == (2, 64, 16)
    assert bool(jnp.all(jnp.isfinite(both)))
    # The small graph is padded with 15 more nodes in the batch than alone. Other shapes,
    # so other kernels and blockings: round-off along the encoder, whose attention runs
    # over the 64 padded nodes of the batch.
    n = encoder_reduction(SMALL, num_nodes=64)
    assert_close(both[1, :17], alone_small[0, :17], reduction=n)
    assert_close(both[0, :43], alone_big[0, :43], reduction=n)
    assert float(jnp.abs(both[1, 17:]).max()) == 0.0
    assert float(jnp.abs(alone_small[0, :17]).min(axis=-1).max()) > 0


def test_spd_attention_bias_changes_outputs(graphs, small_ghn):
    small, _ = graphs
    batch = make_batch([small], SMALL)
    base = encode(small_ghn, batch)
    spd = np.array(batch.spd_fwd_BxNxN)
    assert spd[0, 3, 10] != 1
    spd[0, 3, 10] = 1  # node 3 now "sees" node 10 one hop ahead
    moved = encode(small_ghn, batch.replace(spd_fwd_BxNxN=spd))
    delta = jnp.abs(moved - base).max(axis=-1)[0]
    assert float(delta[3]) > 1e-6
    assert float(delta[17:].max()) == 0.0  # padded rows stay zero


def test_lowrank_factor_shapes_full_and_rank(small_ghn):
    dec = small_ghn.decoder
    e = embeddings(3, 16)
    a, b = dec.factors(e, 32, 40)
    assert a.shape == (3, 32, 4) and b.shape == (3, 4, 40)
    w = np.asarray(dec.full(e, 32, 40))
    assert w.shape == (3, 32, 40)
    # Same factors, XLA's vs NumPy's contraction over the rank r.
    assert_close(w, np.einsum("gir,grj->gij", a, b), reduction=SMALL.rank)
    for wi in w:
        assert np.linalg.matrix_rank(wi) <= SMALL.rank
    assert dec.full(e, 2, 7).shape == (3, 2, 7)  # 1-D parameters: two rows


@pytest.mark.parametrize("factors", ["transpose", "view"])
def test_lowrank_slicing_is_exact(factors):
    cfg = SMALL.replace(factors=factors)
    dec = LowRankDecoder(cfg, rngs=nnx.Rngs(0))
    e = embeddings(2, 16)
    big = dec.full(e, 60, 64)
    # Same MLP output; Z = ReLU(M) W2 and A @ B are GEMMs of other shapes (other kernels):
    # two contractions over r.
    n = 2 * cfg.rank
    assert_close(dec.full(e, 5, 7), big[:, :5, :7], reduction=n)

    # A decoder with a larger K agrees wherever the smaller one is defined
    # (transposed factors): only the columns that are used matter.
    if factors == "transpose":
        wide = LowRankDecoder(cfg.replace(max_dim=4096), rngs=nnx.Rngs(0))
        nnx.update(wide.mlp, nnx.state(dec.mlp))
        wide.w2[...] = wide.w2[...].at[:, :64].set(dec.w2[...])
        assert_close(wide.full(e, 60, 64), big, reduction=n)


def test_lowrank_does_not_tile():
    dec = LowRankDecoder(SMALL.replace(max_dim=4096), rngs=nnx.Rngs(0))
    w = dec.full(embeddings(1, 16), 4096, 8)
    assert not np.allclose(w[:, :2048], w[:, 2048:], atol=1e-3)
    assert float(jnp.abs(w[:, :2048] - w[:, 2048:]).mean()) > 0.1 * float(jnp.abs(w).mean())


def test_factors_match_hand_computation():
    cfg = SMALL.replace(rank=2, max_dim=6)
    e = embeddings(3, 16)
    for parity in (False, True):
        dec = LowRankDecoder(
            cfg.replace(factors="view" if parity else "transpose"), rngs=nnx.Rngs(1)
        )
        dec.b2[...] = embeddings(1, 6, seed=5)[0]
        m = np.asarray(dec.hidden(e))
        assert m.shape == (3, 4, 2)
        h = np.maximum(m, 0)
        if not parity:  # center_factors: each half of ReLU(M) loses its mean row
            h = np.concatenate(
                [
                    h[:, :2] - h[:, :2].mean(1, keepdims=True),
                    h[:, 2:] - h[:, 2:].mean(1, keepdims=True),
                ],
                axis=1,
            )
        z = h @ np.asarray(dec.w2[...]) + np.asarray(dec.b2[...])  # (3, 4, 6)
        # Same M; NumPy's centering (mean over r rows) and contraction over r.
        n = 2 * cfg.rank
        assert_close(dec.z_rows(e, 0, 4, 6), z, reduction=n)
        rows, cols = 5, 4
        if parity:
            v = z.reshape(3, 12, 2)  # torch's row-major .view(-1, 2K, r)
            a_ref, b_ref = v[:, :6][:, :rows], v[:, 6:][:, :cols].transpose(0, 2, 1)
        else:
            a_ref, b_ref = z[:, :2, :rows].transpose(0, 2, 1), z[:, 2:, :cols]
        a, b = dec.factors(e, rows, cols)
        assert_close(a, a_ref, reduction=n)
        assert_close(b, b_ref, reduction=n)
        # ... and one more contraction over r: W = A @ B.
        assert_close(dec.full(e, rows, cols), a_ref @ b_ref, reduction=n + cfg.rank)


def test_view_reads_one_row_of_m_per_factor_with_large_k():
    # With K >> r, the first K/r rows of A are consecutive chunks of Z row 0,
    # and B comes from Z row r: two of the 2r rows of M decide the weight.
    k, r = 4096, 4
    cfg = SMALL.replace(max_dim=k)
    e = embeddings(2, 16)
    rows = k // r
    parity = LowRankDecoder(cfg.replace(factors="view"), rngs=nnx.Rngs(0))
    a, b = parity.factors(e, rows, rows)
    z0 = parity.z_rows(e, 0, 1, k)[:, 0]
    zr = parity.z_rows(e, r, r + 1, k)[:, 0]
    # Z rows from GEMMs of other shapes: one contraction over r (no centering in the view).
    assert_close(a.reshape(2, -1), z0, reduction=r)
    assert_close(b.transpose(0, 2, 1).reshape(2, -1), zr, reduction=r)
    # The transpose uses all r rows of Z[:r] for every row of A.
    default = LowRankDecoder(cfg.replace(factors="transpose"), rngs=nnx.Rngs(0))
    a, _ = default.factors(e, rows, rows)
    # Centering (mean over r rows) and Z's contraction over r.
    assert_close(a.transpose(0, 2, 1), default.z_rows(e, 0, r, rows), reduction=2 * r)


def test_past_max_dim_error_and_wrap():
    e = embeddings(2, 16)
    dec = LowRankDecoder(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rows=65.*K=64.*max_dim"):
        dec.factors(e, 65, 8)
    with pytest.raises(ValueError, match=r"cols=100.*K=64"):
        dec.full(e, 8, 100)
    for parity in (False, True):
        wrap = LowRankDecoder(
            SMALL.replace(past_max_dim="wrap", factors="view" if parity else "transpose"),
            rngs=nnx.Rngs(0),
        )
        w = wrap.full(e, 100, 130)
        assert w.shape == (2, 100, 130)
        # Wrapped W2 columns are copies, but sit elsewhere in the GEMMs (or in GEMMs of
        # another shape): Z's contraction over r, then A @ B's.
        n = 2 * SMALL.rank
        assert_close(w[:, 64:100], w[:, :36], reduction=n)
        assert_close(w[:, :, 64:128], w[:, :, :64], reduction=n)
        assert_close(w[:, :64, :64], wrap.full(e, 64, 64), reduction=n)


def test_tiled_decoder_repeats_with_period_tile():
    dec = TiledDecoder(SMALL.replace(decoder="tiled"), rngs=nnx.Rngs(0))
    e = embeddings(3, 16)
    w = dec.full(e, 21, 19)
    assert w.shape == (3, 21, 19)
    # jnp.tile copies the chunk, and `chunk` is the same MLP op on the same input: bitwise.
    np.testing.assert_array_equal(w[:, 8:16], w[:, :8])
    np.testing.assert_array_equal(w[:, :, 8:16], w[:, :, :8])
    np.testing.assert_array_equal(w[:, :8, :8], dec.chunk(e))
    with pytest.raises(NotImplementedError):
        dec.factors(e, 8, 8)


def test_gradients_reach_every_parameter(graphs, small_ghn):
    small, _ = graphs
    model = small_ghn
    batch = jax.tree.map(jnp.asarray, make_batch([small], SMALL))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = small.num_nodes
    target = embeddings(n * 24, 20, seed=1).reshape(n, 24, 20)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        e_nxd = m.encode(batch)[0, :n]
        w = m.decoder.full(e_nxd, 24, 20)
        return jnp.sum(w * target) + jnp.sum(m.decoder.full(e_nxd, 2, 8) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == len(jax.tree_util.tree_leaves(params))
    for path, g in flat:
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
        assert float(jnp.abs(g).max()) > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_ghn_module_defaults(graphs):
    # Abstract (nothing allocated): the default is LoGAH-Tiny with K = 50304.
    model = nnx.eval_shape(lambda: GHN(rngs=nnx.Rngs(0)))
    assert model.config == GHNConfig.named("tiny")
    assert isinstance(model.encoder, Encoder) and isinstance(model.decoder, LowRankDecoder)
    assert count_params(model) == num_params(model.config)
    graphdef, state = nnx.split(model)
    batch = make_batch(list(graphs), model.config)

    def run(state):
        m = nnx.merge(graphdef, state)
        nodes_BxNxD = m.encode(batch)
        # GPT-2's vocabulary fits in K: no error, no tiling.
        return nodes_BxNxD, m.decoder.factors(nodes_BxNxD[1, :4], 50257, 1600)

    nodes, (a, b) = jax.eval_shape(run, state)
    assert nodes.shape == (2, 64, 64)
    assert a.shape == (4, 50257, 32) and b.shape == (4, 32, 1600)


def test_centered_factors_avoid_rank_one_collapse():
    """Without centering, ReLU(M) >= 0 makes one rank-1 term dominate every W."""
    e = embeddings(8, 16)

    def top_share(center):
        cfg = SMALL.replace(factors="transpose", center_factors=center, rank=32)
        dec = LowRankDecoder(cfg, rngs=nnx.Rngs(0))
        s = np.linalg.svd(np.asarray(dec.full(e, 64, 64)), compute_uv=False)
        return float(np.mean(s[:, 0] ** 2 / np.sum(s**2, axis=1)))

    assert top_share(False) > 0.6
    assert top_share(True) < 0.4


# Host initializers (ghn/hypernet/init.py) against the JAX initializers they stand for:
# (host, JAX, shape, std of the values, bound on |values| or None).
_TRUNC = init.TRUNCATED_STD
INITIALIZERS = {
    "truncated_normal": (
        init.truncated_normal(0.5),
        jax.nn.initializers.truncated_normal(0.5),
        (256, 256),
        0.5 * _TRUNC,
        2 * 0.5,
    ),
    # Variance 1/fan_in: fan_in = 64, and 3*3*8 = 72 for a conv-shaped kernel.
    "lecun_normal": (
        init.lecun_normal(),
        jax.nn.initializers.lecun_normal(),
        (64, 1024),
        64**-0.5,
        2 * 64**-0.5 / _TRUNC,
    ),
    "lecun_normal_4d": (
        init.lecun_normal(),
        jax.nn.initializers.lecun_normal(),
        (3, 3, 8, 1024),
        72**-0.5,
        2 * 72**-0.5 / _TRUNC,
    ),
    "normal": (init.normal(0.3), jax.nn.initializers.normal(0.3), (256, 256), 0.3, None),
}


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |ECDF_a - ECDF_b|."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_host_initializers_draw_the_jax_distributions(name):
    host_init, jax_init, shape, std, bound = INITIALIZERS[name]
    key = jax.random.key(7)
    x = host_init(key, shape, jnp.float32)
    assert isinstance(x, jax.Array) and x.shape == shape and x.dtype == jnp.float32
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    # Standard errors: mean std/sqrt(n); sample std <= std/sqrt(2n) (kurtosis <= 3
    # for these). 5/sqrt(n) is > 5 of them, and 10x below a forgotten truncation
    # correction (12%) at n = 65536.
    assert abs(x.mean()) <= 5 * std / np.sqrt(n)
    assert abs(x.std() / std - 1) <= 5 / np.sqrt(n)
    if bound is not None:
        assert np.abs(x).max() <= bound
    # The whole distribution, against JAX's initializer: the KS distance of two samples
    # of one distribution exceeds sqrt(ln(2/alpha) / 2) * sqrt(2/n) with probability alpha.
    y = np.asarray(jax_init(jax.random.key(8), shape, jnp.float32), np.float64)
    alpha = 1e-6
    assert ks_distance(x, y) <= np.sqrt(np.log(2 / alpha) / 2) * np.sqrt(2 / n)


def test_host_initializers_keys_dtypes_and_tracing():
    k0, k1 = jax.random.key(0), jax.random.key(1)
    for make in (init.truncated_normal(1.0), init.lecun_normal(), init.normal(1.0)):
        a, b, c = (np.asarray(make(k, (16, 8))) for k in (k0, k0, k1))
        np.testing.assert_array_equal(a, b)
        assert not np.any(a == c)
        assert make(k0, (4, 4), jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(init.zeros(k0, (3, 2)), np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(init.ones(k0, (5,)), np.ones(5, np.float32))
    # Legacy raw uint32 keys work too.
    raw = jax.random.key_data(k0)
    np.testing.assert_array_equal(init.normal(1.0)(raw, (4,)), init.normal(1.0)(k0, (4,)))

    # A traced key has no value: JAX's initializer runs (the same program, so bitwise).
    traced = jax.jit(lambda k: init.lecun_normal()(k, (8, 8)))(k0)
    stock = jax.jit(lambda k: jax.nn.initializers.lecun_normal()(k, (8, 8)))(k0)
    np.testing.assert_array_equal(traced, stock)


def _param_leaves(model) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def test_ghn_init_is_a_function_of_the_seed():
    a, b = (_param_leaves(GHN(SMALL, rngs=nnx.Rngs(0))) for _ in range(2))
    other = _param_leaves(GHN(SMALL, rngs=nnx.Rngs(1)))
    assert a.keys() == b.keys() == other.keys()
    random = [k for k in a if np.unique(a[k]).size > 1]
    constant = [k for k in a if k not in random]
    # Biases and LayerNorm parameters are constant; every other leaf is random.
    assert all(k.endswith(("bias']", "scale']", "b2']")) for k in constant), constant
    assert len(random) > len(constant) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        if k in random:
            assert not np.any(a[k] == other[k]), k
        else:
            np.testing.assert_array_equal(a[k], other[k], err_msg=k)
    # Each parameter has its own key: no two leaves share values.
    firsts = [a[k].ravel()[:8].tobytes() for k in random]
    assert len(set(firsts)) == len(firsts)


def test_building_a_ghn_compiles_no_program_per_parameter_shape():
    nnx.Rngs(0).params()  # flax's key derivation compiles once per process
    compiled = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # Shapes no other test builds, so no earlier compilation is reused.
        model = GHN(SMALL.replace(d_model=24, num_heads=3, rank=5, max_dim=72), rngs=nnx.Rngs(3))
        jax.block_until_ready(nnx.state(model))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled == []
