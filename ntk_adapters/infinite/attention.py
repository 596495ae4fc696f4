"""Multi-head dot-product self-attention at infinite width: its limits, and the kernel of one.

A head computes ``softmax(q kᵀ/sqrt(d) + mask) v`` with ``q = x W_Q + b_Q``, ``k = x W_K + b_K``,
``v = x W_V + b_V`` (``(T, d)`` each for a sequence of ``T`` positions and head dimension ``d``);
the ``H`` heads are concatenated and projected by ``W_O`` (fan-in ``H·d_v``). Let the input width
``D`` go to infinity with i.i.d. weights of variance ``σ²/D``: the channels of ``q``, ``k`` and
``v`` become independent Gaussian processes over positions, with kernels ``K_q = σ_Q² K + σ_bQ²``
(and likewise ``K_k``, ``K_v``; ``K`` the input's kernel between positions).

* **A fixed number of heads** (the unchanged ``nn.MultiHeadDotProductAttention``,
  ``nn.SelfAttention``, ``nnx.MultiHeadAttention``, ``hk.MultiHeadAttention``): each head's
  logits ``q_t·k_u/sqrt(d)`` stay random and are shared by all of the head's output channels,
  so the output is a mixture of Gaussian processes over ``H`` random attention matrices, not a
  Gaussian process. There is no NNGP/NTK limit; the engine refuses the layer by default.
* **Infinitely many heads, head dimension fixed** (``attention='infinite_heads'``; the
  ``H → ∞`` limit of Hron, Bahri, Sohl-Dickstein & Novak 2020, "Infinite attention: NNGP and NTK
  for deep attention networks", at the module's own ``d``): the width of the query, key and value
  projections ``H·d`` grows with ``D`` as when a Transformer is widened by adding heads. The heads
  are i.i.d. given the input, so the output is Gaussian with kernel (``A = softmax(G + mask)``
  row by row, ``G = q kᵀ/sqrt(d)``, the expectation over one head's ``q, k``: ``d`` i.i.d.
  Gaussian channels each)::

      nngp = σ_O² E[A K_v A'ᵀ] + σ_bO²

  and, in the standard parameterization with the actual widths (the engine's convention, see
  :func:`~ntk_adapters.infinite.layers.dense`), the NTK sums the output projection
  ``H·d_v · E[A K_v A'ᵀ] (+ 1)``, the path through the values ``σ_O² E[A Θ_v A'ᵀ]`` and the path
  through the logits ``σ_O² E[Σ K_v[u, u'] ⟨∂A[t, u], ∂A'[t', u']⟩]``, where
  ``⟨∂G[t, w], ∂G'[t', w']⟩ = ((k_w·k'_w') Θ_q[t, t'] + (q_t·q'_t') Θ_k[w, w']) / d`` (the query,
  key and value weights are independent, so the input's gradients along the three paths do not
  mix). These expectations have no closed form: :func:`infinite_heads` estimates them from
  ``n_samples`` heads whose ``q`` and ``k`` are drawn jointly over every example and position of
  the batch from their exact Gaussian law (not from a network), so the estimate is a positive
  semi-definite kernel whose error falls as ``1/sqrt(n_samples)``.
* **Scaling ``1/d`` with ``d → ∞``**: the logits converge to their mean, zero for independent
  query and key weights (uniform attention); neural-tangents' ``GlobalSelfAttention(
  linear_scaling=True)`` ties ``W_Q = W_K`` instead. Neither is what these modules compute.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ntk_adapters.infinite import layers as _layers
from ntk_adapters.infinite.kernel import Kernel

__all__ = ["AttentionWeights", "infinite_heads", "module_kernel", "no_limit_reason", "register_attention_rule"]


def register_attention_rule(module_type, rule, precheck) -> None:
    """Register a framework's attention rule: its output is a fresh random linear map (the output
    projection), and it reads masks, needs covariances between positions and samples."""
    from ntk_adapters.infinite import rules as _rules

    _rules.register_rule(module_type, rule, precheck=precheck, linear=True, masks=True, full_layout=True, samples=True)


def no_limit_reason(num_heads: int, head_dim: Optional[int]) -> str:
    """Why a multi-head attention layer with ``num_heads`` heads of dimension ``head_dim`` and the
    standard ``1/sqrt(head_dim)`` logit scaling has no infinite-width kernel as it stands, and which
    limit the engine offers (for :class:`~ntk_adapters.infinite.InfiniteWidthError` messages).

    Example::

        no_limit_reason(8, 64)   # 'multi-head attention with num_heads=8, head_dim=64 and ...'
    """
    dims = f"num_heads={num_heads}" + (f", head_dim={head_dim}" if head_dim is not None else "")
    return (
        f"multi-head attention with {dims} and the standard 1/sqrt(head_dim) logit scaling has no "
        "Gaussian infinite-width limit at a fixed number of heads: as the input width grows, each head's logits "
        "q·k/sqrt(head_dim) stay random and are shared by all of the head's output channels, so the output is a "
        "mixture of Gaussian processes, not one. A limit exists when the number of heads grows with the width "
        "(Hron et al. 2020, 'Infinite attention'): pass attention='infinite_heads' to infinite_kernel_fn for that "
        "kernel, an expectation over Gaussian logits estimated by sampling (attention_samples=, seed=; standard "
        "errors with get='nngp_stderr' / 'ntk_stderr')"
    )


class AttentionWeights:
    """The initial weight variances of one multi-head attention layer, as :func:`infinite_heads` reads them.

    Attributes:
      query, key, value, out: ``(σw², σb², has_bias)`` of each projection, ``σw² = fan_in·Var(W)``.
      fan_in: the input width ``D`` (fan-in of the query, key and value projections).
      num_heads: ``H``; head_dim: ``d`` (of queries and keys); value_dim: ``d_v``.
    """

    def __init__(self, *, query, key, value, out, fan_in: int, num_heads: int, head_dim: int, value_dim: int):
        self.query, self.key, self.value, self.out = query, key, value, out
        self.fan_in, self.num_heads, self.head_dim, self.value_dim = fan_in, num_heads, head_dim, value_dim


def _projection(k: Kernel, fan_in: int, spec) -> Kernel:
    w, b, has_bias = spec
    return _layers.dense(k, fan_in=fan_in, weight_var=w, bias_var=b, has_bias=has_bias)


def _sqrt_psd(c: jax.Array) -> jax.Array:
    """A square root ``L`` with ``L Lᵀ = c`` of a PSD matrix that may be singular (repeated tokens,
    identical examples): eigenvalues below zero from round-off are clipped."""
    lam, u = jnp.linalg.eigh(c)
    return u * jnp.sqrt(jnp.clip(lam, 0.0))


def _flat(a: jax.Array) -> jax.Array:
    """``(N, N, T, T)`` → ``(N·T, N·T)`` ordered ``(n, t)``."""
    n, _, t, _ = a.shape
    return jnp.transpose(a, (0, 2, 1, 3)).reshape(n * t, n * t)


def _contraction_terms(a, kv, y):
    """``Σ_{u,u',w,w'} D[t][u, w] kv[u, u'] D'[t'][u', w'] y[w, w']`` for every ``(n, n', t, t')``, with
    ``D[t][u, w] = ∂A[t, u]/∂G[t, w] = a_u (δ_uw − a_w)`` and ``a = A[n, t]``: four terms of ``T³`` each."""
    ay = jnp.einsum("ntu,nmuv->nmtv", a, y)  # (aᵀ y)[v] for each t
    ak = jnp.einsum("ntu,nmuv->nmtv", a, kv)
    ya = jnp.einsum("nmuv,mwv->nmuw", y, a)  # (y a')[u] for each t'
    ka = jnp.einsum("nmuv,mwv->nmuw", kv, a)
    first = jnp.einsum("ntu,nmuv,mwv->nmtw", a, kv * y, a)
    second = jnp.einsum("ntu,nmuw->nmtw", a, ka * ya)
    third = jnp.einsum("mwv,nmtv->nmtw", a, ak * ay)
    fourth = jnp.einsum("nmtv,mwv->nmtw", ak, a) * jnp.einsum("nmtv,mwv->nmtw", ay, a)
    return first - second - third + fourth


def infinite_heads(
    kernel: Kernel,
    weights: AttentionWeights,
    *,
    mask: Optional[jax.Array],
    n_samples: int,
    key: jax.Array,
    chunk: int = 16,
) -> Kernel:
    """The kernel of multi-head self-attention with infinitely many heads of the layer's head dimension.

    See the module docstring for the limit and the formulas. The expectations over one head's
    queries and keys are averaged over ``n_samples`` heads drawn jointly for every example and
    position of the batch (``chunk`` heads at a time, to bound memory).

    Args:
      kernel: the input's kernel in the ``'full'`` layout with one spatial (sequence) axis, for
        ``x2 = x1`` (``same_inputs``: the draws must be joint over all examples): ``nngp``
        ``(N, N, T, T)``.
      weights: the layer's :class:`AttentionWeights`.
      mask: ``(N, T, T)`` bool, ``mask[n, t, u]`` whether query ``t`` of example ``n`` may attend
        to key ``u`` (``None``: every pair); a fully masked row attends uniformly, as the modules
        compute it.
      n_samples: number of heads drawn (a multiple of ``chunk`` is used: it is rounded up).
      key: a PRNG key.

    Returns:
      The output's kernel, same layout, ``is_gaussian=True``.

    Example::

        w = AttentionWeights(query=(1.0, 0.0, True), key=(1.0, 0.0, True), value=(1.0, 0.0, True),
                             out=(1.0, 0.0, True), fan_in=64, num_heads=8, head_dim=8, value_dim=8)
        k_out = infinite_heads(k, w, mask=None, n_samples=512, key=jax.random.PRNGKey(0))
    """
    if kernel.layout != "full" or len(kernel.spatial) != 1 or not kernel.same_inputs:
        raise ValueError("infinite_heads needs a 'full' kernel with one sequence axis, for x2 = x1")
    d = int(weights.head_dim)
    kq = _projection(kernel, weights.fan_in, weights.query)
    kk = _projection(kernel, weights.fan_in, weights.key)
    kv = _projection(kernel, weights.fan_in, weights.value)
    track_ntk = kernel.ntk is not None
    n, _, t, _ = kernel.nngp.shape
    dtype = kernel.nngp.dtype
    lq, lk = _sqrt_psd(_flat(kq.nngp)), _sqrt_psd(_flat(kk.nngp))
    if mask is None:
        mask = jnp.ones((n, t, t), bool)
    big_negative = jnp.finfo(dtype).min
    n_chunks = max(1, -(-int(n_samples) // chunk))

    def one_chunk(carry, chunk_key):
        kq_key, kk_key = jax.random.split(chunk_key)
        zq = jax.random.normal(kq_key, (chunk, n * t, d), dtype)
        zk = jax.random.normal(kk_key, (chunk, n * t, d), dtype)
        q = jnp.einsum("ij,sjc->sic", lq, zq).reshape(chunk, n, t, d)
        k = jnp.einsum("ij,sjc->sic", lk, zk).reshape(chunk, n, t, d)
        logits = jnp.einsum("sntc,snuc->sntu", q, k) / jnp.sqrt(jnp.asarray(d, dtype))
        a = jax.nn.softmax(jnp.where(mask, logits, big_negative), axis=-1)
        sandwich = lambda m: jnp.einsum("sntu,nmuv,smwv->nmtw", a, m, a) / chunk  # noqa: E731
        acc = {"kv": sandwich(kv.nngp)}
        if track_ntk:
            acc["theta_v"] = sandwich(kv.ntk)
            kk_s = jnp.einsum("snwc,smvc->snmwv", k, k)
            qq_s = jnp.einsum("sntc,smuc->snmtu", q, q)
            through_q = jax.vmap(_contraction_terms, (0, None, 0))(a, kv.nngp, kk_s) * kq.ntk
            through_k = jax.vmap(_contraction_terms, (0, None, None))(a, kv.nngp, kk.ntk) * qq_s
            acc["logits"] = jnp.sum(through_q + through_k, axis=0) / (d * chunk)
        return jax.tree_util.tree_map(jnp.add, carry, acc), None

    zeros = jnp.zeros((n, n, t, t), dtype)
    init = {"kv": zeros, **({"theta_v": zeros, "logits": zeros} if track_ntk else {})}
    sums, _ = jax.lax.scan(one_chunk, init, jax.random.split(key, n_chunks))
    means = jax.tree_util.tree_map(lambda s: s / n_chunks, sums)
    o_w, o_b, o_has_bias = weights.out
    nngp = o_w * means["kv"] + o_b
    ntk = None
    if track_ntk:
        fan_in_out = weights.num_heads * weights.value_dim
        ntk = fan_in_out * means["kv"] + float(o_has_bias) + o_w * (means["theta_v"] + means["logits"])
    cov = jnp.einsum("nntu->ntu", nngp)
    return Kernel(nngp=nngp, ntk=ntk, cov1=cov, cov2=cov, layout="full", is_gaussian=True, same_inputs=True)


def module_kernel(kernel: Kernel, call, weights: AttentionWeights) -> Kernel:
    """The rule shared by the attention modules of every framework: checks what the limit needs
    (the option, the layout, one mask shared by the heads) and applies :func:`infinite_heads`.

    ``call`` is the module's :class:`~ntk_adapters.infinite.rules.ModuleCall`, registered with
    ``masks=True``; its masks broadcast to ``(N, heads, T, T)`` with nonzero entries kept.
    """
    if call.options.attention != "infinite_heads":
        raise call.error(no_limit_reason(weights.num_heads, weights.head_dim))
    if len(call.in_shape) != 2:
        raise call.error(
            f"its input has per-example shape {call.in_shape}; the attention limit takes sequences (T, features)"
        )
    if kernel.layout != "full" or not kernel.same_inputs:
        raise call.error(
            "attention with infinitely many heads needs the covariances between positions: use "
            "spatial_layout='auto' or 'full'"
        )
    n, t = kernel.nngp.shape[0], call.in_shape[0]
    mask = None
    for m1, _ in call.masks:
        m = jnp.asarray(m1)
        if m.ndim < 2 or m.ndim > 4 or m.shape[-2:] != (t, t) or (m.ndim == 4 and m.shape[0] not in (1, n)):
            raise call.error(
                f"it receives an array of shape {m.shape} that is not a parameter; the rule reads such arrays "
                f"as attention masks, which broadcast to (batch, heads, {t}, {t})"
            )
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if m.shape[1] != 1:
            raise call.error("its mask differs between heads; the limit needs one mask shared by all heads")
        m = jnp.broadcast_to(m[:, 0] != 0, (n, t, t))
        mask = m if mask is None else mask & m
    return infinite_heads(kernel, weights, mask=mask, n_samples=call.options.attention_samples, key=call.key)
