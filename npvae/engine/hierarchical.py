"""The engine's log p(x) for a HierarchicalVAE: npvae.hierarchical.log_likelihood with the examples
split over threads.

Each example draws its noise from its own stream (evaluate._noise_seeds), so
the estimates equal the reference's whatever the split: each thread runs
hierarchical.log_likelihood_of_seeds on its examples with a twin of the model
(the same parameters, its own layer caches). tests/test_hierarchical.py holds
the two against each other.
"""
import functools

import numpy as np

from .. import evaluate, hierarchical
from . import parallel
from .evaluate import _SharedProgress
from .model import BoundDense, KernelLogPxZ, twin


def log_likelihood(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None, threads="auto"):
    """hierarchical.log_likelihood (which see) on `threads` threads: x (N, D) -> (N,) float64."""
    k = evaluate._check_positive_int("k", k)
    x = model._as_x(x)
    rng = evaluate._check_rng(rng)
    n = min(parallel.resolve_threads(threads), x.shape[0])
    seeds = evaluate._noise_seeds(rng, x.shape[0])
    if n <= 1:
        return hierarchical.log_likelihood_of_seeds(model, x, k, seeds, batch_size, chunk, progress)
    if progress is not None:   # each thread reports its own examples; progress sees the total
        progress = _SharedProgress(progress, x.shape[0])
    parts = [functools.partial(hierarchical.log_likelihood_of_seeds, model if j == 0 else _twin(model), x[a:b], k,
                               seeds[a:b], batch_size, chunk, None if progress is None else progress.part(j))
             for j, (a, b) in enumerate(parallel.ranges(x.shape[0], n))]
    workers = parallel.Workers(n)
    try:
        return np.concatenate(workers.run(parts))
    finally:
        workers.close()


def _twin(model):
    """engine.model.twin, with a work buffer of its own (a FastHierarchicalVAE's is per thread)."""
    other = twin(model)
    other._work = None
    return other


class FastHierarchicalVAE(KernelLogPxZ, hierarchical.HierarchicalVAE):
    """npvae.hierarchical.HierarchicalVAE with the engine's layers and Bernoulli kernel; the same numbers.

    Its Dense layers are engine.model.BoundDense (unbound: the bias gradient summed by BLAS,
    kernels.column_sums) and a Bernoulli log p(x|z_1) is kernels.bernoulli_log_prob (KernelLogPxZ, as in
    FastVAE). Everything else is the reference's: HierarchicalVAE.forward, backward,
    forward_iwae, backward_iwae (tests/test_hierarchical.py holds them equal).
    """

    dense_layer = BoundDense
