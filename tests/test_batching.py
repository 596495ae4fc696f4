"""Tiled and sharded kernel evaluation (``ntk_adapters.batching``).

The reference for every tiled result is the same kernel function called once on the whole
batch; the kernels are written here by hand (closed forms), so the tests do not lean on the
rest of the library. The CG solver is judged against ``np.linalg.solve`` on the full matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntk_adapters.batching import KernelRegressionResult, batch, kernel_regression_cg
from ntk_adapters.outputs import pack

D_IN = 5


# --------------------------------------------------------------------------------------------
# Hand-written kernels
# --------------------------------------------------------------------------------------------


def arccos_kernel(x1, x2=None, get=("nngp", "ntk"), w_var=1.7, b_var=0.1):
    """One hidden ReLU layer, NTK parameterization, exact infinite width.

    Σ0 = σw² x·x'/d + σb²; E[relu(u) relu(v)] = √(Σ0(x,x) Σ0(x',x')) (sin θ + (π − θ) cos θ)/(2π);
    E[relu'(u) relu'(v)] = (π − θ)/(2π); readout layer: Σ1 = σw² E[..] + σb²,
    Θ1 = Σ1 + σw² E[relu' relu'] Θ0 with Θ0 = Σ0. With ``x2=None`` the diagonal has cos θ = 1
    exactly (arccos amplifies round-off near 1 to √eps).
    """
    same = x2 is None
    x2 = x1 if same else x2
    d = x1.shape[-1]
    s12 = w_var * x1 @ x2.T / d + b_var
    s11 = w_var * jnp.sum(x1 * x1, -1) / d + b_var
    s22 = w_var * jnp.sum(x2 * x2, -1) / d + b_var
    norm = jnp.sqrt(s11[:, None] * s22[None, :])
    cos = jnp.clip(s12 / norm, -1.0, 1.0)
    if same:
        cos = jnp.where(jnp.eye(len(x1), dtype=bool), 1.0, cos)
    theta = jnp.arccos(cos)
    e_relu = norm * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2 * jnp.pi)
    e_drelu = (jnp.pi - theta) / (2 * jnp.pi)
    nngp = w_var * e_relu + b_var
    ntk = nngp + w_var * e_drelu * s12
    return pack(get, dict(nngp=nngp, ntk=ntk))


def rbf_kernel(x1, x2=None):
    x2 = x1 if x2 is None else x2
    return jnp.exp(-0.5 * jnp.sum((x1[:, None, :] - x2[None, :, :]) ** 2, -1))


_O, _P = 3, 7
_W_OO = np.random.default_rng(0).normal(size=(D_IN, _O, _P))


def _features(x, w):
    return jnp.tanh(jnp.einsum("nd,dop->nop", x, w)) + 0.3 * jnp.sin(x[:, :1, None])


def paired_kernel(x1, x2=None, get="ntk", params=None):
    """``K[i, j, a, b] = φ_a(x1_i) · φ_b(x2_j)``: trailing (O, O) pair, not symmetric in (a, b).

    Only the transpose with (a, b) swapped gives ``K(x2, x1)``; ``params`` (the feature weights)
    is an array keyword argument.
    """
    w = _W_OO if params is None else params
    x2 = x1 if x2 is None else x2
    k = jnp.einsum("iap,jbp->ijab", _features(x1, w), _features(x2, w))
    return pack(get, dict(ntk=k, nngp=k[..., 0, 0][..., None, None] * k))


_W_DIAG = np.random.default_rng(1).normal(size=(D_IN, 3, 3, _P))


def diagonal_kernel(x1, x2=None):
    """Trailing (H, W) = (3, 3) *diagonal* axes: ``K[i, j, h, w] = φ_hw(x1_i) · φ_hw(x2_j)``.

    Same trailing shape as an (O, O) pair, but here the transpose keeps (h, w): swapping them
    is wrong, so the shape alone cannot tell how to fill the lower triangle.
    """
    x2 = x1 if x2 is None else x2
    f1 = jnp.tanh(jnp.einsum("nd,dhwp->nhwp", x1, _W_DIAG))
    f2 = jnp.tanh(jnp.einsum("nd,dhwp->nhwp", x2, _W_DIAG))
    return jnp.einsum("ihwp,jhwp->ijhw", f1, f2)


def noisy_rbf_kernel(x1, x2=None):
    """RBF plus observation noise when ``x2`` is ``None``: only diagonal tiles may add it."""
    k = rbf_kernel(x1, x2)
    return k + 0.5 * jnp.eye(len(x1)) if x2 is None else k


def asymmetric_kernel(x1, x2=None):
    """Not a kernel: ``f(x1) · g(x2)ᵀ`` with ``f ≠ g``, so ``K(x, x)`` is not symmetric."""
    x2 = x1 if x2 is None else x2
    return jnp.tanh(x1) @ jnp.cos(x2).T


def _data(n, seed=0, d=D_IN):
    return np.random.default_rng(seed).normal(size=(n, d))


def _assert_tree_close(got, want, rtol=1e-12, atol=1e-12):
    assert type(got) is type(want) or (isinstance(got, (np.ndarray, jax.Array)) and isinstance(want, jax.Array))
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Tiled == untiled
# --------------------------------------------------------------------------------------------

KERNELS = {
    "arccos": (arccos_kernel, dict(get=("nngp", "ntk"))),
    "arccos_str": (arccos_kernel, dict(get="ntk")),
    "arccos_tuple_reordered": (arccos_kernel, dict(get=("ntk", "nngp"))),
    "rbf": (rbf_kernel, {}),
    "noisy_rbf": (noisy_rbf_kernel, {}),
    "paired": (paired_kernel, dict(get=("nngp", "ntk"))),
    "paired_str": (paired_kernel, dict(get="ntk")),
    "diagonal": (diagonal_kernel, {}),
    "asymmetric": (asymmetric_kernel, {}),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("same", [False, True], ids=["x2", "x2=None"])
def test_tiled_equals_untiled(name, same):
    fn, kw = KERNELS[name]
    x1, x2 = _data(23, 1), (None if same else _data(17, 2))
    want = fn(x1, x2, **kw)
    got = batch(fn, 5)(x1, x2, **kw)
    _assert_tree_close(got, want)
    for leaf in jax.tree_util.tree_leaves(got):
        assert isinstance(leaf, jax.Array)


def test_paired_kernel_really_needs_the_swap():
    # The test kernels must make the symmetric fill matter: for ``paired`` the (a, b) swap is
    # the only right transpose, for ``diagonal`` the identity is.
    x = _data(6)
    k = np.asarray(paired_kernel(x))
    np.testing.assert_allclose(k, k.transpose(1, 0, 3, 2), atol=1e-13)
    assert np.abs(k - k.transpose(1, 0, 2, 3)).max() > 1e-2
    k = np.asarray(diagonal_kernel(x))
    np.testing.assert_allclose(k, k.transpose(1, 0, 2, 3), atol=1e-13)
    assert np.abs(k - k.transpose(1, 0, 3, 2)).max() > 1e-2
    k = np.asarray(asymmetric_kernel(x))
    assert np.abs(k - k.T).max() > 1e-2


@pytest.mark.parametrize(
    "name, n_tiles",
    # 23 rows in tiles of 5: 5 diagonal + 10 upper tiles when the lower ones can be mirrored,
    # 5 diagonal + 20 off-diagonal when they cannot.
    [("arccos", 15), ("paired", 15), ("diagonal", 15), ("asymmetric", 25)],
)
def test_symmetric_path_computes_upper_tiles_only(name, n_tiles):
    fn, kw = KERNELS[name]
    evaluated, traced = [], []

    def counting(x1, x2=None, **kwargs):
        traced.append(x2 is None)  # Python side effect: runs once per trace, not per tile
        jax.debug.callback(lambda: evaluated.append(1))
        return fn(x1, x2, **kwargs)

    x = _data(23, 3)
    got = batch(counting, 5, devices=jax.local_devices()[:1])(x, **kw)
    _assert_tree_close(got, fn(x, **kw))
    assert len(evaluated) == n_tiles
    # One program for the diagonal tiles and one for the rest, padded last tiles included.
    assert sorted(traced) == [False, True]
    # A second tiled function of the same kernel reuses both programs.
    batch(counting, 5, devices=jax.local_devices()[:1])(x, **kw)
    assert sorted(traced) == [False, True]


def test_asymmetric_falls_back_to_all_tiles_and_none_forces_it():
    x = _data(19, 4)
    want = asymmetric_kernel(x)
    _assert_tree_close(batch(asymmetric_kernel, 4, symmetry="none")(x), want)
    _assert_tree_close(batch(asymmetric_kernel, 4)(x), want)
    # An explicit (wrong) permutation is trusted, so it must change the answer.
    wrong = batch(asymmetric_kernel, 4, symmetry=())(x)
    assert np.abs(np.asarray(wrong) - np.asarray(want)).max() > 1e-2


def test_explicit_symmetry_permutation():
    x = _data(14, 5)
    _assert_tree_close(batch(paired_kernel, 4, symmetry=(1, 0))(x), paired_kernel(x))
    with pytest.raises(ValueError, match="permutation"):
        batch(paired_kernel, 4, symmetry=(0, 0))
    with pytest.raises(ValueError, match="trailing"):
        batch(paired_kernel, 4, symmetry=(0, 1, 2))(x)


@pytest.mark.parametrize("same", [False, True], ids=["x2", "x2=None"])
def test_store_on_host_and_memmap(tmp_path, same):
    x1, x2 = _data(21, 6), (None if same else _data(10, 7))
    kw = dict(get=("nngp", "ntk"))
    want = paired_kernel(x1, x2, **kw)

    host = batch(paired_kernel, 4, store_on_host=True)(x1, x2, **kw)
    _assert_tree_close(host, want)
    assert all(type(leaf) is np.ndarray for leaf in host)

    path = tmp_path / "k.npy"
    mapped = batch(paired_kernel, 4, memmap_path=path)(x1, x2, **kw)
    _assert_tree_close(mapped, want)
    assert all(isinstance(leaf, np.memmap) for leaf in mapped)
    for field in ("nngp", "ntk"):
        on_disk = np.load(tmp_path / f"k_{field}.npy", mmap_mode="r")
        np.testing.assert_allclose(on_disk, np.asarray(getattr(want, field)), rtol=1e-12, atol=1e-12)

    single = batch(rbf_kernel, 4, memmap_path=tmp_path / "rbf.npy")(x1, x2)
    np.testing.assert_allclose(np.load(tmp_path / "rbf.npy"), np.asarray(rbf_kernel(x1, x2)), rtol=1e-12)
    assert isinstance(single, np.memmap)


def test_array_kwargs_are_traced_not_baked_in():
    x = _data(13, 8)
    batched = batch(paired_kernel, 4)
    for seed in (10, 11):
        w = jnp.asarray(np.random.default_rng(seed).normal(size=(D_IN, _O, _P)))
        _assert_tree_close(batched(x, params=w), paired_kernel(x, params=w))
        _assert_tree_close(batched(x, x[:5], params=w, get=("ntk",)), paired_kernel(x, x[:5], params=w, get=("ntk",)))


def test_pytree_inputs_and_tile_larger_than_data():
    def two_part(x1, x2=None):
        x2 = x1 if x2 is None else x2
        return rbf_kernel(x1["a"], x2["a"]) * (1.0 + x1["b"][:, None] * x2["b"][None, :])

    x = {"a": _data(9, 9), "b": np.linspace(-1, 1, 9)}
    z = {"a": _data(4, 10), "b": np.linspace(0, 1, 4)}
    _assert_tree_close(batch(two_part, 4)(x), two_part(x))
    _assert_tree_close(batch(two_part, 4)(x, z), two_part(x, z))
    _assert_tree_close(batch(two_part, 100)(x, z), two_part(x, z))


def test_float32_kernels_stay_float32():
    x = _data(11, 12).astype(np.float32)
    got = batch(arccos_kernel, 4, store_on_host=True)(x, get="ntk")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(arccos_kernel(x, get="ntk")), rtol=1e-5, atol=1e-6)


def test_explicit_devices_and_progress(capsys):
    x = _data(12, 13)
    got = batch(rbf_kernel, 5, devices=jax.local_devices()[:1], progress=True)(x)
    _assert_tree_close(got, rbf_kernel(x))
    assert "tile" in capsys.readouterr().err


def test_argument_errors():
    with pytest.raises(ValueError, match="batch_size"):
        batch(rbf_kernel, 0)
    with pytest.raises(ValueError, match="symmetry"):
        batch(rbf_kernel, 3, symmetry="sometimes")
    with pytest.raises(ValueError, match="devices"):
        batch(rbf_kernel, 3, devices=[])
    with pytest.raises(ValueError, match="x1"):
        batch(rbf_kernel, 3)({"a": np.ones((4, 2)), "b": np.ones((5,))})
    with pytest.raises(ValueError, match="no examples"):
        batch(rbf_kernel, 3)(np.ones((4, 2)), np.ones((0, 2)))
    with pytest.raises(ValueError, match=r"leading axes \(N1, N2\)"):
        batch(lambda x1, x2=None: jnp.sum(x1, -1), 3)(np.ones((4, 2)))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    n1=st.integers(1, 21),
    n2=st.integers(1, 21),
    tile=st.integers(1, 9),
    same=st.booleans(),
    which=st.sampled_from(["arccos", "paired", "diagonal"]),
)
def test_property_tiled_equals_untiled(n1, n2, tile, same, which):
    fn, kw = KERNELS[which]
    x1 = _data(n1, n1 * 31 + n2)
    x2 = None if same else _data(n2, n2 * 17 + 5)
    _assert_tree_close(batch(fn, tile)(x1, x2, **kw), fn(x1, x2, **kw))


# --------------------------------------------------------------------------------------------
# Several devices
# --------------------------------------------------------------------------------------------

_SHARDED_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, {tests_dir!r})
    from test_batching import KERNELS, _data
    from ntk_adapters.batching import batch

    devices = jax.local_devices()
    report = dict(n_devices=len(devices), cases=[])
    for name in ["arccos", "paired", "diagonal", "asymmetric"]:
        fn, kw = KERNELS[name]
        for same in (False, True):
            # 23 rows in tiles of 5: 5 x 4 = 20 tiles with x2, 15 (5 diagonal, 10 upper)
            # with x2=None: neither a multiple of 4 devices.
            x1, x2 = _data(23, 1), (None if same else _data(17, 2))
            four = batch(fn, 5, devices=devices)(x1, x2, **kw)
            one = batch(fn, 5, devices=devices[:1])(x1, x2, **kw)
            want = fn(x1, x2, **kw)
            for a, b, w in zip(jax.tree_util.tree_leaves(four), jax.tree_util.tree_leaves(one),
                               jax.tree_util.tree_leaves(want)):
                report["cases"].append(dict(
                    name=name, same=same,
                    identical=bool(np.array_equal(np.asarray(a), np.asarray(b))),
                    max_err=float(np.max(np.abs(np.asarray(a) - np.asarray(w)))),
                ))
    # Each device runs the tile program on its own tile: with 4 devices the 15 tiles of the
    # symmetric path are 2 groups of diagonal tiles and 3 of upper tiles, 4 evaluations each
    # (padding tiles included); one device evaluates exactly 15.
    evaluated = []
    def counting(x1, x2=None):
        jax.debug.callback(lambda: evaluated.append(1))
        return KERNELS["rbf"][0](x1, x2)
    for devs in (devices, devices[:1]):
        evaluated.clear()
        batch(counting, 5, devices=devs)(_data(23, 3))
        report["evaluations_%d" % len(devs)] = len(evaluated)
    # CG on 4 devices: the tile pairs of every product are split over the devices.
    from ntk_adapters.batching import kernel_regression_cg
    x, xt = _data(29, 50), _data(9, 51)
    y = np.random.default_rng(52).normal(size=(29, 2))
    k = np.asarray(KERNELS["arccos_str"][0](x, get="ntk"))
    alpha = np.linalg.solve(k + 1e-2 * np.eye(29), y)
    test = np.asarray(KERNELS["arccos_str"][0](xt, x, get="ntk")) @ alpha
    for devs in (devices, devices[:1]):
        res = kernel_regression_cg(KERNELS["arccos_str"][0], x, y, xt, diag_reg=1e-2, batch_size=4,
                                   tol=1e-13, devices=devs)
        report["cg_%d" % len(devs)] = dict(
            alpha_err=float(np.abs(np.asarray(res.alpha) - alpha).max() / np.abs(alpha).max()),
            test_err=float(np.abs(np.asarray(res.test) - test).max() / np.abs(test).max()),
        )
    print("REPORT" + json.dumps(report))
    """
)


def test_sharded_over_four_devices_equals_one_device(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "child.py"
    script.write_text(_SHARDED_CHILD.format(tests_dir=tests_dir))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(tests_dir)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])
    assert report["n_devices"] == 4
    assert len(report["cases"]) == 2 * (2 + 2 + 1 + 1)
    assert (report["evaluations_4"], report["evaluations_1"]) == (4 * (2 + 3), 15)
    for n_dev in (4, 1):
        assert report["cg_%d" % n_dev]["alpha_err"] < 1e-9, report
        assert report["cg_%d" % n_dev]["test_err"] < 1e-9, report
    for case in report["cases"]:
        assert case["identical"], case
        assert case["max_err"] < 1e-12, case


# --------------------------------------------------------------------------------------------
# Conjugate-gradient kernel regression
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("y_shape, reg", [((), 0.0), ((3,), 1e-2)], ids=["y(N,)-reg0", "y(N,3)-reg1e-2"])
def test_cg_matches_direct_solve(y_shape, reg):
    n, n_test = 37, 11
    x, xt = _data(n, 20), _data(n_test, 21)
    y = np.random.default_rng(22).normal(size=(n,) + y_shape)
    res = kernel_regression_cg(arccos_kernel, x, y, xt, diag_reg=reg, batch_size=8, tol=1e-13, get="ntk")
    assert isinstance(res, KernelRegressionResult)

    k = np.asarray(arccos_kernel(x, get="ntk"))
    k_test = np.asarray(arccos_kernel(xt, x, get="ntk"))
    alpha = np.linalg.solve(k + reg * np.eye(n), y)
    assert res.alpha.shape == y.shape and res.train.shape == y.shape
    assert res.test.shape == (n_test,) + y_shape
    scale = np.abs(alpha).max()
    np.testing.assert_allclose(res.alpha, alpha, atol=1e-7 * scale)
    np.testing.assert_allclose(res.train, k @ alpha, atol=1e-8 * np.abs(y).max())
    np.testing.assert_allclose(res.test, k_test @ alpha, atol=1e-7 * np.abs(k_test @ alpha).max())
    assert float(res.residual) < 1e-10


def test_cg_kernel_kwargs_and_no_test_set():
    n = 20
    x = _data(n, 23)
    y = np.sin(x[:, :2])

    def scaled(x1, x2=None, scale=None):
        return scale * rbf_kernel(x1, x2)

    res = kernel_regression_cg(scaled, x, y, diag_reg=0.1, batch_size=6, tol=1e-13, get=None, scale=jnp.float64(2.0))
    alpha = np.linalg.solve(2.0 * np.asarray(rbf_kernel(x)) + 0.1 * np.eye(n), y)
    np.testing.assert_allclose(res.alpha, alpha, atol=1e-9 * np.abs(alpha).max())
    assert res.test is None


def test_cg_uses_same_input_semantics_on_the_diagonal():
    # A kernel with observation noise only when x2 is None: the regression must see K + σ² I.
    n = 17
    x = _data(n, 25)
    y = np.cos(x[:, 0])
    res = kernel_regression_cg(noisy_rbf_kernel, x, y, batch_size=5, tol=1e-13, get=None)
    alpha = np.linalg.solve(np.asarray(rbf_kernel(x)) + 0.5 * np.eye(n), y)
    np.testing.assert_allclose(res.alpha, alpha, atol=1e-10 * np.abs(alpha).max())


def test_cg_rejects_kernels_with_trailing_axes():
    x = _data(10, 24)
    with pytest.raises(ValueError, match=r"\(N1, N2\)"):
        kernel_regression_cg(paired_kernel, x, np.ones(10), batch_size=4)
    with pytest.raises(ValueError, match="y_train"):
        kernel_regression_cg(rbf_kernel, x, np.ones(9), batch_size=4, get=None)


# --------------------------------------------------------------------------------------------
# The library's own kernel functions, when present
# --------------------------------------------------------------------------------------------


def test_empirical_kernel_tiles():
    empirical = pytest.importorskip("ntk_adapters.empirical")
    from ntk_adapters.model import adapt

    rng = np.random.default_rng(30)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D_IN, 16)) / np.sqrt(D_IN)),
        "w2": jnp.asarray(rng.normal(size=(16, 2)) / 4.0),
    }

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    model = adapt(apply_fn, params)
    kernel_fn = empirical.empirical_kernel_fn(model, trace_axes=())
    x1, x2 = _data(11, 31), _data(7, 32)
    for args in ((x1, x2), (x1,)):
        want = kernel_fn(*args, get=("nngp", "ntk"))
        got = batch(kernel_fn, 4)(*args, get=("nngp", "ntk"))
        assert got.ntk.shape[2:] == (2, 2)
        _assert_tree_close(got, want, rtol=1e-10, atol=1e-10)
    # params passed through as a traced keyword argument
    other = jax.tree_util.tree_map(lambda p: 1.5 * p, params)
    _assert_tree_close(
        batch(kernel_fn, 4)(x1, get="ntk", params=other), kernel_fn(x1, get="ntk", params=other), 1e-10, 1e-10
    )


def test_infinite_kernel_tiles():
    infinite = pytest.importorskip("ntk_adapters.infinite")
    if not hasattr(infinite, "infinite_kernel_fn"):
        pytest.skip("ntk_adapters.infinite.infinite_kernel_fn is not available")
    fl = pytest.importorskip("ntk_adapters.flax")
    if not hasattr(fl, "adapt"):
        pytest.skip("ntk_adapters.flax.adapt is not available")
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(1)(x)

    x1, x2 = _data(13, 40), _data(6, 41)
    model = fl.adapt(MLP(), None, x1[:2], key=jax.random.PRNGKey(0))
    kernel_fn = infinite.infinite_kernel_fn(model)
    for args in ((x1, x2), (x1,)):
        want = kernel_fn(*args, get=("nngp", "ntk"))
        got = batch(kernel_fn, 5)(*args, get=("nngp", "ntk"))
        # The ReLU closed form takes arccos of a correlation that is 1 up to round-off on the
        # diagonal, where the result moves by ~√eps when the batch (hence the matmul's rounding)
        # changes; off the diagonal the agreement is at round-off.
        _assert_tree_close(got, want, rtol=1e-7, atol=1e-9)
