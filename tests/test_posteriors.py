"""The posterior families q(z|x) (npvae.posteriors): log-determinants, covariances, normalization,
the planar flow's invertibility, whole-model gradients, checkpoints and log p(x) with the family's q."""
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from npvae import checkpoint as ckpt
from npvae import distributions as dist
from npvae import evaluate, gradcheck, posteriors
from npvae.model import VAE

FLOWS = ("planar:3", "iaf:3")
FAMILIES = ("diagonal", "full") + FLOWS


def family_at(spec, rng, Z, B=1, scale=0.7):
    """A family on Z dimensions with mu, log_sigma (B, Z), its heads and global parameters at a generic point."""
    q = posteriors.make(spec, Z)
    mu, log_sigma = 0.3 * rng.standard_normal((B, Z)), -0.4 + 0.2 * rng.standard_normal((B, Z))
    heads = {n: scale * rng.standard_normal((B, w)) for n, w in q.heads.items()}
    params = {n: scale * rng.standard_normal(shape) / np.sqrt(shape[0]) for n, shape in q.shapes.items()}
    return q, mu, log_sigma, heads, params


def flow_only(q, heads, params):
    """The flow's map z_0 (B, K, Z) -> (z_T, log_q_T - log_q_0) of a planar or IAF family: minus its log-det."""
    def f(z0):
        zero = np.zeros(z0.shape[:2])
        if isinstance(q, posteriors.Planar):
            z, log_q, _ = posteriors.planar_flow(z0, zero, *q._split(heads["enc.planar"]))
        else:
            steps = [q.step_params(params, t) for t in range(q.steps)]
            z, log_q, _ = posteriors.iaf_flow(z0, zero, steps, q.masks)
        return z, log_q
    return f


# --- the log-determinants --------------------------------------------------------------------

@pytest.mark.parametrize("spec", FLOWS)
def test_flow_log_det_matches_a_numerical_jacobian(spec):
    """-(log q_T - log q_0) is log |det dz_T/dz_0|, the Jacobian by central differences of the map (float64)."""
    rng = np.random.default_rng(1)
    Z = 4
    q, _, _, heads, params = family_at(spec, rng, Z)
    f = flow_only(q, heads, params)
    for _ in range(3):
        z0 = rng.standard_normal((1, 1, Z))
        h = 1e-5
        J = np.empty((Z, Z))
        for j in range(Z):
            e = np.zeros(Z)
            e[j] = h
            J[:, j] = (f(z0 + e)[0] - f(z0 - e)[0])[0, 0] / (2 * h)
        sign, log_det = np.linalg.slogdet(J)
        assert sign > 0
        assert abs(-f(z0)[1][0, 0] - log_det) < 1e-8


def test_iaf_jacobian_is_triangular_in_each_steps_order():
    """Step t's (m, s) depend only on earlier dimensions of its order, which reverses from step to step."""
    rng = np.random.default_rng(2)
    Z = 4
    q, _, _, _, params = family_at("iaf:2", rng, Z)
    for t, reverse in ((0, False), (1, True)):
        p = q.step_params(params, t)
        def step(z):
            return posteriors.iaf_step(z[None, None], p, q.masks[t])[0][0, 0]
        z, h = rng.standard_normal(Z), 1e-6
        J = np.stack([(step(z + h * e) - step(z - h * e)) / (2 * h) for e in np.eye(Z)], axis=1)
        order = np.arange(Z)[::-1] if reverse else np.arange(Z)
        J = J[np.ix_(order, order)]          # rows and columns in the step's autoregressive order
        assert np.max(np.abs(np.triu(J, 1))) < 1e-9          # nothing depends on later dimensions
        assert np.min(np.abs(np.diag(J))) > 1e-3             # every dimension depends on itself (g)


# --- the full covariance ----------------------------------------------------------------------

def test_full_samples_have_covariance_L_L_transpose():
    """Monte Carlo with N = 200 000 and a fixed seed: each entry's error within 5 standard errors.

    The standard error of a sample covariance entry is sqrt((S_ii S_jj + S_ij^2) / N) for Gaussian z.
    """
    rng = np.random.default_rng(3)
    Z, N = 3, 200_000
    q, mu, log_sigma, heads, params = family_at("full", rng, Z)
    z, _, _ = q.sample(mu, log_sigma, heads, params, rng.standard_normal((1, N, Z)))
    L = posteriors.cholesky_factor(log_sigma, heads["enc.L"])[0]
    S = L @ L.T
    assert np.any(np.abs(S - np.diag(np.diag(S))) > 0.1)     # a covariance the diagonal family cannot have
    se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S * S) / N)
    assert np.all(np.abs(np.cov(z[0].T) - S) < 5 * se)
    assert np.all(np.abs(z[0].mean(axis=0) - mu[0]) < 5 * np.sqrt(np.diag(S) / N))


def test_full_log_q_is_the_gaussian_density_with_covariance_L_L_transpose():
    rng = np.random.default_rng(4)
    q, mu, log_sigma, heads, params = family_at("full", rng, 3, B=2)
    z, log_q, _ = q.sample(mu, log_sigma, heads, params, rng.standard_normal((2, 5, 3)))
    for b in range(2):
        L = posteriors.cholesky_factor(log_sigma, heads["enc.L"])[b]
        assert np.allclose(log_q[b], multivariate_normal(mu[b], L @ L.T).logpdf(z[b]), rtol=0, atol=1e-10)


# --- each density integrates to 1 (Z = 2) ----------------------------------------------------------

def inverse(q, mu, log_sigma, heads, params, z):
    """eps (1, G, Z) with q's map eps -> z sending it to the given z (1, G, Z), computed without q's log-det.

    planar: each step z = z' + u_hat tanh(a), a = w.z' + b, has w.z + b = a + (w.u_hat) tanh(a), a
    strictly increasing function of a (w.u_hat > -1): bisection for a, then z' = z - u_hat tanh(a).
    iaf: z = g(z') z' + (1 - g(z')) m(z') with g, m depending only on earlier dimensions of the order, so
    the iteration z' <- (z - (1 - g(z')) m(z')) / g(z') is exact after Z rounds.
    """
    if isinstance(q, posteriors.Planar):
        u, w, b = q._split(heads["enc.planar"])
        u_hat = posteriors.planar_u_hat(u, w)
        for t in range(q.steps - 1, -1, -1):
            wu_hat = np.sum(w[0, t] * u_hat[0, t])
            c = z @ w[0, t] + b[0, t]                               # (1, G)
            lo, hi = c - abs(wu_hat) - 1.0, c + abs(wu_hat) + 1.0
            for _ in range(80):
                a = 0.5 * (lo + hi)
                above = a + wu_hat * np.tanh(a) > c
                lo, hi = np.where(above, lo, a), np.where(above, a, hi)
            z = z - u_hat[0, t] * np.tanh(0.5 * (lo + hi))[..., None]
    elif isinstance(q, posteriors.IAF):
        for t in range(q.steps - 1, -1, -1):
            p, z_prev = q.step_params(params, t), z.copy()
            for _ in range(q.z_dim):
                _, _, (_, _, m, g) = posteriors.iaf_step(z_prev, p, q.masks[t])
                z_prev = (z - (1.0 - g) * m) / g
            z = z_prev
    if isinstance(q, posteriors.Full):
        L = posteriors.cholesky_factor(log_sigma, heads["enc.L"])[0]
        return np.linalg.solve(L, (z[0] - mu[0]).T).T[None]
    return (z - mu[:, None]) / dist.std(log_sigma)[:, None]


@pytest.mark.parametrize("spec", FAMILIES)
def test_density_integrates_to_one_on_a_grid(spec):
    """sum over a grid in z of exp(log q(z)) times the cell's area is 1 (Z = 2).

    log q(z) is what the family reports at the eps that its map sends to z, and that eps is found by
    inverting the map without the family's log-det (inverse()); so the integral is over z itself, not
    over the base variable, and a wrong log-det (a missing factor, a sign) moves it away from 1. The
    grid [-6, 6]^2 with spacing 0.05 holds q's mass to ~1e-7 and resolves its width (~0.3 or more).
    """
    rng = np.random.default_rng(5)
    q, mu, log_sigma, heads, params = family_at(spec, rng, 2)
    axis = np.linspace(-6, 6, 241)
    z = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(1, -1, 2)
    eps = inverse(q, mu, log_sigma, heads, params, z)
    z_back, log_q, _ = q.sample(mu, log_sigma, heads, params, eps)
    assert np.max(np.abs(z_back - z)) < 1e-9                 # the inverse is one
    mass = np.sum(np.exp(log_q)) * (axis[1] - axis[0]) ** 2
    assert abs(mass - 1.0) < 1e-6
    # the flows do bend the base Gaussian: their density is not the base's at the same z
    if spec in FLOWS:
        base = dist.gaussian_log_prob(z, mu[:, None], log_sigma[:, None])
        assert np.max(np.abs(np.exp(log_q) - np.exp(base))) > 0.05


# --- the planar flow's invertibility ------------------------------------------------------------------

def test_planar_u_hat_keeps_w_dot_u_hat_above_minus_one():
    """w.u_hat = m(w.u) = -1 + softplus(w.u) > -1 for any u, even against w; det J = 1 + (1 - h^2) w.u_hat > 0."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((200, 3))
    u = rng.standard_normal((200, 3)) * 3.0
    u[:100] = -rng.uniform(1, 20, (100, 1)) * w[:100] / np.sum(w[:100] ** 2, axis=1, keepdims=True)  # w.u down to -20
    assert np.min(np.sum(w * u, axis=1)) < -10       # the raw u would make det J = 1 - 10 (1 - h^2) < 0 near a = 0
    wu_hat = np.sum(w * posteriors.planar_u_hat(u, w), axis=1)
    assert np.min(wu_hat) > -1.0
    assert np.allclose(wu_hat, posteriors.planar_m(np.sum(w * u, axis=1)), rtol=0, atol=1e-12)
    a = np.linspace(-5, 5, 1001)[:, None]
    assert np.min(1.0 + (1.0 - np.tanh(a) ** 2) * wu_hat) > 0   # a + w.u_hat tanh(a) strictly increasing


def test_planar_samples_of_one_flow_step_are_distinct_points():
    """A planar step is one-to-one: no two distinct base points of a fine line land on the same z."""
    rng = np.random.default_rng(7)
    q, mu, log_sigma, heads, params = family_at("planar:1", rng, 2, scale=2.0)
    u, w, b = q._split(heads["enc.planar"])
    t = np.linspace(-4, 4, 4001)
    z0 = (w[0, 0] / np.linalg.norm(w[0, 0]))[None, None] * t[None, :, None]   # a line along w
    z, _, _ = posteriors.planar_flow(z0, np.zeros((1, t.size)), u, w, b)
    assert np.all(np.diff(z[0] @ w[0, 0]) > 0)       # w.z strictly increasing along the line


# --- the whole model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ("full", "planar:2", "iaf:2"))
@pytest.mark.parametrize("term,k", (("elbo", 1), ("iwae", 3)))
def test_whole_model_gradients_match_finite_differences(spec, term, k):
    model = gradcheck.small_model("bernoulli", "tanh", 11, posterior=spec)
    errors = gradcheck.check_model(model, np.random.default_rng(12), term, k=k)
    assert max(errors.values()) <= gradcheck.TOLERANCE, errors


@pytest.mark.parametrize("spec", ("full", "planar:2", "iaf:2"))
def test_loss_and_grads_with_beta_match_finite_differences(spec):
    """loss = -mean(log p(x|z) - beta (log q - log p(z))) through loss_and_grads, with eps fixed."""
    model = gradcheck.small_model("gaussian", "softplus", 13, posterior=spec)
    rng = np.random.default_rng(14)
    x, eps = rng.standard_normal((4, model.x_dim)), rng.standard_normal((4, model.z_dim))
    f = lambda: model.loss_and_grads(x, eps=eps, beta=0.7)[0]  # noqa: E731
    _, grads = model.loss_and_grads(x, eps=eps, beta=0.7, copy=True)
    errors = gradcheck.check_entries(f, model.params, grads)
    assert max(errors.values()) <= gradcheck.TOLERANCE, errors


@pytest.mark.parametrize("spec", FAMILIES)
def test_sample_q_gives_z_and_log_q_of_every_family(spec):
    """sample_q's log q is the family's density at its z; for the diagonal, log N(z; mu, sigma^2)."""
    model = gradcheck.small_model("bernoulli", "tanh", 15, posterior=spec)
    x = np.random.default_rng(16).random((3, model.x_dim))
    z, log_q = model.sample_q(x, 4, rng=np.random.default_rng(17))
    assert z.shape == (3, 4, model.z_dim) and log_q.shape == (3, 4)
    eps = np.random.default_rng(17).standard_normal((3, 4, model.z_dim))
    mu, log_sigma, heads = model._encode_all(x)
    z_ref, log_q_ref, _ = model.q.sample(mu, log_sigma, heads, model.params, eps)
    assert np.array_equal(z, z_ref) and np.array_equal(log_q, log_q_ref)
    if spec == "diagonal":
        assert np.allclose(log_q, dist.gaussian_log_prob(z, mu[:, None], log_sigma[:, None]), rtol=0, atol=1e-12)
    # the ELBO's Monte Carlo KL at the sample is log q - log p(z)
    log_px_z, kl = model.forward(x, eps[:, 0])
    if spec != "diagonal":
        assert np.allclose(kl, log_q[:, 0] - dist.standard_normal_log_prob(z[:, 0]), rtol=0, atol=1e-12)


def test_the_diagonal_posterior_is_todays_model_bit_for_bit():
    """posterior='diagonal' adds no parameter, and its ELBO, KL, gradients and bound are the closed-form ones."""
    kw = dict(x_dim=6, hidden=(5,), z_dim=3, seed=21)
    old, new = VAE(**kw), VAE(**kw, posterior="diagonal")
    assert list(new.params) == [n + s for n, _, _, _ in new._layer_specs() for s in (".W", ".b")]
    assert np.array_equal(old.flat_params, new.flat_params)
    rng = np.random.default_rng(22)
    x, eps = rng.random((4, 6)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    log_px_z, kl = new.elbo_terms(x, eps)
    mu, log_sigma = new._encode(x)
    assert np.array_equal(kl, dist.kl_standard_normal(mu, log_sigma))           # the closed form, not Monte Carlo
    assert np.array_equal(log_px_z, dist.bernoulli_log_prob(x, new._decode(mu + dist.std(log_sigma) * eps)))
    loss_old, g_old = old.loss_and_grads(x, eps=eps, copy=True)
    loss_new, g_new = new.loss_and_grads(x, eps=eps, copy=True)
    assert loss_old == loss_new and all(np.array_equal(g_old[n], g_new[n]) for n in g_old)
    # the same seed draws the same encoder and decoder for every family (their extra heads come last)
    for spec in ("full", "planar:2", "iaf:2"):
        other = VAE(**kw, posterior=spec)
        assert all(np.array_equal(other.params[n], p) for n, p in new.params.items())


@pytest.mark.parametrize("spec", ("full", "planar:4"))
def test_full_and_planar_start_as_the_diagonal(spec):
    """At initialization full's L is diag(sigma) (enc.L at zero) and every planar step has u_hat = 0,
    so their samples and log q are the diagonal's; the flow's parameters still get a gradient."""
    kw = dict(x_dim=6, hidden=(5,), z_dim=3, seed=23, dtype=np.float64)
    x = np.random.default_rng(24).random((2, 6))
    z_d, lq_d = VAE(**kw).sample_q(x, 5, rng=np.random.default_rng(25))
    model = VAE(**kw, posterior=spec)
    z_f, lq_f = model.sample_q(x, 5, rng=np.random.default_rng(25))
    assert np.allclose(z_f, z_d, rtol=0, atol=1e-12) and np.allclose(lq_f, lq_d, rtol=0, atol=1e-12)
    _, grads = model.loss_and_grads(x, rng=np.random.default_rng(26))
    head = "enc.L" if spec == "full" else "enc.planar"
    assert np.max(np.abs(grads[head + ".W"])) > 1e-6 and np.max(np.abs(grads[head + ".b"])) > 1e-6


@pytest.mark.parametrize("bad", ("planar", "planar:0", "iaf:x", "full:2", "gaussian", 3))
def test_a_bad_posterior_is_refused_in_one_line(bad):
    with pytest.raises((ValueError, TypeError), match="posterior") as e:
        VAE(6, (5,), 3, posterior=bad)
    assert "\n" not in str(e.value)


# --- checkpoints, log p(x), training ------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_checkpoint_round_trip_keeps_the_posterior(spec, tmp_path):
    model = gradcheck.small_model("bernoulli", "tanh", 26, posterior=spec)
    ckpt.save_state(tmp_path / ckpt.BEST, model)
    loaded = ckpt.load(tmp_path)
    assert loaded.posterior == spec and loaded.config == model.config
    assert all(np.array_equal(loaded.params[n], p) for n, p in model.params.items())
    x = np.random.default_rng(27).random((3, model.x_dim))
    a = model.sample_q(x, 4, rng=np.random.default_rng(28))
    b = loaded.sample_q(x, 4, rng=np.random.default_rng(28))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    if spec != "diagonal":
        with pytest.raises(ckpt.CheckpointError, match="posterior"):
            ckpt.restore_params(VAE(**{**model.config, "posterior": "diagonal"}), ckpt.read_state(tmp_path / ckpt.BEST))


def test_a_checkpoint_without_a_posterior_loads_as_diagonal(tmp_path):
    """Checkpoints written before posterior families have no 'posterior' in their model config."""
    import json
    model = gradcheck.small_model("bernoulli", "tanh", 29)
    config = {k: v for k, v in model.config.items() if k != "posterior"}
    state = {"model_config": np.array(json.dumps(config)),
             **{"params/" + n: p for n, p in model.params.items()}}
    fresh = VAE(**config)
    ckpt.restore_params(fresh, state)
    assert fresh.posterior == "diagonal" and np.array_equal(fresh.flat_params, model.flat_params)


@pytest.mark.parametrize("spec", ("full", "planar:2", "iaf:2"))
def test_log_likelihood_uses_the_familys_q_as_proposal(spec):
    """evaluate.log_likelihood of a flow model is its IWAE bound with the same noise (per-example streams),
    whatever the chunking, and npvae.engine's log_likelihood (what npvae eval --k runs) gives the same."""
    from npvae.engine.evaluate import log_likelihood as engine_log_likelihood
    model = gradcheck.small_model("bernoulli", "tanh", 30, posterior=spec)
    x = np.random.default_rng(31).random((5, model.x_dim))
    k = 7
    seeds = evaluate._noise_seeds(np.random.default_rng(32), 5)
    eps = np.stack([np.random.default_rng(s).standard_normal((k, model.z_dim)) for s in seeds])
    bound = model.iwae_bound(x, k, eps=eps)
    for batch_size, chunk in ((None, None), (2, 3)):
        log_px = evaluate.log_likelihood(model, x, k, np.random.default_rng(32), batch_size, chunk)
        assert np.allclose(log_px, bound, rtol=0, atol=1e-10)
    assert np.allclose(engine_log_likelihood(model, x, k, np.random.default_rng(32)), bound, rtol=0, atol=1e-10)
    # the sampled ELBO of evaluate uses the same streams: the mean of the model's own single-sample ELBOs
    elbo = evaluate.elbo_estimate(model, x, n_samples=k, rng=np.random.default_rng(32))
    terms = [model.forward(x, eps[:, j]) for j in range(k)]
    assert np.allclose(elbo, np.mean([log_px_z - kl for log_px_z, kl in terms], axis=0), rtol=0, atol=1e-10)


def test_trainer_runs_a_flow_on_the_reference_engine_and_refuses_fast(tmp_path, capsys):
    """npvae train's Trainer takes the reference engine for a flow; npvae eval --k uses the flow's q."""
    import json

    from npvae.cli import main
    from npvae.train import Trainer, TrainConfig, test_set
    config = TrainConfig(dataset="pinwheel", epochs=1, batch_size=100, hidden=(8,), z_dim=2, n_train=200,
                         posterior="planar:2", seed=1)
    with pytest.raises(ValueError, match="engine 'reference' only"):
        Trainer(config, tmp_path / "fast", quiet=True, engine="fast")
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    assert trainer.engine == "reference" and trainer.model.posterior == "planar:2"
    assert trainer.run() == "done"
    model = ckpt.load(tmp_path / "run")
    assert model.posterior == "planar:2"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--k", "20", "--n", "50", "--json", "--quiet", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    x = test_set(config, model, None, 0)[:50]
    expected = evaluate.log_likelihood(model, x, 20, np.random.default_rng([0, 6]))   # the family's q
    assert abs(result["log_likelihood"] - float(np.mean(expected))) < 1e-9
    with pytest.raises(ValueError, match="one-layer VAE"):
        TrainConfig(posterior="iaf:2", inference="per-datapoint").validate()


# --- q fitted to each x alone: the family's q*, the gaps ------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_local_q_is_the_encoders_q_as_per_example_parameters(spec):
    """local_q's per-example copies (an IAF's MADEs included) give the encoder's samples and log q exactly,
    and the per-example MADE gradients summed over the examples are the global ones."""
    model = gradcheck.small_model("bernoulli", "tanh", 40, posterior=spec)
    x = np.random.default_rng(41).random((3, model.x_dim))
    eps = np.random.default_rng(42).standard_normal((3, 4, model.z_dim))
    q = evaluate.local_q(model, x)
    z, log_q, cache = evaluate._sample_local(model, q, eps)
    mu, log_sigma, heads = model._encode_all(x)
    z_ref, log_q_ref, cache_ref = model.q.sample(mu, log_sigma, heads, model.params, eps)
    assert np.allclose(z, z_ref, rtol=0, atol=1e-13) and np.allclose(log_q, log_q_ref, rtol=0, atol=1e-13)
    rng = np.random.default_rng(43)
    dz, dlog_q = rng.standard_normal(z.shape), rng.standard_normal(log_q.shape)
    local, shared = model.q.sample_grad(dz, dlog_q, cache), model.q.sample_grad(dz, dlog_q, cache_ref)
    for a, b in zip(local[:2], shared[:2]):
        assert np.allclose(a, b, rtol=0, atol=1e-12)
    assert set(local[2]) == set(shared[2]) == set(model.q.heads)
    for name, g in shared[2].items():
        assert np.allclose(local[2][name], g, rtol=0, atol=1e-12)
    for name, g in shared[3].items():
        assert local[3][name].shape[0] == 3
        assert np.allclose(local[3][name].sum(axis=0).reshape(g.shape), g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", FAMILIES)
def test_local_family_elbo_gradient_matches_finite_differences(spec):
    """d ELBO / d q of each x's own q (every per-example parameter of the family), per entry, float64."""
    model = gradcheck.small_model("bernoulli", "tanh", 44, posterior=spec)
    rng = np.random.default_rng(45)
    x, eps = rng.random((3, model.x_dim)), rng.standard_normal((3, 5, model.z_dim))
    q = evaluate.local_q(model, x)
    f = lambda: float(np.sum(evaluate._local_family_elbo_and_grads(model, x, q, eps)[0]))  # noqa: E731
    _, grads = evaluate._local_family_elbo_and_grads(model, x, q, eps)
    errors = gradcheck.check_entries(f, q, {n: g.copy() for n, g in grads.items()})
    assert max(errors.values()) <= gradcheck.TOLERANCE, errors
    assert gradcheck.check_direction(f, q, grads, rng) <= gradcheck.TOLERANCE


def _trained_z2(spec, seed=46, epochs=1):
    """A small Z = 2 model of the family on pinwheel-like data, a few Adam steps in: a posterior worth fitting."""
    from npvae.optim import Adam
    model = VAE(8, (12,), 2, likelihood="gaussian", activation="tanh", dtype=np.float64, seed=seed, posterior=spec)
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, 200)
    x = np.stack([np.cos(angle * (j + 1)) for j in range(8)], axis=1) + 0.1 * rng.standard_normal((200, 8))
    adam = Adam(model.params, lr=0.01)
    for _ in range(100 * epochs):
        adam.step(model.loss_and_grads(x[rng.integers(200, size=32)], rng=rng)[1])
    return model, x


@pytest.mark.parametrize("spec", FAMILIES)
def test_gaps_of_every_family_against_the_exact_log_likelihood(spec):
    """With log p(x) by quadrature (Z = 2): q* fitted to each x has a higher ELBO than the encoder's q
    (the amortization gap is positive on average), and no ELBO exceeds log p(x) beyond its Monte Carlo
    error (the approximation gap >= 0): the gap log p(x) - ELBO is a KL."""
    model, x = _trained_z2(spec)
    x = x[:12]
    log_px = evaluate.exact_log_likelihood(model, x)
    gaps = evaluate.amortization_gaps(model, x, k=200, rng=np.random.default_rng(47), n_eval=4000, steps=150,
                                      lr=0.05, log_px=log_px)
    assert gaps["mean"]["amortization_gap"] > 0.01, gaps["mean"]
    assert np.all(gaps["approximation_gap"] > -0.05), gaps["approximation_gap"]
    if spec != "diagonal":
        # the fitted q* is a q of the family: a proposal whose importance-sampled log p(x) is close to exact
        from npvae.evaluate import _noise_seeds, log_likelihood_of_seeds
        fitted = evaluate.optimize_local(model, x, steps=150, lr=0.05, rng=np.random.default_rng(48), n_eval=None)
        estimate = log_likelihood_of_seeds(model, x, 2000, _noise_seeds(np.random.default_rng(49), 12), q=fitted["q"])
        assert np.all(np.abs(estimate - log_px) < 0.05), estimate - log_px


def test_the_sampled_elbo_of_a_full_covariance_q_is_its_quadrature():
    """_elbo_sampled for full: E_q[log p(x, z) - log q(z)] by 20 000 draws against the same integral on the
    grid with q = N(mu, L L^T) in closed form, within four standard errors."""
    model, x = _trained_z2("full", seed=50)
    model.params["enc.L.b"][...] = 0.4                     # a clearly tilted q
    x = x[:4]
    grid = evaluate.latent_grid(2, 301)
    mu, log_sigma, heads = model._encode_all(x)
    L = posteriors.cholesky_factor(log_sigma, heads["enc.L"])
    joint = np.concatenate([lj for _, lj in evaluate._log_joint_on_grid(model, x, grid)], axis=1)   # (B, G)
    log_q = np.stack([multivariate_normal(mu[b], L[b] @ L[b].T).logpdf(grid.z) for b in range(4)])
    exact = np.sum(np.exp(log_q + grid.log_weights) * (joint - log_q), axis=1)
    n = 20000
    seeds = evaluate._noise_seeds(np.random.default_rng(51), 4)
    sampled = evaluate._elbo_sampled(model, x, n, seeds)
    log_w = [np.concatenate([w for _, c in evaluate._sampled_log_weights(model, x[b:b + 1], n, seeds[b:b + 1])
                             for w in c], axis=1) for b in range(4)]
    spread = np.array([np.std(w) for w in log_w])
    assert np.all(np.abs(sampled - exact) < 4 * spread / np.sqrt(n)), (sampled - exact, spread / np.sqrt(n))


@pytest.mark.parametrize("spec", FAMILIES)
def test_the_encoders_q_and_its_per_example_copy_share_their_noise_in_float32(spec):
    """elbo_estimate of a float32 model's encoder q and of the same q as float64 per-example parameters
    (where q* starts) draw the same noise: their difference is rounding, not Monte Carlo error. (The
    diagonal family's q* is a pair (mu, log_sigma), scored with the closed-form KL as the encoder's.)"""
    model = VAE(12, (8,), 2, seed=52, posterior=spec)                     # float32, the training default
    x = (np.random.default_rng(53).random((4, 12)) < 0.4).astype(np.float32)
    a = evaluate.elbo_estimate(model, x, None, 300, np.random.default_rng(54))
    q = evaluate.local_q(model, x)
    q = (q["mu"], q["log_sigma"]) if spec == "diagonal" else q
    b = evaluate.elbo_estimate(model, x, q, 300, np.random.default_rng(54))
    assert np.allclose(a, b, rtol=0, atol=1e-3), a - b


@pytest.mark.parametrize("spec", ("full", "iaf:2"))
def test_a_bad_per_example_q_is_refused_in_one_line(spec):
    model = gradcheck.small_model("bernoulli", "tanh", 55, posterior=spec)
    x = np.random.default_rng(56).random((3, model.x_dim))
    q = evaluate.local_q(model, x)
    name = "enc.L" if spec == "full" else "q.iaf0.b1"
    bad = [dict(q, mu=q["mu"][:2]), {n: a for n, a in q.items() if n != name},
           dict(q, **{name: q[name].reshape(3, -1)[:, :1]}), dict(q, log_sigma=np.full_like(q["log_sigma"], np.nan))]
    for b in bad:
        for call in (lambda: evaluate.elbo_estimate(model, x, b, 5, np.random.default_rng(0)),
                     lambda: evaluate.log_likelihood_of_seeds(model, x, 5, np.arange(3), q=b)):
            with pytest.raises(ValueError, match="q") as e:
                call()
            assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="q must be None"):
        evaluate.optimize_local(model, x, steps=2, q=(q["mu"], q["log_sigma"]))
