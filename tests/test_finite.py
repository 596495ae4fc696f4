"""NaN/Inf checks: host arrays are read in place, accelerator arrays reduced by one device program
(forced here on the CPU); both paths name what they refuse."""

import jax.numpy as jnp
import numpy as np
import pytest

import ntk_adapters.finite as F
from ntk_adapters.predict import checks as predict_checks


@pytest.fixture(params=["host", "device"])
def where(request, monkeypatch):
    if request.param == "device":
        monkeypatch.setattr(F, "_in_host_memory", lambda leaf: False)
    return request.param


def test_non_finite_leaves_are_named_wherever_they_live(where):
    good = {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}
    F.check_finite(good, "params", jnp.ones((4, 3)), "x1")
    with pytest.raises(ValueError, match=r"params at \['b'\] contains NaN or Inf"):
        F.check_finite({**good, "b": good["b"].at[1, 0].set(jnp.inf)}, "params", jnp.ones((4, 3)), "x1")
    with pytest.raises(ValueError, match=r"^x1 contains NaN or Inf"):
        F.check_finite(good, "params", np.full((4, 3), np.nan), "x1")


def test_flags_mark_each_array_and_skip_integers(where):
    leaves = [jnp.ones(2), jnp.array([1.0, jnp.nan]), np.array([np.inf]), jnp.arange(3)]
    assert F.finite_flags(leaves).tolist() == [True, False, False, True]


def test_predictor_inputs_count_their_non_finite_entries(where):
    k = jnp.eye(3).at[0, 1].set(jnp.nan).at[2, 2].set(-jnp.inf)
    predict_checks.check_finite(jnp.eye(3), "k_train_train")
    with pytest.raises(ValueError, match=r"k_train_train \(shape \(3, 3\)\) has 2 non-finite entries"):
        predict_checks.check_finite(k, "k_train_train")
