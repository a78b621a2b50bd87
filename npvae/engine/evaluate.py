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


# Examples read (and converted to the model's dtype) at a time: 31 MB of float32 at D = 784, so that
# a test set of any length, memory-mapped or prepared as it is read, takes no more memory than this.
STREAM_ROWS = 10000


def log_likelihood(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None, q=None,
                   threads="auto"):
    """evaluate.log_likelihood (which see for the arguments), on `threads` threads ("auto": as
    npvae.engine.parallel.resolve_threads): x (N, D) -> (N,) float64 estimates of log p(x).

    x is read STREAM_ROWS examples at a time, each block split over the threads: x may be larger
    than memory (a memory-mapped array, or engine.binarize.PreparedRows). Every example draws its
    noise from its own stream, seeded in order from rng, so the blocks change no estimate.
    A HierarchicalVAE goes to npvae.engine.hierarchical.log_likelihood (q is for one layer only), a VAE
    whose posterior is not the diagonal one to evaluate.log_likelihood on one thread."""
    hierarchical = hasattr(model, "z_dims")
    if hierarchical and q is not None:
        raise ValueError("q applies to a one-layer VAE; a HierarchicalVAE's proposal is its own q chain")
    if not hierarchical and model.posterior != "diagonal":   # FastVAE has the diagonal q only: the reference, on one thread
        return evaluate.log_likelihood(model, x, k, rng, batch_size, chunk, progress, q)
    k = evaluate._check_positive_int("k", k)
    N = evaluate._check_stored(x)[0]
    rng = evaluate._check_rng(rng)
    q = None if q is None else evaluate._check_q(model, q, N)
    if not hierarchical:
        model = model if isinstance(model, FastVAE) else FastVAE.like(model)
    log_px = np.empty(N)
    for s in evaluate.batches(N, STREAM_ROWS):
        xs = model._as_x(x[s])
        done = None if progress is None else functools.partial(_offset_progress, progress, s.start, N)
        if hierarchical:
            from .hierarchical import log_likelihood as hierarchical_log_likelihood
            log_px[s] = hierarchical_log_likelihood(model, xs, k, rng, batch_size, chunk, done, threads)
        else:
            log_px[s] = _log_likelihood_in_memory(model, xs, k, evaluate._noise_seeds(rng, xs.shape[0]),
                                                  None if q is None else (q[0][s], q[1][s]), batch_size, chunk,
                                                  done, threads)
    return log_px


def _offset_progress(progress, start, total, done, _):
    progress(start + done, total)


def _log_likelihood_in_memory(fast, x, k, seeds, q, batch_size, chunk, progress, threads):
    """log_likelihood of a block x (n, D) of the model's dtype, examples seeded by seeds (n,), split over threads."""
    n = min(parallel.resolve_threads(threads), x.shape[0])
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
    zeros = np.zeros((evaluate._check_stored(x)[0], model.z_dim), dtype=model.dtype)
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
