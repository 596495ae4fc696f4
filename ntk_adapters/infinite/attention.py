"""Multi-head dot-product attention at infinite width: which limits exist (framework-free).

A head computes ``softmax(q kᵀ · s + mask) v`` with ``q = x W_Q``, ``k = x W_K``, ``v = x W_V``
(``(T, d)`` each for a sequence of ``T`` positions and head dimension ``d``), and the heads are
concatenated and projected by ``W_O``. Let the input width ``D`` (the fan-in of the query, key and
value projections) go to infinity with i.i.d. weights of variance ``σ²/D``: ``q`` and ``k`` become
Gaussian over positions, with covariance ``σ_Q² K(t, t')`` and ``σ_K² K(t, t')`` (``K`` the input's
kernel between positions) and independent of each other.

* **Standard scaling ``s = 1/sqrt(d)``, a fixed number of heads ``H``** (what ``nn.MultiHeadDotProductAttention``,
  ``nn.SelfAttention``, ``nnx.MultiHeadAttention`` and ``hk.MultiHeadAttention`` compute by
  default): each logit ``q_t·k_u/sqrt(d)`` stays random (a sum of ``d`` products of Gaussian
  entries; Gaussian only if ``d`` also grows) and all output channels of a head share the same
  random attention matrix. The output is a mixture of Gaussian processes over those ``H`` random
  matrices, not a Gaussian process: there is no NNGP/NTK limit, and the engine refuses the layer.
* **``H → ∞`` heads** (Hron, Bahri, Sohl-Dickstein & Novak 2020, "Infinite attention: NNGP and NTK
  for deep attention networks"): given the input, the output is Gaussian with covariance
  ``σ_O² σ_V² · (1/H) Σ_h A_h K A'_hᵀ``, whose average over the i.i.d. heads converges to
  ``E[softmax(G) K softmax(G')ᵀ]`` over the logits ``G`` (Gaussian when ``d → ∞``): a Gaussian
  process whose kernel is an expectation over logits with no closed form (it needs sampling).
* **Scaling ``s = 1/d`` with ``d → ∞``**: the logits converge to their mean. For independent query
  and key weights (the unchanged modules above) that mean is zero, so the attention becomes
  uniform over the unmasked keys; neural-tangents' ``GlobalSelfAttention(linear_scaling=True)``
  ties ``W_Q = W_K``, giving ``softmax(σ² K)``.

The engine implements neither limit for these modules yet: :func:`no_limit_reason` is the
message of the refusal.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["no_limit_reason"]


def no_limit_reason(num_heads: int, head_dim: Optional[int]) -> str:
    """Why a multi-head attention layer with ``num_heads`` heads of dimension ``head_dim`` and the
    standard ``1/sqrt(head_dim)`` logit scaling has no infinite-width kernel, and which
    configurations have one (for :class:`~ntk_adapters.infinite.InfiniteWidthError` messages).

    Example::

        no_limit_reason(8, 64)   # 'multi-head attention with num_heads=8, head_dim=64 and ...'
    """
    dims = f"num_heads={num_heads}" + (f", head_dim={head_dim}" if head_dim is not None else "")
    return (
        f"multi-head attention with {dims} and the standard 1/sqrt(head_dim) logit scaling has no "
        "Gaussian infinite-width limit: as the input width grows, each head's logits q·k/sqrt(head_dim) stay "
        "random and are shared by all of the head's output channels, so the output is a mixture of Gaussian "
        "processes, not one. Limits exist (Hron et al. 2020, 'Infinite attention') when the number of heads "
        "goes to infinity with the width (the kernel is an expectation of softmax(G) K softmax(G')ᵀ over "
        "Gaussian logits G), or with a 1/head_dim logit scaling as head_dim grows (the logits converge to "
        "their mean: uniform attention for independent query and key weights); the engine implements "
        "neither for this layer"
    )
