"""Fast forms of reference functions: the same numbers in fewer passes over memory.

Each function names the reference function it equals; tests/test_engine_kernels.py
holds them against each other (float64: relative error <= 1e-12; float32:
a few ulps, from the different order of the sums and the fused forms).

Shapes: B batch (or batch x K samples), D data, Z latent.
"""
import math

import numpy as np

from .. import distributions as dist

# --- q(z|x): sigma and the clip's mask computed once --------------------------------

# The reference functions each form sigma = std(log_sigma) and the clip's mask
# themselves; a training step calls four of them on one q(z|x), so the engine
# forms both once and hands them in.


def reparameterize(mu, sigma, eps):
    """distributions.reparameterize, with sigma = std(log_sigma) given: z = mu + sigma * eps (B, Z)."""
    return mu + sigma * eps


def reparameterize_grad(dz, sigma, eps, in_range):
    """distributions.reparameterize_grad, with sigma and in_range = _in_range(log_sigma) given."""
    return dz, dz * sigma * eps * in_range


def kl_standard_normal(mu, log_sigma, sigma):
    """distributions.kl_standard_normal, with sigma = std(log_sigma) given."""
    return 0.5 * np.sum(mu * mu + sigma * sigma - 1.0 - 2.0 * dist.clip_log_sigma(log_sigma), axis=-1)


def kl_standard_normal_grad(dkl, mu, sigma, in_range):
    """distributions.kl_standard_normal_grad, with sigma and in_range given."""
    dkl = dist._expand(dkl, mu)
    return dkl * mu, dkl * (sigma * sigma - 1.0) * in_range


# --- Bernoulli from logits ------------------------------------------------------------

# Below these, e^l is finite in the dtype (float32 overflows at l = 88.7, float64 at 709.8).
_EXP_SAFE = {np.dtype(np.float32): 80.0, np.dtype(np.float64): 700.0}


def softplus(l, out=None):
    """distributions.softplus, in place into out (a buffer other than l) if given: (...) -> (...).

    When every l is below the dtype's overflow point of e^l (one cheap max over
    the array tells), it is log(1 + e^l) as written: three passes. Otherwise
    max(l, 0) + log(1 + e^-|l|), as the reference. Both round alike: for l < 0
    they are the same operations, and for l > 0 each is off by a few ulp of
    the result. In float32, for l below ~-17 log(1 + e^l) rounds to 0, an
    absolute error below 1e-7 (the reference's log1p keeps it).
    """
    limit = _EXP_SAFE.get(l.dtype)
    if limit is not None and l.size and np.max(l) < limit:   # NaN fails the test and takes the path below
        t = np.exp(l, out=out)
        t += 1.0
        return np.log(t, out=t)
    t = np.abs(l, out=out)
    np.negative(t, out=t)
    np.exp(t, out=t)
    np.log1p(t, out=t)
    t += np.maximum(l, 0.0)
    return t


def _row_dot(a, b):
    """sum_d a_d b_d: (..., D), (..., D) -> (...), as a (1, D) x (D, 1) matrix product per row
    (BLAS's dot: faster than einsum on a training step's shapes, and no (..., D) temporary)."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def bernoulli_log_prob(x, logits, work=None):
    """distributions.bernoulli_log_prob: (..., D) each -> (...); softplus written into work if given
    (a buffer of at least logits.size floats, reused from call to call: a fresh array per call
    costs page faults)."""
    sp = softplus(logits, out=None if work is None else work[:logits.size].reshape(logits.shape))
    return _row_dot(x, logits) - np.add.reduce(sp, axis=-1)


def bernoulli_log_prob_and_exp(x, logits):
    """(distributions.bernoulli_log_prob(x, logits), e^logits, 1 + e^logits): a forward whose backward follows.

    The same log p, summed differently: with t = 1 + e^l, sum_d softplus(l_d)
    = sum_d log t_d = the sum of logs of products of 2, 4 or 8 t's, one log
    per group (log and exp are the costly passes). A group is as large as
    keeps its product finite: t < e^(l + 1), so g factors stay below
    e^(g (max l + 1)), and g (max l + 1) must stay below the dtype's overflow
    point of e^l. e^l and t are kept for the gradient, where sigmoid(l) =
    e^l / t then costs one division instead of another exp. With the largest
    logits too large even for pairs: the reference, and None, None.
    """
    limit = _EXP_SAFE.get(logits.dtype)
    # np.max, without its Python wrapper's cost
    top = max(float(np.maximum.reduce(logits, axis=None)), 0.0) if limit is not None and logits.size else math.nan
    if not 2 * (top + 1.0) < limit:   # NaN too (max(nan, 0.0) is nan)
        return dist.bernoulli_log_prob(x, logits), None, None
    e = np.exp(logits)
    t = products = e + 1.0
    log_t_sum = 0.0
    group = 1
    while group < 8 and 2 * group * (top + 1.0) < limit:   # at least once: 2 (top + 1) < limit
        if products.shape[-1] % 2:           # an odd column out: its own log
            log_t_sum = log_t_sum + np.log(products[..., -1])
        h = products.shape[-1] // 2
        products = np.multiply(products[..., :h], products[..., h:2 * h])   # groups twice as large
        group *= 2
    log_t_sum = log_t_sum + np.add.reduce(np.log(products, out=products), axis=-1)   # not t: a new array
    return _row_dot(x, logits) - log_t_sum, e, t


def bernoulli_log_prob_grad(dlogp, x, logits, exp_logits=None, one_plus_exp=None):
    """distributions.bernoulli_log_prob_grad: dlogp (B,) -> dlogits (B, D) = dlogp * (x - sigmoid(l)).

    sigmoid(l) = e^l / (1 + e^l) from what bernoulli_log_prob_and_exp kept
    (one division), else exp(l - softplus(l)): exp is cheaper than
    scipy.special.expit.
    """
    if exp_logits is not None:
        d = np.add(exp_logits, 1.0) if one_plus_exp is None else one_plus_exp
        d = np.divide(exp_logits, d)             # sigmoid(l), in a new array
    else:
        d = np.subtract(logits, softplus(logits))
        np.exp(d, out=d)                         # sigmoid(l)
    np.subtract(x, d, out=d)
    d *= dist._expand(dlogp, logits)
    return d


# --- the dense layer's bias gradient ----------------------------------------------------

_ONES = {}


def ones(n, dtype):
    """A read-only vector of n ones of dtype (a np.dtype, the key it is kept under from call to call)."""
    vector = _ONES.get(dtype)
    if vector is None or vector.shape[0] < n:
        vector = np.ones(max(n, 256), dtype)
        vector.flags.writeable = False
        _ONES[vector.dtype] = vector
    return vector[:n]


def column_sums(da, out):
    """da.sum(axis=0) (layers.Dense.backward's db) into out, as a product with a vector of ones:
    BLAS sums the rows about twice as fast as np.sum on a training step's shapes."""
    return np.matmul(ones(da.shape[0], da.dtype), da, out=out)
