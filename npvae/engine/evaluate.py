"""The engine's log p(x): npvae.evaluate.log_likelihood with the examples split over threads.

Every example draws its noise from its own stream (evaluate._noise_seeds), so
the estimates are the reference's whatever the split, to float rounding: the
threads run FastVAE's Bernoulli kernel (kernels.bernoulli_log_prob, into a
work buffer kept from chunk to chunk) where the reference runs
distributions.bernoulli_log_prob. tests/test_engine_evaluate.py holds the two
against each other.
"""
import functools
import threading

import numpy as np

from .. import evaluate
from . import parallel
from .model import FastVAE, twin


def log_likelihood(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None, q=None,
                   threads="auto"):
    """evaluate.log_likelihood (which see for the arguments), on `threads` threads ("auto": as
    npvae.engine.parallel.resolve_threads): x (N, D) -> (N,) float64 estimates of log p(x).

    A HierarchicalVAE goes to npvae.engine.hierarchical.log_likelihood (q is for one layer only), a VAE
    whose posterior is not the diagonal one to evaluate.log_likelihood on one thread."""
    if hasattr(model, "z_dims"):
        if q is not None:
            raise ValueError("q applies to a one-layer VAE; a HierarchicalVAE's proposal is its own q chain")
        from .hierarchical import log_likelihood as hierarchical_log_likelihood
        return hierarchical_log_likelihood(model, x, k, rng, batch_size, chunk, progress, threads)
    if model.posterior != "diagonal":   # FastVAE has the diagonal q only: the reference, on one thread
        return evaluate.log_likelihood(model, x, k, rng, batch_size, chunk, progress, q)
    k = evaluate._check_positive_int("k", k)
    x = model._as_x(x)
    rng = evaluate._check_rng(rng)
    q = None if q is None else evaluate._check_q(model, q, x.shape[0])
    n = min(parallel.resolve_threads(threads), x.shape[0])
    seeds = evaluate._noise_seeds(rng, x.shape[0])
    fast = model if isinstance(model, FastVAE) else FastVAE.like(model)
    if n <= 1:
        return evaluate.log_likelihood_of_seeds(fast, x, k, seeds, q, batch_size, chunk, progress)
    if progress is not None:  # each thread reports its own examples; progress sees the total
        progress = _SharedProgress(progress, x.shape[0])
    parts = []
    for j, (a, b) in enumerate(parallel.ranges(x.shape[0], n)):
        part_q = None if q is None else (q[0][a:b], q[1][a:b])
        parts.append(functools.partial(evaluate.log_likelihood_of_seeds, fast if j == 0 else twin(fast), x[a:b],
                                       k, seeds[a:b], part_q, batch_size, chunk,
                                       None if progress is None else progress.part(j)))
    workers = parallel.Workers(n)
    try:
        return np.concatenate(workers.run(parts))
    finally:
        workers.close()


def log_likelihood_prior(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None, threads="auto"):
    """evaluate.log_likelihood_prior (the prior as proposal), on `threads` threads."""
    x = model._as_x(x)
    zeros = np.zeros((x.shape[0], model.z_dim), dtype=model.dtype)
    return log_likelihood(model, x, k, rng, batch_size, chunk, progress, q=(zeros, zeros), threads=threads)


class _SharedProgress:
    """Calls progress(done, N) with the examples done by all threads together."""

    def __init__(self, progress, total):
        self.progress, self.total = progress, total
        self.done = {}
        self.lock = threading.Lock()

    def part(self, j):
        def report(done, _):
            with self.lock:
                self.done[j] = done
                self.progress(sum(self.done.values()), self.total)
        return report
