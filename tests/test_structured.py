"""The structured (layer-factorized) empirical NTK agrees with the Jacobian contraction and NTVPs.

Expected values come from the two other implementations ('jacobian': jax.jacrev and an einsum;
'ntvp': VJP/JVP products), which share no code with the factorization; the Gram and Jacobian
forms of each layer are also checked against each other by forcing one of them.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk_adapters.flax
import ntk_adapters.haiku
from ntk_adapters import implementations, structured
from ntk_adapters.axes import OutputAxes
from ntk_adapters.empirical import empirical_ntk_fn
from ntk_adapters.structured import factorized_leaves, structured_contributions, structured_cost

AXES = [((-1,), ()), ((), ()), ((), (-1,))]
TOL = dict(rtol=1e-10, atol=1e-10)


def to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def reduce_full(full, trace_axes, diagonal_axes):
    """Traced / diagonal versions of a full (N1, N2, O, O) kernel, by hand."""
    full = np.asarray(full)
    if trace_axes:
        return np.einsum("nmoo->nm", full) / full.shape[-1]
    if diagonal_axes:
        return np.einsum("nmoo->nmo", full)
    return full


# (trace_axes, diagonal_axes, vmap_axes): each axes setting once, both example modes.
SETTINGS = [((), (), 0), ((-1,), (), 0), ((), (-1,), None)]


def agree(model, x1, x2, params=None, cases=SETTINGS, ntvp=True, **kw):
    """Assert that 'structured' matches 'jacobian' (and 'ntvp') for several axes settings.

    Every call compiles, so each setting is checked once against one full reference kernel.
    """
    want = empirical_ntk_fn(model, trace_axes=(), implementation="jacobian", **kw)(x1, x2, params)
    if ntvp:
        np.testing.assert_allclose(
            empirical_ntk_fn(model, trace_axes=(), implementation="ntvp", **kw)(x1, x2, params), want, **TOL
        )
    for trace_axes, diagonal_axes, vmap_axes in cases:
        got = empirical_ntk_fn(
            model,
            trace_axes=trace_axes,
            diagonal_axes=diagonal_axes,
            vmap_axes=vmap_axes,
            implementation="structured",
            **kw,
        )(x1, x2, params)
        np.testing.assert_allclose(
            got,
            reduce_full(want, trace_axes, diagonal_axes),
            **TOL,
            err_msg=f"{trace_axes} {diagonal_axes} vmap_axes={vmap_axes}",
        )


def contributions(f, p, x1, x2, axes, vmap_axes, form):
    return jax.jit(lambda p, a, b: structured_contributions(f, p, a, b, axes, vmap_axes, form=form))(p, x1, x2)


def reference(f, p, x1, x2, axes):
    return jax.jit(lambda p, a, b: implementations.jacobian_contributions(f, p, a, b, axes))(p, x1, x2)


# --------------------------------------------------------------------------------------------
# Plain functions.


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jax.nn.relu(h @ params["w2"] + params["b2"])
    return h @ params["w3"]


def mlp_no_bias(params, x):
    return jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"]) @ params["w3"]


def init_mlp(key, widths=(4, 7, 6, 3), bias=True):
    keys = jax.random.split(key, 2 * len(widths))
    p = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        p[f"w{i + 1}"] = jax.random.normal(keys[2 * i], (a, b)) / np.sqrt(a)
        if bias and i < len(widths) - 2:
            p[f"b{i + 1}"] = 0.5 * jax.random.normal(keys[2 * i + 1], (b,))
    return p


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.PRNGKey(1), (5, 4)), jax.random.normal(jax.random.PRNGKey(2), (3, 4))


@pytest.mark.float64
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_matches_jacobian_and_ntvp(xs, bias):
    params = init_mlp(jax.random.PRNGKey(0), bias=bias)
    f = mlp if bias else mlp_no_bias
    agree(f, *xs, params, ntvp=bias)
    if bias:
        agree(f, xs[0], None, params, cases=[((), (), 0)], ntvp=False)


def test_every_leaf_of_an_mlp_is_factorized(xs):
    params = init_mlp(jax.random.PRNGKey(0))
    kinds = factorized_leaves(mlp, params, xs[0], vmap_axes=0)
    assert kinds == {
        "b1": "add",
        "b2": "add",
        "w1": "dot_general (gram-capable)",
        "w2": "dot_general (gram-capable)",
        "w3": "dot_general (gram-capable)",
    }


def conv_net(strides, padding, bias=True):
    dn = ("NHWC", "HWIO", "NHWC")

    def features(p, x):
        h = jax.lax.conv_general_dilated(x, p["k1"], strides, padding, dimension_numbers=dn)
        if bias:
            h = h + p["c1"]
        h = jnp.tanh(h)
        # The second kernel is stored OIHW and transposed: the weight reaches the conv through a chain.
        h = jax.lax.conv_general_dilated(h, jnp.transpose(p["k2"], (2, 3, 1, 0)), (1, 1), "SAME", dimension_numbers=dn)
        return jax.nn.relu(h).reshape(h.shape[0], -1)

    def f(p, x):
        return features(p, x) @ p["w"]

    f.features = features
    return f


def init_conv(key, strides, padding, c=3, k=4, hw=7, classes=3):
    keys = jax.random.split(key, 4)
    p = {
        "k1": jax.random.normal(keys[0], (3, 3, c, k)) / 3,
        "c1": 0.3 * jax.random.normal(keys[1], (k,)),
        "k2": jax.random.normal(keys[2], (5, k, 2, 2)) / 3,
    }
    n_feat = jax.eval_shape(conv_net(strides, padding).features, p, jnp.zeros((1, hw, hw, c))).shape[1]
    p["w"] = jax.random.normal(keys[3], (n_feat, classes)) / np.sqrt(n_feat)
    return p


@pytest.mark.float64
@pytest.mark.parametrize("case, strides, padding", [(0, (1, 1), "SAME"), (1, (2, 2), "VALID"), (2, (2, 1), "SAME")])
def test_cnn_gram_and_jacobian_forms_match_the_jacobian_contraction(case, strides, padding):
    p = init_conv(jax.random.PRNGKey(0), strides, padding)
    f = conv_net(strides, padding)
    x1 = jax.random.normal(jax.random.PRNGKey(3), (3, 7, 7, 3))
    x2 = jax.random.normal(jax.random.PRNGKey(4), (2, 7, 7, 3))
    trace_axes, diagonal_axes = AXES[case]
    axes = OutputAxes.make(2, trace_axes, diagonal_axes)
    want = reference(f, p, x1, x2, axes)
    forms = [[(0, "gram"), (None, "jacobian")], [(0, "gram")], [(0, "jacobian"), (None, "gram")]][case]
    for vmap_axes, form in forms:
        got = contributions(f, p, x1, x2, axes, vmap_axes, form)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL, err_msg=f"{form} {vmap_axes}")


@pytest.mark.float64
def test_a_memory_budget_passes_over_forms_that_do_not_fit():
    """With the full (O, O) kernel a convolution's cotangent Gram grows with positions² · O²; under a
    small budget each leaf takes the form that fits, and the kernel is the same."""
    p = init_conv(jax.random.PRNGKey(0), (1, 1), "SAME")
    f = conv_net((1, 1), "SAME")
    x1 = jax.random.normal(jax.random.PRNGKey(3), (3, 7, 7, 3))
    axes = OutputAxes.make(2, (), ())
    leaves, treedef = jax.tree_util.tree_flatten(p)
    _, plan = structured._trace(f, leaves, treedef, x1, structured._batch_axes(0))
    out = jax.eval_shape(f, p, x1).shape
    site = next(s for s in plan.sites if s.name == "conv_general_dilated" and structured._gram_layout(s))
    gram = structured._choose_form(site, axes, 0, out, out, "gram")
    jac = structured._choose_form(site, axes, 0, out, out, "jacobian")
    small = min(gram.elements, jac.elements)
    assert structured._choose_form(site, axes, 0, out, out, max_elements=small).elements == small
    tight = 8 * small  # bytes in float64: only the smaller form of that leaf fits
    want = reference(f, p, x1, None, axes)
    got = structured_contributions(f, p, x1, None, axes, 0, memory_budget=tight)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.float64
def test_strided_dilated_convolution_in_nchw_layout():
    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x,
            k,
            (2, 1),
            ((1, 2), (0, 1)),
            lhs_dilation=(1, 2),
            rhs_dilation=(2, 1),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )

    def f(p, x):
        return jnp.tanh(conv(x, p["k"])).reshape(x.shape[0], -1) @ p["w"]

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x1 = jax.random.normal(k1, (3, 2, 6, 5))
    p = {"k": jax.random.normal(k2, (4, 2, 3, 2))}
    n_feat = jax.eval_shape(conv, x1, p["k"])
    p["w"] = jax.random.normal(k3, (int(np.prod(n_feat.shape[1:])), 2))
    axes = OutputAxes.make(2, (), ())
    want = reference(f, p, x1, None, axes)
    for form in ("gram", "jacobian"):
        got = contributions(f, p, x1, None, axes, 0, form)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.float64
def test_multi_axis_outputs_with_trace_and_diagonal_axes():
    """Outputs (N, 3, 2): a dense layer applied per position, traced/diagonal over either axis."""

    def f(p, x):  # x: (N, 3, 4)
        h = jnp.tanh(jnp.einsum("ntd,dk->ntk", x, p["w1"]) + p["b"])
        return jnp.einsum("ntk,ko->nto", h, p["w2"])

    k = jax.random.split(jax.random.PRNGKey(0), 5)
    p = {
        "w1": jax.random.normal(k[0], (4, 5)),
        "b": jax.random.normal(k[1], (5,)),
        "w2": jax.random.normal(k[2], (5, 2)),
    }
    x1, x2 = jax.random.normal(k[3], (3, 3, 4)), jax.random.normal(k[4], (2, 3, 4))
    cases = [((1, 2), (), 0, "auto"), ((), (1,), None, "gram"), ((2,), (1,), 0, "gram"), ((1,), (2,), 0, "jacobian")]
    for trace_axes, diagonal_axes, vmap_axes, form in cases:
        axes = OutputAxes.make(3, trace_axes, diagonal_axes)
        got = contributions(f, p, x1, x2, axes, vmap_axes, form)
        want = reference(f, p, x1, x2, axes)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL, err_msg=str((trace_axes, diagonal_axes, vmap_axes, form)))


@pytest.mark.float64
def test_batch_axis_other_than_zero():
    """Examples along axis 1 of the input and the output (vmap_axes=1)."""

    def f(p, x):  # x: (D, N) -> (O, N)
        return (jnp.tanh(x.T @ p["w1"]) @ p["w2"]).T

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"w1": jax.random.normal(k[0], (4, 6)), "w2": jax.random.normal(k[1], (6, 3))}
    x1, x2 = jax.random.normal(k[2], (4, 5)), jax.random.normal(k[3], (4, 2))
    axes = OutputAxes.make(2, (), ())
    want = reference(f, p, x1, x2, axes)
    for form in ("gram", "jacobian"):
        got = contributions(f, p, x1, x2, axes, 1, form)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.float64
def test_batch_statistics_are_exact_without_vmap_axes(xs):
    """A model that centres its hidden layer over the batch: examples are not independent."""

    def f(p, x):
        z = x @ p["w1"]
        h = jnp.tanh(z - z.mean(0, keepdims=True))
        return h @ p["w2"]

    p = init_mlp(jax.random.PRNGKey(0), widths=(4, 6, 3), bias=False)
    agree(f, *xs, p, cases=[((), (), None), ((-1,), (), None)])
    agree(f, xs[0], None, p, cases=[((), (-1,), None)], ntvp=False)
    # Per-example derivatives treat examples as independent and get a different kernel, so
    # declaring vmap_axes=0 on this model is refused, and 'auto' differentiates the whole batch.
    true = empirical_ntk_fn(f, vmap_axes=None, implementation="jacobian")(*xs, p)
    axes = OutputAxes.make(2, (-1,), ())
    per_example = sum(structured_contributions(f, p, *xs, axes, 0)) / 3
    assert not np.allclose(true, per_example)
    with pytest.raises(ValueError, match="reduce_sum"):
        empirical_ntk_fn(f, vmap_axes=0, implementation="structured")(*xs, p)
    np.testing.assert_allclose(empirical_ntk_fn(f)(*xs, p), true, rtol=1e-10, atol=1e-12)


@pytest.mark.float64
def test_unfactorizable_leaves_fall_back_to_their_jacobian(xs):
    """A weight used twice, one used through exp, one passed straight to the output, and a leaf
    the output ignores."""

    def f(p, x):
        h = jnp.tanh(x @ p["w"])
        h = jnp.tanh(h[:, :4] @ p["w"] + jnp.exp(p["log_b"]))  # w shared: used twice
        return jnp.concatenate([h @ p["out"], jnp.broadcast_to(p["direct"], (x.shape[0], 1))], 1)

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {
        "w": jax.random.normal(k[0], (4, 4)),
        "log_b": 0.1 * jax.random.normal(k[1], (4,)),
        "out": jax.random.normal(k[2], (4, 2)),
        "unused": jnp.ones(3),
        "direct": jax.random.normal(k[3], (1,)),
    }
    kinds = factorized_leaves(f, p, xs[0], vmap_axes=0)
    assert kinds == {
        "direct": "jacobian",
        "log_b": "jacobian",
        "out": "dot_general (gram-capable)",
        "unused": "unused",
        "w": "jacobian",
    }
    agree(f, *xs, p)


@pytest.mark.float64
def test_scaled_and_broadcast_weights(xs):
    """NTK parameterization (weight times a constant) inside a jitted helper, and a weight
    broadcast over a batch dimension."""

    @jax.jit
    def dense(x, w):
        return x @ (w * 0.5)

    def f(p, x):
        h = jnp.tanh(dense(x, p["w1"]) / 2.0)
        hb = jnp.broadcast_to(-p["w2"], (x.shape[0],) + p["w2"].shape)
        return jnp.einsum("ni,nio->no", h, hb)

    k = jax.random.split(jax.random.PRNGKey(0), 2)
    p = {"w1": jax.random.normal(k[0], (4, 5)), "w2": jax.random.normal(k[1], (5, 2))}
    assert factorized_leaves(f, p, xs[0], vmap_axes=0) == {"w1": "dot_general (gram-capable)", "w2": "dot_general"}
    agree(f, *xs, p)


@pytest.mark.float64
def test_weight_as_left_operand_head_axes_and_scan(xs):
    """W @ xᵀ (weight on the left), a weight with a free head axis, and a weight inside lax.scan."""

    def f(p, x):
        h = jnp.tanh((p["wl"] @ x.T).T)
        h = jnp.einsum("nd,hdk->nhk", h, p["heads"]).reshape(x.shape[0], -1)
        h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["rnn"]), None), h, None, length=2)
        return h @ p["out"]

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {
        "wl": jax.random.normal(k[0], (5, 4)),
        "heads": jax.random.normal(k[1], (2, 5, 3)),
        "rnn": 0.3 * jax.random.normal(k[2], (6, 6)),
        "out": jax.random.normal(k[3], (6, 2)),
    }
    assert factorized_leaves(f, p, xs[0], vmap_axes=0) == {
        "heads": "dot_general (gram-capable)",
        "out": "dot_general (gram-capable)",
        "rnn": "jacobian",
        "wl": "dot_general (gram-capable)",
    }
    agree(f, *xs, p, cases=[((), (), 0), ((-1,), (), None)], ntvp=False)


# --------------------------------------------------------------------------------------------
# Flax and Haiku.


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.Conv(5, (3, 3), padding="VALID", use_bias=False)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.LayerNorm()(x)
        x = nn.gelu(nn.Dense(6)(x))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def linen_model():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    module = LinenCNN()
    variables = module.init(jax.random.PRNGKey(0), x)
    # Non-trivial running statistics and normalization parameters, all in float64.
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + 0.3 * rng.uniform(size=a.shape), variables)
    return ntk_adapters.flax.adapt(module, variables, x), x


@pytest.mark.float64
def test_linen_cnn_with_batchnorm_layernorm(linen_model):
    model, x1 = linen_model
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 3))
    kinds = factorized_leaves(model.apply_fn, model.params, x1, vmap_axes=0)
    assert "jacobian" not in kinds.values()  # convs, dense kernels, biases, BN/LN scales: all factorized
    agree(model, x1, x2, cases=[((), (), 0), ((-1,), (), None)], ntvp=False)
    agree(model, x1, None, cases=[((), (-1,), 0)], ntvp=False)


@pytest.mark.float64
def test_by_layer_and_subset(linen_model):
    model, x1 = linen_model
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 3))
    subset = ["Conv_0", "LayerNorm_0", "BatchNorm_0", "Dense_1"]
    got = empirical_ntk_fn(
        model, trace_axes=(), vmap_axes=0, implementation="structured", by_layer=True, subset=subset
    )(x1, x2)
    want = empirical_ntk_fn(model, trace_axes=(), implementation="jacobian", by_layer=True, subset=subset)(x1, x2)
    assert set(got) == set(want) == set(subset)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
    total = empirical_ntk_fn(model, vmap_axes=0, implementation="structured", subset="Dense_1")(x1, x2)
    np.testing.assert_allclose(total, empirical_ntk_fn(model, implementation="ntvp", subset="Dense_1")(x1, x2), **TOL)


@pytest.mark.float64
def test_nnx_mlp():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs, param_dtype=jnp.float64)
            self.l2 = nnx.Linear(8, 3, use_bias=False, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    model = ntk_adapters.flax.adapt(MLP(nnx.Rngs(0)), None, x1)
    model = model.replace(params=to64(model.params))
    agree(model, x1, jax.random.normal(jax.random.PRNGKey(2), (2, 4)))


@pytest.mark.float64
def test_haiku_convnet_with_batchnorm_state():
    def net(x, is_training):
        h = jax.nn.relu(hk.Conv2D(4, 3, stride=2)(x))
        h = hk.Conv2D(6, 3, padding="VALID", with_bias=False)(h)
        h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
        h = hk.Linear(5)(h.reshape(x.shape[0], -1))
        return hk.Linear(2)(jnp.tanh(h))

    x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 7, 2))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 7, 2))
    transformed = hk.transform_with_state(net)
    params, state = transformed.init(jax.random.PRNGKey(0), x1, is_training=True)
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + rng.uniform(0.2, 1.0, size=a.shape), state)
    model = ntk_adapters.haiku.adapt(transformed, to64(params), x1, state=state, is_training=False)
    assert "jacobian" not in factorized_leaves(model.apply_fn, model.params, x1, vmap_axes=0).values()
    agree(model, x1, x2, cases=[((), (), 0), ((), (-1,), None)])


# --------------------------------------------------------------------------------------------
# 'auto' and properties.


@pytest.mark.float64
def test_auto_picks_structured_for_a_wide_mlp_with_vmap_axes(monkeypatch):
    calls = []
    real = implementations.structured_contributions

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(implementations, "structured_contributions", spy)
    f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # a fresh function: nothing cached
    p = init_mlp(jax.random.PRNGKey(0), widths=(64, 128, 4), bias=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 64))
    cost = structured_cost(f, p, x, None, OutputAxes.make(2, (-1,), ()), 0)
    assert cost["structured_flops"] < cost["jacobian_flops"]
    assert cost["structured_bytes"] < cost["jacobian_bytes"]
    got = empirical_ntk_fn(f, vmap_axes=0)(x, None, p)
    assert calls, "'auto' with vmap_axes did not use the structured implementation"
    np.testing.assert_allclose(got, empirical_ntk_fn(f, implementation="jacobian")(x, None, p), **TOL)
    calls.clear()
    empirical_ntk_fn(f)(x, None, p)  # without vmap_axes 'auto' keeps the Jacobian contraction
    assert not calls


def test_bad_form_is_rejected(xs):
    with pytest.raises(ValueError, match="form='fast'"):
        structured_contributions(
            mlp_no_bias,
            init_mlp(jax.random.PRNGKey(0), bias=False),
            xs[0],
            None,
            OutputAxes.make(2, (-1,), ()),
            0,
            form="fast",
        )


@pytest.mark.float64
@settings(max_examples=4, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    n1=st.integers(1, 4),
    n2=st.integers(1, 3),
    seed=st.integers(0, 1000),
    traced=st.booleans(),
    form=st.sampled_from(["gram", "jacobian", "auto"]),
)
def test_property_random_mlps_match_the_jacobian(widths, n1, n2, seed, traced, form):
    params = init_mlp(jax.random.PRNGKey(seed), widths=(3,) + tuple(widths), bias=True)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    x1, x2 = jax.random.normal(k1, (n1, 3)), jax.random.normal(k2, (n2, 3))

    def f(p, x):
        h = x
        for i in range(1, len(widths)):
            h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
        return h @ p[f"w{len(widths)}"]

    axes = OutputAxes.make(2, (-1,) if traced else (), ())
    want = reference(f, params, x1, x2, axes)
    got = contributions(f, params, x1, x2, axes, 0, form)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)


@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 1000))
def test_property_kernel_of_x_with_itself_is_symmetric_psd(n, seed):
    p = init_conv(jax.random.PRNGKey(seed), (1, 1), "SAME")
    f = conv_net((1, 1), "SAME")
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 7, 7, 3))
    k = np.asarray(empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation="structured")(x, None, p))
    flat = k.transpose(0, 2, 1, 3).reshape(n * 3, n * 3)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-10, atol=1e-10)
    assert np.linalg.eigvalsh(flat).min() > -1e-8 * max(1.0, np.abs(flat).max())


@pytest.mark.parametrize(
    "dtype,tol",
    [pytest.param(jnp.float64, TOL, marks=pytest.mark.float64), (jnp.float32, dict(rtol=2e-5, atol=2e-5))],
)
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_jacobian_form_through_scaled_transposed_and_reshaped_weights(dtype, tol, trace_axes):
    """The Jacobian form contracts the Jacobian of the operand the equation sees; with the weight
    scaled, transposed or reshaped on its way there, scale² and the bijection must cancel out."""
    k = jax.random.split(jax.random.PRNGKey(7), 4)

    def f(p, x):
        kernel = (p["conv"] * 0.5).reshape(3, 3, 2, 4)  # stored flat, used as HWIO
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(y).reshape(x.shape[0], -1)
        return h @ (-p["dense"].T) / 3.0  # stored transposed

    p = {"conv": jax.random.normal(k[0], (72,), dtype) / 4, "dense": jax.random.normal(k[1], (3, 6 * 6 * 4), dtype) / 8}
    x1 = jax.random.normal(k[2], (4, 6, 6, 2), dtype)
    x2 = jax.random.normal(k[3], (3, 6, 6, 2), dtype)
    axes = OutputAxes.make(2, trace_axes, ())
    kinds = factorized_leaves(f, p, x1, vmap_axes=0)
    assert kinds == {"conv": "conv_general_dilated (gram-capable)", "dense": "dot_general (gram-capable)"}
    for x2_ in (x2, None):
        want = reference(f, p, x1, x2_, axes)
        got = contributions(f, p, x1, x2_, axes, 0, "jacobian")
        for g, w in zip(got, want):
            assert g.dtype == dtype
            np.testing.assert_allclose(g, w, **tol)


@pytest.mark.parametrize(
    "spec, x_shape, filter_shape, strides, padding, lhs_dil, rhs_dil",
    [
        (("NHWC", "HWIO", "NHWC"), (2, 7, 6, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
        (("NHWC", "HWIO", "NHWC"), (2, 7, 6, 3), (3, 2), (2, 3), ((0, 2), (1, 0)), (1, 1), (1, 1)),
        (("NCHW", "OIHW", "NCHW"), (3, 2, 6, 5), (3, 2), (2, 1), ((1, 2), (0, 1)), (1, 2), (2, 1)),
        (("NCHW", "OIHW", "NHWC"), (1, 4, 5, 5), (2, 2), (1, 2), ((-1, 1), (2, -1)), (2, 1), (1, 3)),
        (("NWC", "WIO", "NWC"), (2, 9, 2), (4,), (3,), ((2, 1),), (1,), (2,)),
        (
            ("NDHWC", "DHWIO", "NDHWC"),
            (1, 4, 5, 3, 2),
            (2, 3, 1),
            (1, 2, 1),
            ((0, 1), (1, 1), (0, 0)),
            (1, 1, 1),
            (1, 1, 2),
        ),
    ],
)
def test_patches_are_the_windows_of_the_convolution(spec, x_shape, filter_shape, strides, padding, lhs_dil, rhs_dil):
    """The copied windows against JAX's own patch extraction (a grouped one-hot convolution), with
    strides, negative and uneven padding, both dilations and mixed layouts."""
    from ntk_adapters.structured_forms import _GramLayout, _patches

    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    rhs_shape = [1] * len(x_shape)
    dn = jax.lax.conv_dimension_numbers(x_shape, tuple(rhs_shape), spec)
    layout = _GramLayout((), (), (), (), (tuple(filter_shape), strides, padding, lhs_dil, rhs_dil, dn))
    want = jax.lax.conv_general_dilated_patches(
        x, filter_shape, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
        dimension_numbers=spec, precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    got = _patches(x, layout)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
