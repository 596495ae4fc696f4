"""Empirical NTK/NNGP: hand-derived Jacobians, agreement of implementations, axes conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk_adapters
from ntk_adapters.empirical import empirical_kernel_fn, empirical_nngp_fn, empirical_ntk_fn

D, H, O = 3, 5, 2


def mlp(params, x):
    """f(x) = W2ᵀ relu(W1ᵀ x + b1) + b2 — a plain function model."""
    z = x @ params["w1"] + params["b1"]
    return jax.nn.relu(z) @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def mlp_params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "w1": jax.random.normal(k[0], (D, H)),
        "b1": jax.random.normal(k[1], (H,)),
        "w2": jax.random.normal(k[2], (H, O)),
        "b2": jax.random.normal(k[3], (O,)),
    }


@pytest.fixture(scope="module")
def xs():
    return jax.random.normal(jax.random.PRNGKey(1), (4, D)), jax.random.normal(jax.random.PRNGKey(2), (3, D))


def hand_ntk(params, x1, x2):
    """Θ[n, m, o, o'] from the Jacobian written out by hand.

    ∂f_o/∂W2[j, o'] = δ_oo' h_j, ∂f_o/∂b2[o'] = δ_oo', ∂f_o/∂W1[i, j] = W2[j, o] relu'(z_j) x_i,
    ∂f_o/∂b1[j] = W2[j, o] relu'(z_j).
    """
    z1, z2 = x1 @ params["w1"] + params["b1"], x2 @ params["w1"] + params["b1"]
    h1, h2 = np.maximum(z1, 0), np.maximum(z2, 0)
    d1, d2 = (z1 > 0).astype(float), (z2 > 0).astype(float)
    w2 = np.asarray(params["w2"])
    out = np.zeros((len(x1), len(x2), O, O))
    for n in range(len(x1)):
        for m in range(len(x2)):
            readout = (h1[n] @ h2[m] + 1.0) * np.eye(O)
            hidden = np.einsum("jo,jp,j->op", w2, w2, d1[n] * d2[m]) * (x1[n] @ x2[m] + 1.0)
            out[n, m] = readout + hidden
    return out


@pytest.mark.float64
@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "auto"])
def test_ntk_equals_hand_written_jacobian_outer_product(mlp_params, xs, implementation):
    x1, x2 = xs
    expected = hand_ntk(mlp_params, np.asarray(x1), np.asarray(x2))
    full = empirical_ntk_fn(mlp, trace_axes=(), implementation=implementation)(x1, x2, mlp_params)
    np.testing.assert_allclose(full, expected, rtol=1e-10, atol=1e-10)
    traced = empirical_ntk_fn(mlp, implementation=implementation)(x1, x2, mlp_params)
    np.testing.assert_allclose(traced, np.einsum("nmoo->nm", expected) / O, rtol=1e-10)


def test_vmap_axes_gives_the_same_kernel(mlp_params, xs):
    x1, x2 = xs
    np.testing.assert_allclose(
        empirical_ntk_fn(mlp, vmap_axes=0, trace_axes=())(x1, x2, mlp_params),
        empirical_ntk_fn(mlp, trace_axes=())(x1, x2, mlp_params),
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    "trace_axes, diagonal_axes, shape",
    [((-1,), (), (4, 3)), ((), (), (4, 3, O, O)), ((), (-1,), (4, 3, O))],
)
def test_output_shapes_follow_the_axes_convention(mlp_params, xs, trace_axes, diagonal_axes, shape):
    x1, x2 = xs
    fn = empirical_ntk_fn(mlp, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    assert fn(x1, x2, mlp_params).shape == shape


@pytest.mark.float64
def test_diagonal_and_traced_kernels_are_slices_of_the_full_one(mlp_params, xs):
    x1, _ = xs
    full = empirical_ntk_fn(mlp, trace_axes=())(x1, None, mlp_params)  # (N, N, O, O)
    all_traced = empirical_ntk_fn(mlp, trace_axes=(0, 1))(x1, None, mlp_params)
    assert all_traced.shape == ()
    np.testing.assert_allclose(all_traced, np.einsum("nnoo->", full) / (len(x1) * O), rtol=1e-12)
    diag_out = empirical_ntk_fn(mlp, trace_axes=(), diagonal_axes=(-1,))(x1, None, mlp_params)
    diag_batch = empirical_ntk_fn(mlp, trace_axes=(), diagonal_axes=(0,))(x1, None, mlp_params)
    np.testing.assert_allclose(diag_out, np.einsum("nmoo->nmo", full), rtol=1e-12)
    np.testing.assert_allclose(diag_batch, np.einsum("nnop->nop", full), rtol=1e-12)


def test_nngp_is_the_averaged_output_outer_product(mlp_params, xs):
    x1, x2 = xs
    y1, y2 = mlp(mlp_params, x1), mlp(mlp_params, x2)
    np.testing.assert_allclose(empirical_nngp_fn(mlp)(x1, x2, mlp_params), y1 @ y2.T / O, rtol=1e-12)
    full = empirical_nngp_fn(mlp, trace_axes=())(x1, x2, mlp_params)
    np.testing.assert_allclose(full, np.einsum("no,mp->nmop", y1, y2), rtol=1e-12)


def test_kernel_fn_returns_what_get_asks_for(mlp_params, xs):
    x1, x2 = xs
    model = ntk_adapters.adapt(mlp, mlp_params, x1)
    fn = empirical_kernel_fn(model)
    both = fn(x1, x2)
    assert both._fields == ("nngp", "ntk")
    np.testing.assert_allclose(fn(x1, x2, get="ntk"), both.ntk)
    assert fn(x1, x2, get=("ntk", "nngp"))._fields == ("ntk", "nngp")


def test_layer_contributions_sum_to_the_ntk_and_match_subsets(mlp_params, xs):
    x1, x2 = xs
    nested = {
        "hidden": {"w": mlp_params["w1"], "b": mlp_params["b1"]},
        "readout": {"w": mlp_params["w2"], "b": mlp_params["b2"]},
    }

    def f(p, x):
        return mlp(
            {"w1": p["hidden"]["w"], "b1": p["hidden"]["b"], "w2": p["readout"]["w"], "b2": p["readout"]["b"]}, x
        )

    parts = empirical_ntk_fn(f, by_layer=True)(x1, x2, nested)
    assert set(parts) == {"hidden", "readout"}
    np.testing.assert_allclose(sum(parts.values()), empirical_ntk_fn(f)(x1, x2, nested), rtol=1e-12)
    readout_only = empirical_ntk_fn(f, subset="readout")(x1, x2, nested)
    np.testing.assert_allclose(readout_only, parts["readout"], rtol=1e-12)
    # Training only the readout of a network with a bias: Θ = h·h' + 1 exactly.
    h1 = jax.nn.relu(x1 @ mlp_params["w1"] + mlp_params["b1"])
    h2 = jax.nn.relu(x2 @ mlp_params["w1"] + mlp_params["b1"])
    np.testing.assert_allclose(readout_only, h1 @ h2.T + 1.0, rtol=1e-12)
    by_predicate = empirical_ntk_fn(f, subset=lambda path: path.endswith("/w"))(x1, x2, nested)
    by_prefix = empirical_ntk_fn(f, subset=["hidden/w", "readout/w"])(x1, x2, nested)
    np.testing.assert_allclose(by_predicate, by_prefix, rtol=1e-12)


def test_float32_and_float64_agree_to_float32_precision(mlp_params, xs):
    x1, x2 = xs
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), mlp_params)
    k32 = empirical_ntk_fn(mlp)(x1.astype(jnp.float32), x2.astype(jnp.float32), p32)
    k64 = empirical_ntk_fn(mlp)(x1, x2, mlp_params)
    assert k32.dtype == jnp.float32
    np.testing.assert_allclose(k32, k64, rtol=2e-5, atol=1e-5)


def test_kernel_functions_can_be_jitted(mlp_params, xs):
    x1, x2 = xs
    fn = empirical_ntk_fn(mlp)
    np.testing.assert_allclose(jax.jit(fn)(x1, x2, mlp_params), fn(x1, x2, mlp_params), rtol=1e-12)


@pytest.mark.float64
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10_000), implementation=st.sampled_from(["jacobian", "ntvp"]))
def test_kernels_of_x_with_itself_are_symmetric_psd(mlp_params, n, seed, implementation):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, D))
    ntk = np.asarray(empirical_ntk_fn(mlp, trace_axes=(), implementation=implementation)(x, None, mlp_params))
    flat = ntk.transpose(0, 2, 1, 3).reshape(n * O, n * O)
    np.testing.assert_allclose(flat, flat.T, atol=1e-10)
    assert np.linalg.eigvalsh(flat).min() > -1e-9 * max(1.0, np.abs(flat).max())
    nngp = np.asarray(empirical_nngp_fn(mlp)(x, None, mlp_params))
    assert np.linalg.eigvalsh(nngp).min() > -1e-9 * max(1.0, np.abs(nngp).max())


class TestBadInput:
    def test_feature_shapes_must_match(self, mlp_params):
        with pytest.raises(ValueError, match=r"same per-example shape.*\(4, 3\).*\(2, 4\)"):
            empirical_ntk_fn(mlp)(jnp.ones((4, 3)), jnp.ones((2, 4)), mlp_params)

    def test_trace_axis_out_of_range(self, mlp_params, xs):
        with pytest.raises(ValueError, match=r"trace_axes=\(2,\) has axis 2, out of range"):
            empirical_ntk_fn(mlp, trace_axes=(2,))(xs[0], None, mlp_params)

    def test_axis_in_trace_and_diagonal(self, mlp_params, xs):
        with pytest.raises(ValueError, match=r"both trace_axes.*and diagonal_axes"):
            empirical_ntk_fn(mlp, trace_axes=(-1,), diagonal_axes=(1,))(xs[0], None, mlp_params)

    def test_diagonal_batch_axis_needs_equal_batches(self, mlp_params, xs):
        with pytest.raises(ValueError, match="diagonal_axes but has size 4 for x1 and 3 for x2"):
            empirical_ntk_fn(mlp, diagonal_axes=(0,))(xs[0], xs[1], mlp_params)

    def test_output_must_be_an_array(self, mlp_params, xs):
        with pytest.raises(TypeError, match="must return a single array"):
            empirical_ntk_fn(lambda p, x: (mlp(p, x), x))(xs[0], None, mlp_params)

    def test_params_must_match_the_model(self, mlp_params, xs):
        model = ntk_adapters.adapt(mlp, mlp_params, xs[0])
        wrong = {**mlp_params, "w1": jnp.ones((D + 1, H))}
        with pytest.raises(ValueError, match=r"leaf \['w1'\] has shape \(4, 5\), the model expects \(3, 5\)"):
            empirical_ntk_fn(model)(xs[0], None, wrong)
        with pytest.raises(ValueError, match="tree structure"):
            empirical_ntk_fn(model)(xs[0], None, {"w1": mlp_params["w1"]})

    def test_unknown_implementation(self, mlp_params, xs):
        with pytest.raises(ValueError, match="implementation='fast'"):
            empirical_ntk_fn(mlp, implementation="fast")(xs[0], None, mlp_params)

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_non_finite_inputs_and_params_are_rejected(self, mlp_params, xs, bad):
        x = np.array(xs[0]).copy()
        x[1, 2] = bad
        with pytest.raises(ValueError, match="x1 contains NaN or Inf"):
            empirical_ntk_fn(mlp)(x, None, mlp_params)
        with pytest.raises(ValueError, match=r"x2 contains NaN or Inf"):
            empirical_nngp_fn(mlp)(xs[0], x, mlp_params)
        params = {**mlp_params, "b1": mlp_params["b1"].at[0].set(bad)}
        with pytest.raises(ValueError, match=r"params at \['b1'\] contains NaN or Inf"):
            empirical_ntk_fn(mlp)(xs[0], None, params)

    def test_params_found_finite_once_are_still_checked_when_they_change(self, mlp_params, xs):
        """A kernel function skips the check of the very parameter arrays it already found finite
        (JAX arrays cannot change); new arrays, and NumPy arrays changed in place, are checked."""
        for kernel_fn in (empirical_ntk_fn(mlp), empirical_nngp_fn(mlp)):
            kernel_fn(xs[0], None, mlp_params)
            kernel_fn(xs[0], None, mlp_params)
            bad = {**mlp_params, "b1": mlp_params["b1"].at[0].set(np.nan)}
            with pytest.raises(ValueError, match=r"params at \['b1'\] contains NaN"):
                kernel_fn(xs[0], None, bad)
            host = {k: np.array(v) for k, v in mlp_params.items()}
            kernel_fn(xs[0], None, host)
            host["w1"][0, 0] = np.inf
            with pytest.raises(ValueError, match=r"params at \['w1'\] contains NaN or Inf"):
                kernel_fn(xs[0], None, host)

    def test_non_finite_values_propagate_when_checks_are_off_or_under_jit(self, mlp_params, xs):
        x = np.array(xs[0]).copy()
        x[0, 0] = np.nan
        # Differentiating the whole batch at once, 0 * NaN in the backward pass reaches every entry;
        # per-example Jacobians (vmap_axes=0) confine it to the row and column of the bad example.
        whole_batch = empirical_ntk_fn(mlp, vmap_axes=None, check_finite_values=False)(x, None, mlp_params)
        assert np.isnan(whole_batch).all()
        per_example = empirical_ntk_fn(mlp, vmap_axes=0, check_finite_values=False)(x, None, mlp_params)
        assert np.isnan(per_example[0]).all() and np.isnan(per_example[:, 0]).all()
        assert np.isfinite(per_example[1:, 1:]).all()
        jitted = jax.jit(empirical_ntk_fn(mlp))(x, None, mlp_params)
        assert np.isnan(jitted[0]).any()


def test_a_kernel_function_resolves_each_input_shape_once(monkeypatch, mlp_params, xs):
    """Output axes, vmap_axes and the implementation follow from shapes and dtypes alone: a kernel
    function works them out on the first call with given shapes and reuses them after."""
    import ntk_adapters.empirical as E

    calls = []
    original = E.choose
    monkeypatch.setattr(E, "choose", lambda *a, **k: calls.append(1) or original(*a, **k))
    ntk = empirical_ntk_fn(mlp)
    first = ntk(xs[0], None, mlp_params)
    ntk(xs[0] + 1.0, None, mlp_params)
    assert len(calls) == 1
    ntk(xs[0][:3], None, mlp_params)  # another batch size: resolved again
    ntk(xs[0], xs[0][:3], mlp_params)
    assert len(calls) == 3
    np.testing.assert_allclose(ntk(xs[0], None, mlp_params), first)
