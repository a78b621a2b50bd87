"""Mistakes other VAE implementations are known for, each caught by the meaning it breaks.

A mistake made the same way in a forward and its backward passes every
gradient check. These tests check meanings instead: a statistic of the
samples, a sign, a loss worked out by hand, the finite difference of the right
function. docs/derivations.md ("Mistakes other VAE implementations are known
for") lists the mistakes, and for each one the mistaken variant that was put in
and the test here that failed.
"""
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import norm

from npvae import VAE
from npvae import distributions as dist
from npvae.gradcheck import TOLERANCE, check_entries, numerical_gradient, relative_error


def generic_model(likelihood="bernoulli", x_sigma=None, seed=0, D=6, hidden=(5,), Z=3, dtype=np.float64):
    """A small tanh VAE moved off its initial point (where the log_sigma heads are zero)."""
    model = VAE(D, hidden, Z, likelihood=likelihood, activation="tanh", dtype=dtype, seed=seed, x_sigma=x_sigma)
    rng = np.random.default_rng(100 + seed)
    for p in model.params.values():
        p += 0.1 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
    return model


def data(model, rng, B):
    """Grey levels for a Bernoulli decoder, reals for a Gaussian one."""
    if model.likelihood == "bernoulli":
        return rng.random((B, model.x_dim))
    return rng.standard_normal((B, model.x_dim))


def flat(grads):
    return np.concatenate([np.ravel(g) for g in grads.values()])


# --- (a) the sampler's std is the KL's sigma ------------------------------------------------

def test_model_samples_z_with_std_exp_log_sigma_and_its_kl_is_of_that_q():
    # numpy-ml's bug: z drawn with exp(log_var) as the standard deviation while the KL
    # reads the same number as a log-variance. Forward and backward agree, so only the
    # samples show it. The z here is the one the model's own forward fed its decoder.
    model = generic_model(Z=3)
    model.params["enc.log_sigma.W"][...] = 0.0
    model.params["enc.log_sigma.b"][...] = [-1.0, 0.0, 0.7]   # sigma < 1, = 1 and > 1
    rng = np.random.default_rng(1)
    N = 100_000
    x = np.repeat(data(model, rng, 1), N, axis=0)               # one q(z|x), N draws from it
    _, kl = model.forward(x, rng.standard_normal((N, 3)))
    z = model.decoder.layers[0].x.copy()                         # (N, Z): the decoder's input
    mu, log_sigma = (a[0] for a in model.encode(x[:1]))
    sigma = np.exp(log_sigma)                                    # exp taken here, not by dist.std
    assert np.all(np.abs(z.mean(axis=0) - mu) <= 5 * sigma / np.sqrt(N))
    assert np.all(np.abs(z.std(axis=0) - sigma) <= 5 * sigma / np.sqrt(2 * N))
    # The closed-form KL is E_q[log q(z) - log p(z)] under those same samples, with the
    # densities from scipy: sampler and KL describe one q.
    log_ratio = norm.logpdf(z, mu, sigma).sum(axis=1) - norm.logpdf(z).sum(axis=1)
    se = log_ratio.std(ddof=1) / np.sqrt(N)
    assert abs(log_ratio.mean() - kl[0]) <= 5 * se, (log_ratio.mean(), kl[0], se)


# --- (b) the KL's sign ------------------------------------------------------------------------

def test_kl_is_nonnegative_zero_at_the_prior_and_the_loss_falls_with_it():
    model = generic_model()
    rng = np.random.default_rng(2)
    B = 5
    x, eps = data(model, rng, B), rng.standard_normal((B, 3))
    assert np.all(model.elbo_terms(x, eps)[1] > 0)
    P = model.params
    # A decoder that ignores z: log p(x|z) is then a constant c, so loss = -c + mean(kl).
    P["dec.h0.W"][...] = 0.0
    P["enc.mu.W"][...] = P["enc.log_sigma.W"][...] = 0.0
    mu_dir, ls_dir = np.array([1.0, -2.0, 0.5]), np.array([0.5, -0.3, 0.2])

    def at(t):
        """q = N(t mu_dir, exp(t ls_dir)^2) for every x: (loss, mean kl)."""
        P["enc.mu.b"][...], P["enc.log_sigma.b"][...] = t * mu_dir, t * ls_dir
        loss, _, terms = model.loss_and_grads(x, eps, terms=True)
        return loss, float(np.mean(terms["kl"]))

    loss0, kl0 = at(0.0)
    assert kl0 == 0.0                                            # q is the prior
    losses, kls = zip(*(at(t) for t in (1.0, 0.5, 0.25)))
    assert kls[0] > kls[1] > kls[2] > 0
    assert losses[0] > losses[1] > losses[2] > loss0             # the loss falls as the KL shrinks
    np.testing.assert_allclose(np.array(losses) - loss0, kls, rtol=1e-12)   # by exactly the KL
    # The gradient points the same way: d loss/d mu = mu and d loss/d log_sigma = sigma^2 - 1,
    # and a small step against it shrinks the KL.
    at(1.0)
    _, grads = model.loss_and_grads(x, eps, copy=True)
    np.testing.assert_allclose(grads["enc.mu.b"], mu_dir, rtol=1e-12)
    np.testing.assert_allclose(grads["enc.log_sigma.b"], np.exp(2 * ls_dir) - 1.0, rtol=1e-12)
    for name in ("enc.mu.b", "enc.log_sigma.b"):
        P[name] -= 0.1 * grads[name]
    assert model.loss_and_grads(x, eps, terms=True)[2]["kl"].mean() < kls[0]


# --- (c) the reductions -------------------------------------------------------------------------

def known_model():
    """A Bernoulli VAE (D = 3, H = 2, Z = 2, identity activations) whose terms are known numbers.

    Decoder: every weight 0, so logits = (0, log 3, -log 3) whatever z.
    Encoder: h = (x_0, 0), mu = (2 x_0, -1), log_sigma = (0, log 2).
    """
    model = VAE(3, (2,), 2, likelihood="bernoulli", activation="identity", dtype=np.float64, seed=0)
    for p in model.params.values():
        p[...] = 0.0
    P = model.params
    P["dec.logits.b"][...] = [0.0, np.log(3.0), -np.log(3.0)]
    P["enc.h0.W"][0, 0] = 1.0
    P["enc.mu.W"][0, 0] = 2.0
    P["enc.mu.b"][...] = [0.0, -1.0]
    P["enc.log_sigma.b"][...] = [0.0, np.log(2.0)]
    return model


def test_loss_is_the_batch_mean_of_sums_over_pixels_and_latents_in_known_numbers():
    # Mean over pixels for log p(x|z), or over latents for the KL, or a sum over the batch,
    # gives a consistent model with the wrong weight on one term: only the numbers show it.
    model = known_model()
    x = np.array([[1.0, 1.0, 0.0],
                  [0.0, 1.0, 1.0]])
    eps = np.random.default_rng(3).standard_normal((2, 2))      # the decoder ignores z
    loss, grads, terms = model.loss_and_grads(x, eps, terms=True, copy=True)
    # log p(x|z) = sum_d x_d l_d - softplus(l_d); softplus(0, log 3, -log 3) = log 2, log 4, log 4/3,
    # which sum to log 32/3. Example 1: x.l = log 3; example 2: x.l = log 3 - log 3 = 0.
    log_px_z = np.log([9.0 / 32.0, 3.0 / 32.0])
    # KL = sum_j (mu_j^2 + sigma_j^2 - 1 - 2 log sigma_j) / 2 with sigma = (1, 2):
    # example 1, mu = (2, -1): 2 + (2 - log 2); example 2, mu = (0, -1): 0 + (2 - log 2).
    kl = np.array([4.0 - np.log(2.0), 2.0 - np.log(2.0)])
    np.testing.assert_allclose(terms["log_px_z"], log_px_z, rtol=1e-14)
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-14)
    assert loss == pytest.approx(3.0 + 0.5 * np.log(256.0 / 27.0), rel=1e-14)   # -mean(log_px_z - kl)
    assert loss == pytest.approx(-np.mean(log_px_z - kl), rel=1e-14)
    # The gradient weighs the terms the same way, in numbers worked out by hand:
    # d loss/d mu_b = mu_b / B, d loss/d log_sigma_b = (sigma^2 - 1) / B, d loss/d l_b = -(x_b - sigmoid(l)) / B.
    np.testing.assert_allclose(grads["enc.mu.b"], [1.0, -1.0], rtol=1e-14)           # mean of (2,-1), (0,-1)
    np.testing.assert_allclose(grads["enc.mu.W"], [[1.0, -0.5], [0.0, 0.0]], rtol=1e-14)   # mean of h^T mu
    np.testing.assert_allclose(grads["enc.log_sigma.b"], [0.0, 3.0], atol=1e-15)
    # sigmoid(l) = (1/2, 3/4, 1/4); x - sigmoid(l) = (1/2, 1/4, -1/4) and (-1/2, 1/4, 3/4)
    np.testing.assert_allclose(grads["dec.logits.b"], [0.0, -0.25, -0.25], atol=1e-15)


# --- (d) one eps for the forward and the backward -------------------------------------------------

@pytest.mark.parametrize("k", [1, 4])
def test_gradient_is_the_finite_difference_of_the_same_samples_loss(k):
    model = generic_model("gaussian", seed=4)
    rng = np.random.default_rng(4)
    B, Z = 4, model.z_dim
    x = data(model, rng, B)
    eps = rng.standard_normal((B, Z) if k == 1 else (B, k, Z))
    _, grads = model.loss_and_grads(x, eps, k=k, copy=True)
    errors = check_entries(lambda: model.loss_and_grads(x, eps, k=k)[0], model.params, grads)
    assert max(errors.values()) <= TOLERANCE, errors
    # The check has power: the gradient of another sample is far from this one's.
    _, other = model.loss_and_grads(x, rng.standard_normal(eps.shape), k=k, copy=True)
    assert relative_error(flat(other), flat(grads)) > 0.01
    # With the noise drawn from rng, the gradient is that of the eps rng drew, bit for bit.
    drawn = np.random.default_rng(5).standard_normal(eps.shape, dtype=model.dtype)
    _, from_eps = model.loss_and_grads(x, drawn, k=k, copy=True)
    _, from_rng = model.loss_and_grads(x, rng=np.random.default_rng(5), k=k, copy=True)
    for name in grads:
        np.testing.assert_array_equal(from_rng[name], from_eps[name])


# --- (e) the IWAE weights carry no gradient of their own -------------------------------------------

def test_iwae_gradient_is_the_bounds_not_one_with_the_weights_gradient_added():
    model = generic_model("bernoulli", seed=5)
    rng = np.random.default_rng(5)
    B, K, Z = 4, 5, model.z_dim
    x, eps = data(model, rng, B), 1.5 * rng.standard_normal((B, K, Z))   # spread-out weights

    def log_weights():
        """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), (B, K), with scipy's densities."""
        mu, log_sigma = model.encode(x)
        sigma = np.exp(log_sigma)[:, None, :]
        z = mu[:, None, :] + sigma * eps                                         # (B, K, Z)
        logits = model.decode(z.reshape(B * K, Z)).reshape(B, K, -1)
        return (model.log_px_z(x[:, None, :], logits) + norm.logpdf(z).sum(axis=2)
                - norm.logpdf(z, mu[:, None, :], sigma).sum(axis=2))

    def bound_loss():            # -mean log (1/K) sum_k w_k
        return -np.mean(logsumexp(log_weights(), axis=1) - np.log(K))

    def undetached_loss():       # -mean sum_k w~_k log w_k with w~ = softmax(log w) differentiated too
        log_w = log_weights()
        return -np.mean(np.sum(softmax(log_w, axis=1) * log_w, axis=1))

    _, grads = model.loss_and_grads(x, eps, k=K, copy=True)
    assert model.loss_and_grads(x, eps, k=K)[0] == pytest.approx(bound_loss(), rel=1e-12)
    fd_bound = {n: numerical_gradient(bound_loss, p) for n, p in model.params.items()}
    fd_undetached = {n: numerical_gradient(undetached_loss, p) for n, p in model.params.items()}
    # d/dtheta of the second is the bound's gradient plus sum_k log w_k dw~_k/dtheta.
    errors = {n: relative_error(grads[n], fd_bound[n]) for n in grads}
    assert max(errors.values()) <= TOLERANCE, errors
    assert relative_error(flat(grads), flat(fd_undetached)) > 0.01
    # The weights are a softmax over K: they sum to 1 for each example, the reason
    # sum_k w~_k d(log w_k) is the whole gradient of log sum_k w_k.
    np.testing.assert_allclose(softmax(log_weights(), axis=1).sum(axis=1), 1.0, rtol=1e-14)


# --- (f) bounded log_sigma ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log_sigma", [1e3, -1e3])
def test_extreme_log_sigma_stays_finite_and_has_no_gradient_outside_the_clip(log_sigma, dtype):
    model = generic_model("gaussian", seed=6, dtype=dtype)
    P = model.params
    P["enc.log_sigma.W"][...] = P["dec.log_sigma.W"][...] = 0.0
    P["enc.log_sigma.b"][...] = log_sigma                # exp(+-1000) over- or underflows in any float
    P["dec.log_sigma.b"][...] = -log_sigma
    rng = np.random.default_rng(6)
    x = data(model, rng, 4).astype(dtype)
    clipped = np.clip(log_sigma, dist.LOG_SIGMA_MIN, dist.LOG_SIGMA_MAX)
    for k in (1, 3):
        eps = rng.standard_normal((4, model.z_dim) if k == 1 else (4, k, model.z_dim))
        with warnings.catch_warnings():
            warnings.simplefilter("error")               # no overflow or invalid-value warning
            loss, grads, terms = model.loss_and_grads(x, eps, k=k, copy=True, terms=True)
            P["enc.log_sigma.b"][...] = log_sigma + 1.0  # the loss is flat out there
            assert model.loss_and_grads(x, eps, k=k)[0] == loss
            P["enc.log_sigma.b"][...] = log_sigma
        assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())
        for name in ("enc.log_sigma.W", "enc.log_sigma.b", "dec.log_sigma.W", "dec.log_sigma.b"):
            np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
        if k == 1:   # the KL is that of the clipped sigma
            mu = model.encode(x)[0].astype(np.float64)
            want = 0.5 * np.sum(mu * mu + np.exp(2.0 * clipped) - 1.0 - 2.0 * clipped, axis=1)
            np.testing.assert_allclose(terms["kl"], want, rtol=1e-6 if dtype == np.float32 else 1e-13)
