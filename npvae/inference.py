"""Where q(z|x) comes from while the decoder learns: amortized, per-datapoint and semi-amortized inference.

All three maximize the same ELBO of a diagonal Gaussian q_i = N(mu_i, diag(sigma_i^2)) per example,

    elbo_i(theta, phi_i) = E_eps[log p_theta(x_i | mu_i + sigma_i * eps)] - beta KL(q_i || N(0, I)),

and take the decoder's step theta <- theta - lr * Adam(d loss / d theta), loss = -mean_i elbo_i.
They differ in where phi_i = (mu_i, log_sigma_i) comes from:

    amortized        phi_i = encoder_psi(x_i)                    psi trained on the same ELBO (npvae.model)
    per-datapoint    phi_i = a row of a table phi (M, 2Z)        started at the prior (mu = 0, log_sigma = 0);
                     phi_i <- S steps of the inner optimizer on elbo_i, theta fixed, written back
    semi-amortized   phi_i^0 = encoder_psi(x_i), then S steps:   phi_i^S, theta stepped at phi_i^S;
                     psi trained on its own ELBO, elbo_i(theta, encoder_psi(x_i))

One inner step of each row, the decoder fixed (q_elbo_and_grads; each row climbs its own ELBO, not
the batch mean, so a step of phi_i does not depend on the batch it is in):

    z_s = mu + sigma * eps_s,  eps_s ~ N(0, I),  s = 1..n_samples
    d(-elbo)/dmu        = -1/n sum_s dz_s                 + beta mu
    d(-elbo)/dlog_sigma = -1/n sum_s dz_s * sigma * eps_s + beta (sigma^2 - 1)
    dz_s = d log p(x|z_s) / dz_s                           (the decoder's backward pass)

The decoder's gradient at a given q (decoder_loss_and_grads) is that of model.backward with the
encoder left out: the same eps, the same z, the KL does not depend on theta.

The semi-amortized encoder is trained on its own ELBO (Krishnan, Liang & Hoffman 2018), not towards
the refined q (Hjelm et al. 2016), because: (1) its own ELBO is a bound it can climb by itself,
whose reparameterized gradient npvae already derives and checks, while a target like
KL(q^S || q^0) moves with S and the inner learning rate and vanishes as the refinement's steps
shrink; (2) it makes the encoder a good start for the refinement, which is all the refinement asks
of it; (3) with S = 0 the method is exactly the amortized VAE, step for step (a test checks it).
**Gradients through the refinement steps are not computed** (Kim et al. 2018 backpropagate through
them with Hessian-vector products): the refined q is treated as a constant for theta's step, and
the encoder's gradient is its own ELBO's at its own q, so the refinement does not shape the encoder.

The inner optimizer ("adam" or "sgd", npvae.optim) starts with fresh state at every visit of a
minibatch: only phi carries over from one visit to the next, so the run's state is the table
(and, for validation, the same table over the validation set), which the checkpoint keeps.

Test data (per-datapoint) is scored by fitting its own phi with the same inner loop, theta fixed:
`passes` visits of S steps each from the prior (fit_q), as many as a training example had by then.

Shapes: B batch, M training examples, D data, Z latent, S inner steps, n samples per step.
Values are nats per example.
"""
import contextlib
import math

import numpy as np

from . import distributions as dist
from .evaluate import _check_rng, batches, elbo_estimate, optimize_local
from .model import _all_samples, _per_sample
from .optim import SGD, Adam

METHODS = ("amortized", "per-datapoint", "semi-amortized")
INNER_OPTIMIZERS = ("adam", "sgd")
# (inner_steps, inner_lr, inner_optimizer) when not given. Adam's first step moves every
# coordinate by about lr whatever its gradient's size, which suits posteriors whose widths differ
# by 100x across latents (SGD's rate must stay below 2 / curvature of the sharpest one).
# per-datapoint starts every row at the prior and needs to travel: lr 0.2 reached a training ELBO
# of -166.1 after 3 epochs on 10 000 MNIST images (784-200-200-50 tanh), lr 0.05 only -177.1;
# semi-amortized starts at the encoder's q, a few small steps from where it should be.
DEFAULTS = {"per-datapoint": (5, 0.2, "adam"), "semi-amortized": (5, 0.05, "adam")}
EVAL_BATCH = 1000   # rows per pass when fitting or scoring a whole set


# --- checking a TrainConfig's inference settings ---------------------------------------------------

def validate_config(config):
    """Check config.inference and the inner loop's settings; fill in the method's defaults (so that
    config.json records what ran). Raises ValueError/TypeError naming the setting."""
    if config.inference not in METHODS:
        raise ValueError(f"inference must be one of {list(METHODS)}, got {config.inference!r}")
    inner = ("inner_steps", "inner_lr", "inner_optimizer")
    if config.inference == "amortized":
        given = [n for n in inner if getattr(config, n) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to inference 'per-datapoint' or 'semi-amortized' only, "
                             f"not 'amortized'")
        return config
    steps, lr, optimizer = DEFAULTS[config.inference]
    if config.inner_steps is None:
        config.inner_steps = steps
    if config.inner_lr is None:
        config.inner_lr = lr
    if config.inner_optimizer is None:
        config.inner_optimizer = optimizer
    v = config.inner_steps
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"inner_steps must be an integer, got {v!r}")
    low = 1 if config.inference == "per-datapoint" else 0
    if v < low:
        raise ValueError(f"inner_steps must be >= {low} for inference {config.inference!r}, got {v}")
    config.inner_steps = int(v)
    v = config.inner_lr
    if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"inner_lr must be a positive number, got {v!r}")
    if config.inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {list(INNER_OPTIMIZERS)}, got {config.inner_optimizer!r}")
    if config.objective != "elbo":
        raise ValueError(f"inference {config.inference!r} trains on the ELBO only (objective='elbo'), "
                         f"got objective={config.objective!r}")
    return config


# --- one q per row: its ELBO, its gradient, the inner loop --------------------------------------------

def q_elbo_and_grads(model, x, mu, log_sigma, eps, beta=1.0):
    """Each row's ELBO and its own gradient: x (b, D), mu, log_sigma (b, Z), eps (b, n, Z) -> (elbo, dmu, dlog_sigma).

        elbo_i = 1/n sum_s log p(x_i | mu_i + sigma_i eps_is) - beta KL(q_i || N(0, I))      (b,)
        dmu_i, dlog_sigma_i = d(-elbo_i)/dmu_i, d(-elbo_i)/dlog_sigma_i                    (b, Z)

    The decoder is fixed. Its backward pass also writes its weight gradients into model.grads;
    they are not used (the caller's next theta gradient overwrites them).
    """
    b, n, Z = eps.shape
    z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)              # (b, n, Z)
    out_bn = _per_sample(model._decode(z.reshape(b * n, Z)), b, n)
    log_px_z = model.log_px_z(x[:, None, :], out_bn)                            # (b, n)
    kl = dist.kl_standard_normal(mu, log_sigma)                                 # (b,)
    elbo = np.mean(log_px_z, axis=1, dtype=np.float64) - beta * kl
    # loss_i = -elbo_i: d loss_i / d log p(x_i|z_is) = -1/n for each sample
    dlog_px_z = np.full((b, n), -1.0 / n, dtype=model.dtype)
    dz = model._decode_backward(_all_samples(model._log_px_z_grad(dlog_px_z, x[:, None, :], out_bn), b, n))
    dmu, dlog_sigma = dist.reparameterize_grad(dz.reshape(b, n, Z), log_sigma[:, None], eps)
    dmu_kl, dlog_sigma_kl = dist.kl_standard_normal_grad(np.full(b, beta, dtype=model.dtype), mu, log_sigma)
    # mu and log_sigma feed every sample and the KL: the branches are summed
    return elbo, dmu.sum(axis=1) + dmu_kl, dlog_sigma.sum(axis=1) + dlog_sigma_kl


def inner_optimizer(q, name, lr):
    """A fresh npvae.optim optimizer over q = {"mu": (b, Z), "log_sigma": (b, Z)}, updated in place."""
    if name == "adam":
        return Adam(q, lr=lr)
    if name == "sgd":
        return SGD(q, lr=lr)
    raise ValueError(f"inner_optimizer must be one of {list(INNER_OPTIMIZERS)}, got {name!r}")


def refine(model, x, mu, log_sigma, steps, lr, rng, optimizer="adam", beta=1.0, n_samples=1, eps=None):
    """`steps` steps of the inner optimizer on each row's ELBO, theta fixed: -> (mu, log_sigma), each (b, Z).

    x (b, D) in the model's dtype; mu, log_sigma (b, Z), copied (the inputs are not changed). Each
    step draws eps (b, n_samples, Z) from rng, unless eps is given: then every step uses that same
    eps, which makes the objective a fixed function of phi (the test against a direct optimizer).
    The optimizer starts with fresh state (zero moments) at every call.
    """
    q = {"mu": np.array(mu, dtype=model.dtype), "log_sigma": np.array(log_sigma, dtype=model.dtype)}
    opt = inner_optimizer(q, optimizer, lr)
    b, Z = q["mu"].shape
    for _ in range(steps):
        e = rng.standard_normal((b, n_samples, Z), dtype=model.dtype) if eps is None else eps
        _, dmu, dlog_sigma = q_elbo_and_grads(model, x, q["mu"], q["log_sigma"], e, beta)
        opt.step({"mu": dmu, "log_sigma": dlog_sigma})
    return q["mu"], q["log_sigma"]


def decoder_loss_and_grads(model, x, mu, log_sigma, eps, beta=1.0):
    """theta's gradient at a fixed q: x (B, D), mu, log_sigma, eps (B, Z) -> (loss, log_px_z (B,), kl (B,)).

        z = mu + sigma * eps;  loss = -mean(log p(x|z) - beta KL(q || N(0, I)))

    writes d loss / d theta into the decoder's entries of model.grads (the encoder's are left
    as they were: the KL does not depend on theta, and q is a constant here).
    """
    B = x.shape[0]
    z = dist.reparameterize(mu, log_sigma, eps)                    # (B, Z)
    out = model._decode(z)
    log_px_z = model.log_px_z(x, out)                              # (B,)
    kl = dist.kl_standard_normal(mu, log_sigma)                    # (B,)
    # d loss / d log_px_z = -1/B for every example (as in VAE.loss_and_grads)
    model._decode_backward(model._log_px_z_grad(np.full(B, -1.0 / B), x, out))
    return float(-np.mean(log_px_z - beta * kl)), log_px_z, kl


def decoder_names(model):
    """The names of the decoder's parameters ('dec.*'), in the model's order."""
    return [n for n in model.params if n.startswith("dec.")]


def prior_q(n, z_dim, dtype):
    """The prior as a q: mu = 0, log_sigma = 0, each (n, Z)."""
    return np.zeros((n, z_dim), dtype=dtype), np.zeros((n, z_dim), dtype=dtype)


# --- the run's own q for new data, its ELBO and its gap ---------------------------------------------

def fit_q(model, x, method, steps, lr, rng, optimizer="adam", passes=1, batch_size=EVAL_BATCH):
    """The q a run of `method` gives the examples x (N, D), theta fixed: -> (mu, log_sigma), each (N, Z).

        amortized        the encoder's q
        semi-amortized   the encoder's q refined by `steps` inner steps
        per-datapoint    the prior refined by `passes` visits of `steps` inner steps each
                         (fresh optimizer state at each visit, as in training)
    """
    x = model._as_x(x)
    rng = _check_rng(rng)
    mu_all = np.empty((x.shape[0], model.z_dim), dtype=model.dtype)
    log_sigma_all = np.empty_like(mu_all)
    for s in batches(x.shape[0], batch_size):
        if method == "per-datapoint":
            mu, log_sigma = prior_q(s.stop - s.start, model.z_dim, model.dtype)
            for _ in range(passes):
                mu, log_sigma = refine(model, x[s], mu, log_sigma, steps, lr, rng, optimizer)
        elif method in ("amortized", "semi-amortized"):
            mu, log_sigma = model._encode(x[s])
            if method == "semi-amortized":
                mu, log_sigma = refine(model, x[s], mu, log_sigma, steps, lr, rng, optimizer)
        else:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        mu_all[s], log_sigma_all[s] = mu, log_sigma
    return mu_all, log_sigma_all


def elbo_stats_at(model, x, q, rng, batch_size=EVAL_BATCH):
    """evaluate.elbo_stats at a given q = (mu, log_sigma), each (N, Z): one sample of z per example.

    Returns {"elbo", "recon", "kl", "n"} in nats per example.
    """
    return _stats(_elbo_sums(model, x, q, rng, batch_size), x.shape[0])


def _stats(sums, n):
    """(sum of log p(x|z), sum of KL) over n examples -> {"elbo", "recon", "kl", "n"} per example."""
    recon, kl = sums / n
    return {"elbo": float(recon - kl), "recon": float(recon), "kl": float(kl), "n": int(n)}


def _elbo_sums(model, x, q, rng, batch_size=EVAL_BATCH):
    """(sum of log p(x|z), sum of KL) over x at q, float64, one eps (b, Z) drawn per batch as elbo_stats does."""
    sums = np.zeros(2)
    for s in batches(x.shape[0], batch_size):
        eps = rng.standard_normal((s.stop - s.start, model.z_dim), dtype=model.dtype)
        z = dist.reparameterize(q[0][s], q[1][s], eps)
        log_px_z = model.log_px_z(x[s], model._decode(z))
        kl = dist.kl_standard_normal(q[0][s], q[1][s])
        sums += np.sum(log_px_z, dtype=np.float64), np.sum(kl, dtype=np.float64)
    return sums


def amortization_gap(model, x, q, rng, steps=500, lr=0.2, n_samples=10, n_eval=1000):
    """The gap of a run's own inference q = (mu, log_sigma) on x (N, D), decoder fixed.

        gap_i = ELBO(q*_i) - ELBO(q_i),     q*_i = evaluate.optimize_local started from q_i

    For an amortized run q is the encoder's and this is Cremer et al.'s amortization gap
    (evaluate.amortization_gaps). For a semi-amortized run q is the refined one; for a
    per-datapoint run the inner loop's fit, and the gap is what that loop leaves unconverged.
    Both ELBOs take the closed-form KL and n_eval samples of the same noise (common random numbers).
    Returns (N,) float64 arrays elbo_own, elbo_optimized, gap and the fitted q*.
    """
    rng = _check_rng(rng)
    x = model._as_x(x)
    fitted = optimize_local(model, x, steps=steps, lr=lr, rng=rng, n_samples=n_samples, n_eval=None, q=q)
    q_opt = (fitted["mu"], fitted["log_sigma"])
    seed = int(rng.integers(2 ** 63))
    own = elbo_estimate(model, x, q, n_eval, np.random.default_rng(seed))
    best = elbo_estimate(model, x, q_opt, n_eval, np.random.default_rng(seed))
    return {"elbo_own": own, "elbo_optimized": best, "gap": best - own, "q_optimized": q_opt}


# --- training steps -----------------------------------------------------------------------------------

class Inference:
    """The inner loop of a per-datapoint or semi-amortized run, and the state it keeps between steps.

    config: a validated TrainConfig (inference, inner_steps, inner_lr, inner_optimizer, seed);
    n_train, n_valid: the sizes of the training and validation sets. Per-datapoint runs keep
    phi (n_train, 2Z) and valid_phi (n_valid, 2Z), [mu | log_sigma] per row, started at the prior;
    state_dict() is what the checkpoint stores, load_state_dict() brings it back.
    """

    def __init__(self, config, model, n_train, n_valid):
        self.method = config.inference
        self.steps, self.lr, self.optimizer = config.inner_steps, config.inner_lr, config.inner_optimizer
        self.z_dim, self.dtype = model.z_dim, model.dtype
        self.phi = self.valid_phi = None
        if self.method == "per-datapoint":
            self.phi = np.zeros((n_train, 2 * model.z_dim), dtype=model.dtype)        # (M, 2Z): the prior
            self.valid_phi = np.zeros((n_valid, 2 * model.z_dim), dtype=model.dtype)

    def trained_params(self, model):
        """What theta's optimizer updates: the decoder alone for per-datapoint (no encoder is used), else all."""
        if self.method == "per-datapoint":
            return {n: model.params[n] for n in decoder_names(model)}
        return model.params

    def state_dict(self):
        return {} if self.phi is None else {"phi": self.phi, "valid_phi": self.valid_phi}

    def load_state_dict(self, state, path=""):
        """Restore the tables from a checkpoint's arrays ('extra/phi', 'extra/valid_phi')."""
        if self.phi is None:
            return
        for name in ("phi", "valid_phi"):
            a = state.get("extra/" + name)
            table = getattr(self, name)
            if a is None or a.shape != table.shape or a.dtype != table.dtype or not np.all(np.isfinite(a)):
                from .checkpoint import CheckpointError
                raise CheckpointError(f"checkpoint {path}: {name} must be a finite {table.dtype}{table.shape} "
                                      f"table, got {'none' if a is None else f'{a.dtype}{a.shape}'}")
        self.phi[...] = state["extra/phi"]
        self.valid_phi[...] = state["extra/valid_phi"]

    def _refine(self, model, x, mu, log_sigma, rng, beta=1.0):
        return refine(model, x, mu, log_sigma, self.steps, self.lr, rng, self.optimizer, beta)

    def make_step(self, model, optimizer, prepare):
        """A step(x, beta, rng, index, next_index=None) like train.reference_step's, for this method.

        -> (sum of log p(x|z), sum of KL, |grad|^2) at the q theta stepped at; a step whose loss or
        gradient is not finite changes nothing (neither theta nor the phi table).
        """
        Z, names = self.z_dim, list(optimizer.params)

        def step(x, beta, rng, index=None, next_index=None):
            if index is None and self.method == "per-datapoint":
                raise ValueError("a per-datapoint step needs the rows' index into the phi table")
            rows = x if index is None else x[np.asarray(index)]
            if rows.shape[0] == 0:
                raise ValueError("a minibatch needs at least one row: x (or x[index]) has none")
            xb = model._as_x(prepare(rows, rng))
            B = xb.shape[0]
            if self.method == "per-datapoint":
                phi = self.phi[np.asarray(index)]                              # (B, 2Z), a copy
                mu, log_sigma = self._refine(model, xb, phi[:, :Z], phi[:, Z:], rng, beta)
                eps = rng.standard_normal((B, Z), dtype=model.dtype)
            else:
                # the encoder's own ELBO and its gradient, as VAE.loss_and_grads computes them
                eps = rng.standard_normal((B, Z), dtype=model.dtype)
                model.forward(xb, eps)
                model.backward(np.full(B, -1.0 / B), np.full(B, beta / B))
                mu, log_sigma = self._refine(model, xb, model._cache[2], model._cache[3], rng, beta)
            # theta's step at the refined q, with the same eps the encoder's gradient used
            _, log_px_z, kl = decoder_loss_and_grads(model, xb, mu, log_sigma, eps, beta)
            grads = {n: model.grads[n] for n in names}
            g2 = sum(float(np.vdot(g, g)) for g in grads.values())
            sums = float(np.sum(log_px_z, dtype=np.float64)), float(np.sum(kl, dtype=np.float64))
            if math.isfinite(sums[0]) and math.isfinite(sums[1]) and math.isfinite(g2):
                if self.method == "per-datapoint":
                    self.phi[np.asarray(index)] = np.concatenate([mu, log_sigma], axis=1)
                optimizer.step(grads)
            return sums[0], sums[1], g2

        step.session = contextlib.nullcontext   # NumPy's BLAS keeps its threads, as in train.reference_step
        step.close = lambda: None
        return step

    def valid_stats(self, model, x, rng):
        """The validation ELBO with this method's inference (one sample of z per example), theta fixed.

        per-datapoint: valid_phi gets one visit of the inner loop (warm, as a training row gets
        one per epoch), then is scored; semi-amortized: the encoder's q refined by S steps.
        With S = 0 the semi-amortized figure is evaluate.elbo_stats's, draw for draw.
        """
        Z = self.z_dim
        if self.method == "per-datapoint":
            for s in batches(x.shape[0], EVAL_BATCH):
                mu, log_sigma = self._refine(model, x[s], self.valid_phi[s, :Z], self.valid_phi[s, Z:], rng)
                self.valid_phi[s] = np.concatenate([mu, log_sigma], axis=1)
            return elbo_stats_at(model, x, (self.valid_phi[:, :Z], self.valid_phi[:, Z:]), rng)
        sums = np.zeros(2)
        for s in batches(x.shape[0], EVAL_BATCH):
            q = self._refine(model, x[s], *model._encode(x[s]), rng)
            sums += _elbo_sums(model, x[s], q, rng, EVAL_BATCH)
        return _stats(sums, x.shape[0])

