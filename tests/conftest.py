"""Shared test configuration: float64 everywhere, so kernel comparisons are limited by the
mathematics (Monte Carlo error, quadrature) and not by float32 round-off."""

import jax

jax.config.update("jax_enable_x64", True)
