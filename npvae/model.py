"""The variational autoencoder: encoder q(z|x), decoder p(x|z), the ELBO and the IWAE bound.

    mu, log_sigma = encode(x)                    q(z|x) = N(mu, diag(sigma^2))
    z             = mu + sigma * eps             eps ~ N(0, I)  (reparameterization)
    log_px_z      = log p(x|z)                   Bernoulli from logits, or Gaussian
    kl            = KL(q(z|x) || N(0, I))        closed form
    elbo          = log_px_z - kl                nats per example; E_eps[elbo] <= log p(x)
    loss          = -mean(elbo)                  summed over dimensions, mean over the batch

With K > 1 importance samples per example the IWAE bound (Burda et al. 2015)
replaces the ELBO:

    log_w = log p(x|z_k) + log p(z_k) - log q(z_k|x)          (B, K)
    bound = logsumexp_k(log_w) - log K

posterior="full", "planar:T" or "iaf:T" (npvae.posteriors) replaces the diagonal q by a
full-covariance Gaussian or a flow on it: z and log q(z|x) come from the family, and the
KL, which has no closed form there, is log q(z|x) - log p(z) at the sample.

Shapes: B batch, D data, H hidden, Z latent, K importance samples.
"""
import math

import numpy as np

from . import distributions as dist
from . import posteriors
from .layers import MLP, Dense, check_activation, init_std

LIKELIHOODS = ("bernoulli", "gaussian")
DTYPES = ("float32", "float64")


def _check_dtype(dtype):
    name = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype, str)) else repr(dtype)
    if name not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(name)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class VAE:
    """A VAE with MLP encoder and decoder whose gradients are written by hand.

    x_dim: D; hidden: widths of the hidden layers (the decoder mirrors the
    encoder); z_dim: Z; likelihood: "bernoulli" (decoder gives logits) or
    "gaussian" (decoder gives a mean and, with x_sigma=None, a learned
    input-dependent log_sigma per dimension; with x_sigma a positive float,
    that fixed standard deviation). dtype: float32 for training, float64 for
    gradient checks. seed: initial weights and the fallback noise generator.

    params and grads are dicts of named arrays with the same keys and shapes
    ('enc.h0.W', 'enc.mu.b', ...), views into one flat buffer each
    (flat_params, flat_grads), so that all parameters can also be treated as
    one vector.

    posterior: the family of q(z|x) (npvae.posteriors): "diagonal" (the
    default), "full", "planar:T" or "iaf:T" (T flow steps). Every family
    gives samples and log q by sample_q; the ELBO's KL is the closed form for
    "diagonal" and log q(z|x) - log p(z) at the sample for the others.
    """

    posterior = "diagonal"   # the class's own, for the subclasses that have no other

    def __init__(self, x_dim, hidden=(400,), z_dim=20, likelihood="bernoulli",
                 activation="relu", dtype=np.float32, seed=0, x_sigma=None, posterior="diagonal"):
        self.x_dim = _check_positive_int("x_dim", x_dim)
        self.z_dim = _check_positive_int("z_dim", z_dim)
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        self.hidden = tuple(_check_positive_int("hidden", h) for h in hidden)
        family, steps = posteriors.parse(posterior)
        self.posterior = f"{family}:{steps}" if steps else family
        self._set_settings(likelihood, activation, dtype, seed, x_sigma)
        self._build()

    def _set_settings(self, likelihood, activation, dtype, seed, x_sigma):
        """Check and keep the constructor's arguments other than the sizes (shared with HierarchicalVAE)."""
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}")
        self.likelihood = likelihood
        self.activation = check_activation(activation)
        self.dtype = _check_dtype(dtype)
        if x_sigma is not None:
            if likelihood != "gaussian":
                raise ValueError("x_sigma applies only to likelihood='gaussian'")
            if not np.isfinite(x_sigma) or x_sigma <= 0:
                raise ValueError(f"x_sigma must be a positive finite number or None, got {x_sigma!r}")
            x_sigma = float(x_sigma)
        self.x_sigma = x_sigma
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    # --- construction ----------------------------------------------------------

    @property
    def config(self):
        """The constructor's arguments as a JSON-friendly dict."""
        return dict(x_dim=self.x_dim, hidden=list(self.hidden), z_dim=self.z_dim,
                    likelihood=self.likelihood, activation=self.activation,
                    dtype=self.dtype.name, seed=self.seed, x_sigma=self.x_sigma, posterior=self.posterior)

    def _layer_specs(self):
        """(name, fan_in, fan_out, activation) for every layer, encoder first."""
        D, Z, act = self.x_dim, self.z_dim, self.activation
        specs = []
        widths = (D,) + self.hidden
        for i in range(len(self.hidden)):
            specs.append((f"enc.h{i}", widths[i], widths[i + 1], act))
        H = widths[-1]
        specs += [("enc.mu", H, Z, "identity"), ("enc.log_sigma", H, Z, "identity")]
        widths = (Z,) + self.hidden[::-1]
        for i in range(len(self.hidden)):
            specs.append((f"dec.h{i}", widths[i], widths[i + 1], act))
        H = widths[-1]
        if self.likelihood == "bernoulli":
            specs.append(("dec.logits", H, D, "identity"))
        else:
            specs.append(("dec.mean", H, D, "identity"))
            if self.x_sigma is None:
                specs.append(("dec.log_sigma", H, D, "identity"))
        return specs

    def _build(self):
        """Allocate the parameter and gradient buffers, initialize the weights, make the layers."""
        self.q = posteriors.make(self.posterior, self.z_dim)
        # the family's extra encoder heads come last, so that a seed draws the same
        # encoder and decoder weights for every family
        H = ((self.x_dim,) + self.hidden)[-1]
        specs = self._layer_specs() + [(name, H, width, "identity") for name, width in self.q.heads.items()]
        shapes = {}
        for name, fan_in, fan_out, _ in specs:
            shapes[name + ".W"] = (fan_in, fan_out)
            shapes[name + ".b"] = (fan_out,)
        shapes.update(self.q.shapes)   # a flow's global parameters
        self.flat_params, self.params = self._allocate(shapes)
        self.flat_grads, self.grads = self._allocate(shapes)
        init_rng = np.random.default_rng(self.seed)
        for name, fan_in, fan_out, _ in specs:
            # The hidden layers' activation sets the scale of the weights that feed it.
            # log_sigma heads start with zero weights, so every sigma starts at
            # exp(bias) whatever the input: a random head would put some sigmas
            # near e^-10 at step one, where (x - mean)^2 / sigma^2 makes the
            # first gradients overflow. (The bias and the data still break symmetry.)
            # The full covariance's head starts at zero for the same reason: L = diag(sigma).
            if not (name.endswith("log_sigma") or name == "enc.L"):
                W = self.params[name + ".W"]
                W[...] = init_rng.standard_normal(W.shape) * init_std(self.activation, fan_in, fan_out)
        self.q.init(self.params, init_rng)
        self._make_layers(specs)

    def _allocate(self, shapes):
        """A zeroed flat buffer and the dict {name: view of it of shapes[name]}, laid out in order."""
        flat = np.zeros(sum(math.prod(shape) for shape in shapes.values()), dtype=self.dtype)
        views, offset = {}, 0
        for name, shape in shapes.items():
            views[name] = flat[offset:offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
        return flat, views

    def _make_layers(self, specs):
        """The Dense layers over self.params and self.grads, and the networks made of them."""
        layers = {name: self.dense_layer(self.params[name + ".W"], self.params[name + ".b"],
                                         self.grads[name + ".W"], self.grads[name + ".b"], act)
                  for name, _, _, act in specs}
        n_hidden = len(self.hidden)
        self.encoder = MLP([layers[f"enc.h{i}"] for i in range(n_hidden)])
        self.enc_mu, self.enc_log_sigma = layers["enc.mu"], layers["enc.log_sigma"]
        self.decoder = MLP([layers[f"dec.h{i}"] for i in range(n_hidden)])
        self.dec_heads = [layers[n] for n in ("dec.logits", "dec.mean", "dec.log_sigma") if n in layers]
        self.enc_heads = {n: layers[n] for n in self.q.heads}   # the posterior family's extra outputs
        self._layers = layers

    # the class of the model's layers (the engine's model takes one that writes where it is told)
    dense_layer = Dense

    @property
    def n_params(self):
        """Number of trainable scalars."""
        return sum(p.size for p in self.params.values())

    # --- input handling --------------------------------------------------------

    def _as_rows(self, a, name, width):
        """Check that a is a finite float (B, width) array and return it in the model's dtype."""
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
        if a.ndim != 2 or a.shape[1] != width:
            raise ValueError(f"{name} must have shape (B, {width}), got {a.shape}")
        a = a.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return a

    def _as_x(self, x, name="x"):
        """Check x and return it as a (B, D) array of the model's dtype."""
        x = self._as_rows(x, name, self.x_dim)
        if x.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one example, got shape {x.shape}")
        if self.likelihood == "bernoulli" and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{name} must lie in [0, 1] for a Bernoulli likelihood, "
                             f"got values in [{x.min():g}, {x.max():g}]")
        return x

    def _as_z(self, z, name="z"):
        """Check z and return it as a (B, Z) array of the model's dtype."""
        return self._as_rows(z, name, self.z_dim)

    def _noise(self, shape, eps, rng):
        """eps of the given shape: the caller's, or drawn from rng (else the model's own)."""
        if eps is None:
            rng = self.rng if rng is None else rng
            if not isinstance(rng, np.random.Generator):
                raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
            return rng.standard_normal(shape, dtype=self.dtype)
        eps = np.asarray(eps)
        if eps.shape != tuple(shape):
            raise ValueError(f"eps must have shape {tuple(shape)}, got {eps.shape}")
        if eps.dtype.kind != "f":
            raise TypeError(f"eps must be a float array, got dtype {eps.dtype}")
        eps = eps.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(eps)):
            raise ValueError("eps contains NaN or infinite values")
        return eps

    # --- the networks ------------------------------------------------------------

    def encode(self, x):
        """x (B, D) -> mu (B, Z), log_sigma (B, Z) of q(z|x)."""
        return self._encode(self._as_x(x))

    def _encode(self, x):
        h = self.encoder.forward(x)  # (B, H)
        return self.enc_mu.forward(h), self.enc_log_sigma.forward(h)

    def _encode_all(self, x):
        """x (B, D) -> mu, log_sigma (B, Z) and {head name: (B, width)} of the family's extra heads."""
        h = self.encoder.forward(x)  # (B, H)
        heads = {n: layer.forward(h) for n, layer in self.enc_heads.items()}
        return self.enc_mu.forward(h), self.enc_log_sigma.forward(h), heads

    def _encode_backward(self, dmu, dlog_sigma, dheads=None):
        # h feeds every head, so its gradient is the sum of the branches.
        dh = self.enc_mu.backward(dmu)
        dh += self.enc_log_sigma.backward(dlog_sigma)
        for n, d in (dheads or {}).items():
            dh += self.enc_heads[n].backward(d)
        self.encoder.backward(dh, need_dx=False)

    def decode(self, z):
        """z (B, Z) -> bernoulli: logits (B, D); gaussian: (mean, log_sigma), each (B, D)."""
        return self._decode(self._as_z(z))

    def _decode(self, z):
        h = self.decoder.forward(z)  # (B, H)
        if self.likelihood == "bernoulli":
            return self.dec_heads[0].forward(h)
        mean = self.dec_heads[0].forward(h)
        if self.x_sigma is None:
            return mean, self.dec_heads[1].forward(h)
        return mean, np.full_like(mean, np.log(self.x_sigma))

    def _decode_backward(self, dout):
        """Gradient w.r.t. the decoder's outputs -> gradient w.r.t. z."""
        if self.likelihood == "bernoulli":
            dh = self.dec_heads[0].backward(dout)
        else:
            dmean, dlog_sigma = dout
            dh = self.dec_heads[0].backward(dmean)
            if self.x_sigma is None:
                dh += self.dec_heads[1].backward(dlog_sigma)  # h feeds both heads
        return self.decoder.backward(dh)

    def mean_px_z(self, out):
        """Decoder output -> the mean of p(x|z), (B, D)."""
        from scipy.special import expit  # imported on first use (see layers.py)
        return expit(out) if self.likelihood == "bernoulli" else out[0]

    def log_px_z(self, x, out):
        """log p(x|z) per example, (..., D) -> (...), from the decoder's output."""
        if self.likelihood == "bernoulli":
            return dist.bernoulli_log_prob(x, out)
        if self.x_sigma is not None:
            return dist.gaussian_fixed_log_prob(x, out[0], self.x_sigma)
        return dist.gaussian_log_prob(x, *out)

    def _log_px_z_grad(self, dlog_px_z, x, out):
        """Upstream gradient of log p(x|z) -> gradient w.r.t. the decoder's output."""
        if self.likelihood == "bernoulli":
            return dist.bernoulli_log_prob_grad(dlog_px_z, x, out)
        if self.x_sigma is not None:
            return dist.gaussian_fixed_log_prob_grad(dlog_px_z, x, out[0], self.x_sigma), None
        return dist.gaussian_log_prob_grad(dlog_px_z, x, *out)

    # --- the ELBO (K = 1) ------------------------------------------------------------

    def forward(self, x, eps):
        """x (B, D), eps (B, Z) -> (log_px_z, kl), each (B,); keeps what backward needs.

        kl is the closed form for the diagonal posterior; for the others, which have none,
        it is log q(z|x) - log p(z) at the sample z, whose expectation is the KL.
        """
        if self.posterior != "diagonal":
            log_px_z, log_pz, log_q = self._forward_sampled(x, eps[:, None, :])
            return log_px_z[:, 0], (log_q - log_pz)[:, 0]
        mu, log_sigma = self._encode(x)                 # (B, Z), (B, Z)
        z = dist.reparameterize(mu, log_sigma, eps)     # (B, Z)
        out = self._decode(z)                           # logits or (mean, log_sigma), (B, D)
        log_px_z = self.log_px_z(x, out)                # (B,)
        kl = dist.kl_standard_normal(mu, log_sigma)     # (B,)
        self._cache = (x, eps, mu, log_sigma, out)
        return log_px_z, kl

    def backward(self, dlog_px_z, dkl):
        """Upstream gradients (B,), (B,) -> grads dict (views of the model's buffer).

        mu and log_sigma feed both z and the KL, so their gradients sum both paths.
        """
        if self.posterior != "diagonal":
            # kl = log q - log p(z): d kl / d log q = 1, d kl / d log p(z) = -1
            dkl = np.asarray(dkl, dtype=self.dtype)[:, None]
            return self._backward_sampled(np.asarray(dlog_px_z, dtype=self.dtype)[:, None], -dkl, dkl)
        x, eps, mu, log_sigma, out = self._cache
        dz = self._decode_backward(self._log_px_z_grad(dlog_px_z, x, out))    # (B, Z)
        dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma, eps)
        dmu_kl, dlog_sigma_kl = dist.kl_standard_normal_grad(dkl, mu, log_sigma)
        self._encode_backward(dmu + dmu_kl, dlog_sigma + dlog_sigma_kl)
        return self.grads

    def elbo_terms(self, x, eps=None, rng=None):
        """x (B, D) -> (log_px_z, kl), each (B,): the ELBO's reconstruction and KL terms."""
        x = self._as_x(x)
        eps = self._noise((x.shape[0], self.z_dim), eps, rng)
        return self.forward(x, eps)

    def elbo(self, x, eps=None, rng=None):
        """x (B, D) -> (B,) ELBO in nats per example; eps (B, Z) fixes the noise."""
        log_px_z, kl = self.elbo_terms(x, eps, rng)
        return log_px_z - kl

    # --- the IWAE bound (K >= 1) -------------------------------------------------------

    def forward_iwae(self, x, eps):
        """x (B, D), eps (B, K, Z) -> bound (B,); keeps what backward_iwae needs."""
        B, K, Z = eps.shape
        if self.posterior != "diagonal":
            log_px_z, log_pz, log_q = self._forward_sampled(x, eps)
            log_w = log_px_z + log_pz - log_q                             # (B, K)
            self._log_w = log_w
            from scipy.special import logsumexp
            return logsumexp(log_w, axis=1) - math.log(K)
        mu, log_sigma = self._encode(x)                                   # (B, Z)
        z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)     # (B, K, Z)
        out = self._decode(z.reshape(B * K, Z))
        out_bk = _per_sample(out, B, K)                                   # (B, K, D)
        log_px_z = self.log_px_z(x[:, None, :], out_bk)                   # (B, K)
        log_pz = dist.standard_normal_log_prob(z)                         # (B, K)
        log_qz = dist.log_q_reparameterized(eps, log_sigma[:, None])     # (B, K)
        log_w = log_px_z + log_pz - log_qz                                # (B, K)
        self._cache_iwae = (x, eps, z, log_sigma, out_bk, log_w)
        from scipy.special import logsumexp
        return logsumexp(log_w, axis=1) - math.log(K)

    def backward_iwae(self, dbound):
        """Upstream gradient (B,) -> grads dict; the normalized weights carry the gradient.

        Local derivative: d bound / d log_w_k = w_k / sum_j w_j (a softmax over K).
        """
        from scipy.special import softmax
        if self.posterior != "diagonal":
            dlog_w = np.asarray(dbound, dtype=self.dtype)[:, None] * softmax(self._log_w, axis=1)
            dlog_w = dlog_w.astype(self.dtype, copy=False)
            return self._backward_sampled(dlog_w, dlog_w, -dlog_w)
        x, eps, z, log_sigma, out_bk, log_w = self._cache_iwae
        B, K, Z = eps.shape
        dlog_w = np.asarray(dbound, dtype=self.dtype)[:, None] * softmax(log_w, axis=1)  # (B, K)
        dlog_w = dlog_w.astype(self.dtype, copy=False)
        dout = _all_samples(self._log_px_z_grad(dlog_w, x[:, None, :], out_bk), B, K)   # (B*K, D)
        dz = self._decode_backward(dout).reshape(B, K, Z)
        dz -= dlog_w[..., None] * z                     # from log p(z): d/dz = -z
        dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma[:, None], eps)
        dlog_sigma = dlog_sigma.sum(axis=1)             # (B, Z): log_sigma feeds every sample
        # from -log q(z|x): d/dlog_sigma = +1 per sample (inside the clip)
        dlog_sigma += dlog_w.sum(axis=1)[:, None] * dist._in_range(log_sigma)
        self._encode_backward(dmu.sum(axis=1), dlog_sigma)
        return self.grads

    def iwae_bound(self, x, k, eps=None, rng=None):
        """x (B, D) -> (B,) IWAE bound with k samples; eps (B, K, Z) fixes the noise.

        k = 1 gives the single-sample ELBO with a Monte Carlo KL, whose
        expectation is elbo(x).
        """
        k = _check_positive_int("k", k)
        x = self._as_x(x)
        eps = self._noise((x.shape[0], k, self.z_dim), eps, rng)
        return self.forward_iwae(x, eps)

    # --- any posterior family: log q at the sample ------------------------------------------

    def _forward_sampled(self, x, eps):
        """x (B, D), eps (B, K, Z) -> log p(x|z), log p(z), log q(z|x), each (B, K), at z of the family's q."""
        B, K, Z = eps.shape
        mu, log_sigma, heads = self._encode_all(x)                               # (B, Z), (B, Z), {...}
        z, log_q, q_cache = self.q.sample(mu, log_sigma, heads, self.params, eps)  # (B, K, Z), (B, K)
        out_bk = _per_sample(self._decode(z.reshape(B * K, Z)), B, K)            # (B, K, D)
        log_px_z = self.log_px_z(x[:, None, :], out_bk)                          # (B, K)
        self._cache_sampled = (x, z, out_bk, q_cache)
        return log_px_z, dist.standard_normal_log_prob(z), log_q

    def _backward_sampled(self, dlog_px_z, dlog_pz, dlog_q):
        """Upstream gradients of _forward_sampled's three (B, K) terms -> grads dict.

        z feeds the decoder and log p(z) (d/dz = -z): their gradients sum before the family's backward.
        """
        x, z, out_bk, q_cache = self._cache_sampled
        B, K, Z = z.shape
        dout = _all_samples(self._log_px_z_grad(dlog_px_z, x[:, None, :], out_bk), B, K)
        dz = self._decode_backward(dout).reshape(B, K, Z)
        dz -= dlog_pz[..., None] * z
        dmu, dlog_sigma, dheads, dparams = self.q.sample_grad(dz, dlog_q, q_cache)
        for name, d in dparams.items():
            self.grads[name][...] = d
        self._encode_backward(dmu, dlog_sigma, dheads)
        return self.grads

    def sample_q(self, x, k, rng=None):
        """x (B, D) -> z (B, K, Z) drawn from q(z|x) with K = k, and log q(z|x) (B, K), for every family."""
        k = _check_positive_int("k", k)
        x = self._as_x(x)
        eps = self._noise((x.shape[0], k, self.z_dim), None, rng)
        mu, log_sigma, heads = self._encode_all(x)
        z, log_q, _ = self.q.sample(mu, log_sigma, heads, self.params, eps)
        return z, log_q

    # --- training interface ------------------------------------------------------------

    def loss_and_grads(self, x, eps=None, rng=None, k=1, beta=1.0, copy=False, terms=False, objective=None):
        """x (B, D) -> (loss, grads): loss = -mean(elbo) (k = 1) or -mean(IWAE bound) (k > 1).

        objective: "elbo" (k = 1) or "iwae" (any k; with k = 1 the bound is
        the single-sample ELBO with a Monte Carlo KL); None: "elbo" for k = 1,
        "iwae" otherwise. eps is (B, Z) for the ELBO and (B, K, Z) for the
        bound; without it the noise comes from rng (else the model's own
        generator). beta weights the KL term (KL warm-up, beta-VAE) and
        applies to the ELBO only. grads has the
        keys and shapes of params: the model's own gradient buffers, which the
        next call overwrites (copy=True: arrays of the caller's own). With
        terms=True, returns (loss, grads, terms) with the per-example terms
        (B,): {"log_px_z", "kl"} for the ELBO, {"bound"} for the IWAE bound.
        """
        k = _check_positive_int("k", k)
        objective = ("elbo" if k == 1 else "iwae") if objective is None else objective
        if objective not in ("elbo", "iwae") or (objective == "elbo" and k != 1):
            raise ValueError(f"objective must be 'elbo' (with k = 1) or 'iwae', got {objective!r} with k={k}")
        x = self._as_x(x)
        B = x.shape[0]
        if objective == "elbo":
            eps = self._noise((B, self.z_dim), eps, rng)
            log_px_z, kl = self.forward(x, eps)
            loss = -np.mean(log_px_z - beta * kl)
            # d loss / d log_px_z = -1/B, d loss / d kl = beta/B, for every example
            self.backward(np.full(B, -1.0 / B), np.full(B, beta / B))
            per_example = {"log_px_z": log_px_z, "kl": kl}
        else:
            if beta != 1.0:
                raise ValueError(f"beta must be 1 with the IWAE objective, got {beta}")
            eps = self._noise((B, k, self.z_dim), eps, rng)
            bound = self.forward_iwae(x, eps)
            loss = -np.mean(bound)
            self.backward_iwae(np.full(B, -1.0 / B))
            per_example = {"bound": bound}
        grads = {n: g.copy() for n, g in self.grads.items()} if copy else self.grads
        return (float(loss), grads, per_example) if terms else (float(loss), grads)

    # --- generation ---------------------------------------------------------------------

    def sample(self, n, rng=None):
        """(n, D): the mean of p(x|z) for z ~ N(0, I)."""
        n = _check_positive_int("n", n)
        z = self._noise((n, self.z_dim), None, rng)
        return self.mean_px_z(self._decode(z))

    def reconstruct(self, x):
        """x (B, D) -> (B, D): the mean of p(x|z) at z = mu(x), the posterior mean."""
        mu, _ = self.encode(x)
        return self.mean_px_z(self._decode(mu))


def _per_sample(out, B, K):
    """Decoder output for B*K rows -> (B, K, D) arrays (a tuple of them for a Gaussian)."""
    if isinstance(out, tuple):
        return tuple(o.reshape(B, K, -1) for o in out)
    return out.reshape(B, K, -1)


def _all_samples(dout, B, K):
    """Gradient w.r.t. a (B, K, D) decoder output -> (B*K, D) (None stays None)."""
    if isinstance(dout, tuple):
        return tuple(None if d is None else d.reshape(B * K, -1) for d in dout)
    return dout.reshape(B * K, -1)
