"""Evaluation: the ELBO and its parts over a dataset.

Shapes: B batch, D data, Z latent, K importance samples. Values in nats per example.
"""
import numpy as np


def batches(n, batch_size):
    """Slices that cover range(n) in order, batch_size at a time."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def elbo_stats(model, x, rng, batch_size=1000):
    """Mean ELBO, reconstruction log p(x|z) and KL over x (N, D), one sample of z per example.

    Returns a dict with keys elbo, recon, kl (nats per example, as floats) and n.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, D) array, got shape {x.shape}")
    sums = np.zeros(2)
    for s in batches(x.shape[0], batch_size):
        log_px_z, kl = model.elbo_terms(x[s], rng=rng)
        sums += np.sum(log_px_z, dtype=np.float64), np.sum(kl, dtype=np.float64)
    recon, kl = sums / x.shape[0]
    return {"elbo": float(recon - kl), "recon": float(recon), "kl": float(kl), "n": int(x.shape[0])}
