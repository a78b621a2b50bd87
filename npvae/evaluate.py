"""Evaluation: the ELBO, log p(x) by importance sampling and by quadrature, the gaps, active units.

    elbo      = E_q[log p(x|z)] - KL(q(z|x) || p(z))                          <= log p(x)
    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,  z_k ~ q(z|x)
    log p(x)  = log integral p(x|z) p(z) dz       (a grid in z, for Z = 1 or 2)
    log p(x)  = elbo + KL(q(z|x) || p(z|x))

The importance-sampled estimate is a stochastic lower bound on log p(x) (its
expectation is the IWAE bound with K samples, Burda et al. 2015) and tends to
log p(x) as K grows. With K = 1 it is the single-sample ELBO.

Cremer, Li & Duvenaud (2018) split the gap between log p(x) and the encoder's ELBO:

    amortization gap  = ELBO(q*) - ELBO(q_encoder)     q* = the best q(z|x) fitted to x alone
    approximation gap = log p(x) - ELBO(q*)            what a diagonal Gaussian cannot capture

Shapes: N examples, B a batch of them, D data, H hidden, Z latent, K importance
samples, G grid points. Values are in nats per example.
"""
import dataclasses
import math

import numpy as np
from scipy.special import logsumexp, ndtr

from . import distributions as dist
from .model import _all_samples, _check_positive_int, _per_sample
from .optim import Adam

# Upper bound on the entries of one (rows, width) array of a network pass, width
# = max(D, H). 2**20 floats are 4 MB in float32: with K = 5000 on 784-dimensional
# data one pass decodes 1337 samples of one example, which keeps the matrix
# products large enough to run at full speed while the elementwise work on the
# (rows, D) logits stays in cache (measured faster than passes 4x as large).
CHUNK_FLOATS = 2 ** 20


def batches(n, batch_size):
    """Slices that cover range(n) in order, batch_size at a time."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _check_stored(x, name="x"):
    """x must be non-empty (N, D) rows; they are read batch by batch, never all at once -> x's shape."""
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "__getitem__"):
        raise TypeError(f"{name} must be an (N, D) array, or rows that slice into arrays, got {type(x).__name__}")
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(shape)}")
    return tuple(shape)


def elbo_stats(model, x, rng, batch_size=1000):
    """Mean ELBO, reconstruction log p(x|z) and KL over x (N, D), one sample of z per example.

    x is read batch_size rows at a time, so it may be larger than memory: a memory-mapped
    array, or rows prepared as they are read (engine.binarize.PreparedRows).
    Returns a dict with keys elbo, recon, kl (nats per example, as floats) and n.
    """
    _check_stored(x)
    sums = np.zeros(2)
    for s in batches(x.shape[0], batch_size):
        log_px_z, kl = model.elbo_terms(x[s], rng=rng)
        sums += np.sum(log_px_z, dtype=np.float64), np.sum(kl, dtype=np.float64)
    recon, kl = sums / x.shape[0]
    return {"elbo": float(recon - kl), "recon": float(recon), "kl": float(kl), "n": int(x.shape[0])}


# --- argument checks -------------------------------------------------------------------

def _check_rng(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_optional_int(name, value):
    return None if value is None else _check_positive_int(name, value)


def _check_q(model, q, n):
    """q = (mu, log_sigma), each (N, Z), as float arrays of the model's dtype."""
    if not (isinstance(q, (tuple, list)) and len(q) == 2):
        raise TypeError("q must be a pair (mu, log_sigma) of (N, Z) arrays")
    out = []
    for name, a in zip(("mu", "log_sigma"), q):
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.shape != (n, model.z_dim):
            raise ValueError(f"q's {name} must be a float array of shape {(n, model.z_dim)}, "
                             f"got {a.dtype} {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"q's {name} contains NaN or infinite values")
        out.append(a.astype(model.dtype, copy=False))
    return tuple(out)


def _check_local_q(model, q, n):
    """q: per-example parameters of the model's family in local_q's form, n rows each, finite."""
    shapes = {"mu": (model.z_dim,), "log_sigma": (model.z_dim,), **{h: (w,) for h, w in model.q.heads.items()},
              **{name: a.shape[1:] for name, a in model.q.per_example(model.params, 1).items()}}
    if not isinstance(q, dict) or set(q) != set(shapes):
        raise ValueError(f"q must be a dict with the entries {sorted(shapes)} of the {model.posterior!r} family "
                         f"(evaluate.local_q), got {sorted(q) if isinstance(q, dict) else type(q).__name__}")
    for name, a in q.items():
        a = np.asarray(a)
        if a.dtype.kind != "f" or a.shape != (n,) + shapes[name]:
            raise ValueError(f"q's {name} must be a float array of shape {(n,) + shapes[name]}, got {a.dtype} {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"q's {name} contains NaN or infinite values")
    return {name: np.asarray(a) for name, a in q.items()}


def _width(model):
    """The widest layer output a pass stores per row: max(D, H)."""
    return max((model.x_dim,) + model.hidden)


def chunk_sizes(model, n, k, batch_size=None, chunk=None):
    """(B', K'): examples per pass and samples per pass, so that B' * K' * max(D, H) <= CHUNK_FLOATS.

    Either may be given; the other is then chosen to fit. K' = min(k, rows that
    fit) fills a pass with one example's samples before taking more examples.
    """
    n, k = _check_positive_int("n", n), _check_positive_int("k", k)
    batch_size, chunk = _check_optional_int("batch_size", batch_size), _check_optional_int("chunk", chunk)
    rows = max(1, CHUNK_FLOATS // _width(model))
    if chunk is None:
        chunk = min(k, max(1, rows // (batch_size or 1)))
    if batch_size is None:
        batch_size = max(1, rows // chunk)
    return min(batch_size, n), min(chunk, k)


# --- sampling z ~ q(z|x) in chunks ---------------------------------------------------------

def _encode_diagonal(model, x):
    """The encoder's mu, log_sigma (B, Z) for a model whose q(z|x) is the diagonal Gaussian; others refused."""
    if model.posterior != "diagonal":
        raise ValueError(f"this measure takes the encoder's diagonal q(z|x); the model's posterior is "
                         f"{model.posterior!r} (for it: log_likelihood, elbo_stats, model.sample_q)")
    return model._encode(x)


def _encode_q(model, xb, q, s):
    """mu, log_sigma (b, Z) for the examples s, whose rows are xb (b, D): the encoder's, or the given q's."""
    return _encode_diagonal(model, xb) if q is None else (q[0][s], q[1][s])


def _draw_eps(streams, k, z_dim, dtype):
    """(b, k, Z) standard normal noise, row i drawn from streams[i] (one generator per example)."""
    eps = np.empty((len(streams), k, z_dim), dtype=dtype)
    for e, g in zip(eps, streams):
        g.standard_normal(dtype=dtype, out=e)
    return eps


def _log_px_z_samples(model, x, z):
    """x (b, D), z (b, K, Z) -> log p(x|z_k) (b, K), with all b*K samples decoded in one pass."""
    b, K, Z = z.shape
    out = model._decode(z.reshape(b * K, Z))
    return model.log_px_z(x[:, None, :], _per_sample(out, b, K))


def _noise_seeds(rng, n):
    """One seed per example for its own noise stream (Generator.spawn needs numpy 1.25)."""
    return rng.integers(2 ** 63, size=n)


def _sample_batches(model, x, k, seeds, q=None, batch_size=None, chunk=None):
    """Walk x in batches of B' examples, drawing k samples z ~ q(z|x) per example in chunks of K'.

    Yields (s, mu, log_sigma, chunks) per batch, where chunks yields
    (eps, z, log_px_z) with eps, z (b, K', Z) and log_px_z (b, K'). Example i
    draws its noise from its own generator, seeded by seeds[i] (_noise_seeds),
    so the result depends neither on B' or K' (only the sums are grouped
    differently) nor on how the examples are split over threads.
    """
    N, Z = x.shape[0], model.z_dim
    B_, K_ = chunk_sizes(model, N, k, batch_size, chunk)

    def chunks(xb, mu, log_sigma, streams):
        for start in range(0, k, K_):
            eps = _draw_eps(streams, min(K_, k - start), Z, model.dtype)
            z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)   # (b, K', Z)
            yield eps, z, _log_px_z_samples(model, xb, z)

    for s in batches(N, B_):
        xb = model._as_x(x[s])                               # x is read a batch at a time
        mu, log_sigma = _encode_q(model, xb, q, s)           # each x is encoded once
        streams = [np.random.default_rng(seed) for seed in seeds[s]]
        yield s, mu, log_sigma, chunks(xb, mu, log_sigma, streams)


# --- log p(x) by importance sampling -----------------------------------------------------------

def log_likelihood(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None, q=None):
    """x (N, D) -> (N,) float64 estimates of log p(x) by importance sampling with K = k samples.

        log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,  z_k ~ q(z|x)

    q is the encoder's q(z|x), of the model's posterior family, unless a diagonal
    q = (mu, log_sigma), each (N, Z), is given. Works on batch_size examples x chunk samples at a time (see chunk_sizes) and
    combines the chunks with a running log-sum-exp in float64; the network runs
    in the model's dtype. progress(done, N) is called after each batch. Each
    example draws its noise from its own stream (_sample_batches), so the
    estimates do not depend on how the examples are batched or split. x is
    read a batch at a time (as in elbo_stats): it may be larger than memory.
    """
    k = _check_positive_int("k", k)
    N = _check_stored(x)[0]
    rng = _check_rng(rng)
    q = None if q is None else _check_q(model, q, N)
    return log_likelihood_of_seeds(model, x, k, _noise_seeds(rng, N), q, batch_size, chunk, progress)


def log_likelihood_of_seeds(model, x, k, seeds, q=None, batch_size=None, chunk=None, progress=None):
    """log_likelihood's estimates for x (n, D), read a batch at a time, whose examples draw from the streams of seeds (n,)."""
    if isinstance(q, dict) or (q is None and model.posterior != "diagonal"):
        q = None if q is None else _check_local_q(model, q, x.shape[0])
        return _log_likelihood_sampled(model, x, k, seeds, q, batch_size, chunk, progress)
    log_px = np.empty(x.shape[0])
    for s, mu, log_sigma, chunks in _sample_batches(model, x, k, seeds, q, batch_size, chunk):
        total = np.full(s.stop - s.start, -np.inf)                   # log sum_k w_k so far
        for eps, z, log_px_z in chunks:
            # the (b, K', Z) terms are small, so they are formed in float64 too
            z, eps = z.astype(np.float64), eps.astype(np.float64)
            log_w = (log_px_z.astype(np.float64) + dist.standard_normal_log_prob(z)
                     - dist.log_q_reparameterized(eps, log_sigma.astype(np.float64)[:, None]))   # (b, K')
            total = np.logaddexp(total, logsumexp(log_w, axis=1))
        log_px[s] = total - math.log(k)
        if progress is not None:
            progress(s.stop, x.shape[0])
    return log_px


def local_q(model, x):
    """The encoder's q(z|x) for each row of x (N, D), as per-example parameters of its family (float64).

    {"mu": (N, Z), "log_sigma": (N, Z), the family's heads (N, width), and its global parameters
    copied per example (posteriors.*.per_example)}: the form q* takes when fitted to each x alone.
    """
    x = model._as_x(x)
    mu, log_sigma, heads = model._encode_all(x)
    q = {"mu": mu, "log_sigma": log_sigma, **heads, **model.q.per_example(model.params, x.shape[0])}
    return {name: a.astype(np.float64) for name, a in q.items()}


def _sample_local(model, q, eps):
    """z (b, K, Z), log q(z|x) (b, K) and the family's cache, for per-example parameters q (local_q's form)."""
    heads = {name: q[name] for name in model.q.heads}
    params = {name: q[name] for name in model.q.shapes}
    return model.q.sample(q["mu"], q["log_sigma"], heads, params, eps)


def _sampled_log_weights(model, x, k, seeds, q=None, batch_size=None, chunk=None):
    """Walk x in batches, drawing k samples of any family's q(z|x) per example in chunks of K'.

    Yields (s, chunks) per batch, where chunks yields log w = log p(x|z) + log p(z) - log q(z|x)
    (b, K') in float64. q is the encoder's unless per-example parameters q (local_q's form, N rows)
    are given. The noise streams are _sample_batches': one per example, seeded by seeds.
    """
    N, Z = x.shape[0], model.z_dim
    B_, K_ = chunk_sizes(model, N, k, batch_size, chunk)

    def chunks(xb, q_b, streams):
        for start in range(0, k, K_):
            # drawn in the model's dtype whatever q's: the same streams give the encoder's q and a
            # float64 q* the same noise (common random numbers), as Generator draws differ by dtype
            eps = _draw_eps(streams, min(K_, k - start), Z, model.dtype).astype(q_b["mu"].dtype, copy=False)
            z, log_q, _ = _sample_local(model, q_b, eps)                          # (b, K', Z), (b, K')
            log_px_z = _log_px_z_samples(model, xb, z.astype(model.dtype, copy=False))
            yield (log_px_z.astype(np.float64) + dist.standard_normal_log_prob(z.astype(np.float64))
                   - log_q.astype(np.float64))

    for s in batches(N, B_):
        xb = model._as_x(x[s])                                              # a batch of x, read now
        if q is None:
            mu, log_sigma, heads = model._encode_all(xb)                    # in the model's dtype
            q_b = {"mu": mu, "log_sigma": log_sigma, **heads, **{n: model.params[n] for n in model.q.shapes}}
        else:
            q_b = {name: a[s] for name, a in q.items()}
        streams = [np.random.default_rng(seed) for seed in seeds[s]]
        yield s, chunks(xb, q_b, streams)


def _log_likelihood_sampled(model, x, k, seeds, q=None, batch_size=None, chunk=None, progress=None):
    """log_likelihood_of_seeds with the model's own posterior family (full, a flow) as the proposal.

    The same noise streams as _sample_batches; the family maps each eps to z and gives log q(z|x).
    q: per-example parameters of the family (local_q's form) instead of the encoder's.
    """
    log_px = np.empty(x.shape[0])
    for s, chunks in _sampled_log_weights(model, x, k, seeds, q, batch_size, chunk):
        total = np.full(s.stop - s.start, -np.inf)
        for log_w in chunks:
            total = np.logaddexp(total, logsumexp(log_w, axis=1))
        log_px[s] = total - math.log(k)
        if progress is not None:
            progress(s.stop, x.shape[0])
    return log_px


def _elbo_sampled(model, x, n_samples, seeds, q=None, batch_size=None, chunk=None):
    """x (N, D) -> (N,) ELBO = E_q[log p(x|z) + log p(z) - log q(z|x)] of any family by n_samples draws.

    No closed form for a flow's KL: the whole integrand is averaged over the samples. q as in
    _sampled_log_weights.
    """
    elbo = np.empty(x.shape[0])
    for s, chunks in _sampled_log_weights(model, x, n_samples, seeds, q, batch_size, chunk):
        elbo[s] = sum(np.sum(log_w, axis=1) for log_w in chunks) / n_samples
    return elbo


def log_likelihood_prior(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None):
    """x (N, D) -> (N,) naive Monte Carlo estimates of log p(x) with z_k ~ p(z) = N(0, I).

        log p(x) ~= logsumexp_k log p(x|z_k) - log K

    This is importance sampling with the prior as proposal, where p(z_k) / q(z_k)
    is 1. Unbiased for p(x) like the encoder's version, but with far more
    variance: few prior samples land where p(z|x) has its mass.
    """
    x = model._as_x(x)
    zeros = np.zeros((x.shape[0], model.z_dim), dtype=model.dtype)
    return log_likelihood(model, x, k, rng, batch_size, chunk, progress, q=(zeros, zeros))


def elbo_estimate(model, x, q=None, n_samples=1000, rng=None, batch_size=None, chunk=None):
    """x (N, D) -> (N,) float64 ELBO = E_q[log p(x|z)] - KL(q || p(z)), the expectation by n_samples draws.

    For the diagonal family the KL is the closed form, so the only Monte Carlo error is the
    reconstruction term's. q is the encoder's unless q = (mu, log_sigma) is given. For the other
    families (full, flows) the whole integrand log p(x|z) + log p(z) - log q(z|x) is averaged
    over the samples (_elbo_sampled), and q may be per-example parameters in local_q's form.
    """
    n_samples = _check_positive_int("n_samples", n_samples)
    x = model._as_x(x)
    rng = _check_rng(rng)
    seeds = _noise_seeds(rng, x.shape[0])
    if isinstance(q, dict) or (q is None and model.posterior != "diagonal"):
        q = None if q is None else _check_local_q(model, q, x.shape[0])
        return _elbo_sampled(model, x, n_samples, seeds, q, batch_size, chunk)
    q = None if q is None else _check_q(model, q, x.shape[0])
    elbo = np.empty(x.shape[0])
    for s, mu, log_sigma, chunks in _sample_batches(model, x, n_samples, seeds, q, batch_size, chunk):
        recon = sum(np.sum(log_px_z, axis=1, dtype=np.float64) for _, _, log_px_z in chunks)
        elbo[s] = recon / n_samples - dist.kl_standard_normal(mu.astype(np.float64),
                                                              log_sigma.astype(np.float64))
    return elbo


# --- exact log p(x) by quadrature (Z = 1 or 2) ------------------------------------------------------

# Points per axis and half-width of the default grid. Z = 2: the spacing 12/400 =
# 0.03 integrates a Gaussian-shaped p(x|z)p(z) of width s with relative error
# ~2 exp(-2 pi^2 s^2 / h^2) (Poisson summation: the trapezoid rule is spectrally
# accurate for smooth, decaying integrands), below 1e-8 for s >= h = 0.03;
# the prior mass outside [-6, 6]^2 is 4 Phi(-6) ~ 4e-9. Z = 1 affords a much
# finer grid. quadrature_error_estimate() measures both errors for a given model.
GRID_DEFAULTS = {1: (4001, 8.0), 2: (401, 6.0)}


@dataclasses.dataclass(frozen=True)
class LatentGrid:
    """A tensor grid over [-limit, limit]^Z with trapezoid weights: integral f ~= sum_g exp(log_weights_g) f(z_g)."""

    axes: tuple              # Z arrays of shape (n,)
    z: np.ndarray            # (G, Z) float64, G = n^Z, the last axis varying fastest
    log_weights: np.ndarray  # (G,)
    limit: float

    @property
    def shape(self):
        return tuple(a.size for a in self.axes)

    @property
    def spacing(self):
        return float(self.axes[0][1] - self.axes[0][0])


def latent_grid(z_dim, n=None, limit=None):
    """The grid of n points per axis on [-limit, limit]^z_dim (defaults: GRID_DEFAULTS)."""
    z_dim = _check_positive_int("z_dim", z_dim)
    if z_dim > 2:
        raise ValueError(f"quadrature is for Z = 1 or 2 (a grid in Z = {z_dim} dimensions is too large); "
                         "use log_likelihood for importance sampling")
    n_default, limit_default = GRID_DEFAULTS[z_dim]
    n = n_default if n is None else _check_positive_int("n", n)
    limit = limit_default if limit is None else float(limit)
    if n < 3 or not (np.isfinite(limit) and limit > 0):
        raise ValueError(f"need n >= 3 and a positive finite limit, got n={n}, limit={limit}")
    axis = np.linspace(-limit, limit, n)
    w = np.full(n, 2.0 * limit / (n - 1))       # trapezoid rule: h inside, h/2 at both ends
    w[[0, -1]] *= 0.5
    axes = (axis,) * z_dim
    z = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)   # (G, Z)
    log_w = sum(a.ravel() for a in np.meshgrid(*((np.log(w),) * z_dim), indexing="ij"))
    return LatentGrid(axes, z, np.asarray(log_w, np.float64), limit)


def _grid_for(model, grid, n, limit):
    if grid is None:
        grid = latent_grid(model.z_dim, n, limit)
    if grid.z.shape[1] != model.z_dim:
        raise ValueError(f"grid is over Z = {grid.z.shape[1]} but the model has Z = {model.z_dim}")
    return grid


def _log_px_z_all_pairs(model, x, out):
    """log p(x_b | z_g) for every example and grid point: x (B, D) float64, decoder output at G points -> (B, G).

    Each likelihood is expanded so that the sum over d is a matrix product:
      Bernoulli: sum_d x_d l_d - softplus(l_d)            = x @ l.T - sum_d softplus(l)
      Gaussian:  sum_d -log sigma - (x - m)^2 / 2 sigma^2 - log(2 pi)/2
               = -x^2 @ (1/2sigma^2).T + x @ (m/sigma^2).T - sum_d [m^2/2sigma^2 + log sigma + log(2 pi)/2]
    """
    if model.likelihood == "bernoulli":
        logits = out.astype(np.float64)                                       # (G, D)
        return x @ logits.T - dist.softplus(logits).sum(axis=1)
    mean = out[0].astype(np.float64)
    if model.x_sigma is not None:
        log_sigma = np.full_like(mean, math.log(model.x_sigma))
    else:
        log_sigma = dist.clip_log_sigma(out[1].astype(np.float64))
    inv_var = 1.0 / dist.std(log_sigma) ** 2                                  # (G, D)
    const = np.sum(0.5 * mean * mean * inv_var + log_sigma + 0.5 * dist.LOG_2PI, axis=1)
    return -0.5 * (x * x) @ inv_var.T + x @ (mean * inv_var).T - const


def _log_joint_on_grid(model, x, grid):
    """Yield (sl, log p(x|z_g) + log p(z_g)) (B, g) for the grid's points in chunks sl of g."""
    x = x.astype(np.float64)
    g = max(1, CHUNK_FLOATS // max(x.shape[0], _width(model)))
    for sl in batches(grid.z.shape[0], g):
        out = model._decode(grid.z[sl].astype(model.dtype))
        yield sl, _log_px_z_all_pairs(model, x, out) + dist.standard_normal_log_prob(grid.z[sl])


def _exact(model, x, grid):
    """(log p(x) (B,), max_g log p(x|z_g) (B,)) by the trapezoid rule on grid."""
    total = np.full(x.shape[0], -np.inf)
    max_log_px_z = np.full(x.shape[0], -np.inf)
    for sl, log_joint in _log_joint_on_grid(model, x, grid):
        total = np.logaddexp(total, logsumexp(log_joint + grid.log_weights[sl], axis=1))
        log_px_z = log_joint - dist.standard_normal_log_prob(grid.z[sl])
        max_log_px_z = np.maximum(max_log_px_z, log_px_z.max(axis=1))
    return total, max_log_px_z


def exact_log_likelihood(model, x, grid=None, n=None, limit=None):
    """x (N, D) -> (N,) log p(x) = log integral p(x|z) p(z) dz by the trapezoid rule, for Z = 1 or 2.

    The grid is latent_grid(Z, n, limit) unless given; quadrature_error_estimate
    says how far the result can be trusted.
    """
    x = model._as_x(x)
    return _exact(model, x, _grid_for(model, grid, n, limit))[0]


def exact_posterior(model, x, grid=None, n=None, limit=None):
    """x (D,) or (1, D) -> (axes, log p(z|x)): the posterior density on the grid, shape (n,) * Z.

    log p(z|x) = log p(x|z) + log p(z) - log p(x); exp of it sums to 1 with the grid's weights.
    """
    x = model._as_x(np.atleast_2d(x))
    if x.shape[0] != 1:
        raise ValueError(f"exact_posterior takes one example, got {x.shape[0]}")
    grid = _grid_for(model, grid, n, limit)
    log_joint = np.concatenate([lj[0] for _, lj in _log_joint_on_grid(model, x, grid)])  # (G,)
    log_px = logsumexp(log_joint + grid.log_weights)
    return grid.axes, (log_joint - log_px).reshape(grid.shape)


def _log_q_on_grid(mu, log_sigma, z):
    """log q(z_g|x_b) for mu, log_sigma (B, Z) and grid points z (g, Z) -> (B, g)."""
    mu, log_sigma = mu.astype(np.float64), log_sigma.astype(np.float64)
    return dist.gaussian_log_prob(z[None, :, :], mu[:, None, :], log_sigma[:, None, :])


def kl_to_posterior(model, x, grid=None, n=None, limit=None):
    """x (N, D) -> (N,) KL(q(z|x) || p(z|x)) = integral q (log q - log p(z|x)) dz on the grid (Z = 1 or 2).

    Accurate when the grid resolves q: sigma of q well above the grid spacing
    (quadrature_error_estimate reports q's mass on the grid, which should be 1).
    """
    x = model._as_x(x)
    grid = _grid_for(model, grid, n, limit)
    log_px, _ = _exact(model, x, grid)
    mu, log_sigma = _encode_diagonal(model, x)
    kl = np.zeros(x.shape[0])
    for sl, log_joint in _log_joint_on_grid(model, x, grid):
        log_q = _log_q_on_grid(mu, log_sigma, grid.z[sl])            # (B, g)
        log_posterior = log_joint - log_px[:, None]                  # log p(z|x), (B, g)
        kl += np.sum(np.exp(log_q + grid.log_weights[sl]) * (log_q - log_posterior), axis=1)
    return kl


def exact_elbo(model, x, grid=None, n=None, limit=None):
    """x (N, D) -> (N,) ELBO = E_q[log p(x|z)] - KL(q || p(z)): the expectation on the grid, the KL closed form."""
    x = model._as_x(x)
    grid = _grid_for(model, grid, n, limit)
    mu, log_sigma = _encode_diagonal(model, x)
    recon = np.zeros(x.shape[0])
    for sl, log_joint in _log_joint_on_grid(model, x, grid):
        log_px_z = log_joint - dist.standard_normal_log_prob(grid.z[sl])
        q_w = np.exp(_log_q_on_grid(mu, log_sigma, grid.z[sl]) + grid.log_weights[sl])
        recon += np.sum(q_w * log_px_z, axis=1)
    return recon - dist.kl_standard_normal(mu.astype(np.float64), log_sigma.astype(np.float64))


def quadrature_error_estimate(model, x, n=None, limit=None):
    """How far exact_log_likelihood on latent_grid(Z, n, limit) can be trusted, per example.

    Returns a dict:
      log_px            (N,) log p(x) on the grid with half the spacing (2n - 1 points per axis)
      discretization    (N,) |log p(x) on the grid - on the half-spacing grid|: the coarse
                        grid's error, since the finer one's is smaller (by 4x for a
                        rule of order h^2, by far more for smooth integrands)
      tail_prior_mass   prior mass outside [-limit, limit]^Z: 1 - (1 - 2 Phi(-limit))^Z
      tail              (N,) log(1 + tail_prior_mass * max_z p(x|z) / p(x)), the missing
                        tail as a log error, if p(x|z) outside the box stays below its
                        maximum on the grid
      q_mass            (N,) sum of the grid weights times q(z|x): 1 when the grid resolves q
    """
    x = model._as_x(x)
    grid = latent_grid(model.z_dim, n, limit)
    fine = latent_grid(model.z_dim, 2 * grid.shape[0] - 1, grid.limit)
    log_px, max_log_px_z = _exact(model, x, grid)
    log_px_fine, _ = _exact(model, x, fine)
    tail_prior_mass = float(-np.expm1(model.z_dim * np.log1p(-2.0 * ndtr(-grid.limit))))
    tail = np.log1p(tail_prior_mass * np.exp(max_log_px_z - log_px_fine))
    mu, log_sigma = _encode_diagonal(model, x)
    q_mass = np.zeros(x.shape[0])
    for sl in batches(grid.z.shape[0], max(1, CHUNK_FLOATS // x.shape[0])):
        q_mass += np.exp(_log_q_on_grid(mu, log_sigma, grid.z[sl]) + grid.log_weights[sl]).sum(axis=1)
    return {"log_px": log_px_fine, "discretization": np.abs(log_px - log_px_fine),
            "tail_prior_mass": tail_prior_mass, "tail": tail, "q_mass": q_mass}


# --- non-amortized inference: a q(z|x) fitted to each x ------------------------------------------------

def _local_elbo_and_grads(model, x, mu, log_sigma, eps):
    """ELBO (b,) of q = N(mu, sigma^2) for each x, and its gradient w.r.t. mu and log_sigma, decoder fixed.

    x (b, D); mu, log_sigma (b, Z) float64; eps (b, S, Z). The reconstruction
    term is the mean over S samples z = mu + sigma * eps; the KL is closed form:

        elbo = 1/S sum_s log p(x|z_s) - KL(q || N(0, I))
        d elbo / d log p(x|z_s) = 1/S,  then decoder backward to dz, then dz/dmu = 1, dz/dlog_sigma = sigma eps

    The decoder's backward also writes its parameter gradients into the model's
    gradient buffer; they are not used and no parameter changes.
    """
    b, S, Z = eps.shape
    z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)            # (b, S, Z)
    out = model._decode(z.reshape(b * S, Z).astype(model.dtype, copy=False))
    out_bs = _per_sample(out, b, S)
    log_px_z = model.log_px_z(x[:, None, :], out_bs)                          # (b, S)
    kl = dist.kl_standard_normal(mu, log_sigma)                               # (b,)
    elbo = np.mean(log_px_z, axis=1, dtype=np.float64) - kl

    dlog_px_z = np.full((b, S), 1.0 / S, dtype=model.dtype)
    dout_bs = model._log_px_z_grad(dlog_px_z, x[:, None, :], out_bs)
    dout = _all_samples(dout_bs, b, S)
    dz = model._decode_backward(dout).reshape(b, S, Z)
    dmu, dlog_sigma = dist.reparameterize_grad(dz.astype(np.float64), log_sigma[:, None], eps)
    dmu_kl, dlog_sigma_kl = dist.kl_standard_normal_grad(np.ones(b), mu, log_sigma)
    # mu and log_sigma feed every sample and the KL: sum the branches
    return elbo, dmu.sum(axis=1) - dmu_kl, dlog_sigma.sum(axis=1) - dlog_sigma_kl


def _local_family_elbo_and_grads(model, x, q, eps):
    """ELBO (b,) of each x's own q of the model's family, and its gradient w.r.t. every entry of q, decoder fixed.

    x (b, D); q per-example parameters in local_q's form (float64); eps (b, S, Z). No closed-form KL
    for a flow, so the whole integrand is the mean over the S samples z_s of the family's map:

        elbo = 1/S sum_s [log p(x|z_s) + log p(z_s) - log q(z_s|x)]
        d elbo / d log p(x|z_s) = d elbo / d log p(z_s) = 1/S,  d elbo / d log q(z_s|x) = -1/S

    z feeds the decoder and log p(z) (d/dz = -z): both are summed before the family's backward
    (posteriors.*.sample_grad), which gives the gradients to mu, log_sigma, the heads and the
    per-example flow weights. Returns (elbo, {name: d elbo / d q[name]}).
    """
    b, S, Z = eps.shape
    z, log_q, cache = _sample_local(model, q, eps)                           # (b, S, Z), (b, S)
    out_bs = _per_sample(model._decode(z.reshape(b * S, Z).astype(model.dtype, copy=False)), b, S)
    log_px_z = model.log_px_z(x[:, None, :], out_bs)                          # (b, S)
    elbo = np.mean(log_px_z.astype(np.float64) + dist.standard_normal_log_prob(z) - log_q, axis=1)

    dlog_px_z = np.full((b, S), 1.0 / S, dtype=model.dtype)
    dout = _all_samples(model._log_px_z_grad(dlog_px_z, x[:, None, :], out_bs), b, S)
    dz = model._decode_backward(dout).reshape(b, S, Z).astype(np.float64)
    dz -= z / S                                                               # through log p(z)
    dmu, dlog_sigma, dheads, dparams = model.q.sample_grad(dz, np.full((b, S), -1.0 / S), cache)
    return elbo, {"mu": dmu, "log_sigma": dlog_sigma, **dheads, **dparams}


def _ascend_local(q, elbo_and_grads, steps, lr, trace, n):
    """Adam ascent on the per-example arrays of q (in place), `steps` steps; -> the iterates' average over the second half.

    elbo_and_grads() -> (elbo (b,), {name: d elbo / d q[name]}) on fresh noise. The step size decays
    linearly from lr to lr/100; trace[t] gathers the step's mean ELBO (a sum over batches / n).
    """
    adam = Adam(q, lr=lr)          # updates q's arrays in place; the model is not touched
    average = {name: np.zeros_like(a) for name, a in q.items()}
    for t in range(steps):
        adam.lr = lr * (1.0 - 0.99 * t / steps)
        elbo, grads = elbo_and_grads()
        adam.step({name: -g for name, g in grads.items()})      # Adam descends the loss -ELBO
        trace[t] += elbo.sum() / n
        if t >= steps // 2:
            for name, a in q.items():
                average[name] += a / (steps - steps // 2)
    return average


# q*'s first Adam step size. A flow's weights need smaller steps than mu and log_sigma: with the
# decoder of demos/flows.py's diagonal model (100 test images, 500 steps) planar:16's q* ended 3.29
# nats below log p(x) at 0.2 and 0.14 at 0.05; iaf:4's 0.37 and 0.36; full's 0.14 at either.
LOCAL_LR = {"diagonal": 0.2, "full": 0.2, "planar": 0.05, "iaf": 0.05}


def _local_lr(model, lr):
    return LOCAL_LR[model.posterior.partition(":")[0]] if lr is None else lr


def optimize_local(model, x, steps=500, lr=None, rng=None, n_samples=10, n_eval=1000, q=None,
                   batch_size=None):
    """Fit a separate q_i = N(mu_i, diag(sigma_i^2)) to each x_i by maximizing its ELBO, decoder fixed.

    For a model of another posterior family, q_i is that family's, every per-example parameter
    fitted (_local_family_elbo_and_grads). Starts from the encoder's q (or q = (mu, log_sigma), each
    (N, Z)) and takes `steps` Adam steps on fresh-noise gradients with n_samples samples each,
    the first of size lr (default LOCAL_LR of the family).
    The noise keeps the iterates jittering around the optimum, which costs
    ELBO; two remedies, together worth ~10x on a linear-Gaussian model: the
    step size decays linearly from lr to lr/100, and the answer is the average
    of the iterates over the second half (Polyak-Ruppert averaging).
    Returns a dict:
      mu, log_sigma  (N, Z) float64, the fitted q
      q              every per-example parameter of the fitted q (local_q's form; for the
                     diagonal family mu and log_sigma). An IAF's per-example MADEs take
                     T (3 Z M + M + 2 Z) floats per example, several times over during the
                     fit (Adam's moments, the average): 240 for iaf:4 at Z = 2, 121 200 at Z = 50
      elbo           (N,) the fitted q's ELBO estimated with n_eval samples
                     (elbo_estimate; None when n_eval is None)
      trace          (steps,) the mean single-step ELBO estimate at each step
    """
    steps = _check_positive_int("steps", steps)
    n_samples = _check_positive_int("n_samples", n_samples)
    lr = _local_lr(model, lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    x = model._as_x(x)
    rng = _check_rng(rng)
    N, Z = x.shape[0], model.z_dim
    diagonal = model.posterior == "diagonal"
    if not diagonal and q is not None:
        raise ValueError(f"q must be None for a model whose posterior is {model.posterior!r}: its fit "
                         f"starts from its encoder's q (q = (mu, log_sigma) is for the diagonal family)")
    q = None if q is None else _check_q(model, q, N)
    B_ = chunk_sizes(model, N, n_samples, batch_size=batch_size, chunk=n_samples)[0]
    fitted = {}
    trace = np.zeros(steps)
    for s in batches(N, B_):
        if diagonal:
            mu0, log_sigma0 = _encode_q(model, x[s], q, s)
            q_s = {"mu": mu0.astype(np.float64), "log_sigma": log_sigma0.astype(np.float64)}
        else:
            # every per-example parameter of the family, starting from the encoder's: mu, log_sigma,
            # the heads (L's lower triangle, the planar steps' u, w, b) and, for an IAF, a copy of
            # every MADE per example, so q* is the best member of the family for each x alone
            q_s = local_q(model, x[s])

        def elbo_and_grads():
            eps = rng.standard_normal((s.stop - s.start, n_samples, Z))
            if not diagonal:
                return _local_family_elbo_and_grads(model, x[s], q_s, eps)
            elbo, dmu, dlog_sigma = _local_elbo_and_grads(model, x[s], q_s["mu"], q_s["log_sigma"], eps)
            return elbo, {"mu": dmu, "log_sigma": dlog_sigma}

        for name, a in _ascend_local(q_s, elbo_and_grads, steps, lr, trace, N).items():
            fitted.setdefault(name, np.empty((N,) + a.shape[1:]))[s] = a
    # the diagonal q* is scored as a pair (mu, log_sigma), with the closed-form KL
    q_opt = (fitted["mu"], fitted["log_sigma"]) if diagonal else fitted
    elbo = None if n_eval is None else elbo_estimate(model, x, q_opt, n_eval, rng)
    return {"q": fitted, "mu": fitted["mu"], "log_sigma": fitted["log_sigma"], "elbo": elbo, "trace": trace}


def amortization_gaps(model, x, k=5000, rng=None, n_eval=None, steps=500, lr=None, n_samples=10, log_px=None):
    """The inference gaps of Cremer, Li & Duvenaud (2018) for each example of x (N, D).

    Returns a dict of (N,) float64 arrays
      elbo_encoder       ELBO of the encoder's q(z|x)
      elbo_optimized     ELBO of q fitted to each x by optimize_local
      log_px             the log_px given (e.g. exact_log_likelihood when Z <= 2), else
                         log p(x) by importance sampling with k samples, proposal the
                         *optimized* q (closer to p(z|x) than the encoder's, so less variance).
                         Like any such estimate it is low on average. It is unreliable when
                         q's precision exceeds twice p(z|x)'s in some direction, as a diagonal
                         q of a strongly correlated posterior's can: the weights p(z|x)/q(z)
                         then have infinite variance, and the estimate is mostly too low,
                         now and then far too high.
      amortization_gap   elbo_optimized - elbo_encoder
      approximation_gap  log_px - elbo_optimized
      inference_gap      log_px - elbo_encoder (the sum of the two)
    and "mean": the same names -> mean over the examples. Both ELBOs use n_eval (default k)
    samples of the same noise (common random numbers), so their difference is not drowned in
    Monte Carlo error.

    Every posterior family: q* is the family's q fitted to each x (optimize_local), and the
    ELBOs use the closed-form KL for the diagonal family, the sampled integrand for the others
    (elbo_estimate). For a flow, inference_gap = KL(q || p(z|x)) is then the exact gap when
    log_px is exact (Z = 2: exact_log_likelihood), up to the ELBO's Monte Carlo error.
    """
    k = _check_positive_int("k", k)
    n_eval = k if n_eval is None else _check_positive_int("n_eval", n_eval)
    x = model._as_x(x)
    rng = _check_rng(rng)
    fitted = optimize_local(model, x, steps=steps, lr=lr, rng=rng, n_samples=n_samples, n_eval=None)
    q_opt = fitted["q"] if model.posterior != "diagonal" else (fitted["mu"], fitted["log_sigma"])
    seed = int(rng.integers(2 ** 63))
    if log_px is None:
        log_px = log_likelihood_of_seeds(model, x, k, _noise_seeds(rng, x.shape[0]), q=q_opt) if isinstance(
            q_opt, dict) else log_likelihood(model, x, k, rng, q=q_opt)
    else:
        log_px = np.asarray(log_px, dtype=np.float64)
        if log_px.shape != (x.shape[0],):
            raise ValueError(f"log_px must have shape {(x.shape[0],)}, got {log_px.shape}")
    out = {"elbo_encoder": elbo_estimate(model, x, None, n_eval, np.random.default_rng(seed)),
           "elbo_optimized": elbo_estimate(model, x, q_opt, n_eval, np.random.default_rng(seed)),
           "log_px": log_px}
    out["amortization_gap"] = out["elbo_optimized"] - out["elbo_encoder"]
    out["approximation_gap"] = out["log_px"] - out["elbo_optimized"]
    out["inference_gap"] = out["log_px"] - out["elbo_encoder"]
    out["mean"] = {name: float(np.mean(v)) for name, v in out.items()}
    return out


# --- active units ------------------------------------------------------------------------------------

def active_units(model, x, threshold=0.01, batch_size=1000):
    """(count, variances (Z,)): latent j is active when Var_x(E_q[z_j|x]) = Var_x(mu_j(x)) > threshold.

    Burda et al. (2015): a unit whose posterior mean does not move with x carries
    no information about x, however the KL treats it.
    """
    N = _check_stored(x)[0]
    variances = column_variance(model._encode(model._as_x(x[s]))[0] for s in batches(N, batch_size))
    return int(np.sum(variances > threshold)), variances


def column_variance(blocks):
    """Var over rows of the (b, Z) blocks stacked, in float64, one block at a time: -> (Z,).

    Chan, Golub & LeVeque's pairwise update: with n rows seen (mean m, sum of squared
    deviations M2) and a block of b (mean m_b, M2_b), d = m_b - m,
        m  <- m + d b / (n + b),    M2 <- M2 + M2_b + d^2 n b / (n + b),
    and the variance is M2 / n at the end: what np.var of the whole gives, to rounding,
    without the (N, Z) array.
    """
    n, mean, m2 = 0, 0.0, 0.0
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        b = block.shape[0]
        block_mean = block.mean(axis=0)
        d = block_mean - mean
        mean = mean + d * (b / (n + b))
        m2 = m2 + ((block - block_mean) ** 2).sum(axis=0) + d * d * (n * b / (n + b))
        n += b
    return m2 / n
