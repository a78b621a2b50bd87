"""Diagonal Gaussians and the likelihoods p(x|z), each with its hand-written gradient.

Conventions used everywhere in npvae:
- a Gaussian is given by its mean `mu` and its log standard deviation
  `log_sigma`; `sigma = std(log_sigma)` is the only place exp(log_sigma) is taken;
- log densities and KLs are summed over data or latent dimensions, giving one
  value per example, in nats;
- a `*_grad` function returns the derivative of the per-example value with
  respect to its inputs, already multiplied by an upstream gradient of shape
  (B,) (or broadcastable to the input's shape).

Shapes: B batch (or batch x K importance samples), D data, Z latent.
"""
import math

import numpy as np

# scipy.special is imported where it is used: it costs ~0.2 s at import time.

LOG_2PI = float(np.log(2.0 * np.pi))

# log_sigma is clipped to this range wherever a standard deviation is formed,
# so that exp() can neither overflow nor divide by zero in float32 (e^40 ~ 2e17
# and e^-40 ~ 4e-18 keep sigma^2 and 1/sigma^2 finite). Inside the range the
# model is exactly the textbook one; outside, the gradient is that of the clip.
LOG_SIGMA_MIN, LOG_SIGMA_MAX = -20.0, 20.0


def clip_log_sigma(log_sigma):
    """log_sigma clipped to [LOG_SIGMA_MIN, LOG_SIGMA_MAX] (NaN stays NaN).

    The same as np.clip, whose Python wrapper costs several times more than
    the arithmetic on a (B, Z) array.
    """
    clipped = np.maximum(log_sigma, LOG_SIGMA_MIN)
    return np.minimum(clipped, LOG_SIGMA_MAX, out=clipped)


def std(log_sigma):
    """sigma = exp(log_sigma), with log_sigma clipped to [LOG_SIGMA_MIN, LOG_SIGMA_MAX]."""
    sigma = clip_log_sigma(log_sigma)
    return np.exp(sigma, out=sigma)


def _in_range(log_sigma):
    """1 where the clip in std() is inactive, 0 where it holds log_sigma at a bound."""
    return (log_sigma >= LOG_SIGMA_MIN) & (log_sigma <= LOG_SIGMA_MAX)


def _expand(d, like):
    """Upstream gradient (B,) -> (B, 1) so it broadcasts against (B, Z) or (B, D)."""
    d = np.asarray(d, dtype=like.dtype)
    return d[..., None] if d.ndim == like.ndim - 1 else d


# --- reparameterization -------------------------------------------------------

# The functions below take sigma = std(log_sigma) and in_range = _in_range(log_sigma)
# as optional arguments: a model that calls several of them on one q(z|x)
# computes each once (VAE.forward, VAE.backward) instead of once per call.

def reparameterize(mu, log_sigma, eps, sigma=None):
    """z = mu + sigma * eps: mu, log_sigma, eps (B, Z) -> z (B, Z)."""
    sigma = std(log_sigma) if sigma is None else sigma
    return mu + sigma * eps


def reparameterize_grad(dz, log_sigma, eps, sigma=None, in_range=None):
    """dz (B, Z) -> (dmu, dlog_sigma), each (B, Z).

    Local derivative: dz/dmu = 1, dz/dlog_sigma = sigma * eps.
    """
    sigma = std(log_sigma) if sigma is None else sigma
    in_range = _in_range(log_sigma) if in_range is None else in_range
    return dz, dz * sigma * eps * in_range


# --- KL divergences -------------------------------------------------------------

def kl_standard_normal(mu, log_sigma, sigma=None):
    """KL(N(mu, sigma^2) || N(0, I)) per example: (B, Z), (B, Z) -> (B,).

    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - 2 log sigma_j).
    """
    log_sigma = clip_log_sigma(log_sigma)
    sigma = np.exp(log_sigma) if sigma is None else sigma   # std(), on the clipped log_sigma at hand
    return 0.5 * np.sum(mu * mu + sigma * sigma - 1.0 - 2.0 * log_sigma, axis=-1)


def kl_standard_normal_grad(dkl, mu, log_sigma, sigma=None, in_range=None):
    """dkl (B,) -> (dmu, dlog_sigma), each (B, Z).

    Local derivative: dKL/dmu = mu, dKL/dlog_sigma = sigma^2 - 1.
    """
    sigma = std(log_sigma) if sigma is None else sigma
    in_range = _in_range(log_sigma) if in_range is None else in_range
    dkl = _expand(dkl, mu)
    return dkl * mu, dkl * (sigma * sigma - 1.0) * in_range


def kl_diag_gaussians(mu_q, log_sigma_q, mu_p, log_sigma_p):
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per example: four (B, Z) -> (B,).

    KL = sum_j [log sigma_p - log sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2].
    """
    log_sigma_q = clip_log_sigma(log_sigma_q)
    log_sigma_p = clip_log_sigma(log_sigma_p)
    var_q, var_p = std(log_sigma_q) ** 2, std(log_sigma_p) ** 2
    diff = mu_q - mu_p
    return np.sum(log_sigma_p - log_sigma_q + (var_q + diff * diff) / (2.0 * var_p) - 0.5, axis=-1)


def kl_diag_gaussians_grad(dkl, mu_q, log_sigma_q, mu_p, log_sigma_p):
    """dkl (B,) -> (dmu_q, dlog_sigma_q, dmu_p, dlog_sigma_p), each (B, Z).

    Local derivative: d/dmu_q = (mu_q - mu_p)/sigma_p^2 = -d/dmu_p;
    d/dlog_sigma_q = sigma_q^2/sigma_p^2 - 1; d/dlog_sigma_p = 1 - (sigma_q^2 + (mu_q - mu_p)^2)/sigma_p^2.
    """
    dkl = _expand(dkl, mu_q)
    var_q, var_p = std(log_sigma_q) ** 2, std(log_sigma_p) ** 2
    diff = mu_q - mu_p
    dmu_q = dkl * diff / var_p
    dlog_sigma_q = dkl * (var_q / var_p - 1.0) * _in_range(log_sigma_q)
    dlog_sigma_p = dkl * (1.0 - (var_q + diff * diff) / var_p) * _in_range(log_sigma_p)
    return dmu_q, dlog_sigma_q, -dmu_q, dlog_sigma_p


# --- log densities of Gaussians (for importance sampling) -----------------------

def standard_normal_log_prob(z):
    """log N(z; 0, I) per example: (..., Z) -> (...)."""
    return -0.5 * np.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * LOG_2PI


def gaussian_log_prob(x, mu, log_sigma):
    """log N(x; mu, diag(sigma^2)) per example: (..., D) each -> (...).

    log p = sum_d [-1/2 log 2 pi - log sigma_d - (x_d - mu_d)^2 / (2 sigma_d^2)].
    """
    log_sigma = clip_log_sigma(log_sigma)
    r = (x - mu) / std(log_sigma)  # standardized residual
    return np.sum(-0.5 * LOG_2PI - log_sigma - 0.5 * r * r, axis=-1)


def gaussian_log_prob_grad(dlogp, x, mu, log_sigma):
    """dlogp (B,) -> (dmu, dlog_sigma), each (B, D).

    Local derivative: d/dmu = (x - mu)/sigma^2, d/dlog_sigma = ((x - mu)/sigma)^2 - 1.
    """
    dlogp = _expand(dlogp, mu)
    sigma = std(log_sigma)
    r = (x - mu) / sigma
    return dlogp * r / sigma, dlogp * (r * r - 1.0) * _in_range(log_sigma)


def gaussian_fixed_log_prob(x, mu, sigma):
    """log N(x; mu, sigma^2 I) per example with a fixed scalar sigma: (B, D) each -> (B,)."""
    r = (x - mu) / sigma
    return np.sum(-0.5 * r * r, axis=-1) - x.shape[-1] * (0.5 * LOG_2PI + math.log(sigma))


def gaussian_fixed_log_prob_grad(dlogp, x, mu, sigma):
    """dlogp (B,) -> dmu (B, D). Local derivative: d/dmu = (x - mu)/sigma^2."""
    return _expand(dlogp, mu) * (x - mu) / (sigma * sigma)


# --- Bernoulli from logits --------------------------------------------------------

# Below these, e^l is finite in the dtype (float32 overflows at l = 88.7, float64 at 709.8).
_EXP_SAFE = {np.dtype(np.float32): 80.0, np.dtype(np.float64): 700.0}


def softplus(l, out=None):
    """log(1 + e^l) elementwise, finite for every finite l: (...) -> (...); out: a buffer other than l.

    When every l is below the dtype's overflow point of e^l (one cheap max over
    the array tells), it is log(1 + e^l) as written: three passes. Otherwise
    max(l, 0) + log(1 + e^-|l|), whose exponent is never positive. Both round
    alike: for l < 0 they are the same operations, and for l > 0 each is off by
    a few ulp of the result. exp and log are NumPy's vectorized fast paths
    (np.logaddexp and np.log1p are several times slower). In float32, for l
    below ~-17 the result rounds to 0, an absolute error below 1e-7.
    """
    limit = _EXP_SAFE.get(l.dtype)
    if limit is not None and l.size and np.max(l) < limit:   # NaN fails the test and takes the path below
        t = np.exp(l, out=out)
        t += 1.0
        return np.log(t, out=t)
    t = np.abs(l, out=out)
    np.negative(t, out=t)
    np.exp(t, out=t)
    t += 1.0
    np.log(t, out=t)
    t += np.maximum(l, 0.0)
    return t


def bernoulli_log_prob(x, logits, softplus_logits=None):
    """log Bernoulli(x; sigmoid(logits)) per example: (..., D) each -> (...).

    log p = sum_d [x_d l_d - softplus(l_d)], which is finite for any finite
    logits and for grey-level x in [0, 1] is the cross-entropy. softplus_logits
    may pass softplus(logits) when the caller has it already.
    """
    sp = softplus(logits) if softplus_logits is None else softplus_logits
    return _row_dot(x, logits) - np.sum(sp, axis=-1)


def _row_dot(a, b):
    """sum_d a_d b_d: (..., D), (..., D) -> (...), as a (1, D) x (D, 1) matrix product per row
    (BLAS's dot: faster than einsum on a training step's shapes, and no (..., D) temporary)."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def bernoulli_log_prob_and_exp(x, logits):
    """(log Bernoulli(x; sigmoid(logits)) per example, e^logits, 1 + e^logits): a forward whose backward follows.

    The same log p as bernoulli_log_prob, summed differently: with t = 1 + e^l,
    sum_d softplus(l_d) = sum_d log t_d = the sum of logs of products of
    2, 4 or 8 t's, one log per group (log and exp are the costly passes). A
    group is as large as keeps its product finite: t < e^(l + 1), so g
    factors stay below e^(g (max l + 1)), and g (max l + 1) must stay below
    the dtype's overflow point of e^l. e^l and t are kept for the gradient,
    where sigmoid(l) = e^l / t then costs one division instead of another exp.
    With the largest logits too large even for pairs: softplus, and None, None.
    """
    limit = _EXP_SAFE.get(logits.dtype)
    # np.max, without its Python wrapper's cost
    top = max(float(np.maximum.reduce(logits, axis=None)), 0.0) if limit is not None and logits.size else math.nan
    if not 2 * (top + 1.0) < limit:   # NaN too (max(nan, 0.0) is nan)
        return bernoulli_log_prob(x, logits), None, None
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


def bernoulli_log_prob_grad(dlogp, x, logits, softplus_logits=None, exp_logits=None, one_plus_exp=None):
    """dlogp (B,) -> dlogits (B, D). Local derivative: d/dl = x - sigmoid(l).

    sigmoid(l) = e^l / (1 + e^l) when the forward passes exp_logits, and
    one_plus_exp = 1 + e^l if it has that too (see bernoulli_log_prob_and_exp),
    else exp(l - softplus(l)), which reuses a softplus the forward has; exp
    is cheaper than scipy.special.expit.
    """
    if exp_logits is not None:
        d = np.add(exp_logits, 1.0) if one_plus_exp is None else one_plus_exp
        d = np.divide(exp_logits, d)             # sigmoid(l), in a new array
    else:
        d = softplus(logits) if softplus_logits is None else softplus_logits
        d = np.subtract(logits, d)
        np.exp(d, out=d)                         # sigmoid(l)
    np.subtract(x, d, out=d)
    d *= _expand(dlogp, logits)
    return d
