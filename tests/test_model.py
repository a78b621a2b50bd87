"""The VAE: whole-model gradients, the training interface, and what the ELBO and IWAE bound mean."""
import warnings

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import multivariate_normal

from npvae import VAE
from npvae import distributions as dist
from npvae.gradcheck import TOLERANCE, check_entries, numerical_gradient

KINKED = ("relu", "leaky_relu", "elu")

# (likelihood, activation, x_sigma): every decoder head and a spread of activations.
MODELS = [
    ("bernoulli", "relu", None),
    ("bernoulli", "tanh", None),
    ("bernoulli", "softplus", None),
    ("gaussian", "elu", None),
    ("gaussian", "sigmoid", None),
    ("gaussian", "leaky_relu", 0.5),
    ("gaussian", "tanh", 1.3),
]
MODEL_IDS = [f"{lik}{'' if xs is None else '-fixed'}-{act}" for lik, act, xs in MODELS]
LIKELIHOODS = [("bernoulli", None), ("gaussian", None), ("gaussian", 0.5)]
LIKELIHOOD_IDS = ["bernoulli", "gaussian", "gaussian-fixed"]


def small_model(likelihood="bernoulli", activation="tanh", x_sigma=None, seed=1,
                D=6, hidden=(5, 4), Z=3, dtype=np.float64, generic=True):
    """A small VAE; generic=True moves it off its initial point to a generic one.

    At init the log_sigma heads have zero weights and zero biases, so the KL's
    gradient there is exactly 0 and a finite difference can only compare rounding
    noise. Small random weights and biases everywhere (and log_sigma kept far
    inside its clip range, where the loss is smooth) make every gradient entry real.
    """
    model = VAE(D, hidden, Z, likelihood=likelihood, activation=activation,
                dtype=dtype, seed=seed, x_sigma=x_sigma)
    if generic:
        rng = np.random.default_rng(1000 + seed)
        for p in model.params.values():
            p += 0.1 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
    return model


def data(model, rng, B=4):
    """Grey levels in [0, 1] for a Bernoulli decoder, reals for a Gaussian one."""
    if model.likelihood == "bernoulli":
        return rng.random((B, model.x_dim))
    return rng.standard_normal((B, model.x_dim))


def copy_grads(grads):
    return {n: g.copy() for n, g in grads.items()}


def assert_away_from_kinks(model, margin=1e-4):
    """After a forward pass: no hidden pre-activation is within margin of a rectifier's kink."""
    if model.activation not in KINKED:
        return
    for layer in model.encoder.layers + model.decoder.layers:
        a = layer.x @ layer.W + layer.b
        assert np.min(np.abs(a)) > margin, "test point too close to a kink; change the seed"


def assert_smooth_scales(model, low=-8.0, high=8.0):
    """After a forward pass: every log_sigma is far inside the clip range."""
    heads = [model.enc_log_sigma] + model.dec_heads[1:]  # dec_heads[1] is a learned log_sigma
    for layer in heads:
        assert low < np.min(layer.y) and np.max(layer.y) < high, "log_sigma near the clip; change the seed"


def model_objective(model, term, rng, k=3, B=4):
    """(f, grads): f() is a random weighting of the model's terms with eps fixed; grads its gradient."""
    x = data(model, rng, B)
    if term == "iwae":
        eps, r = rng.standard_normal((B, k, model.z_dim)), rng.standard_normal(B)

        def f():
            return float(np.sum(r * model.forward_iwae(x, eps)))
        f()
        assert_away_from_kinks(model)
        assert_smooth_scales(model)
        return f, copy_grads(model.backward_iwae(r))
    eps = rng.standard_normal((B, model.z_dim))
    r_rec = rng.standard_normal(B) if term in ("recon", "elbo") else np.zeros(B)
    r_kl = rng.standard_normal(B) if term in ("kl", "elbo") else np.zeros(B)

    def f():
        log_px_z, kl = model.forward(x, eps)
        return float(np.sum(r_rec * log_px_z + r_kl * kl))
    f()
    assert_away_from_kinks(model)
    assert_smooth_scales(model)
    return f, copy_grads(model.backward(r_rec, r_kl))


# --- whole-model finite differences -------------------------------------------------------

@pytest.mark.parametrize("term", ["recon", "kl", "elbo", "iwae"])
@pytest.mark.parametrize("likelihood, activation, x_sigma", MODELS, ids=MODEL_IDS)
def test_model_gradient_per_entry(likelihood, activation, x_sigma, term):
    model = small_model(likelihood, activation, x_sigma, seed=3)
    f, grads = model_objective(model, term, np.random.default_rng(7))
    errors = check_entries(f, model.params, grads)
    assert set(errors) == set(model.params)
    assert max(errors.values()) <= TOLERANCE, {n: e for n, e in errors.items() if e > TOLERANCE}


def test_kl_term_leaves_decoder_gradients_at_zero():
    # The KL does not depend on the decoder; stale gradients from an earlier call must not survive.
    model = small_model("gaussian", "tanh")
    rng = np.random.default_rng(0)
    model_objective(model, "elbo", rng)
    _, grads = model_objective(model, "kl", rng)
    for name, g in grads.items():
        if name.startswith("dec."):
            np.testing.assert_array_equal(g, 0.0)
        else:
            assert np.any(g != 0)


def direction_error(f, model, grads, rng, h=1e-5):
    """Relative error of g . u against (f(theta + h u) - f(theta - h u)) / 2h for a random unit u.

    u is redrawn if it is nearly orthogonal to g: there g . u is a tiny difference of
    large terms and its relative error says nothing about the gradient.
    """
    # g laid out like model.flat_params, whose alignment padding gets a zero gradient
    g = np.zeros(model.flat_params.size)
    base = model.flat_params.ctypes.data
    for n, p in model.params.items():
        start = (p.ctypes.data - base) // p.itemsize
        g[start:start + p.size] = grads[n].ravel()
    while True:
        u = rng.standard_normal(g.size)
        u /= np.linalg.norm(u)
        analytic = g @ u
        if abs(analytic) > 0.3 * np.linalg.norm(g) / np.sqrt(g.size):
            break
    theta = model.flat_params.copy()
    model.flat_params[:] = theta + h * u
    f_plus = f()
    model.flat_params[:] = theta - h * u
    f_minus = f()
    model.flat_params[:] = theta
    numeric = (f_plus - f_minus) / (2 * h)
    return abs(analytic - numeric) / abs(analytic)


@pytest.mark.parametrize("likelihood, activation, term, D, hidden, Z, k", [
    ("bernoulli", "relu", "elbo", 784, (400,), 20, 1),
    ("gaussian", "tanh", "iwae", 100, (64, 48), 10, 5),
    ("gaussian", "elu", "elbo", 50, (32, 32, 16), 8, 1),
    ("gaussian", "leaky_relu", "iwae", 60, (40,), 6, 4),
])
def test_model_gradient_random_direction_large(likelihood, activation, term, D, hidden, Z, k):
    model = small_model(likelihood, activation, None, seed=4, D=D, hidden=hidden, Z=Z)
    for seed in range(20):  # the first data and noise whose pre-activations keep off the kinks
        try:
            f, grads = model_objective(model, term, np.random.default_rng(seed), k=k, B=8)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError("no test point away from the kinks")
    rng = np.random.default_rng(100 + seed)
    for _ in range(3):  # three independent directions
        assert direction_error(f, model, grads, rng) <= TOLERANCE


@pytest.mark.parametrize("k, beta", [(1, 1.0), (1, 0.3), (3, 1.0)])
@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_loss_and_grads_is_the_gradient_of_its_loss(likelihood, x_sigma, k, beta):
    # Checks the -1/B and beta/B factors that loss_and_grads feeds into backward.
    model = small_model(likelihood, "tanh", x_sigma, seed=5)
    rng = np.random.default_rng(12)
    x = data(model, rng, B=5)
    eps = rng.standard_normal((5, model.z_dim) if k == 1 else (5, k, model.z_dim))
    f = lambda: model.loss_and_grads(x, eps, k=k, beta=beta)[0]  # noqa: E731
    _, grads = model.loss_and_grads(x, eps, k=k, beta=beta, copy=True)
    errors = check_entries(f, model.params, grads)
    assert max(errors.values()) <= TOLERANCE, errors


# --- loss_and_grads -----------------------------------------------------------------------

@pytest.fixture(params=list(zip(LIKELIHOODS, LIKELIHOOD_IDS)), ids=LIKELIHOOD_IDS)
def model_and_data(request):
    (likelihood, x_sigma), _ = request.param
    model = small_model(likelihood, "tanh", x_sigma, seed=6)
    rng = np.random.default_rng(13)
    return model, data(model, rng, B=5), rng


def test_loss_is_minus_mean_elbo(model_and_data):
    model, x, rng = model_and_data
    eps = rng.standard_normal((5, model.z_dim))
    loss, _ = model.loss_and_grads(x, eps)
    assert isinstance(loss, float)
    assert loss == pytest.approx(-np.mean(model.elbo(x, eps)), rel=1e-13)
    log_px_z, kl = model.elbo_terms(x, eps)
    np.testing.assert_allclose(model.elbo(x, eps), log_px_z - kl, rtol=1e-14)
    assert np.all(kl > 0)


def test_grads_have_the_keys_and_shapes_of_params(model_and_data):
    model, x, rng = model_and_data
    for k in (1, 3):
        _, grads = model.loss_and_grads(x, rng=rng, k=k)
        assert list(grads) == list(model.params)
        for name, p in model.params.items():
            assert grads[name].shape == p.shape and grads[name].dtype == p.dtype
        assert sum(g.size for g in grads.values()) == model.n_params


def test_grads_are_the_model_buffers_unless_copied(model_and_data):
    # By default, as a training loop wants: the model's own buffers, which the next call overwrites.
    model, x, rng = model_and_data
    _, grads = model.loss_and_grads(x, rng=rng)
    for name in model.params:
        assert grads[name] is model.grads[name]
        assert np.shares_memory(grads[name], model.flat_grads)
    kept = {n: g.copy() for n, g in grads.items()}
    _, copied = model.loss_and_grads(x, rng=rng, copy=True)
    for name in model.params:
        assert not np.shares_memory(copied[name], model.flat_grads)
        np.testing.assert_array_equal(copied[name], model.grads[name])
    assert any(not np.array_equal(kept[n], copied[n]) for n in kept)   # other noise, another gradient


def test_fixed_eps_is_deterministic(model_and_data):
    model, x, rng = model_and_data
    for eps in (rng.standard_normal((5, model.z_dim)), rng.standard_normal((5, 4, model.z_dim))):
        k = 1 if eps.ndim == 2 else 4
        loss1, g1 = model.loss_and_grads(x, eps, k=k, copy=True)
        model.loss_and_grads(x, rng=rng, k=k)  # something else in between
        loss2, g2 = model.loss_and_grads(x, eps, k=k)
        assert loss1 == loss2
        for name in g1:
            np.testing.assert_array_equal(g1[name], g2[name])
    # A seeded generator is just as reproducible; fresh noise is not.
    l1, _ = model.loss_and_grads(x, rng=np.random.default_rng(99))
    l2, _ = model.loss_and_grads(x, rng=np.random.default_rng(99))
    l3, _ = model.loss_and_grads(x, rng=np.random.default_rng(100))
    assert l1 == l2 and l1 != l3


def test_beta_scales_the_kl(model_and_data):
    model, x, rng = model_and_data
    B = x.shape[0]
    eps = rng.standard_normal((B, model.z_dim))
    log_px_z, kl = model.elbo_terms(x, eps)
    # The reconstruction-only gradient, straight from backward.
    model.forward(x, eps)
    recon_only = copy_grads(model.backward(np.full(B, -1.0 / B), np.zeros(B)))
    loss0, g0 = model.loss_and_grads(x, eps, beta=0.0, copy=True)
    loss1, g1 = model.loss_and_grads(x, eps, beta=1.0, copy=True)
    assert loss0 == pytest.approx(-np.mean(log_px_z), rel=1e-13)
    for name in g0:
        np.testing.assert_allclose(g0[name], recon_only[name], rtol=1e-13, atol=1e-15)
    assert any(np.max(np.abs(g1[n] - g0[n])) > 1e-3 for n in g0)  # the KL does contribute
    for beta in (0.25, 3.0):
        loss, g = model.loss_and_grads(x, eps, beta=beta)
        assert loss == pytest.approx(-np.mean(log_px_z) + beta * np.mean(kl), rel=1e-13)
        for name in g:  # the loss is linear in beta, so is its gradient
            np.testing.assert_allclose(g[name], g0[name] + beta * (g1[name] - g0[name]),
                                       rtol=1e-10, atol=1e-12)


def test_k_greater_than_one_is_the_iwae_bound(model_and_data):
    model, x, rng = model_and_data
    B, K = x.shape[0], 4
    eps = rng.standard_normal((B, K, model.z_dim))
    loss, grads = model.loss_and_grads(x, eps, k=K, copy=True)
    assert loss == pytest.approx(-np.mean(model.iwae_bound(x, K, eps)), rel=1e-13)
    model.forward_iwae(x, eps)
    expected = model.backward_iwae(np.full(B, -1.0 / B))
    for name in grads:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-13, atol=1e-15)


def test_objective_iwae_with_one_sample_is_the_bound_not_the_analytic_elbo(model_and_data):
    # objective="iwae", k=1: the single-sample bound, whose KL is Monte Carlo (log p(z) - log q(z|x)).
    model, x, rng = model_and_data
    eps = rng.standard_normal((x.shape[0], 1, model.z_dim))
    loss, grads = model.loss_and_grads(x, eps, k=1, objective="iwae", copy=True)
    assert loss == pytest.approx(-np.mean(model.iwae_bound(x, 1, eps)), rel=1e-13)
    model.forward_iwae(x, eps)
    expected = model.backward_iwae(np.full(x.shape[0], -1.0 / x.shape[0]))
    for name in grads:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-13, atol=1e-15)
    assert loss != pytest.approx(model.loss_and_grads(x, eps[:, 0])[0], rel=1e-6)   # not the closed-form KL
    with pytest.raises(ValueError, match="objective"):
        model.loss_and_grads(x, k=3, objective="elbo")


def test_terms_are_the_per_example_values_of_the_loss(model_and_data):
    model, x, rng = model_and_data
    eps = rng.standard_normal((x.shape[0], model.z_dim))
    loss, _, terms = model.loss_and_grads(x, eps, beta=0.4, terms=True)
    log_px_z, kl = model.elbo_terms(x, eps)
    np.testing.assert_array_equal(terms["log_px_z"], log_px_z)
    np.testing.assert_array_equal(terms["kl"], kl)
    assert loss == pytest.approx(-np.mean(log_px_z - 0.4 * kl), rel=1e-13)
    eps = rng.standard_normal((x.shape[0], 3, model.z_dim))
    loss, _, terms = model.loss_and_grads(x, eps, k=3, terms=True)
    np.testing.assert_allclose(terms["bound"], model.iwae_bound(x, 3, eps), rtol=1e-13)
    assert loss == pytest.approx(-np.mean(terms["bound"]), rel=1e-13)


def test_eps_shape_must_match_k(model_and_data):
    model, x, rng = model_and_data
    B, Z = x.shape[0], model.z_dim
    with pytest.raises(ValueError, match="eps"):
        model.loss_and_grads(x, rng.standard_normal((B, Z)), k=3)
    with pytest.raises(ValueError, match="eps"):
        model.loss_and_grads(x, rng.standard_normal((B, 3, Z)), k=1)
    with pytest.raises(ValueError, match="eps"):
        model.iwae_bound(x, 2, rng.standard_normal((B, 3, Z)))
    with pytest.raises(ValueError, match="beta"):
        model.loss_and_grads(x, rng.standard_normal((B, 3, Z)), k=3, beta=0.5)


@pytest.mark.parametrize("bad, error", [
    (lambda m: np.full((2, m.x_dim), 1.5), ValueError),          # outside [0, 1]
    (lambda m: np.ones((2, m.x_dim + 1)), ValueError),           # wrong width
    (lambda m: np.ones(m.x_dim), ValueError),                    # not (B, D)
    (lambda m: np.full((2, m.x_dim), np.nan), ValueError),
    (lambda m: np.ones((2, m.x_dim), dtype=int), TypeError),
])
def test_bad_x_is_rejected(bad, error):
    model = small_model("bernoulli")
    with pytest.raises(error):
        model.elbo(bad(model))


# --- the reparameterized gradient is unbiased -----------------------------------------------

def test_pathwise_gradient_of_a_quadratic_is_unbiased():
    # f(z) = sum(a z^2 + c z), z ~ N(mu, sigma^2): E f = sum(a (mu^2 + sigma^2) + c mu), so
    # dE/dmu = 2 a mu + c and dE/dlog_sigma = 2 a sigma^2.
    rng = np.random.default_rng(20)
    a, c = np.array([0.5, -1.5, 2.0]), np.array([1.0, 0.3, 0.7])
    mu, log_sigma = np.array([0.4, -1.0, 0.2]), np.array([-0.3, 0.5, 0.0])
    eps = rng.standard_normal((100_000, 3))
    z = dist.reparameterize(mu, log_sigma, eps)                # (N, Z)
    dmu, dls = dist.reparameterize_grad(2 * a * z + c, log_sigma, eps)  # per-sample pathwise gradients
    sigma = np.exp(log_sigma)
    for estimate, exact in ((dmu, 2 * a * mu + c), (dls, 2 * a * sigma ** 2)):
        mean, se = estimate.mean(axis=0), estimate.std(axis=0, ddof=1) / np.sqrt(len(eps))
        assert np.all(np.abs(mean - exact) <= 5 * se), (mean, exact, se)
        assert np.all(se < 0.02 * np.abs(exact))  # tight enough to mean something


def linear_gaussian_model(seed=0):
    """A VAE whose decoder is linear (identity activation, fixed sigma), so everything has a closed form."""
    return VAE(3, (2,), 2, likelihood="gaussian", activation="identity",
               dtype=np.float64, seed=seed, x_sigma=0.7)


def linear_decoder(model):
    """mean(z) = z A + c: (A (Z, D), c (D,))."""
    c = model.decode(np.zeros((1, model.z_dim)))[0][0]
    A = model.decode(np.eye(model.z_dim))[0] - c
    return A, c


def expected_elbo(model, x):
    """E_q[log p(x|z)] - KL in closed form for the linear-Gaussian model: (B, D) -> (B,)."""
    mu, log_sigma = model.encode(x)                     # (B, Z)
    A, c = linear_decoder(model)
    s = model.x_sigma
    residual = x - (mu @ A + c)                          # (B, D)
    spread = np.exp(2 * log_sigma) @ (A * A)             # E_q of (z - mu) A squared, (B, D)
    log_px_z = (-0.5 * np.sum(residual ** 2 + spread, axis=-1) / s ** 2
                - x.shape[1] * (0.5 * np.log(2 * np.pi) + np.log(s)))
    return log_px_z - dist.kl_standard_normal(mu, log_sigma)


def test_linear_gaussian_closed_form_matches_monte_carlo_elbo():
    model = linear_gaussian_model()
    x = np.random.default_rng(21).standard_normal((2, 3))
    N = 50_000
    elbo = model.elbo(np.repeat(x, N, axis=0), rng=np.random.default_rng(22)).reshape(2, N)
    exact = expected_elbo(model, x)
    for i in range(2):
        samples = elbo[i]
        assert abs(samples.mean() - exact[i]) <= 5 * samples.std() / np.sqrt(N)


def test_model_gradient_estimator_is_unbiased():
    # Average many loss_and_grads estimates; compare with the gradient of the closed-form
    # expected loss (by finite differences of that closed form, which is smooth).
    model = linear_gaussian_model()
    x = np.random.default_rng(23).standard_normal((2, 3))
    expected_loss = lambda: -np.mean(expected_elbo(model, x))  # noqa: E731
    exact = np.concatenate([numerical_gradient(expected_loss, p).ravel() for p in model.params.values()])
    T, M = 500, 40  # each estimate averages T draws per example; M independent estimates
    x_rep = np.repeat(x, T, axis=0)
    rng = np.random.default_rng(24)
    estimates = np.array([np.concatenate([g.ravel() for g in model.loss_and_grads(x_rep, rng=rng)[1].values()])
                          for _ in range(M)])
    mean, se = estimates.mean(axis=0), estimates.std(axis=0, ddof=1) / np.sqrt(M)
    scale = np.max(np.abs(exact))
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-8 * scale), np.max(np.abs(mean - exact) / (se + 1e-30))
    assert np.max(se) < 0.02 * scale


def _log_px_and_posterior(model, x):
    """log p(x) (B,) and the exact posterior (means (B, Z), covariance (Z, Z)) of the linear model."""
    A, c = linear_decoder(model)
    s2, Z = model.x_sigma ** 2, model.z_dim
    log_px = multivariate_normal(mean=c, cov=A.T @ A + s2 * np.eye(x.shape[1])).logpdf(x)
    cov = np.linalg.inv(np.eye(Z) + A @ A.T / s2)
    means = (x - c) @ A.T @ cov / s2
    return np.atleast_1d(log_px), means, cov


def test_elbo_gap_is_kl_to_the_true_posterior():
    # log p(x) - E_q[ELBO] = KL(q(z|x) || p(z|x)) >= 0: the ELBO is a lower bound, and by exactly this much.
    model = linear_gaussian_model(seed=3)
    x = np.random.default_rng(25).standard_normal((3, 3))
    log_px, post_means, post_cov = _log_px_and_posterior(model, x)
    mu, log_sigma = model.encode(x)
    cov_inv = np.linalg.inv(post_cov)
    for i in range(3):
        var_q, diff = np.exp(2 * log_sigma[i]), post_means[i] - mu[i]
        kl = 0.5 * (np.sum(np.diag(cov_inv) * var_q) + diff @ cov_inv @ diff - model.z_dim
                    + np.linalg.slogdet(post_cov)[1] - np.sum(np.log(var_q)))
        assert kl > 1e-3
        assert log_px[i] - expected_elbo(model, x[i:i + 1])[0] == pytest.approx(kl, rel=1e-10)


def exact_posterior_model(shift_mu=0.0, shift_log_sigma=0.0):
    """The linear-Gaussian model with a diagonal true posterior, and an encoder that outputs it.

    With A A^T diagonal the posterior N(m(x), S) has S = (I + A A^T / s^2)^-1
    diagonal and m(x) = (x - c) A^T S / s^2 linear in x, which the encoder can
    represent exactly. The shifts move q away from it.
    """
    model = linear_gaussian_model()
    s2 = model.x_sigma ** 2
    A = np.array([[0.8, 1.6, 0.0], [1.0, -0.5, 0.5]])  # orthogonal rows
    c = np.array([0.3, -0.2, 0.5])
    cov = np.linalg.inv(np.eye(2) + A @ A.T / s2)
    M = A.T @ cov / s2                                   # (D, Z)
    P = model.params
    P["dec.h0.W"][...], P["dec.h0.b"][...] = np.eye(2), 0.0
    P["dec.mean.W"][...], P["dec.mean.b"][...] = A, c
    P["enc.h0.W"][...], P["enc.h0.b"][...] = M, -c @ M
    P["enc.mu.W"][...], P["enc.mu.b"][...] = np.eye(2), shift_mu
    P["enc.log_sigma.W"][...] = 0.0
    P["enc.log_sigma.b"][...] = 0.5 * np.log(np.diag(cov)) + shift_log_sigma
    return model


def test_elbo_and_iwae_are_log_px_when_q_is_the_posterior():
    # Then log p(x, z) - log q(z|x) = log p(x) for every z: the bounds are tight for any eps.
    model = exact_posterior_model()
    x = np.random.default_rng(26).standard_normal((3, 3))
    log_px = _log_px_and_posterior(model, x)[0]
    np.testing.assert_allclose(expected_elbo(model, x), log_px, rtol=1e-12)
    for k in (1, 4):
        np.testing.assert_allclose(model.iwae_bound(x, k, rng=np.random.default_rng(k)), log_px, rtol=1e-12)


def test_iwae_approaches_log_px_from_below():
    model = exact_posterior_model(shift_mu=0.5, shift_log_sigma=0.7)
    x = np.random.default_rng(27).standard_normal((1, 3))
    log_px = _log_px_and_posterior(model, x)[0][0]
    elbo = expected_elbo(model, x)[0]
    assert log_px - elbo > 1.0  # a real gap to close
    bound = model.iwae_bound(np.repeat(x, 200, axis=0), 300, rng=np.random.default_rng(28))
    mean, se = bound.mean(), bound.std() / np.sqrt(bound.size)
    assert elbo < mean - 5 * se
    assert mean <= log_px + 5 * se
    assert log_px - mean < 0.05 * (log_px - elbo) + 5 * se  # nearly all of the gap is closed


# --- ELBO versus the IWAE bound -------------------------------------------------------------

def test_iwae_k1_is_the_elbo_with_a_monte_carlo_kl():
    model = small_model("bernoulli", "tanh", seed=7)
    rng = np.random.default_rng(30)
    x = data(model, rng, B=6)
    eps = rng.standard_normal((6, model.z_dim))
    log_px_z, _ = model.elbo_terms(x, eps)
    mu, log_sigma = model.encode(x)
    z = dist.reparameterize(mu, log_sigma, eps)
    expected = log_px_z + dist.standard_normal_log_prob(z) - dist.gaussian_log_prob(z, mu, log_sigma)
    np.testing.assert_allclose(model.iwae_bound(x, 1, eps[:, None, :]), expected, rtol=1e-12)


@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_iwae_k1_has_the_expectation_of_the_elbo(likelihood, x_sigma):
    model = small_model(likelihood, "tanh", x_sigma, seed=8)
    rng = np.random.default_rng(31)
    N = 20_000
    x = np.repeat(data(model, rng, B=1), N, axis=0)
    eps = rng.standard_normal((N, model.z_dim))
    # Paired on the same eps the difference is log p(z) - log q(z) + KL, of mean zero.
    diff = model.iwae_bound(x, 1, eps[:, None, :]) - model.elbo(x, eps)
    assert abs(diff.mean()) <= 5 * diff.std() / np.sqrt(N)


def test_iwae_bound_increases_with_k_and_exceeds_the_elbo():
    model = VAE(20, (16,), 4, activation="tanh", dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    N = 2000
    x = np.repeat((rng.random((1, 20)) < 0.5).astype(float), N, axis=0)
    estimates = [model.elbo(x, rng=rng)] + [model.iwae_bound(x, k, rng=rng) for k in (5, 50)]
    means = [e.mean() for e in estimates]
    ses = [e.std() / np.sqrt(N) for e in estimates]
    for i in range(2):
        assert means[i + 1] - means[i] > 5 * np.hypot(ses[i], ses[i + 1]), (means, ses)


# --- dtypes ------------------------------------------------------------------------------------

def _outputs(model, rng):
    """Every array the public API hands back, by name."""
    x = data(model, rng, B=3).astype(model.dtype)
    out = {"flat_params": model.flat_params, "flat_grads": model.flat_grads}
    out.update({f"params[{n}]": p for n, p in model.params.items()})
    out["encode.mu"], out["encode.log_sigma"] = model.encode(x)
    mu = out["encode.mu"]
    decoded = model.decode(mu)
    for i, d in enumerate(decoded if isinstance(decoded, tuple) else (decoded,)):
        out[f"decode[{i}]"] = d
    out["elbo"] = model.elbo(x, rng=rng)
    out["elbo_terms.log_px_z"], out["elbo_terms.kl"] = model.elbo_terms(x, rng=rng)
    out["iwae_bound"] = model.iwae_bound(x, 3, rng=rng)
    for k in (1, 3):
        _, grads = model.loss_and_grads(x, rng=rng, k=k, copy=True)
        out.update({f"grads(k={k})[{n}]": g for n, g in grads.items()})
    out["sample"] = model.sample(4, rng=rng)
    out["reconstruct"] = model.reconstruct(x)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_outputs_keep_the_model_dtype(likelihood, x_sigma, dtype):
    model = small_model(likelihood, "relu", x_sigma, dtype=dtype)
    wrong = {n: a.dtype.name for n, a in _outputs(model, np.random.default_rng(0)).items()
             if a.dtype != dtype}
    assert not wrong, f"silently changed dtype: {wrong}"


@pytest.mark.parametrize("likelihood, activation, x_sigma", MODELS, ids=MODEL_IDS)
def test_float32_training_passes_stay_in_float32(likelihood, activation, x_sigma, float64_watch):
    # The training step's forward and backward (ELBO and IWAE): every ufunc
    # pass that touches data computed from x or eps runs in float32.
    watch, log = float64_watch
    model = small_model(likelihood, activation, x_sigma, dtype=np.float32, generic=False)
    rng = np.random.default_rng(0)
    x = watch(data(model, rng, B=5).astype(np.float32))
    for k in (1, 3):
        eps = watch(rng.standard_normal((5, model.z_dim) if k == 1 else (5, k, model.z_dim)).astype(np.float32))
        if k == 1:
            model.forward(x, eps)
            model.backward(np.full(5, -0.2), np.full(5, 0.2))
        else:
            model.forward_iwae(x, eps)
            model.backward_iwae(np.full(5, -0.2))
    assert log.calls > 50 and log == []


def test_float32_input_to_float64_model_is_computed_in_float64():
    model = small_model("bernoulli", dtype=np.float64)
    x = np.random.default_rng(0).random((2, model.x_dim)).astype(np.float32)
    assert model.elbo(x, rng=np.random.default_rng(1)).dtype == np.float64


@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_float32_and_float64_models_agree(likelihood, x_sigma):
    m32 = small_model(likelihood, "tanh", x_sigma, seed=9, D=20, hidden=(16,), Z=4, dtype=np.float32, generic=False)
    m64 = small_model(likelihood, "tanh", x_sigma, seed=9, D=20, hidden=(16,), Z=4, dtype=np.float64, generic=False)
    for name, p in m32.params.items():
        np.testing.assert_array_equal(p, m64.params[name].astype(np.float32))
    rng = np.random.default_rng(2)
    x = data(m64, rng, B=8)
    eps = rng.standard_normal((8, 4))
    np.testing.assert_allclose(m32.elbo(x, eps), m64.elbo(x, eps), rtol=1e-4)
    l32, g32 = m32.loss_and_grads(x, eps)
    l64, g64 = m64.loss_and_grads(x, eps)
    assert l32 == pytest.approx(l64, rel=1e-4)
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-4 * np.max(np.abs(g64[name])))


# --- shapes, sampling, seeds ----------------------------------------------------------------

@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_shapes(likelihood, x_sigma):
    model = small_model(likelihood, "tanh", x_sigma, D=7, hidden=(5,), Z=3)
    rng = np.random.default_rng(0)
    x = data(model, rng, B=4)
    mu, log_sigma = model.encode(x)
    assert mu.shape == log_sigma.shape == (4, 3)
    z = rng.standard_normal((4, 3))
    out = model.decode(z)
    if likelihood == "bernoulli":
        assert isinstance(out, np.ndarray) and out.shape == (4, 7)  # logits
    else:
        mean, ls = out
        assert mean.shape == ls.shape == (4, 7)
        if x_sigma is not None:
            np.testing.assert_allclose(ls, np.log(x_sigma))
    assert model.elbo(x, rng=rng).shape == (4,)
    assert model.iwae_bound(x, 5, rng=rng).shape == (4,)
    assert model.sample(6, rng=rng).shape == (6, 7)
    assert model.reconstruct(x).shape == (4, 7)


def test_bernoulli_sample_and_reconstruct_are_probabilities():
    model = small_model("bernoulli", "relu", D=10, hidden=(8,), Z=3)
    s = model.sample(500, rng=np.random.default_rng(0))
    assert s.shape == (500, 10) and np.all((s >= 0) & (s <= 1))
    assert s.std() > 0  # different z give different images
    # sample is the mean of p(x|z) at z ~ N(0, I): sigmoid of the logits.
    z = np.random.default_rng(1).standard_normal((5, 3))
    np.testing.assert_allclose(model.sample(5, rng=np.random.default_rng(1)), expit(model.decode(z)), rtol=1e-12)
    x = np.random.default_rng(2).random((3, 10))
    np.testing.assert_allclose(model.reconstruct(x), expit(model.decode(model.encode(x)[0])), rtol=1e-12)


def test_gaussian_sample_is_the_decoder_mean():
    model = small_model("gaussian", "tanh")
    z = np.random.default_rng(1).standard_normal((5, model.z_dim))
    np.testing.assert_allclose(model.sample(5, rng=np.random.default_rng(1)), model.decode(z)[0], rtol=1e-12)


def test_same_seed_same_params_different_seed_different_params():
    a, b, c = (VAE(12, (8,), 3, seed=s) for s in (0, 0, 1))
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.array_equal(a.flat_params, c.flat_params)
    # The model's own generator is seeded too: the same seed gives the same noise.
    x = np.random.default_rng(0).random((2, 12)).astype(np.float32)
    np.testing.assert_array_equal(a.elbo(x), b.elbo(x))
    assert not np.array_equal(a.elbo(x), a.elbo(x))  # and it advances


@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_initial_point(likelihood, x_sigma):
    # Random weights, zero biases; the log_sigma heads start at zero weights so every
    # sigma starts at exp(0) = 1 whatever the input.
    model = VAE(10, (8,), 3, likelihood=likelihood, x_sigma=x_sigma, seed=0)
    for name, p in model.params.items():
        if name.endswith(".b") or name.endswith("log_sigma.W"):
            np.testing.assert_array_equal(p, 0.0, err_msg=name)
        else:
            assert np.all(p != 0), name
    x = data(model, np.random.default_rng(0), B=3)
    np.testing.assert_array_equal(model.encode(x)[1], 0.0)


def test_params_are_views_of_one_flat_buffer():
    model = small_model("gaussian", "tanh")
    assert model.n_params == sum(p.size for p in model.params.values())
    for name, p in model.params.items():
        assert np.shares_memory(p, model.flat_params)
        assert np.shares_memory(model.grads[name], model.flat_grads)
    model.flat_params[:] = 0.25
    assert all(np.all(p == 0.25) for p in model.params.values())


# --- extreme inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_value", [0.0, 1.0])
@pytest.mark.parametrize("log_sigma_bias", [1e4, -1e4])
@pytest.mark.parametrize("likelihood, x_sigma", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_extreme_inputs_stay_finite(likelihood, x_sigma, log_sigma_bias, x_value, dtype):
    model = small_model(likelihood, "relu", x_sigma, D=8, hidden=(6,), Z=3, dtype=dtype)
    model.params["enc.log_sigma.b"][...] = log_sigma_bias
    if "dec.log_sigma.b" in model.params:
        model.params["dec.log_sigma.b"][...] = -log_sigma_bias
    x = np.full((4, 8), x_value, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value RuntimeWarnings either
        mu, log_sigma = model.encode(x)
        results = {"mu": mu, "log_sigma": log_sigma,
                   "elbo": model.elbo(x, rng=np.random.default_rng(0)),
                   "iwae": model.iwae_bound(x, 3, rng=np.random.default_rng(0))}
        for k in (1, 3):
            loss, grads = model.loss_and_grads(x, rng=np.random.default_rng(1), k=k, copy=True)
            results[f"loss(k={k})"] = np.array(loss)
            results.update({f"grads(k={k})[{n}]": g for n, g in grads.items()})
    bad = [n for n, v in results.items() if not np.all(np.isfinite(v))]
    assert not bad, bad
    # The KL reflects the clipped scale, not the raw 1e4.
    kl = model.elbo_terms(x, rng=np.random.default_rng(0))[1]
    assert np.all(kl > 0) and np.all(np.isfinite(kl))
