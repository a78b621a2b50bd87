"""Gradient checking: analytic gradients against central finite differences in float64.

Two checks, both on a scalar function f() of arrays that are changed in place:
- per entry: df/dtheta_i ~ (f(theta + h e_i) - f(theta - h e_i)) / 2h for every i;
- along a random unit direction u: g . u ~ (f(theta + h u) - f(theta - h u)) / 2h,
  with the error relative to |g|.

The error of an array is max_i |analytic_i - numeric_i| / max_i max(|analytic_i|, |numeric_i|):
relative to the array's largest gradient entry. A per-entry ratio would blow up
on entries that are zero up to rounding (a dead ReLU unit, a pixel that is
always off), where no finite difference can be more precise than ~1e-11.

`python -m npvae gradcheck` runs run_all() and prints one row per component.
"""
import numpy as np

from . import distributions as dist
from .layers import ACTIVATIONS, Dense, init_std

TOLERANCE = 1e-7   # for smooth functions in float64 with step H
H = 1e-5           # truncation error ~H^2 f''' and rounding ~1e-16 |f| / H both stay below 1e-9


def numerical_gradient(f, x, h=H):
    """Central differences of the scalar f() w.r.t. every entry of x (changed in place, then restored)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so that its entries can be perturbed in place")
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


def relative_error(analytic, numeric):
    """max |a - n| over the array, relative to the array's largest |a| or |n| (0 if both are 0)."""
    analytic, numeric = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    scale = max(np.max(np.abs(analytic)), np.max(np.abs(numeric)))
    return 0.0 if scale == 0 else float(np.max(np.abs(analytic - numeric)) / scale)


def check_entries(f, arrays, grads, h=H):
    """Per-entry check: {name: relative error} for every array in arrays (dict name -> ndarray)."""
    return {n: relative_error(grads[n], numerical_gradient(f, a, h)) for n, a in arrays.items()}


def check_direction(f, arrays, grads, rng, h=H):
    """Random-direction check over all arrays at once: the relative error of g . u."""
    u = {n: rng.standard_normal(a.shape) for n, a in arrays.items()}
    norm = np.sqrt(sum(np.sum(v * v) for v in u.values()))
    originals = {n: a.copy() for n, a in arrays.items()}

    def shifted(step):
        for n, a in arrays.items():
            a[...] = originals[n] + step * u[n] / norm
        return f()

    numeric = (shifted(h) - shifted(-h)) / (2.0 * h)
    for n, a in arrays.items():
        a[...] = originals[n]
    analytic = sum(np.sum(grads[n] * u[n]) for n in arrays) / norm
    # Relative to |g|, the largest g . u can be: a direction nearly orthogonal
    # to g makes g . u itself tiny, and dividing by it would measure only rounding.
    g_norm = np.sqrt(sum(np.sum(np.asarray(grads[n], np.float64) ** 2) for n in arrays))
    return abs(analytic - numeric) / max(g_norm, 1e-300)


# --- components -------------------------------------------------------------------
# Each check_* returns {array name: relative error}. Upstream gradients are
# random (never all ones), so a transposed or mis-summed gradient cannot hide.

def check_dense(activation, rng, B=4, I=5, O=3):
    """Dense layer: y = act(x W + b), loss = sum(R * y)."""
    W = rng.standard_normal((I, O)) * init_std(activation, I, O)
    b = rng.standard_normal(O) * 0.1
    x, R = rng.standard_normal((B, I)), rng.standard_normal((B, O))
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), activation)
    f = lambda: float(np.sum(R * layer.forward(x.copy())))  # noqa: E731 (forward may work in place)
    layer.forward(x.copy())
    dx = layer.backward(R)
    return check_entries(f, {"W": W, "b": b, "x": x}, {"W": layer.dW, "b": layer.db, "x": dx})


def check_reparameterize(rng, B=4, Z=3):
    """z = mu + sigma * eps with eps fixed, loss = sum(R * z)."""
    mu, log_sigma = rng.standard_normal((B, Z)), 0.5 * rng.standard_normal((B, Z))
    eps, R = rng.standard_normal((B, Z)), rng.standard_normal((B, Z))
    f = lambda: float(np.sum(R * dist.reparameterize(mu, log_sigma, eps)))  # noqa: E731
    dmu, dls = dist.reparameterize_grad(R, log_sigma, eps)
    return check_entries(f, {"mu": mu, "log_sigma": log_sigma}, {"mu": dmu, "log_sigma": dls})


def check_kl_standard_normal(rng, B=4, Z=3):
    """KL(q || N(0, I)), loss = sum(r * kl)."""
    mu, log_sigma, r = rng.standard_normal((B, Z)), 0.5 * rng.standard_normal((B, Z)), rng.standard_normal(B)
    f = lambda: float(np.sum(r * dist.kl_standard_normal(mu, log_sigma)))  # noqa: E731
    dmu, dls = dist.kl_standard_normal_grad(r, mu, log_sigma)
    return check_entries(f, {"mu": mu, "log_sigma": log_sigma}, {"mu": dmu, "log_sigma": dls})


def check_kl_diag_gaussians(rng, B=4, Z=3):
    """KL(q || p) between diagonal Gaussians, w.r.t. both sides."""
    args = {"mu_q": rng.standard_normal((B, Z)), "log_sigma_q": 0.5 * rng.standard_normal((B, Z)),
            "mu_p": rng.standard_normal((B, Z)), "log_sigma_p": 0.5 * rng.standard_normal((B, Z))}
    r = rng.standard_normal(B)
    f = lambda: float(np.sum(r * dist.kl_diag_gaussians(*args.values())))  # noqa: E731
    grads = dict(zip(args, dist.kl_diag_gaussians_grad(r, *args.values())))
    return check_entries(f, args, grads)


def check_bernoulli(rng, B=4, D=5):
    """log Bernoulli(x; sigmoid(logits)) with grey-level x in [0, 1]."""
    x, logits, r = rng.random((B, D)), 2.0 * rng.standard_normal((B, D)), rng.standard_normal(B)
    f = lambda: float(np.sum(r * dist.bernoulli_log_prob(x, logits)))  # noqa: E731
    return check_entries(f, {"logits": logits}, {"logits": dist.bernoulli_log_prob_grad(r, x, logits)})


def check_gaussian(rng, B=4, D=5):
    """log N(x; mean, sigma^2) with a learned log_sigma per dimension."""
    x, mean = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    log_sigma, r = 0.5 * rng.standard_normal((B, D)), rng.standard_normal(B)
    f = lambda: float(np.sum(r * dist.gaussian_log_prob(x, mean, log_sigma)))  # noqa: E731
    dmean, dls = dist.gaussian_log_prob_grad(r, x, mean, log_sigma)
    return check_entries(f, {"mean": mean, "log_sigma": log_sigma}, {"mean": dmean, "log_sigma": dls})


def check_gaussian_fixed(rng, B=4, D=5, sigma=0.7):
    """log N(x; mean, sigma^2 I) with a fixed sigma."""
    x, mean, r = rng.standard_normal((B, D)), rng.standard_normal((B, D)), rng.standard_normal(B)
    f = lambda: float(np.sum(r * dist.gaussian_fixed_log_prob(x, mean, sigma)))  # noqa: E731
    return check_entries(f, {"mean": mean}, {"mean": dist.gaussian_fixed_log_prob_grad(r, x, mean, sigma)})


def small_model(likelihood, activation, seed, x_sigma=None, D=6, hidden=(5, 4), Z=3, posterior="diagonal"):
    """A float64 VAE small enough to check every entry, at a generic point.

    The initial log_sigma heads have zero weights, where the KL's gradient with
    respect to them is exactly 0 and only rounding noise is left to compare;
    small random weights and biases everywhere make every gradient entry real.
    """
    from .model import VAE
    model = VAE(D, hidden, Z, likelihood=likelihood, activation=activation,
                dtype=np.float64, seed=seed, x_sigma=x_sigma, posterior=posterior)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if name.startswith("q.iaf"):
            # an IAF starts near the identity (outputs at 0.01 scale, gates near 1), where its
            # gradients are ~1e-3 against a loss of ~10 and rounding would pass for error
            p[...] = 0.5 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
        elif name == "enc.planar.b":
            # u_hat's correction (m(w.u) - w.u) w / |w|^2 bends as 1/|w| near w = 0, where the
            # third derivative lifts central differences' h^2 error to 1e-7: w of size 1 instead
            p[...] = rng.standard_normal(p.shape)
        else:
            p += 0.1 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
    return model


def small_hierarchical(likelihood, activation, seed, layers=(((5, 4), 3), ((4, 3), 2)), D=6):
    """A float64 HierarchicalVAE at a generic point, as small_model (Burda's: layers=BURDA_LAYERS, D=784)."""
    from .hierarchical import HierarchicalVAE
    model = HierarchicalVAE(D, layers, likelihood=likelihood, activation=activation, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        p += 0.1 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])
    return model


def model_data(model, rng, B=4):
    """Inputs that suit the model's likelihood: grey levels for Bernoulli, reals for Gaussian."""
    if model.likelihood == "bernoulli":
        return rng.random((B, model.x_dim))
    return rng.standard_normal((B, model.x_dim))


def check_model(model, rng, term="elbo", k=1, B=4, direction=False):
    """Gradient of a weighted sum of the model's terms w.r.t. all its parameters.

    term: "recon" (log p(x|z)), "kl", "elbo" (both) with k = 1, or "iwae" with k >= 1.
    The weights are random per example, and eps is fixed, so f is deterministic.
    """
    x = model_data(model, rng, B)
    if term == "iwae":
        eps, r = rng.standard_normal((B, k, model.z_dim)), rng.standard_normal(B)
        f = lambda: float(np.sum(r * model.forward_iwae(x, eps)))  # noqa: E731
        f()
        grads = {n: g.copy() for n, g in model.backward_iwae(r).items()}
    else:
        eps = rng.standard_normal((B, model.z_dim))
        r_rec = rng.standard_normal(B) if term in ("recon", "elbo") else np.zeros(B)
        r_kl = rng.standard_normal(B) if term in ("kl", "elbo") else np.zeros(B)

        def f():
            log_px_z, kl = model.forward(x, eps)
            return float(np.sum(r_rec * log_px_z + r_kl * kl))
        f()
        grads = {n: g.copy() for n, g in model.backward(r_rec, r_kl).items()}
    if direction:
        return {"direction": check_direction(f, model.params, grads, rng)}
    return check_entries(f, model.params, grads)


def check_posterior(spec, rng, B=3, K=2, Z=3):
    """A posterior family's map eps -> (z, log q) alone, loss = sum(R * z) + sum(r * log_q).

    The encoder's outputs (mu, log_sigma and the family's heads) and the flow's global
    parameters are all checked; the heads and parameters are drawn at a generic point.
    """
    from . import posteriors
    q = posteriors.make(spec, Z)
    arrays = {"mu": rng.standard_normal((B, Z)), "log_sigma": 0.3 * rng.standard_normal((B, Z))}
    arrays.update({n: 0.5 * rng.standard_normal((B, w)) for n, w in q.heads.items()})
    params = {n: 0.3 * rng.standard_normal(shape) for n, shape in q.shapes.items()}
    eps, R, r = rng.standard_normal((B, K, Z)), rng.standard_normal((B, K, Z)), rng.standard_normal((B, K))
    heads = {n: arrays[n] for n in q.heads}
    arrays.update(params)

    def f():
        z, log_q, _ = q.sample(arrays["mu"], arrays["log_sigma"], heads, params, eps)
        return float(np.sum(R * z) + np.sum(r * log_q))
    _, _, cache = q.sample(arrays["mu"], arrays["log_sigma"], heads, params, eps)
    dmu, dlog_sigma, dheads, dparams = q.sample_grad(R, r, cache)
    return check_entries(f, arrays, {"mu": dmu, "log_sigma": dlog_sigma, **dheads, **dparams})


POSTERIORS = ("full", "planar:3", "iaf:2")   # the gradcheck's flows: short, so every entry is cheap


def components():
    """(name, function of a Generator -> {array: error}) for everything run_all checks."""
    comps = [(f"dense[{a}]", lambda rng, a=a: check_dense(a, rng)) for a in ACTIVATIONS]
    comps += [("reparameterize", check_reparameterize),
              ("kl_standard_normal", check_kl_standard_normal),
              ("kl_diag_gaussians", check_kl_diag_gaussians),
              ("bernoulli_log_prob", check_bernoulli),
              ("gaussian_log_prob", check_gaussian),
              ("gaussian_fixed_log_prob", check_gaussian_fixed)]
    models = [("bernoulli", "relu", None), ("bernoulli", "tanh", None), ("bernoulli", "elu", None),
              ("bernoulli", "softplus", None), ("gaussian", "tanh", None), ("gaussian", "leaky_relu", None),
              ("gaussian", "sigmoid", 0.5)]
    for lik, act, xs in models:
        label = f"{lik}{'' if xs is None else '[fixed sigma]'},{act}"
        for term in ("recon", "kl", "elbo"):
            comps.append((f"vae[{label}] {term}",
                          lambda rng, lik=lik, act=act, xs=xs, term=term:
                          check_model(small_model(lik, act, 1, xs), rng, term)))
    for lik, act in (("bernoulli", "tanh"), ("gaussian", "elu")):
        comps.append((f"vae[{lik},{act}] iwae k=4",
                      lambda rng, lik=lik, act=act: check_model(small_model(lik, act, 2), rng, "iwae", k=4)))
    comps.append(("vae[bernoulli,relu,784-400-20] direction",
                  lambda rng: check_model(small_model("bernoulli", "relu", 3, None, 784, (400,), 20),
                                          rng, "elbo", B=8, direction=True)))
    comps.append(("vae[gaussian,tanh,560-200-200-10] iwae direction",
                  lambda rng: check_model(small_model("gaussian", "tanh", 4, None, 560, (200, 200), 10),
                                          rng, "iwae", k=5, B=8, direction=True)))
    # every posterior family: its map alone, then the whole model's ELBO (Monte Carlo KL) and IWAE bound
    for spec in POSTERIORS:
        comps.append((f"posterior[{spec}]", lambda rng, spec=spec: check_posterior(spec, rng)))
        for term, k in (("elbo", 1), ("iwae", 3)):
            comps.append((f"vae[bernoulli,tanh,posterior={spec}] {term}{f' k={k}' if k > 1 else ''}",
                          lambda rng, spec=spec, term=term, k=k:
                          check_model(small_model("bernoulli", "tanh", 8, posterior=spec), rng, term, k=k)))
        comps.append((f"vae[gaussian,softplus,posterior={spec},50-20-8] elbo direction",
                      lambda rng, spec=spec: check_model(small_model("gaussian", "softplus", 9, None, 50, (20,), 8,
                                                                     posterior=spec), rng, "elbo", B=6, direction=True)))
    # two stochastic layers (and three): the backward through every reparameterization
    # (not elu for the Gaussian: its kink in the second derivative at 0 costs central differences ~1e-8)
    for lik, act in (("bernoulli", "tanh"), ("gaussian", "softplus")):
        for term, k in (("recon", 1), ("kl", 1), ("elbo", 1), ("iwae", 4))[0 if lik == "bernoulli" else 2:]:
            comps.append((f"hvae[{lik},{act},6-5-4-[3]-4-3-[2]] {term}{f' k={k}' if k > 1 else ''}",
                          lambda rng, lik=lik, act=act, term=term, k=k:
                          check_model(small_hierarchical(lik, act, 5), rng, term, k=k)))
    comps.append(("hvae[bernoulli,tanh,3 layers] iwae k=3",
                  lambda rng: check_model(small_hierarchical("bernoulli", "tanh", 6, (((5,), 3), ((4,), 2), ((3,), 2))),
                                          rng, "iwae", k=3)))
    from .hierarchical import BURDA_LAYERS
    for term, k in (("elbo", 1), ("iwae", 5)):
        comps.append((f"hvae[bernoulli,tanh,Burda 784-200-200-[100]-100-100-[50]] {term} direction",
                      lambda rng, term=term, k=k: check_model(small_hierarchical("bernoulli", "tanh", 7, BURDA_LAYERS, 784),
                                                              rng, term, k=k, B=8, direction=True)))
    return comps


def run_all(seed=0, tolerance=TOLERANCE):
    """Run every check; returns a list of (component, worst array, max relative error, passed)."""
    rows = []
    for i, (name, check) in enumerate(components()):
        errors = check(np.random.default_rng([seed, i]))
        worst = max(errors, key=errors.get)
        rows.append((name, worst, errors[worst], errors[worst] <= tolerance))
    return rows


def format_table(rows, tolerance=TOLERANCE):
    """The rows of run_all() as a plain-text table."""
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'worst array':<16}  {'max rel error':>13}  result",
             "-" * (width + 42)]
    for name, worst, err, ok in rows:
        lines.append(f"{name:<{width}}  {worst:<16}  {err:>13.2e}  {'pass' if ok else 'FAIL'}")
    n_fail = sum(not r[3] for r in rows)
    lines.append(f"{len(rows) - n_fail} passed, {n_fail} failed (tolerance {tolerance:.0e}, float64, "
                 f"central differences with h = {H:.0e})")
    return "\n".join(lines)
