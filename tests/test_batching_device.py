"""``batch`` assembles results that stay on the device on the device itself.

The tiles are placed into device buffers by in-place updates; the result must be bit for bit the
host-assembled one (mirrored tiles with their trailing axes swapped included), live on the first
device, and never pass through host buffers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.batching as batching
from ntk_adapters.batching import batch

O = 3
M = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.5]])


def paired(x1, x2=None):
    """``K[i, j, a, b] = (x1[i]·x2[j]) M[a, b] + x1[i, a] x2[j, b]``: symmetric only with the
    trailing axes swapped (``K[j, i, b, a] = K[i, j, a, b]``)."""
    x2 = x1 if x2 is None else x2
    return jnp.einsum("ic,jc->ij", x1, x2)[:, :, None, None] * M + jnp.einsum("ia,jb->ijab", x1[:, :O], x2[:, :O])


def _tol(x):
    """Tiled against untiled: the same products, summed in another order (64-bit floats on or off)."""
    return 1e-12 if x.dtype == jnp.float64 else 1e-5


@pytest.fixture(scope="module")
def data():
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    return jax.random.normal(key1, (23, 5)), jax.random.normal(key2, (11, 5))


@pytest.mark.parametrize("same", [True, False], ids=["x2=None", "x2"])
def test_device_assembly_equals_host_assembly_bit_for_bit(data, same):
    x1, x2 = data
    x2 = None if same else x2
    device = jax.local_devices()[0]
    on_device = batch(paired, 5)(x1, x2)
    on_host = batch(paired, 5, store_on_host=True)(x1, x2)
    assert isinstance(on_device, jax.Array) and on_device.devices() == {device}
    assert isinstance(on_host, np.ndarray)
    np.testing.assert_array_equal(np.asarray(on_device), on_host)
    np.testing.assert_allclose(np.asarray(on_device), paired(x1, x2), rtol=_tol(x1), atol=_tol(x1))


def test_results_that_stay_on_the_device_never_use_host_buffers(data, monkeypatch):
    x1, _ = data

    class NumpyWithoutEmpty:
        """numpy as ntk_adapters.batching sees it, except that allocating a host buffer fails."""

        def __getattr__(self, name):
            if name == "empty":
                raise AssertionError("a host buffer was allocated for a device result")
            return getattr(np, name)

    monkeypatch.setattr(batching, "np", NumpyWithoutEmpty())
    got = batch(paired, 4)(x1)
    np.testing.assert_allclose(np.asarray(got), paired(x1), rtol=_tol(x1), atol=_tol(x1))
