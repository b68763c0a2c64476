"""The SVD core shared by the SVD family (KaSA, PiSSA, SVFit, SORSA, CorDA, SALT): float32 decompositions of a
frozen kernel and the low-rank corrections that stand beside the base weight instead of rewriting it.

Imports jax only. Flax layout throughout: a kernel W0 is (n_in, n_out) and W0 = P diag(sigma) Q^T with
P (n_in, k), sigma (k,) descending, Q (n_out, k), k = min(n_in, n_out). The decompositions run inside the jitted,
layer-scanned adapter init, so every targeted weight of a stacked model is decomposed in one compiled program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpeft.errors import AdapterError


def check_rank(method: str, r: int, kernel: jax.Array) -> None:
    """A clear error when a method takes r singular directions of a weight that has fewer than r."""
    n_in, n_out = kernel.shape
    if r > min(n_in, n_out):
        raise AdapterError(f"{method} needs r <= min(n_in, n_out): r={r} on a {n_in}x{n_out} weight; lower adapter.r "
                           "or exclude this module")


def svd_f32(kernel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(P (n_in, k), sigma (k,), Q (n_out, k)) of kernel (n_in, n_out), computed in float32 whatever the storage
    dtype (bf16 weights are upcast first), singular values descending."""
    u, s, vh = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    return u, s, vh.T


def randomized_svd_f32(kernel: jax.Array, rank: int, niter: int, rng: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top `rank` triplets (P (n_in, rank), sigma (rank,), Q (n_out, rank)) by a randomized range finder with
    `niter` subspace (power) iterations (Halko et al. 2011; what PiSSA's `pissa_niter_k` and torch.svd_lowrank do).
    Float32; approximate: more iterations get closer to the exact top triplets."""
    w = kernel.astype(jnp.float32)
    n_in, n_out = w.shape
    q = jax.random.normal(rng, (n_out, rank), jnp.float32)
    y, _ = jnp.linalg.qr(w @ q)  # (n_in, rank): a basis of W's leading column space
    for _ in range(niter):
        z, _ = jnp.linalg.qr(w.T @ y)
        y, _ = jnp.linalg.qr(w @ z)
    u_small, s, vh = jnp.linalg.svd(y.T @ w, full_matrices=False)  # (rank, rank), (rank,), (rank, n_out)
    return y @ u_small, s, vh.T


def orthogonality_gap(m: jax.Array, rows: bool) -> jax.Array:
    """||M M^T - I||_F (rows=True: the rows of M should be orthonormal) or ||M^T M - I||_F (columns), float32,
    without squaring the norm."""
    m = m.astype(jnp.float32)
    gram = m @ m.T if rows else m.T @ m
    return jnp.sqrt(jnp.sum(jnp.square(gram - jnp.eye(gram.shape[0], dtype=jnp.float32))))
