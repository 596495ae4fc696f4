"""Speed of the infinite-width engine against hand-written closed-form kernels.

Two architectures, each evaluated by ``ntk_adapters.infinite.infinite_kernel_fn`` on the unchanged
Flax model and by a jitted arc-cosine recursion written out here for the same architecture; the
table gives medians over repeats (after a warm-up call that compiles) and the ratio
engine / hand-written (target ≤ 1.2×). The two results are also checked to agree.

Run:  .venv/bin/python benchmarks/infinite_kernel.py [--repeats 15] [--n 1000]
      .venv/bin/python benchmarks/infinite_kernel.py --small      # seconds
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import relu_maps  # noqa: E402

import ntk_adapters.flax as nflax  # noqa: E402
from ntk_adapters.infinite import infinite_kernel_fn  # noqa: E402

jax.config.update("jax_enable_x64", True)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512)(x))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@jax.jit
def mlp_by_hand(x1, x2):
    d = x1.shape[1]
    k = x1 @ x2.T / d
    q1, q2 = jnp.sum(x1 * x1, 1) / d, jnp.sum(x2 * x2, 1) / d
    ntk = jnp.zeros_like(k)
    fan_in = d
    for width in (512, 512, None):
        ntk = fan_in * k + ntk + 1.0  # lecun_normal: σw² = 1; zero bias, trainable
        if width is None:
            break
        j1, j0 = relu_maps(k, q1[:, None], q2[None, :])
        k, ntk, q1, q2, fan_in = j1, ntk * j0, q1 / 2, q2 / 2, width
    return k, ntk


def _window_avg(a, lead):
    """(1/9) Σ_δ a[.., h+δh, h'+δh, w+δw, w'+δw] with zero padding (3×3 'SAME', full layout)."""
    pad = [(0, 0)] * lead + [(1, 1)] * 4
    p = jnp.pad(a, pad)
    h, w = a.shape[lead], a.shape[lead + 2]
    out = 0.0
    for dh in range(3):
        for dw in range(3):
            out = (
                out
                + p[
                    (slice(None),) * lead + (slice(dh, dh + h), slice(dh, dh + h), slice(dw, dw + w), slice(dw, dw + w))
                ]
            )
    return out / 9.0


def _diag(c):  # (N, H, H, W, W) -> (N, H, 1, W, 1) and (N, 1, H, 1, W)
    d = jnp.diagonal(jnp.diagonal(c, axis1=1, axis2=2), axis1=1, axis2=2)  # (N, H, W)
    n, h, w = d.shape
    return d.reshape(n, h, 1, w, 1), d.reshape(n, 1, h, 1, w)


@jax.jit
def cnn_by_hand(x1, x2):
    c = x1.shape[-1]
    k = jnp.einsum("iabz,jcdz->ijacbd", x1, x2) / c
    c1 = jnp.einsum("iabz,icdz->iacbd", x1, x1) / c
    c2 = jnp.einsum("iabz,icdz->iacbd", x2, x2) / c
    ntk = jnp.zeros_like(k)
    fan_in = 9 * c
    for _ in range(2):
        ak = _window_avg(k, 2)
        ntk = fan_in * ak + _window_avg(ntk, 2) + 1.0
        k, c1, c2 = ak, _window_avg(c1, 1), _window_avg(c2, 1)
        a1, b1 = _diag(c1)
        a2, b2 = _diag(c2)
        v1, v2 = a1[:, None], b2[None]
        j1, j0 = relu_maps(k, v1, v2)
        k, ntk = j1, ntk * j0
        c1 = relu_maps(c1, a1, b1)[0]
        c2 = relu_maps(c2, a2, b2)[0]
        fan_in = 9 * 64
    # global average pooling, then Dense(10)
    k = k.mean(axis=(2, 3, 4, 5))
    ntk = ntk.mean(axis=(2, 3, 4, 5))
    return k, 64 * k + ntk + 1.0


def bench(engine, by_hand, repeats):
    """Median seconds of each, timed alternately so that drift in machine load hits both alike."""
    jax.block_until_ready(engine())
    jax.block_until_ready(by_hand())
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((engine, by_hand), times):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - t)
    return tuple(float(np.median(t)) for t in times)


def main():
    small = "--small" in sys.argv[1:]  # smaller defaults; explicit options still win
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="200 inputs, 8 images, 5 repeats (seconds, < 1 GiB)")
    ap.add_argument("--repeats", type=int, default=5 if small else 15)
    ap.add_argument("--n", type=int, default=200 if small else 1000, help="inputs per side for the MLP")
    ap.add_argument("--n-img", type=int, default=8 if small else 32, help="images per side for the CNN")
    args = ap.parse_args()

    rows = []
    x = jax.random.normal(jax.random.PRNGKey(0), (args.n, 32))
    model = nflax.adapt(MLP(), None, x[:2])
    kf = infinite_kernel_fn(model)
    eng = kf(x, x)
    ref = mlp_by_hand(x, x)
    np.testing.assert_allclose(eng.nngp, ref[0], rtol=1e-9, atol=1e-12)
    # arccos is ill-conditioned at ρ = 1 (the diagonal): ~1e-8 relative differences there
    np.testing.assert_allclose(eng.ntk, ref[1], rtol=1e-7)
    rows.append(
        (f"MLP 32-512-512-10, {args.n}x{args.n}", *bench(lambda: kf(x, x), lambda: mlp_by_hand(x, x), args.repeats))
    )

    xi = jax.random.normal(jax.random.PRNGKey(1), (args.n_img, 8, 8, 3))
    model = nflax.adapt(CNN(), None, xi[:2])
    kf = infinite_kernel_fn(model)
    eng = kf(xi, xi)
    ref = cnn_by_hand(xi, xi)
    np.testing.assert_allclose(eng.nngp, ref[0], rtol=1e-9, atol=1e-12)
    # arccos is ill-conditioned at ρ = 1 (the diagonal): ~1e-8 relative differences there
    np.testing.assert_allclose(eng.ntk, ref[1], rtol=1e-7)
    rows.append(
        (
            f"CNN conv-conv-GAP-dense 8x8x3, {args.n_img}x{args.n_img}",
            *bench(lambda: kf(xi, xi), lambda: cnn_by_hand(xi, xi), args.repeats),
        )
    )

    print(f"{'case':44s} {'engine (ms)':>12s} {'by hand (ms)':>13s} {'ratio':>7s}")
    for name, t_eng, t_ref in rows:
        print(f"{name:44s} {1e3 * t_eng:12.2f} {1e3 * t_ref:13.2f} {t_eng / t_ref:7.2f}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, float64, median of {args.repeats} alternating runs")


if __name__ == "__main__":
    main()
