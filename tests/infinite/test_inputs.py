"""Pytree inputs of the infinite-width engine: several float leaves, integer leaves, NaNs, dtypes.

Expectations are independent of the engine: kernels written out by hand for one linear layer,
the empirical NTK of the real module (exact at any width for a linear model: its Jacobian does
not depend on the weights) and a Monte Carlo NNGP over the module's own initializers, compared
within a few standard errors.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters
import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.infinite import InfiniteWidthError, infinite_kernel_fn

DA, DB, WIDTH = 4, 3, 16


@pytest.fixture(scope="module")
def ab():
    ka, kb, kc, kd = jax.random.split(jax.random.PRNGKey(7), 4)
    a1, b1 = jax.random.normal(ka, (3, DA)), jax.random.normal(kb, (3, DB))
    a2, b2 = jax.random.normal(kc, (2, DA)), jax.random.normal(kd, (2, DB))
    return a1, b1, a2, b2


class TwoDense(nn.Module):
    """``Dense(a) + Dense(b)``, called as ``module(a, b)``."""

    @nn.compact
    def __call__(self, a, b):
        return nn.Dense(WIDTH)(a) + nn.Dense(WIDTH)(b)


class ConcatDense(nn.Module):
    """``Dense(concatenate([a, b]))`` on ``x = {'a': a, 'b': b}``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH)(jnp.concatenate([x["a"], x["b"]], -1))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(WIDTH)(x)))


class Picks(nn.Module):
    """Applies ``inner`` to the leaf ``key`` of its input (a dict key or a tuple index)."""

    key: object
    inner: nn.Module

    def __call__(self, x):
        return self.inner(x[self.key])


# ----------------------------------------------------------------------------------------------
# One float leaf in a container is the plain array.


@pytest.mark.parametrize("wrap, key", [(lambda x: {"x": x}, "x"), (lambda x: (x,), 0)])
def test_single_float_leaf_is_the_plain_array(ab, wrap, key):
    a1, _, a2, _ = ab
    plain = infinite_kernel_fn(nflax.adapt(MLP(), None, a1))
    boxed = infinite_kernel_fn(nflax.adapt(Picks(key, MLP()), None, wrap(a1)))
    for want, got in zip(plain(a1, a2), boxed(wrap(a1), wrap(a2))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# Two float leaves.


def _by_hand_two_dense(a1, b1, a2, b2):
    # lecun_normal weights (σw² = 1), zeros bias (σb² = 0, trainable: +1 to the NTK per layer)
    nngp = a1 @ a2.T / DA + b1 @ b2.T / DB
    ntk = a1 @ a2.T + b1 @ b2.T + 2.0
    return nngp, ntk


def test_sum_of_two_dense_branches_matches_hand_formula_and_empirical_ntk(ab):
    a1, b1, a2, b2 = ab
    model = nflax.adapt(TwoDense(), None, (a1, b1), inputs="args")
    kernel_fn = infinite_kernel_fn(model)
    nngp, ntk = kernel_fn((a1, b1), (a2, b2))
    want_nngp, want_ntk = _by_hand_two_dense(a1, b1, a2, b2)
    np.testing.assert_allclose(nngp, want_nngp, rtol=1e-12)
    np.testing.assert_allclose(ntk, want_ntk, rtol=1e-12)
    # the NTK of a linear model is the same for every draw of its weights
    emp = ntk_adapters.empirical_ntk_fn(model)((a1, b1), (a2, b2))
    np.testing.assert_allclose(ntk, emp, rtol=1e-10)
    # same inputs: symmetric, diagonal as the hand formula
    same_nngp = kernel_fn((a1, b1), get="nngp")
    np.testing.assert_allclose(same_nngp, _by_hand_two_dense(a1, b1, a1, b1)[0], rtol=1e-12)


def test_sum_of_two_dense_branches_nngp_matches_monte_carlo(ab):
    a1, b1, a2, b2 = ab
    model = nflax.adapt(TwoDense(), None, (a1, b1), inputs="args")
    nngp = infinite_kernel_fn(model)((a1, b1), (a2, b2), get="nngp")
    n = 64
    mc = ntk_adapters.monte_carlo_kernel_fn(model, jax.random.PRNGKey(3), n, get="nngp")((a1, b1), (a2, b2))
    # f(x1), f(x2) jointly Gaussian per output unit, units independent: Var(f f') = K11 K22 + K12²
    k11 = np.diag(_by_hand_two_dense(a1, b1, a1, b1)[0])
    k22 = np.diag(_by_hand_two_dense(a2, b2, a2, b2)[0])
    se = np.sqrt((np.outer(k11, k22) + np.asarray(nngp) ** 2) / (n * WIDTH))
    assert np.all(np.abs(np.asarray(mc) - np.asarray(nngp)) < 5 * se)


def test_dense_of_concatenated_leaves_matches_hand_formula_and_empirical_ntk(ab):
    a1, b1, a2, b2 = ab
    x1, x2 = {"a": a1, "b": b1}, {"a": a2, "b": b2}
    model = nflax.adapt(ConcatDense(), None, x1)
    nngp, ntk = infinite_kernel_fn(model)(x1, x2)
    np.testing.assert_allclose(nngp, (a1 @ a2.T + b1 @ b2.T) / (DA + DB), rtol=1e-12)
    np.testing.assert_allclose(ntk, a1 @ a2.T + b1 @ b2.T + 1.0, rtol=1e-12)
    np.testing.assert_allclose(ntk, ntk_adapters.empirical_ntk_fn(model)(x1, x2), rtol=1e-10)


def test_two_leaves_through_a_hidden_relu_layer_match_hand_formula_and_monte_carlo(ab, mc):
    a1, b1, _, _ = ab
    hidden = 256

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(hidden)(x["a"]) + nn.Dense(hidden)(x["b"]))
            return nn.Dense(1)(h)

    x = {"a": a1, "b": b1}
    model = nflax.adapt(Net(), None, x)
    nngp, ntk = infinite_kernel_fn(model)(x)
    # Pre-activations: Gaussian with q = a·a'/DA + b·b'/DB. ReLU: arc-cosine kernels of degree 1
    # (features) and 0 (derivatives). Last Dense (standard parameterization, σw² = 1, zero bias):
    # nngp = E[relu relu], ntk = hidden·E[relu relu] + 1 + E[relu' relu']·ntk_hidden.
    a, b = np.asarray(a1), np.asarray(b1)
    q = a @ a.T / DA + b @ b.T / DB
    norm = np.sqrt(np.outer(np.diag(q), np.diag(q)))
    theta = np.arccos(np.clip(q / norm, -1.0, 1.0))
    k_relu = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    k_step = (np.pi - theta) / (2 * np.pi)
    ntk_hidden = a @ a.T + b @ b.T + 2.0
    np.testing.assert_allclose(nngp, k_relu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ntk, hidden * k_relu + 1.0 + k_step * ntk_hidden, rtol=1e-6)
    # the real module: at width 256 its NTK is close to the limit at every draw
    _, mc_ntk = mc.monte_carlo(model, x, n_samples=8, chunk=8)
    assert mc.rel_err(mc_ntk, ntk) < 0.1


@pytest.mark.parametrize(
    "combine, leaves",
    [
        (lambda a, b: a + b, "x[0] and x[1]"),
        (lambda a, b: a * b, "x[0] and x[1]"),
    ],
)
def test_entrywise_combinations_of_two_leaves_are_refused(combine, leaves):
    a = jax.random.normal(jax.random.PRNGKey(0), (3, DA))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(combine(*x))

    with pytest.raises(InfiniteWidthError, match="entry by entry") as info:
        infinite_kernel_fn(nflax.adapt(Net(), None, (a, 2 * a)))
    assert leaves in str(info.value)


def test_bool_mask_times_features_is_refused_naming_the_leaves():
    x = {"h": jnp.ones((3, DA)), "mask": jnp.array([[True] * DA] * 3)}

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x["h"] * x["mask"])

    with pytest.raises(InfiniteWidthError, match=r"x\['h'\] and x\['mask'\]"):
        infinite_kernel_fn(nflax.adapt(Net(), None, x))


# ----------------------------------------------------------------------------------------------
# Integer leaves.


def test_flax_embed_of_token_ids_has_the_lookup_kernel():
    x = {"ids": jnp.array([[1, 2], [3, 4], [1, 6]], jnp.int32), "x": jnp.ones((3, 2))}

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            e = nn.Embed(10, 4)(x["ids"])
            return nn.Dense(2)(e.reshape((e.shape[0], -1)))

    k = infinite_kernel_fn(nflax.adapt(Net(), None, x))(x)
    ids = np.asarray(x["ids"])
    same = (ids[:, None, :] == ids[None, :, :]).mean(-1)
    # Flax's default embedding_init has variance 1/features = 1/4; lecun_normal Dense: σw² = 1
    np.testing.assert_allclose(k.nngp, same / 4, rtol=1e-6)


def test_haiku_embed_of_token_ids_has_the_lookup_kernel():
    ids = jnp.array([[1, 2], [3, 4], [1, 6]], jnp.int32)

    def f(x):
        tokens, feats = x
        e = hk.Embed(10, 4)(tokens)
        return hk.Linear(2)(e.reshape((e.shape[0], -1)))

    net = hk.without_apply_rng(hk.transform(f))
    x = (ids, jnp.ones((3, 2)))
    k = infinite_kernel_fn(nhaiku.adapt(net, None, x))(x)
    same = (np.asarray(ids)[:, None, :] == np.asarray(ids)[None, :, :]).mean(-1)
    s2 = 0.7737413  # TruncatedNormal(1) at ±2 (table) and TruncatedNormal(1/sqrt(fan_in)) (Linear)
    np.testing.assert_allclose(k.nngp, s2 * s2 * same, rtol=1e-5)


def test_integer_leaf_refused_at_first_call_without_recorded_inputs():
    emb = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    model = ntk_adapters.adapt(
        lambda p, x: jnp.take(p["emb"], x["ids"], axis=0)[:, 0] @ p["w"], {"emb": emb, "w": jnp.ones((4, 2))}
    )
    kernel_fn = infinite_kernel_fn(model)  # no input specs: nothing is traced yet
    with pytest.raises(InfiniteWidthError, match=r"x\['ids'\].*primitive") as info:
        kernel_fn({"ids": jnp.array([[1], [2]])})
    assert "int" in str(info.value)


def test_unused_integer_leaf_does_not_change_the_kernel(ab):
    a1, _, a2, _ = ab
    ids1, ids2 = jnp.arange(6).reshape(3, 2), jnp.arange(4).reshape(2, 2)
    plain = infinite_kernel_fn(nflax.adapt(MLP(), None, a1))
    with_ids = infinite_kernel_fn(nflax.adapt(Picks("x", MLP()), None, {"ids": ids1, "x": a1}))
    got = with_ids({"ids": ids1, "x": a1}, {"ids": ids2, "x": a2})
    for want, g in zip(plain(a1, a2), got):
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=0)


def test_integers_converted_to_floats_by_the_model_are_input_features():
    counts = jnp.array([[1, 0, 2], [0, 3, 1], [2, 2, 0]], jnp.int32)
    model = nflax.adapt(nn.Dense(WIDTH), None, jnp.ones((3, 3)))
    kernel_fn = infinite_kernel_fn(model)
    # nn.Dense promotes integer inputs to its float32 parameters' dtype: the kernel of the counts as
    # float32 features
    nngp, ntk = kernel_fn(counts)
    assert nngp.dtype == jnp.float32
    c = np.asarray(counts, float)
    np.testing.assert_allclose(nngp, c @ c.T / 3, rtol=1e-6)
    np.testing.assert_allclose(ntk, c @ c.T + 1, rtol=1e-6)


def test_haiku_linear_contracting_integers_sees_them_as_features(haiku_truncated_variance):
    counts = jnp.array([[1, 0, 2], [0, 3, 1], [2, 2, 0]])
    net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(WIDTH)(x)))
    model = nhaiku.adapt(net, None, jnp.ones((3, 3)))
    nngp, ntk = infinite_kernel_fn(model)(counts)  # jnp.dot(int, float) inside hk.Linear
    c = np.asarray(counts, float)
    np.testing.assert_allclose(nngp, haiku_truncated_variance * c @ c.T / 3, rtol=1e-12)
    np.testing.assert_allclose(ntk, c @ c.T + 1, rtol=1e-12)


def test_float_values_for_an_integer_leaf_are_refused(ab):
    a1, _, _, _ = ab
    ids = jnp.arange(6).reshape(3, 2)
    kernel_fn = infinite_kernel_fn(nflax.adapt(Picks("x", MLP()), None, {"ids": ids, "x": a1}))
    with pytest.raises(ValueError, match=r"x1\['ids'\]"):
        kernel_fn({"ids": ids, "x": a1}, {"ids": ids * 0.5, "x": a1})


def test_mismatched_structures_and_batch_sizes_name_the_leaf(ab):
    a1, b1, _, _ = ab
    kernel_fn = infinite_kernel_fn(nflax.adapt(ConcatDense(), None, {"a": a1, "b": b1}))
    with pytest.raises(ValueError, match="same structure"):
        kernel_fn({"a": a1, "b": b1}, (a1, b1))
    with pytest.raises(ValueError, match=r"x1\['b'\]|batch size"):
        kernel_fn({"a": a1, "b": b1[:2]})


# ----------------------------------------------------------------------------------------------
# Values and dtypes.


def test_nan_input_raises_unless_checks_are_off(ab):
    a1, b1, _, _ = ab
    x = {"a": a1.at[0, 1].set(jnp.nan), "b": b1}
    model = nflax.adapt(ConcatDense(), None, {"a": a1, "b": b1})
    with pytest.raises(ValueError, match=r"x1.*\['a'\].*check_finite_values"):
        infinite_kernel_fn(model)(x)
    with pytest.raises(ValueError, match="check_finite_values"):
        infinite_kernel_fn(model)({"a": a1, "b": b1}, x)
    nngp = infinite_kernel_fn(model, check_finite_values=False)(x, get="nngp")
    assert np.isnan(nngp[0, 0]) and np.isfinite(nngp[1, 2])


def test_float32_inputs_give_float32_kernels_close_to_float64(ab):
    a1, b1, a2, b2 = ab

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(WIDTH)(x["a"]) + nn.Dense(WIDTH)(x["b"]))
            return nn.Dense(2)(nn.Dense(WIDTH)(h) + nn.Dense(WIDTH)(x["b"]))

    x1, x2 = {"a": a1, "b": b1}, {"a": a2, "b": b2}
    f32 = lambda x: jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), x)  # noqa: E731
    kernel_fn = infinite_kernel_fn(nflax.adapt(Net(), None, f32(x1)))
    k64 = kernel_fn(x1, x2)
    k32 = kernel_fn(f32(x1), f32(x2))
    for lo, hi in zip(k32, k64):
        assert lo.dtype == jnp.float32 and hi.dtype == jnp.float64
        np.testing.assert_allclose(lo, hi, rtol=1e-6, atol=1e-6 * float(np.abs(hi).max()))


def test_pytree_inputs_under_an_outer_jit(ab):
    a1, b1, _, _ = ab
    model = nflax.adapt(TwoDense(), None, (a1, b1), inputs="args")
    kernel_fn = infinite_kernel_fn(model)
    ntk = jax.jit(lambda x: kernel_fn(x, get="ntk"))((a1, b1))
    np.testing.assert_allclose(ntk, _by_hand_two_dense(a1, b1, a1, b1)[1], rtol=1e-12)
