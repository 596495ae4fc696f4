"""The documentation against the code: every public name is in the API reference, the README's
example runs and prints what it says, and the docstring examples listed here run.

Docstring examples are ``Example::`` blocks. The ones listed in ``DOCSTRING_EXAMPLES`` are
executed with the names they assume (``model``, ``x1``, ...) bound to small values; where a block
states a concrete value in a comment, the check compares it with a value derived here, not with
the library's output. Blocks that need a whole application around them (a ResNet, a tokenizer)
are not run; ``test_listed_examples_exist`` keeps the list honest about which ones are.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"
PUBLIC_NAMESPACES = [
    "ntk_adapters",
    "ntk_adapters.infinite",
    "ntk_adapters.predict",
    "ntk_adapters.flax",
    "ntk_adapters.haiku",
]

_DIRECTIVE = re.compile(
    r"^\s*\.\. (?:auto(?:function|class|exception|data|module|method|attribute)|py:data|currentmodule)::\s*(\S+)",
    re.M,
)


def _documented_names() -> set[str]:
    """Fully qualified names that the API pages document (``currentmodule`` applied)."""
    names = set()
    for page in sorted(API_DIR.glob("*.rst")):
        current = ""
        for line in page.read_text(encoding="utf-8").splitlines():
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            target = m.group(1)
            if "currentmodule::" in line:
                current = target
            elif "automodule::" in line or "." in target and target.split(".")[0] == "ntk_adapters":
                names.add(target)
            else:
                names.add(f"{current}.{target}" if current else target)
    return names


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def _public_symbols():
    for namespace in PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            yield namespace, name, getattr(module, name)


def test_every_public_symbol_is_in_the_api_reference():
    documented = _documented_names()
    objects = []
    for name in documented:
        try:
            objects.append(_resolve(name))
        except (ImportError, AttributeError) as err:
            raise AssertionError(f"docs/api names {name!r}, which does not exist: {err}") from err
    missing = []
    for namespace, name, obj in _public_symbols():
        qualified = f"{namespace}.{name}"
        if qualified in documented:
            continue
        # Constants are documented by name; everything else may be documented once, under any
        # public name of the same object (ntk_adapters.Kernel is ntk_adapters.infinite.Kernel).
        if isinstance(obj, (str, int, float)) or not any(o is obj for o in objects):
            missing.append(qualified)
    assert not missing, f"public names missing from docs/api/*.rst: {missing}"


@pytest.mark.parametrize("namespace", PUBLIC_NAMESPACES)
def test_every_public_symbol_has_a_docstring(namespace):
    module = importlib.import_module(namespace)
    assert inspect.getdoc(module), f"{namespace} has no module docstring"
    undocumented = [
        name
        for name in module.__all__
        if not isinstance(getattr(module, name), (str, int, float)) and not inspect.getdoc(getattr(module, name))
    ]
    assert not undocumented, f"{namespace}: no docstring for {undocumented}"


def test_the_checker_sees_a_missing_name(tmp_path):
    # The coverage test must be able to fail: with one page removed its names are reported.
    for page in API_DIR.glob("*.rst"):
        if page.name != "predict.rst":
            (tmp_path / page.name).write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    globals_ = globals()
    saved = globals_["API_DIR"]
    globals_["API_DIR"] = tmp_path
    try:
        with pytest.raises(AssertionError, match="gradient_descent_mse"):
            test_every_public_symbol_is_in_the_api_reference()
    finally:
        globals_["API_DIR"] = saved


# ------------------------------------------------------------------------------------------------
# README


def test_readme_example_runs_and_prints_what_its_comment_says():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    code = blocks[0]
    printed = [line for line in code.splitlines() if line.startswith("print(") and "#" in line]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == len(printed)
    for line, source in zip(lines, printed):
        assert line.strip() == source.split("#", 1)[1].strip()


def test_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


# ------------------------------------------------------------------------------------------------
# Docstring examples


def _example_block(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    m = re.search(r"Example[^\n]*::\n\n((?:[ \t]+\S[^\n]*\n|[ \t]*\n)+)", doc + "\n")
    assert m, f"{obj!r} has no Example:: block"
    return textwrap.dedent(m.group(1))


def _mlp_model():
    import flax.linen as nn

    import ntk_adapters.flax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(32)(x)))

    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    return ntk_adapters.flax.adapt(MLP(), None, x), x


def _setup_kernels():
    model, x = _mlp_model()
    return {"model": model, "x": x, "x1": x, "x2": x[:4] + 1.0, "x_train": x, "x_test": x[:3] - 1.0}


def _setup_predict():
    import ntk_adapters

    model, x = _mlp_model()
    x_test = x[:3] - 1.0
    ntk = ntk_adapters.empirical_ntk_fn(model)
    kernel_fn = ntk_adapters.infinite_kernel_fn(model)
    y = jnp.sin(x[:, :2])
    return {
        "ntk_train_train": ntk(x),
        "ntk_test_train": ntk(x_test, x),
        "y_train": y,
        "fx_train_0": model(model.params, x),
        "fx_test_0": model(model.params, x_test),
        "y_onehot": jax.nn.one_hot(jnp.arange(6) % 2, 2),
        "kernel_fn": kernel_fn,
        "x_train": x,
        "x_test": x_test,
        "x1": x,
        "x2": x_test,
        "kernels_train": kernel_fn(x),
        "kernels_test_train": kernel_fn(x_test, x),
        "kernels_test_test": kernel_fn(x_test),
    }


def _check_adapt(ns):
    assert ns["model"].output_shape == (2,)


def _check_mse_loss(ns):
    from ntk_adapters.dynamics import mse_loss

    assert float(mse_loss(jnp.zeros((4, 3)), jnp.ones((4, 3)))) == 0.5  # ½·mean of 1s


def _check_moments(ns):
    from ntk_adapters.infinite import initializers

    mean, var = initializers.moments(jax.nn.initializers.lecun_normal(), (64, 32))
    assert mean == 0.0 and math.isclose(var, 1 / 64, rel_tol=1e-9)  # Var = 1/fan_in


def _check_variance(ns):
    from ntk_adapters.infinite import initializers

    assert math.isclose(initializers.variance(jax.nn.initializers.he_normal(), (128, 64)), 2 / 128, rel_tol=1e-9)


def _check_elementwise_fn(ns):
    np.testing.assert_allclose(ns["f"](jnp.array([-1.0, 2.0])), [-0.2, 2.0], rtol=1e-6)


def _check_gaussian_variance(ns):
    np.testing.assert_allclose(ns["q"], [0.5, 2.0], rtol=1e-6)  # E relu(u)² = q/2


def _check_relu_expectations(ns):
    theta = math.acos(0.5)
    np.testing.assert_allclose(ns["nngp"], (math.sin(theta) + (math.pi - theta) * 0.5) / (2 * math.pi), rtol=1e-5)
    np.testing.assert_allclose(ns["dd"], 1 / 3, rtol=1e-5)


def _check_input_kernel(ns):
    assert ns["k"].nngp.shape == (4, 4, 8, 8, 8, 8) and ns["k"].cov1.shape == (4, 8, 8, 8, 8)


def _check_conv(ns):
    assert ns["k"].nngp.shape == (4, 4, 4, 4)


def _check_dense(ns):
    x = np.asarray(ns["x"], np.float64)
    np.testing.assert_allclose(ns["k"].nngp, 2 * x @ x.T / x.shape[1], rtol=1e-5)


def _check_coupling(ns):
    assert "reduce_sum" in ns["_"] and "batch axis" in ns["_"]


def _check_linearize(ns):
    model, x = ns["model"], ns["x"]
    np.testing.assert_allclose(ns["lin"](model.params, x), model(model.params, x), rtol=1e-6, atol=1e-6)


def _layers_setup():
    return {"x": jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))}


# (module, attribute, setup, check); attribute None: the module docstring.
DOCSTRING_EXAMPLES = [
    ("ntk_adapters.model", "adapt", dict, _check_adapt),
    (
        "ntk_adapters.model",
        "Model",
        lambda: {"w": jnp.ones((3, 2)), "x": jnp.ones((4, 3)), "ntk_adapters": importlib.import_module("ntk_adapters")},
        None,
    ),
    ("ntk_adapters.empirical", "empirical_ntk_fn", _setup_kernels, None),
    ("ntk_adapters.empirical", "empirical_nngp_fn", _setup_kernels, None),
    ("ntk_adapters.empirical", "empirical_kernel_fn", _setup_kernels, None),
    ("ntk_adapters.monte_carlo", "monte_carlo_kernel_fn", _setup_kernels, None),
    ("ntk_adapters.linearize", "linearize", _setup_kernels, _check_linearize),
    (
        "ntk_adapters.linearize",
        "taylor_expand",
        lambda: {**_setup_kernels(), "new_params": _mlp_model()[0].params},
        None,
    ),
    ("ntk_adapters.dynamics", "mse_loss", dict, _check_mse_loss),
    ("ntk_adapters.independence", "find_batch_coupling", dict, _check_coupling),
    ("ntk_adapters.predict.mse", "gradient_descent_mse", _setup_predict, None),
    (
        "ntk_adapters.predict.mse",
        "max_learning_rate",
        lambda: {**_setup_predict(), "optax": importlib.import_module("optax")},
        None,
    ),
    ("ntk_adapters.predict.ode", "gradient_descent", _setup_predict, None),
    ("ntk_adapters.predict.ensemble", "gp_inference", _setup_predict, None),
    ("ntk_adapters.predict.ensemble", "gradient_descent_mse_ensemble", _setup_predict, None),
    ("ntk_adapters.infinite.engine", "expand_outputs", _setup_predict, None),
    ("ntk_adapters.infinite.initializers", None, dict, _check_moments),
    ("ntk_adapters.infinite.initializers", "variance", dict, _check_variance),
    ("ntk_adapters.infinite.elementwise", "elementwise_fn", dict, _check_elementwise_fn),
    ("ntk_adapters.infinite.elementwise", "gaussian_expectations", dict, _check_relu_expectations),
    ("ntk_adapters.infinite.elementwise", "gaussian_variance", dict, _check_gaussian_variance),
    ("ntk_adapters.infinite.layers", "input_kernel", dict, _check_input_kernel),
    (
        "ntk_adapters.infinite.layers",
        "dense",
        lambda: {"x": jax.random.normal(jax.random.PRNGKey(1), (5, 3))},
        _check_dense,
    ),
    ("ntk_adapters.infinite.layers", "conv", _layers_setup, _check_conv),
]


def _example_id(case):
    return f"{case[0]}.{case[1] or '<module>'}"


def test_listed_examples_exist():
    for module_name, attr, _, _ in DOCSTRING_EXAMPLES:
        module = importlib.import_module(module_name)
        _example_block(getattr(module, attr) if attr else module)


@pytest.mark.parametrize("case", DOCSTRING_EXAMPLES, ids=_example_id)
def test_docstring_example_runs(case):
    module_name, attr, setup, check = case
    module = importlib.import_module(module_name)
    obj = getattr(module, attr) if attr else module
    code = _example_block(obj)
    # A bare expression's value is kept in `_` (as an interactive session would show it).
    lines = code.rstrip().splitlines()
    ns = {name: getattr(module, name) for name in getattr(module, "__all__", dir(module))}
    ns.update({"jax": jax, "jnp": jnp, "np": np, "ntk_adapters": importlib.import_module("ntk_adapters")})
    ns.update(setup())
    exec(compile(code, f"{module_name}.{attr} example", "exec"), ns)
    statements = [line for line in lines if line.split("#", 1)[0].strip()]
    last = statements[-1].split("#", 1)[0].strip()
    if last and not last.startswith(("print(", "import ", "from ")) and "=" not in last.split("(")[0]:
        ns["_"] = eval(compile(last, "last line", "eval"), ns)
    if check is not None:
        check(ns)


def test_batch_docstring_doctest():
    import doctest

    from ntk_adapters import batching

    parser = doctest.DocTestParser()
    test = parser.get_doctest(batching.batch.__doc__, {"batch": batching.batch, "jnp": jnp}, "batch", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples and runner.failures == 0
