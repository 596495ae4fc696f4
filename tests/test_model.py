"""The Model record and the plain-function adapter."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

import ntk_adapters


def test_plain_function_is_accepted_as_is():
    model = ntk_adapters.adapt(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)))
    assert model.input_shape == (3,) and model.output_shape == (2,)
    assert model(model.params, jnp.ones((1, 3))).shape == (1, 2)


def test_non_array_output_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match="output= selector"):
        ntk_adapters.adapt(lambda p, x: {"y": x}, {}, jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="scalar"):
        ntk_adapters.adapt(lambda p, x: x.sum(), {}, jnp.ones((4, 3)))


def test_import_works_without_flax_and_haiku():
    """The core never imports a framework; the adapters say what to install."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('flax', 'haiku'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ntk_adapters, ntk_adapters.empirical, ntk_adapters.monte_carlo, ntk_adapters.linearize\n"
        "assert not any(m.split('.')[0] in ('flax', 'haiku') for m in sys.modules)\n"
        "try:\n"
        "    import ntk_adapters.flax\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'ntk_adapters[flax]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ImportError')\n"
        "try:\n"
        "    import ntk_adapters.haiku\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'ntk_adapters[haiku]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
