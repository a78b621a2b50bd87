"""The variational autoencoder: encoder q(z|x), decoder p(x|z), the ELBO and the IWAE bound.

    mu, log_sigma = encode(x)                    q(z|x) = N(mu, diag(sigma^2))
    z             = mu + sigma * eps             eps ~ N(0, I)  (reparameterization)
    log_px_z      = log p(x|z)                   Bernoulli from logits, or Gaussian
    kl            = KL(q(z|x) || N(0, I))        closed form
    elbo          = log_px_z - kl                nats per example, <= log p(x)
    loss          = -mean(elbo)                  summed over dimensions, mean over the batch

With K > 1 importance samples per example the IWAE bound (Burda et al. 2015)
replaces the ELBO:

    log_w = log p(x|z_k) + log p(z_k) - log q(z_k|x)          (B, K)
    bound = logsumexp_k(log_w) - log K

Shapes: B batch, D data, H hidden, Z latent, K importance samples.
"""
import math

import numpy as np

from . import distributions as dist
from .parallel import aligned_zeros
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
    shared: keep the parameter and gradient buffers (and those of replicas)
    in memory that processes forked later also see, for training in helper
    processes (npvae.parallel.Processes).
    """

    def __init__(self, x_dim, hidden=(400,), z_dim=20, likelihood="bernoulli",
                 activation="relu", dtype=np.float32, seed=0, x_sigma=None, shared=False):
        self.x_dim = _check_positive_int("x_dim", x_dim)
        self.z_dim = _check_positive_int("z_dim", z_dim)
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        self.hidden = tuple(_check_positive_int("hidden", h) for h in hidden)
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
        self.shared = bool(shared)
        self.rng = np.random.default_rng(seed)
        self._rows = None   # (x rows, z rows) of a SplitBatch this model is bound to (bind_rows)
        self._bound = None  # (batch, first, stop) of that binding
        self._build()

    # --- construction ----------------------------------------------------------

    @property
    def config(self):
        """The constructor's arguments as a JSON-friendly dict."""
        return dict(x_dim=self.x_dim, hidden=list(self.hidden), z_dim=self.z_dim,
                    likelihood=self.likelihood, activation=self.activation,
                    dtype=self.dtype.name, seed=self.seed, x_sigma=self.x_sigma)

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
        """Allocate one flat buffer for parameters and one for gradients, and views into them."""
        specs = self._layer_specs()
        shapes = {}
        for name, fan_in, fan_out, _ in specs:
            shapes[name + ".W"] = (fan_in, fan_out)
            shapes[name + ".b"] = (fan_out,)
        # One flat buffer each for parameters and gradients, so an optimizer can
        # treat all parameters as a single vector while layers see named views.
        # Each view starts on a 64-byte boundary: BLAS is ~10% slower on
        # misaligned matrices. The padding between views stays zero.
        align = max(1, 64 // self.dtype.itemsize)
        offsets, size = {}, 0
        for name, shape in shapes.items():
            offsets[name] = size
            size += -(-int(np.prod(shape)) // align) * align
        self._views = {name: (offsets[name], shape) for name, shape in shapes.items()}
        self.flat_params, self.params = self._allocate(size)
        self.flat_grads, self.grads = self._allocate(size)
        init_rng = np.random.default_rng(self.seed)
        for name, fan_in, fan_out, _ in specs:
            # The hidden layers' activation sets the scale of the weights that feed it.
            # log_sigma heads start with zero weights, so every sigma starts at
            # exp(bias) whatever the input: a random head would put some sigmas
            # near e^-10 at step one, where (x - mean)^2 / sigma^2 makes the
            # first gradients overflow. (The bias and the data still break symmetry.)
            if not name.endswith("log_sigma"):
                W = self.params[name + ".W"]
                W[...] = init_rng.standard_normal(W.shape) * init_std(self.activation, fan_in, fan_out)
        self._make_layers(specs)

    def _allocate(self, size):
        """A zeroed flat buffer of `size` elements and the dict of named views into it."""
        flat = aligned_zeros(size, self.dtype, shared=self.shared)
        return flat, {name: flat[o:o + int(np.prod(shape))].reshape(shape)
                      for name, (o, shape) in self._views.items()}

    def _make_layers(self, specs):
        """The Dense layers over self.params and self.grads, and the networks made of them."""
        layers = {name: Dense(self.params[name + ".W"], self.params[name + ".b"],
                              self.grads[name + ".W"], self.grads[name + ".b"], act)
                  for name, _, _, act in specs}
        n_hidden = len(self.hidden)
        self.encoder = MLP([layers[f"enc.h{i}"] for i in range(n_hidden)])
        self.enc_mu, self.enc_log_sigma = layers["enc.mu"], layers["enc.log_sigma"]
        self.decoder = MLP([layers[f"dec.h{i}"] for i in range(n_hidden)])
        self.dec_heads = [layers[n] for n in ("dec.logits", "dec.mean", "dec.log_sigma") if n in layers]
        self._layers = layers

    def replica(self):
        """A VAE that shares this one's parameters (the same arrays) but has its own gradients.

        Its forward and backward keep their own caches and write its own
        gradient buffer, so several replicas can work on parts of one batch at
        once (npvae.parallel); an update to the parameters is seen by all.
        """
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin._cache = twin._cache_iwae = twin._rows = twin._bound = None
        twin.flat_grads, twin.grads = twin._allocate(self.flat_grads.size)
        twin._make_layers(self._layer_specs())
        return twin

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
        if self._rows is not None and x is not self._rows[0]:   # bound: x goes into the batch's rows too
            np.copyto(self._rows[0], x)
            x = self._rows[0]
        h = self.encoder.forward(x)  # (B, H)
        return self.enc_mu.forward(h), self.enc_log_sigma.forward(h)

    def _encode_backward(self, dmu, dlog_sigma):
        # h feeds both heads, so its gradient is the sum of the two branches.
        dh = self.enc_mu.backward(dmu)
        dh += self.enc_log_sigma.backward(dlog_sigma)
        self.encoder.backward(dh, need_dx=False)

    def decode(self, z):
        """z (B, Z) -> bernoulli: logits (B, D); gaussian: (mean, log_sigma), each (B, D)."""
        return self._decode(self._as_z(z))

    def _decode(self, z):
        if self._rows is not None:
            np.copyto(self._rows[1], z)
            z = self._rows[1]
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
        return self._log_px_z(x, out)[0]

    def _log_px_z(self, x, out):
        """(log p(x|z), what its gradient can reuse: (e^logits, 1 + e^logits) or None for Bernoulli)."""
        if self.likelihood == "bernoulli":
            log_p, e, t = dist.bernoulli_log_prob_and_exp(x, out)
            return log_p, None if e is None else (e, t)
        if self.x_sigma is not None:
            return dist.gaussian_fixed_log_prob(x, out[0], self.x_sigma), None
        return dist.gaussian_log_prob(x, *out), None

    def _log_px_z_grad(self, dlog_px_z, x, out, reuse=None):
        """Upstream gradient of log p(x|z) -> gradient w.r.t. the decoder's output."""
        if self.likelihood == "bernoulli":
            e, t = (None, None) if reuse is None else reuse
            return dist.bernoulli_log_prob_grad(dlog_px_z, x, out, exp_logits=e, one_plus_exp=t)
        if self.x_sigma is not None:
            return dist.gaussian_fixed_log_prob_grad(dlog_px_z, x, out[0], self.x_sigma), None
        return dist.gaussian_log_prob_grad(dlog_px_z, x, *out)

    # --- the ELBO (K = 1) ------------------------------------------------------------

    def forward(self, x, eps):
        """x (B, D), eps (B, Z) -> (log_px_z, kl), each (B,); caches what backward needs."""
        mu, log_sigma = self._encode(x)                     # (B, Z), (B, Z)
        sigma = dist.std(log_sigma)                         # (B, Z), once for z, the KL and backward
        z = dist.reparameterize(mu, log_sigma, eps, sigma)  # (B, Z)
        out = self._decode(z)                               # logits or (mean, log_sigma), (B, D)
        log_px_z, reuse = self._log_px_z(x, out)            # (B,)
        kl = dist.kl_standard_normal(mu, log_sigma, sigma)  # (B,)
        self._cache = (x, eps, mu, log_sigma, sigma, out, reuse)
        return log_px_z, kl

    def backward(self, dlog_px_z, dkl):
        """Upstream gradients (B,), (B,) -> grads dict (views of the model's buffer).

        mu and log_sigma feed both z and the KL, so their gradients sum both paths.
        """
        x, eps, mu, log_sigma, sigma, out, reuse = self._cache
        dz = self._decode_backward(self._log_px_z_grad(dlog_px_z, x, out, reuse))
        in_range = dist._in_range(log_sigma)   # where the clip in std() lets the gradient through
        dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma, eps, sigma, in_range)
        dmu_kl, dlog_sigma_kl = dist.kl_standard_normal_grad(dkl, mu, log_sigma, sigma, in_range)
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
        """x (B, D), eps (B, K, Z) -> bound (B,); caches what backward_iwae needs."""
        B, K, Z = eps.shape
        mu, log_sigma = self._encode(x)                                   # (B, Z)
        z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)     # (B, K, Z)
        out = self._decode(z.reshape(B * K, Z))
        out_bk = (out.reshape(B, K, -1) if self.likelihood == "bernoulli"
                  else tuple(o.reshape(B, K, -1) for o in out))
        log_px_z, reuse = self._log_px_z(x[:, None, :], out_bk)           # (B, K)
        log_pz = dist.standard_normal_log_prob(z)                          # (B, K)
        # log q(z|x) at z = mu + sigma*eps, written in eps so its derivative
        # with the noise held fixed is plain: d/dlog_sigma = -1, d/dmu = 0.
        log_qz = (-0.5 * np.sum(eps * eps, axis=-1) - np.sum(
            dist.clip_log_sigma(log_sigma), axis=-1)[:, None]
            - 0.5 * Z * dist.LOG_2PI)                                     # (B, K)
        log_w = log_px_z + log_pz - log_qz                                 # (B, K)
        self._cache_iwae = (x, eps, z, log_sigma, out_bk, reuse, log_w)
        from scipy.special import logsumexp
        return logsumexp(log_w, axis=1) - math.log(K)

    def backward_iwae(self, dbound):
        """Upstream gradient (B,) -> grads dict; the normalized weights carry the gradient.

        Local derivative: d bound / d log_w_k = w_k / sum_j w_j (a softmax over K).
        """
        from scipy.special import softmax
        x, eps, z, log_sigma, out_bk, reuse, log_w = self._cache_iwae
        B, K, Z = eps.shape
        dlog_w = np.asarray(dbound, dtype=self.dtype)[:, None] * softmax(log_w, axis=1)  # (B, K)
        dlog_w = dlog_w.astype(self.dtype, copy=False)
        dout_bk = self._log_px_z_grad(dlog_w, x[:, None, :], out_bk, reuse)  # (B, K, D) each
        dout = (dout_bk.reshape(B * K, -1) if self.likelihood == "bernoulli"
                else tuple(None if d is None else d.reshape(B * K, -1) for d in dout_bk))
        dz = self._decode_backward(dout).reshape(B, K, Z)
        dz -= dlog_w[..., None] * z                     # from log p(z): d/dz = -z
        dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma[:, None], eps)
        dlog_sigma = dlog_sigma.sum(axis=1)             # (B, Z)
        # from -log q(z|x): +1 per sample and latent dimension (inside the clip)
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

    # --- training interface ------------------------------------------------------------

    def loss_and_grads(self, x, eps=None, rng=None, k=1, beta=1.0, copy=True):
        """x (B, D) -> (loss, grads): loss = -mean(elbo) (k = 1) or -mean(IWAE bound) (k > 1).

        eps is (B, Z) for k = 1 and (B, K, Z) for k > 1. beta weights the KL
        term (KL warm-up, beta-VAE) and applies to k = 1 only. grads has the
        keys and shapes of params; with copy=False they are the model's own
        buffers, overwritten by the next call.
        """
        k = _check_positive_int("k", k)
        x = self._as_x(x)
        B = x.shape[0]
        if k == 1:
            eps = self._noise((B, self.z_dim), eps, rng)
            log_px_z, kl = self.forward(x, eps)
            loss = -np.mean(log_px_z - beta * kl)
            # d loss / d log_px_z = -1/B, d loss / d kl = beta/B, for every example
            self.backward(np.full(B, -1.0 / B), np.full(B, beta / B))
        else:
            if beta != 1.0:
                raise ValueError(f"beta must be 1 with the IWAE objective (k > 1), got {beta}")
            eps = self._noise((B, k, self.z_dim), eps, rng)
            loss = -np.mean(self.forward_iwae(x, eps))
            self.backward_iwae(np.full(B, -1.0 / B))
        grads = {n: g.copy() for n, g in self.grads.items()} if copy else self.grads
        return float(loss), grads

    # --- a minibatch split over replicas ------------------------------------------------

    def layer_inputs(self):
        """{layer name: what the layer reads}: 'x', 'z', or the hidden layer before it, encoder first."""
        inputs = {}
        for side, first, heads in (("enc", "x", ("mu", "log_sigma")),
                                   ("dec", "z", ("logits", "mean", "log_sigma"))):
            before = first
            for i in range(len(self.hidden)):
                inputs[f"{side}.h{i}"], before = before, f"{side}.h{i}"
            for head in heads:
                inputs[f"{side}.{head}"] = before
        return {name: inputs[name] for name, *_ in self._layer_specs()}

    def grad_ranges(self, n):
        """n ranges [(start, stop), ...] that tile the flat gradient buffer in nearly equal pieces,
        each cut between two rows of a weight matrix or at the start of a bias (SplitBatch.weight_grads)."""
        allowed = {0, self.flat_grads.size}
        for offset, shape in self._views.values():
            width = shape[1] if len(shape) == 2 else shape[0]   # a bias is one row
            allowed.update(range(offset, offset + math.prod(shape) + 1, width))
        allowed = np.array(sorted(allowed))
        cuts = [0]
        for j in range(1, n):
            ideal = self.flat_grads.size * j / n
            cuts.append(max(cuts[-1], int(allowed[np.argmin(np.abs(allowed - ideal))])))
        cuts.append(self.flat_grads.size)
        return list(zip(cuts, cuts[1:]))

    def input_rows(self):
        """Bound to a SplitBatch: the (b, D) rows of it where forward puts x (x may be written
        there in advance; forward then copies nothing). Else None."""
        return None if self._rows is None else self._rows[0]

    def bind_rows(self, batch, first, stop):
        """Work on rows [first, stop) of the SplitBatch batch (None: unbind).

        Bound, forward writes the inputs of every layer (x, z, the hidden
        layers' outputs) into those rows of batch, and backward writes each
        layer's local gradient da there instead of its own weight gradients;
        batch.weight_grads computes those afterwards, over the whole batch.
        """
        if batch is None:
            self._rows = self._bound = None
            for layer in self._layers.values():
                layer.out = layer.da_out = None
            return
        bound = self._bound
        if bound is not None and bound[0] is batch and bound[1:] == (first, stop):
            return   # bound there already (a training step binds the same rows every time)
        k = batch.k
        for name, layer in self._layers.items():
            r = _rows_per_example(name, k)
            rows = slice(first * r, stop * r)
            layer.out = batch.inputs[name][rows] if name in batch.inputs else None
            layer.da_out = batch.da[name][rows]
        self._rows = batch.inputs["x"][first:stop], batch.inputs["z"][first * k:stop * k]
        self._bound = batch, first, stop

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


class SplitBatch:
    """A minibatch split over replicas: its layers' inputs and local gradients, whole.

    Each replica, bound to its block of rows (VAE.bind_rows), runs forward
    and backward on them and writes every layer's input (x, z, the hidden
    layers' outputs) and local gradient da = dloss/da into its rows here.
    Once all have finished, the weight gradients are sums over the whole batch,

        dW = x^T da        db = sum over rows of da

    so any range of the model's flat gradient buffer can be computed on its
    own (weight_grads), by any process: no replica keeps gradients of its
    own, and none have to be added up.

    capacity: the most examples a minibatch may have; k: samples per example
    (the decoder sees k rows per example: the IWAE bound); shared: in memory
    that processes forked later also see (npvae.parallel.Processes).
    """

    def __init__(self, model, capacity, k=1, shared=False):
        self.model, self.capacity, self.k = model, int(capacity), int(k)
        self.reads = model.layer_inputs()

        def rows(name):
            return self.capacity * _rows_per_example(name, self.k)

        def zeros(name, width):
            return aligned_zeros(rows(name) * width, model.dtype, shared=shared).reshape(rows(name), width)
        widths = {"x": model.x_dim, "z": model.z_dim}
        widths.update((name, fan_out) for name, _, fan_out, _ in model._layer_specs())
        # inputs[name]: the array that name's output is; layers read it (x and z are the model's)
        self.inputs = {name: zeros(name, widths[name]) for name in ["x", "z"] + sorted(
            set(self.reads.values()) - {"x", "z"})}
        self.da = {name: zeros(name, fan_out) for name, _, fan_out, _ in model._layer_specs()}
        self._plans = {}   # (start, stop) -> what weight_grads does for that range

    def weight_grads(self, start, stop, B):
        """The model's gradient on [start, stop) of its flat buffer (model.grad_ranges' pieces),
        from the first B examples, which the bound replicas have written."""
        if not 0 < B <= self.capacity:
            raise ValueError(f"B must be in [1, {self.capacity}], got {B}")
        plan = self._plans.get((start, stop))
        if plan is None:   # a training step asks for the same ranges every time: worked out once
            plan = self._plans[start, stop] = self._plan(start, stop)
        for layer, x, da, r, rows, cols in plan:
            layer.weight_grads(x[:B * r], da[:B * r], rows, cols)

    def _plan(self, start, stop):
        """[(layer, its input, its da, rows per example, rows of W, entries of b)] of every layer
        with a piece in [start, stop) of the flat buffer."""
        model, plan = self.model, []
        for name, layer in model._layers.items():
            rows = _piece(model._views[name + ".W"], start, stop)
            cols = _piece(model._views[name + ".b"], start, stop)
            if rows.stop > rows.start or cols.stop > cols.start:
                plan.append((layer, self.inputs[self.reads[name]], self.da[name],
                             _rows_per_example(name, self.k), rows, cols))
        return plan


def _rows_per_example(name, k):
    """How many rows an example has in layer (or input) `name` of a SplitBatch: k in z and the
    decoder, which see k samples per example (the IWAE bound), 1 in x and the encoder."""
    return k if name == "z" or name.startswith("dec.") else 1


def _piece(view, start, stop):
    """The rows of a (rows, width) view (entries of a 1-D one) at (offset, shape) that [start, stop) covers."""
    offset, shape = view
    width = shape[1] if len(shape) == 2 else 1
    first = min(max(start - offset, 0), shape[0] * width)
    last = min(max(stop - offset, 0), shape[0] * width)
    if first % width or last % width:
        raise ValueError(f"range [{start}, {stop}) cuts a row of a weight matrix (see VAE.grad_ranges)")
    return slice(first // width, last // width)
