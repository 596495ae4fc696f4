"""Monte Carlo convergence of whole models, Flax and Haiku: the engine's kernels against the
average over random initializations of the real modules, at two widths."""

import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import ntk_adapters.flax as nflax
import ntk_adapters.haiku as nhaiku
from ntk_adapters.flax import ntk_param as flax_ntk
from ntk_adapters.haiku import ntk_param as haiku_ntk
from ntk_adapters.infinite import infinite_kernel_fn

WIDTHS = (8, 256)
N_NNGP, N_NTK = 2048, 16
TOL_NNGP, TOL_NTK = 0.05, 0.08  # at the largest width: MC noise ~1-3 % plus O(1/width) bias


class FlaxMLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(8)(x)


def flax_mlp(width, x):
    return nflax.adapt(FlaxMLP(width), None, x)


def haiku_mlp(width, x):
    def f(x):
        x = jax.nn.relu(hk.Linear(width)(x))
        x = jax.nn.gelu(hk.Linear(width)(x))
        return hk.Linear(8)(x)

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, x)


def check_convergence(mc, build, x, widths=WIDTHS, tol_nngp=TOL_NNGP, tol_ntk=TOL_NTK, n_nngp=N_NNGP, n_ntk=N_NTK):
    mc.check_convergence(build, x, widths=widths, tol_nngp=tol_nngp, tol_ntk=tol_ntk, n_nngp=n_nngp, n_ntk=n_ntk)


@pytest.mark.slow
@pytest.mark.parametrize("build", [flax_mlp, haiku_mlp], ids=["flax", "haiku"])
def test_mlp_converges(mc, build, x_vec):
    check_convergence(mc, build, x_vec)


def haiku_cnn_pool(width, x):
    """NTK-param conv (circular), LayerNorm, Haiku Conv2D, inline avg_pool, global mean."""

    def f(x):
        x = haiku_ntk.Conv2D(width, 3, padding="CIRCULAR", w_std=1.2, b_std=0.3)(x)
        x = jax.nn.relu(hk.LayerNorm(-1, True, True)(x))
        x = jax.nn.relu(hk.Conv2D(width, 2, padding="VALID")(x))
        x = hk.avg_pool(x, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")
        return hk.Linear(8)(jnp.mean(x, axis=(1, 2)))

    return nhaiku.adapt(hk.without_apply_rng(hk.transform(f)), None, x)


class FlaxResLN(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width)(x)
        h = h + nn.Dense(self.width)(nn.relu(nn.LayerNorm()(h)))
        h = nn.BatchNorm(use_running_average=True)(h)
        return nn.Dense(8)(nn.relu(h))


def flax_res_ln(width, x):
    return nflax.adapt(FlaxResLN(width), None, x)


@pytest.mark.slow
def test_cnn_global_average_pooling_converges(mc, x_img):
    check_convergence(mc, haiku_cnn_pool, x_img[:, :5, :5], widths=(2, 64))


@pytest.mark.slow
def test_residual_layernorm_batchnorm_converges(mc, x_vec):
    check_convergence(mc, flax_res_ln, x_vec)


# Rule coverage: each model below exercises several rules on the real modules.


class FlaxConv1D(nn.Module):
    """1-D circular dilated conv, strided VALID conv, leaky ReLU, NTK-param Dense on a flatten."""

    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.leaky_relu(nn.Conv(self.width, (3,), padding="CIRCULAR", kernel_dilation=2)(x), 0.2)
        x = jax.scipy.special.erf(nn.Conv(self.width, (2,), strides=2, padding="VALID", use_bias=False)(x))
        return flax_ntk.Dense(8, w_std=1.3, b_std=0.2)(x.reshape((x.shape[0], -1)))


def flax_conv1d(width, x):
    return nflax.adapt(FlaxConv1D(width), None, x.reshape((x.shape[0], -1, 2)))


class FlaxNTKConvPool(nn.Module):
    """NTK-param conv, LayerNorm over channels, inline average pooling, deterministic dropout."""

    width: int

    @nn.compact
    def __call__(self, x):
        x = flax_ntk.Conv(self.width, (3, 3), w_std=1.5, b_std=0.1)(x)
        x = nn.gelu(nn.LayerNorm()(x))
        x = nn.Dropout(0.3, deterministic=True)(x)
        x = nn.avg_pool(nn.Conv(self.width, (3, 3))(x), (2, 2), strides=(2, 2))
        x = jnp.sum(nn.relu(x), axis=(1, 2))
        return nn.Dense(8)(x)


def flax_ntk_conv_pool(width, x):
    return nflax.adapt(FlaxNTKConvPool(width), None, x)


@pytest.mark.slow
def test_conv1d_circular_dilated_ntk_dense_converges(mc, x_img):
    check_convergence(mc, lambda w, x: flax_conv1d(w, x), x_img.reshape((3, -1, 2))[:, :8], widths=(2, 128))


@pytest.mark.slow
def test_ntk_conv_layernorm_avgpool_converges(mc, x_img):
    check_convergence(mc, flax_ntk_conv_pool, x_img[:, :4, :4], widths=(2, 64))


class FlaxBN(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width)(nn.relu(nn.Dense(self.width)(x)))
        return nn.Dense(8)(nn.BatchNorm(use_running_average=True)(h))


def flax_batchnorm_stats(width, x):
    """Inference BatchNorm with non-trivial running statistics and trained-looking scale/bias."""
    module = FlaxBN(width)
    variables = module.init(jax.random.PRNGKey(0), x)
    c = jnp.arange(width)
    stats = {"mean": 0.3 * jnp.sin(c), "var": 1.0 + 0.5 * jnp.cos(c)}
    variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": stats}}
    params = variables["params"]
    params["BatchNorm_0"] = {"scale": 1.0 + 0.4 * jnp.cos(0.7 * c), "bias": 0.2 * jnp.sin(1.3 * c)}
    model = nflax.adapt(module, variables, x)
    init = model.init_fn

    def init_fn(key, x):
        # fresh Dense weights; the BatchNorm's (trained) scale and bias stay as they are
        p = init(key, x)
        return {**p, "BatchNorm_0": params["BatchNorm_0"]}

    return model.replace(init_fn=init_fn, params=params)


@pytest.mark.slow
def test_batchnorm_inference_with_running_stats_converges(mc, x_vec):
    # The NTK here counts the BatchNorm scale/bias as trainable (the Monte Carlo NTK differentiates them).
    check_convergence(mc, flax_batchnorm_stats, x_vec)


def haiku_batchnorm_stats(width, x):
    """Haiku inference BatchNorm with non-trivial running statistics and scale/offset."""

    def f(x, is_training):
        h = hk.Linear(width)(jax.nn.relu(hk.Linear(width)(x)))
        h = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(h, is_training)
        return hk.Linear(8)(h)

    net = hk.without_apply_rng(hk.transform_with_state(f))
    params, state = net.init(jax.random.PRNGKey(0), x, is_training=True)
    c = jnp.arange(width, dtype=x.dtype).reshape(1, width)  # Haiku keeps (1, C) statistics
    state = {
        "batch_norm/~/mean_ema": {**state["batch_norm/~/mean_ema"], "average": 0.3 * jnp.sin(c)},
        "batch_norm/~/var_ema": {**state["batch_norm/~/var_ema"], "average": 1.0 + 0.5 * jnp.cos(c)},
    }
    bn = {"scale": 1.0 + 0.4 * jnp.cos(0.7 * c), "offset": 0.2 * jnp.sin(1.3 * c)}
    params = {**params, "batch_norm": bn}
    model = nhaiku.adapt(net, params, x, state=state, is_training=False, init_kwargs={"is_training": True})
    init = model.init_fn

    def init_fn(key, x):
        # fresh Linear weights; the BatchNorm's (trained) scale and offset stay as they are
        return {**init(key, x), "batch_norm": bn}

    return model.replace(init_fn=init_fn)


@pytest.mark.slow
def test_haiku_batchnorm_inference_with_running_stats_converges(mc, x_vec):
    check_convergence(mc, haiku_batchnorm_stats, x_vec)


class FlaxDropout(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x))
        h = nn.Dropout(0.3, deterministic=False)(h)
        return nn.Dense(8)(h)


def flax_dropout_masks(width, x):
    """Training-mode Dropout whose mask is redrawn with every initialization sample.

    The adapter closes over one rng; for the Monte Carlo side each sample carries its own mask seed
    next to the parameters (``stop_gradient``: it is not trained and adds nothing to the NTK), so
    the average runs over masks and weights together, as the infinite-width rule does."""
    module = FlaxDropout(width)
    model = nflax.adapt(module, None, x, rngs={"dropout": jax.random.PRNGKey(0)})

    def apply_fn(p, x):
        seed = jax.lax.stop_gradient(p["mask_seed"]).astype(jnp.uint32)
        return module.apply({"params": p["net"]}, x, rngs={"dropout": jax.random.PRNGKey(seed)})

    def init_fn(key, x):
        k_net, k_seed = jax.random.split(key)
        seed = jax.random.randint(k_seed, (), 0, 2**30).astype(x.dtype)
        return {"net": model.init_fn(k_net, x), "mask_seed": seed}

    return model.replace(
        apply_fn=apply_fn, init_fn=init_fn, params={"net": model.params, "mask_seed": jnp.zeros((), x.dtype)}
    )


@pytest.mark.slow
def test_stochastic_dropout_converges(mc, x_vec):
    # The engine reads the architecture from the adapted module; the Monte Carlo side redraws the
    # mask with the weights. x2 is x1: an example shares its mask with itself only.
    errs = []
    for w in WIDTHS:
        model = flax_dropout_masks(w, x_vec)
        k = infinite_kernel_fn(nflax.adapt(FlaxDropout(w), None, x_vec, rngs={"dropout": jax.random.PRNGKey(0)}))(x_vec)
        nngp, _ = mc.monte_carlo(model, x_vec, n_samples=N_NNGP, want_ntk=False, chunk=N_NNGP)
        _, ntk = mc.monte_carlo(model, x_vec, n_samples=N_NTK * 4, chunk=N_NTK * 4)
        errs.append((mc.rel_err(nngp, k.nngp), mc.rel_err(ntk, k.ntk)))
    (n0, t0), (n1, t1) = errs
    assert n1 < TOL_NNGP and t1 < TOL_NTK, errs
    # One hidden layer: the NNGP is exact in expectation at every width (its error is sampling
    # noise, ~2 % at both widths), the NTK carries the O(1/width) fluctuation and must shrink.
    # Without the 1/(1 − rate) on same-example entries both errors would be ~37 %.
    assert t1 < t0, errs
