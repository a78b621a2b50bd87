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

def reparameterize(mu, log_sigma, eps):
    """z = mu + sigma * eps: mu, log_sigma, eps (B, Z) -> z (B, Z)."""
    return mu + std(log_sigma) * eps


def reparameterize_grad(dz, log_sigma, eps):
    """dz (B, Z) -> (dmu, dlog_sigma), each (B, Z).

    Local derivative: dz/dmu = 1, dz/dlog_sigma = sigma * eps.
    """
    return dz, dz * std(log_sigma) * eps * _in_range(log_sigma)


# --- KL divergences -------------------------------------------------------------

def kl_standard_normal(mu, log_sigma):
    """KL(N(mu, sigma^2) || N(0, I)) per example: (B, Z), (B, Z) -> (B,).

    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - 2 log sigma_j).
    """
    sigma = std(log_sigma)
    return 0.5 * np.sum(mu * mu + sigma * sigma - 1.0 - 2.0 * clip_log_sigma(log_sigma), axis=-1)


def kl_standard_normal_grad(dkl, mu, log_sigma):
    """dkl (B,) -> (dmu, dlog_sigma), each (B, Z).

    Local derivative: dKL/dmu = mu, dKL/dlog_sigma = sigma^2 - 1.
    """
    sigma = std(log_sigma)
    dkl = _expand(dkl, mu)
    return dkl * mu, dkl * (sigma * sigma - 1.0) * _in_range(log_sigma)


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


# --- log densities of Gaussians ------------------------------------------------

def standard_normal_log_prob(z):
    """log N(z; 0, I) per example: (..., Z) -> (...)."""
    return -0.5 * np.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * LOG_2PI


def log_q_reparameterized(eps, log_sigma):
    """log q(z|x) = log N(z; mu, diag(sigma^2)) at z = mu + sigma * eps: eps (..., Z), log_sigma
    broadcastable to it -> (...).

    (z - mu) / sigma is eps exactly, so the density needs no division:
    log q = sum_j [-eps_j^2 / 2 - log sigma_j - log(2 pi) / 2]. Held at fixed
    eps, its derivatives are plain: d/dmu = 0, d/dlog_sigma_j = -1 (inside the clip).
    """
    log_sigma = np.broadcast_to(clip_log_sigma(log_sigma), eps.shape)
    return np.sum(-0.5 * eps * eps - log_sigma, axis=-1) - 0.5 * eps.shape[-1] * LOG_2PI


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

def softplus(l):
    """log(1 + e^l) elementwise, finite for every finite l: (...) -> (...).

    Written as max(l, 0) + log(1 + e^-|l|), whose exponent is never positive,
    so e^-|l| cannot overflow; log1p keeps the precision where it is tiny.
    (np.logaddexp(0, l) is the same number at several times the cost.)
    """
    return np.maximum(l, 0) + np.log1p(np.exp(-np.abs(l)))


def bernoulli_log_prob(x, logits):
    """log Bernoulli(x; sigmoid(logits)) per example: (..., D) each -> (...).

    log p = sum_d [x_d l_d - softplus(l_d)], which is finite for any finite
    logits and for grey-level x in [0, 1] is the cross-entropy.
    """
    return np.sum(x * logits - softplus(logits), axis=-1)


def sigmoid(l):
    """1 / (1 + e^-l) elementwise: (...) -> (...), written as (1 + tanh(l / 2)) / 2.

    The same function (tanh(u) = (1 - e^-2u) / (1 + e^-2u)), but tanh
    saturates at +-1 instead of overflowing, and NumPy's tanh is several
    times faster than scipy.special.expit in float32. Its absolute error is
    an ulp of 1; for l below about -17 (float32) it rounds to 0, where expit
    keeps the tiny value: no gradient here can tell (x - sigmoid(l) is
    summed with x in [0, 1]).
    """
    return 0.5 * (1.0 + np.tanh(0.5 * l))


def bernoulli_log_prob_grad(dlogp, x, logits):
    """dlogp (B,) -> dlogits (B, D). Local derivative: d/dl = x - sigmoid(l)."""
    return _expand(dlogp, logits) * (x - sigmoid(logits))
