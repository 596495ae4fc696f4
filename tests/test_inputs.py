"""Inputs as pytrees (tuples and dicts of arrays, integer leaves kept), neural-tangents' vmap_axes
forms and implementation numbers, and the errors for inputs the library cannot use."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import ntk_adapters
from ntk_adapters import NtkImplementation, empirical_ntk_fn, linearize, monte_carlo_kernel_fn, taylor_expand
from ntk_adapters.inputs import BatchAxes, num_examples, parse_vmap_axes

IMPLS = ("jacobian", "ntvp", "structured")


def masked_mlp(p, x):
    """Two inputs per example: features and a per-example weight (a mask or length)."""
    feats, weight = x
    h = jnp.tanh(feats @ p["w1"] + p["b1"])
    return (h * weight[:, None]) @ p["w2"]


def concatenated_mlp(p, z):
    """The same model with both inputs in one array: an independent formulation."""
    return masked_mlp(p, (z[:, :-1], z[:, -1]))


@pytest.fixture(scope="module")
def masked():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    p = {
        "w1": jax.random.normal(k[0], (3, 6)),
        "b1": jax.random.normal(k[1], (6,)),
        "w2": jax.random.normal(k[2], (6, 2)),
    }
    x1 = (jax.random.normal(k[3], (4, 3)), jnp.array([1.0, 0.5, 0.0, 2.0]))
    x2 = (jax.random.normal(k[4], (3, 3)), jnp.array([0.3, 1.0, 1.5]))
    return p, x1, x2


def as_one_array(x):
    return jnp.concatenate([x[0], x[1][:, None]], 1)


@pytest.mark.float64
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("vmap_axes", [None, 0, "auto", ((0, 0), 0, {})])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_tuple_inputs_give_the_kernel_of_the_concatenated_model(masked, implementation, vmap_axes, trace_axes):
    p, x1, x2 = masked
    want = empirical_ntk_fn(concatenated_mlp, trace_axes=trace_axes, vmap_axes=None, implementation="jacobian")(
        as_one_array(x1), as_one_array(x2), p
    )
    got = empirical_ntk_fn(masked_mlp, trace_axes=trace_axes, vmap_axes=vmap_axes, implementation=implementation)(
        x1, x2, p
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_by_layer_and_subset_with_tuple_inputs(masked):
    p, x1, x2 = masked
    full = empirical_ntk_fn(concatenated_mlp)(as_one_array(x1), as_one_array(x2), p)
    parts = empirical_ntk_fn(masked_mlp, by_layer=True)(x1, x2, p)
    np.testing.assert_allclose(sum(parts.values()), full, rtol=1e-10)
    last = empirical_ntk_fn(masked_mlp, subset="w2")(x1, x2, p)
    np.testing.assert_allclose(last, parts["w2"], rtol=1e-10)


@pytest.mark.float64
def test_a_shared_input_leaf_is_given_whole_to_every_example(masked):
    """in_axes None: the second input is one array used by every example, not split by rows."""
    p, x1, x2 = masked
    scale = jnp.array([0.5, 2.0, 1.0, -1.0, 3.0, 0.1])

    def f(p, x):
        feats, s = x
        return (jnp.tanh(feats @ p["w1"]) * s) @ p["w2"]

    want = empirical_ntk_fn(lambda q, a: f(q, (a, scale)), vmap_axes=None)(x1[0], x2[0], p)
    got = empirical_ntk_fn(f, vmap_axes=((0, None), 0, {}), implementation="structured")(
        (x1[0], scale), (x2[0], scale), p
    )
    np.testing.assert_allclose(got, want, rtol=1e-10)


def embed_dict_model(p, x):
    ids = x["ids"]
    assert jnp.issubdtype(ids.dtype, jnp.integer), "token ids must reach the model as integers"
    h = p["table"][ids].mean(1) + x["extra"] @ p["w0"]
    return jnp.tanh(h) @ p["w"]


def onehot_model(p, z):
    """The dict model with one-hot floats in place of ids: a second formulation."""
    onehot, extra = z
    h = jnp.einsum("nlv,vd->nd", onehot, p["table"]) / onehot.shape[1] + extra @ p["w0"]
    return jnp.tanh(h) @ p["w"]


@pytest.mark.float64
@pytest.mark.parametrize("implementation", IMPLS)
def test_integer_leaves_stay_integers_and_give_the_one_hot_kernel(implementation):
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    p = {
        "table": jax.random.normal(k[0], (7, 5)),
        "w0": jax.random.normal(k[1], (2, 5)),
        "w": jax.random.normal(k[2], (5, 3)),
    }
    x = {"ids": jax.random.randint(k[3], (4, 6), 0, 7), "extra": jax.random.normal(k[4], (4, 2))}
    want = empirical_ntk_fn(onehot_model, vmap_axes=None, implementation="jacobian")(
        (jax.nn.one_hot(x["ids"], 7), x["extra"]), None, p
    )
    got = empirical_ntk_fn(embed_dict_model, implementation=implementation)(x, None, p)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_float32_tuple_inputs_agree_across_implementations(masked):
    p, x1, x2 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), masked)
    want = np.asarray(
        empirical_ntk_fn(concatenated_mlp, vmap_axes=None, implementation="jacobian")(
            as_one_array(x1), as_one_array(x2), jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
        )
    )
    for impl in IMPLS:
        got = empirical_ntk_fn(masked_mlp, implementation=impl)(x1, x2, p)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_neural_tangents_implementation_numbers_name_the_same_implementations(masked):
    p, x1, x2 = masked
    for number, name in ((1, "jacobian"), (2, "ntvp"), (3, "structured"), (0, "auto")):
        want = empirical_ntk_fn(masked_mlp, implementation=name)(x1, x2, p)
        np.testing.assert_allclose(empirical_ntk_fn(masked_mlp, implementation=number)(x1, x2, p), want, rtol=1e-12)
        np.testing.assert_allclose(
            empirical_ntk_fn(masked_mlp, implementation=NtkImplementation(number))(x1, x2, p), want, rtol=1e-12
        )
    with pytest.raises(ValueError, match="implementation=7"):
        empirical_ntk_fn(masked_mlp, implementation=7)


def test_vmap_axes_forms():
    assert parse_vmap_axes(0) == parse_vmap_axes((0, 0, {})) == parse_vmap_axes((0, 0, None)) == BatchAxes.of(0, 0)
    assert parse_vmap_axes(((0, None), 0, {})).per_leaf((jnp.ones((2, 3)), jnp.ones(3))) == [0, None]
    assert parse_vmap_axes({"a": 1, "b": None}).out_axis == 1
    assert parse_vmap_axes(None) is None
    with pytest.raises(ValueError, match="kwargs_axes"):
        parse_vmap_axes((0, 0, {"mask": 0}))
    with pytest.raises(ValueError, match="no output axis"):
        parse_vmap_axes((0, 1))
    with pytest.raises(ValueError, match="batches no input"):
        parse_vmap_axes(((None, None), 0, {}))
    with pytest.raises(ValueError, match="vmap_axes='yes'"):
        empirical_ntk_fn(masked_mlp, vmap_axes="yes")(masked_inputs(), None, None)


def masked_inputs():
    return (jnp.ones((2, 3)), jnp.ones(2))


@pytest.mark.float64
def test_monte_carlo_with_tuple_inputs_agrees_across_implementations(masked):
    _, x1, x2 = masked

    def init(key, x):
        k = jax.random.split(key, 3)
        return {
            "w1": jax.random.normal(k[0], (3, 6)),
            "b1": jax.random.normal(k[1], (6,)),
            "w2": jax.random.normal(k[2], (6, 2)),
        }

    model = ntk_adapters.adapt(masked_mlp, init(jax.random.PRNGKey(0), x1), x1, init_fn=init)
    key = jax.random.PRNGKey(5)
    want = monte_carlo_kernel_fn(model, key, 6, batch_size=4, implementation="jacobian", vmap_axes=None)(x1, x2)
    for impl in ("structured", "ntvp"):
        got = monte_carlo_kernel_fn(model, key, 6, batch_size=4, implementation=impl)(x1, x2)
        np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-10)
        np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-10)
    # The average of six draws is the mean of six separately computed empirical kernels.
    by_hand = np.mean([empirical_ntk_fn(masked_mlp)(x1, x2, init(jax.random.fold_in(key, i), x1)) for i in range(6)], 0)
    np.testing.assert_allclose(want.ntk, by_hand, rtol=1e-10)


@pytest.mark.float64
def test_kernel_regression_cg_with_tuple_inputs_solves_the_concatenated_system(masked):
    p, x1, x2 = masked
    y = jnp.arange(8.0).reshape(4, 2) / 8
    res = ntk_adapters.kernel_regression_cg(
        ntk_adapters.empirical_kernel_fn(masked_mlp), x1, y, x2, diag_reg=0.1, batch_size=2, tol=1e-12, params=p
    )
    k = np.asarray(empirical_ntk_fn(concatenated_mlp)(as_one_array(x1), None, p))
    k_test = np.asarray(empirical_ntk_fn(concatenated_mlp)(as_one_array(x2), as_one_array(x1), p))
    alpha = np.linalg.solve(k + 0.1 * np.eye(4), np.asarray(y))
    np.testing.assert_allclose(res.alpha, alpha, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.test, k_test @ alpha, rtol=1e-8, atol=1e-10)


@pytest.mark.float64
def test_linearize_and_taylor_take_tuple_inputs(masked):
    p, x1, _ = masked
    delta = jax.tree_util.tree_map(lambda a: 1e-3 * jnp.ones_like(a), p)
    moved = jax.tree_util.tree_map(jnp.add, p, delta)
    lin = linearize(masked_mlp, p)
    tangent = jax.jvp(lambda q: masked_mlp(q, x1), (p,), (delta,))[1]
    np.testing.assert_allclose(lin(moved, x1), masked_mlp(p, x1) + tangent, rtol=1e-12)
    quad = taylor_expand(masked_mlp, p, 2)
    np.testing.assert_allclose(quad(moved, x1), masked_mlp(moved, x1), rtol=1e-6)


def test_adapt_records_per_example_specs_of_pytree_inputs():
    x = {"ids": jnp.zeros((3, 5), jnp.int32), "w": jnp.ones((3, 2))}
    model = ntk_adapters.adapt(lambda p, x: x["w"] * p + x["ids"][:, :2], jnp.float32(2.0), x)
    assert model.input_shape == {"ids": (5,), "w": (2,)}
    assert model.input_spec["ids"].dtype == jnp.int32


class TestBadInput:
    def test_an_input_without_a_batch_axis_names_the_leaf(self, masked):
        p, x1, _ = masked
        with pytest.raises(ValueError, match=r"x1\[1\] has no batch axis"):
            empirical_ntk_fn(masked_mlp)((x1[0], jnp.float64(1.0)), None, p)
        with pytest.raises(ValueError, match="share the batch size"):
            empirical_ntk_fn(masked_mlp)((x1[0], jnp.ones(3)), None, p)
        with pytest.raises(ValueError, match="sample_x"):
            ntk_adapters.adapt(lambda p, x: x * p, 1.0, jnp.float64(3.0))

    def test_a_one_value_per_example_output_needs_trace_axes(self):
        f = lambda p, x: jnp.tanh(x @ p)  # (N,)
        with pytest.raises(ValueError, match=r"trace_axes=\(\)"):
            empirical_ntk_fn(f)(jnp.ones((3, 2)), None, jnp.ones(2))
        assert empirical_ntk_fn(f, trace_axes=())(jnp.ones((3, 2)), None, jnp.ones(2)).shape == (3, 3)

    def test_framework_objects_are_sent_to_their_adapters(self):
        with pytest.raises(TypeError, match="ntk_adapters.flax.adapt"):
            ntk_adapters.adapt(nn.Dense(3), {}, jnp.ones((2, 2)))
        with pytest.raises(TypeError, match="ntk_adapters.flax.adapt"):
            empirical_ntk_fn(nn.Dense(3))
        net = hk.transform(lambda x: hk.Linear(2)(x))
        with pytest.raises(TypeError, match="ntk_adapters.haiku.adapt"):
            ntk_adapters.adapt(net, {}, jnp.ones((2, 2)))

    def test_non_finite_inputs_name_check_finite_values(self, masked):
        p, x1, _ = masked
        bad = (x1[0].at[0, 0].set(jnp.nan), x1[1])
        with pytest.raises(ValueError, match=r"x1 at \[0\].*check_finite_values=False"):
            empirical_ntk_fn(masked_mlp)(bad, None, p)

    def test_num_examples_of_an_empty_tree(self):
        with pytest.raises(ValueError, match="holds no array"):
            num_examples((), "x")
