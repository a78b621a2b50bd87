"""A VAE with L stochastic layers (Burda, Grosse & Salakhutdinov 2015, section 5), gradients by hand.

The generative model runs top-down, the recognition model bottom-up:

    p(z_L) = N(0, I)
    p(z_l | z_{l+1}) = N(mu, diag(sigma^2)),  (mu, log_sigma) = MLP_p,l+1(z_{l+1})    l = L-1 .. 1
    p(x | z_1)       = Bernoulli(sigmoid(logits(z_1)))  (or Gaussian)
    q(z_1 | x)       = N(mu, diag(sigma^2)),  (mu, log_sigma) = MLP_q,1(x)
    q(z_l | z_{l-1}) = N(mu, diag(sigma^2)),  (mu, log_sigma) = MLP_q,l(z_{l-1})      l = 2 .. L

Every latent is drawn by the reparameterization z_l = mu_l + sigma_l * eps_l,
eps_l ~ N(0, I), so one noise array eps = [eps_1 | eps_2 | ... | eps_L] (the
layers side by side on its last axis, width z_dim = Z_1 + ... + Z_L) fixes a
sample of the whole chain.

The ELBO (k = 1), with the top layer's KL in closed form:

    elbo = log p(x|z_1) + sum_{l<L} [log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})]
           - KL(q(z_L|z_{L-1}) || N(0, I))

The top KL is analytic because, given the sampled z_{L-1}, both of its
Gaussians are known: the prior does not depend on anything. The lower terms
are not: KL(q(z_l|z_{l-1}) || p(z_l|z_{l+1})) would need z_{l+1} fixed, but
z_{l+1} is drawn from q(z_{l+1}|z_l), that is from the very z_l the KL
averages over, so they are estimated at the sampled z. `kl` below is the
whole correction log p(x|z_1) - elbo, a single-sample estimate of
KL(q(z|x) || p(z)) over all layers.

The IWAE bound with K samples drawn through all layers:

    log_w_k = log p(x|z_1k) + sum_{l<L} log p(z_lk|z_{l+1,k}) + log p(z_Lk)
              - sum_l log q(z_lk|z_{l-1,k})                                    (B, K)
    bound   = logsumexp_k(log_w) - log K

Parameter names: layer 1 keeps the one-layer VAE's (enc.h0, enc.mu,
enc.log_sigma, dec.h0, dec.logits, ...), so that with one layer the model is
npvae.model.VAE, number for number; layer l >= 2 has enc<l>.* (q(z_l|z_{l-1}))
and dec<l>.* (p(z_{l-1}|z_l), heads dec<l>.mu and dec<l>.log_sigma).

Derivation of the backward pass: docs/derivations.md, "A hierarchical VAE".
Shapes: B batch, D data, H hidden, Z_l layer l's latent, K importance samples.
"""
import math
from types import SimpleNamespace

import numpy as np

from . import distributions as dist
from .layers import MLP
from .model import VAE, _all_samples, _check_positive_int, _per_sample

BURDA_LAYERS = (((200, 200), 100), ((100, 100), 50))   # Burda et al. (2015): 784-200-200-[100]-100-100-[50]


def check_layers(layers):
    """[(hidden, z_dim), ...] -> a tuple of ((H, ...), Z) pairs, or a one-line error saying what was expected."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__") or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty list of (hidden, z_dim) pairs, got {layers!r}")
    out = []
    for i, layer in enumerate(layers):
        if not (isinstance(layer, (tuple, list)) and len(layer) == 2):
            raise ValueError(f"layers[{i}] must be a pair (hidden widths, z_dim), got {layer!r}")
        hidden, z = layer
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        hidden = tuple(_check_positive_int(f"layers[{i}] hidden width", h) for h in hidden)
        if not hidden:
            raise ValueError(f"layers[{i}] needs at least one hidden width, got {layer!r}")
        out.append((hidden, _check_positive_int(f"layers[{i}] z_dim", z)))
    return tuple(out)


class HierarchicalVAE(VAE):
    """A VAE with len(layers) stochastic layers; layers = [(hidden widths, z_dim), ...], bottom first.

    layer l's hidden widths serve both of its networks: q(z_l|z_{l-1}) runs
    through them, p(z_{l-1}|z_l) (p(x|z_1) for l = 1) through them reversed.
    likelihood, activation, dtype, seed, x_sigma: as npvae.model.VAE. The
    defaults are Burda et al.'s two-layer MNIST model (latents 100 and 50,
    200-200 and 100-100 hidden, tanh).

    z_dims: (Z_1, ..., Z_L); z_dim = sum(z_dims) is the width of eps (all
    layers side by side). elbo, iwae_bound, elbo_terms, loss_and_grads are
    VAE's and take eps (B, z_dim) or (B, K, z_dim).
    """

    def __init__(self, x_dim, layers=BURDA_LAYERS, likelihood="bernoulli", activation="tanh",
                 dtype=np.float32, seed=0, x_sigma=None):
        self.x_dim = _check_positive_int("x_dim", x_dim)
        self.layers = check_layers(layers)
        self.z_dims = tuple(z for _, z in self.layers)
        self.z_dim = sum(self.z_dims)
        # every hidden width, so that evaluate.chunk_sizes sizes its passes by the widest layer
        self.hidden = tuple(h for hidden, _ in self.layers for h in hidden)
        self._set_settings(likelihood, activation, dtype, seed, x_sigma)
        self._build()

    # --- construction ----------------------------------------------------------

    @property
    def config(self):
        """The constructor's arguments as a JSON-friendly dict (npvae.load tells the models apart by 'layers')."""
        return dict(x_dim=self.x_dim, layers=[[list(h), z] for h, z in self.layers],
                    likelihood=self.likelihood, activation=self.activation,
                    dtype=self.dtype.name, seed=self.seed, x_sigma=self.x_sigma)

    def _layer_specs(self):
        """(name, fan_in, fan_out, activation) for every layer: layer 1 as VAE's, then enc<l>, dec<l>."""
        (hidden, Z1), act = self.layers[0], self.activation
        # layer 1 is a one-layer VAE's encoder and decoder: VAE's own specs for its sizes
        one = SimpleNamespace(x_dim=self.x_dim, hidden=hidden, z_dim=Z1, activation=act,
                              likelihood=self.likelihood, x_sigma=self.x_sigma)
        specs = VAE._layer_specs(one)
        for l in range(2, len(self.layers) + 1):
            hidden, Z = self.layers[l - 1]
            Z_below = self.z_dims[l - 2]
            widths = (Z_below,) + hidden
            specs += [(f"enc{l}.h{i}", widths[i], widths[i + 1], act) for i in range(len(hidden))]
            specs += [(f"enc{l}.mu", hidden[-1], Z, "identity"), (f"enc{l}.log_sigma", hidden[-1], Z, "identity")]
            widths = (Z,) + hidden[::-1]
            specs += [(f"dec{l}.h{i}", widths[i], widths[i + 1], act) for i in range(len(hidden))]
            specs += [(f"dec{l}.mu", hidden[0], Z_below, "identity"),
                      (f"dec{l}.log_sigma", hidden[0], Z_below, "identity")]
        return specs

    def _make_layers(self, specs):
        """The Dense layers, layer 1's networks under VAE's names, and q_nets / p_nets for l >= 2."""
        layers = {name: self.dense_layer(self.params[name + ".W"], self.params[name + ".b"],
                                         self.grads[name + ".W"], self.grads[name + ".b"], act)
                  for name, _, _, act in specs}
        n_hidden = len(self.layers[0][0])
        self.encoder = MLP([layers[f"enc.h{i}"] for i in range(n_hidden)])
        self.enc_mu, self.enc_log_sigma = layers["enc.mu"], layers["enc.log_sigma"]
        self.decoder = MLP([layers[f"dec.h{i}"] for i in range(n_hidden)])
        self.dec_heads = [layers[n] for n in ("dec.logits", "dec.mean", "dec.log_sigma") if n in layers]
        # q_nets[l - 2], p_nets[l - 2] for l = 2..L: (MLP, mu head, log_sigma head)
        self.q_nets, self.p_nets = [], []
        for l in range(2, len(self.layers) + 1):
            n_hidden = len(self.layers[l - 1][0])
            for kind, nets in (("enc", self.q_nets), ("dec", self.p_nets)):
                nets.append((MLP([layers[f"{kind}{l}.h{i}"] for i in range(n_hidden)]),
                             layers[f"{kind}{l}.mu"], layers[f"{kind}{l}.log_sigma"]))
        self._layers = layers

    @staticmethod
    def _gaussian_net(net, u):
        """u (R, I) -> (mu, log_sigma), each (R, Z): a conditional Gaussian's MLP and its two heads."""
        mlp, mu_head, log_sigma_head = net
        h = mlp.forward(u)
        return mu_head.forward(h), log_sigma_head.forward(h)

    @staticmethod
    def _gaussian_net_backward(net, dmu, dlog_sigma):
        """(dmu, dlog_sigma) (R, Z) -> du (R, I); h feeds both heads, so its gradient sums the two."""
        mlp, mu_head, log_sigma_head = net
        dh = mu_head.backward(dmu)
        dh += log_sigma_head.backward(dlog_sigma)
        return mlp.backward(dh)

    def _split_eps(self, eps):
        """eps (..., z_dim) -> [eps_1 (..., Z_1), ..., eps_L (..., Z_L)] (views)."""
        cuts = np.cumsum(self.z_dims)[:-1]
        return np.split(eps, cuts, axis=-1)

    # --- the networks ------------------------------------------------------------

    def sample_q(self, x, k, rng=None):
        """Not for a chain of layers: its q is sampled inside forward_iwae (log_weights)."""
        raise TypeError("sample_q is for a one-layer VAE; a HierarchicalVAE samples its q chain in log_weights")

    def encode(self, x):
        """x (B, D) -> [(mu_1, log_sigma_1), ..., (mu_L, log_sigma_L)], each (B, Z_l).

        Layer l >= 2 is q(z_l|z_{l-1}) at z_{l-1} = mu_{l-1}: the chain of
        means, one deterministic pass (E_q[z_l|x] itself needs samples of the
        layers below: see active_units).
        """
        x = self._as_x(x)
        mu, log_sigma = self._encode(x)
        out = [(mu, log_sigma)]
        for net in self.q_nets:
            mu, log_sigma = self._gaussian_net(net, mu)
            out.append((mu, log_sigma))
        return out

    def decode(self, z):
        """z_1 (B, Z_1) -> p(x|z_1)'s output: logits (B, D), or (mean, log_sigma) for a Gaussian."""
        return self._decode(self._as_rows(z, "z", self.z_dims[0]))

    # --- one pass through every layer, K samples per example -------------------------

    def _forward_chain(self, x, eps, analytic_top):
        """x (B, D), eps (B, K, z_dim) -> the terms of log_w (or of the ELBO), each (B, K).

        Returns dict log_px_z, log_p_mid (sum of log p(z_l|z_{l+1}), l < L),
        log_q (sum of log q(z_l|.) over the layers that are sampled: all but the
        top one when analytic_top), and top: KL(q(z_L|.) || N(0, I)) when
        analytic_top, else log p(z_L). Keeps what _backward_chain needs.
        """
        B, K, _ = eps.shape
        L = len(self.layers)
        eps_l = self._split_eps(eps)                                          # (B, K, Z_l)
        mu1, log_sigma1 = self._encode(x)                                     # (B, Z_1)
        z = dist.reparameterize(mu1[:, None], log_sigma1[:, None], eps_l[0])  # (B, K, Z_1)
        zs, qs = [z.reshape(B * K, -1)], [(mu1, log_sigma1)]                  # z_l (BK, Z_l)
        eps_rows = [None] + [e.reshape(B * K, -1) for e in eps_l[1:]]        # eps_l (BK, Z_l), l >= 2
        sampled_top = not (analytic_top and L == 1)
        log_q = (dist.log_q_reparameterized(eps_l[0], log_sigma1[:, None]) if sampled_top
                 else np.zeros((B, K), self.dtype))                           # (B, K)
        for l in range(2, L + 1):
            mu, log_sigma = self._gaussian_net(self.q_nets[l - 2], zs[-1])    # q(z_l|z_{l-1}), (BK, Z_l)
            zs.append(dist.reparameterize(mu, log_sigma, eps_rows[l - 1]))
            qs.append((mu, log_sigma))
            if not (analytic_top and l == L):
                log_q = log_q + dist.log_q_reparameterized(eps_rows[l - 1], log_sigma).reshape(B, K)
        out = self._decode(zs[0])                                            # p(x|z_1) on BK rows
        out_bk = _per_sample(out, B, K)                                      # (B, K, D)
        log_px_z = self.log_px_z(x[:, None, :], out_bk)                      # (B, K)
        ps, log_p_mid = [], np.zeros((B, K), self.dtype)
        for l in range(2, L + 1):
            mu_p, log_sigma_p = self._gaussian_net(self.p_nets[l - 2], zs[l - 1])   # p(z_{l-1}|z_l)
            ps.append((mu_p, log_sigma_p))
            log_p_mid = log_p_mid + dist.gaussian_log_prob(zs[l - 2], mu_p, log_sigma_p).reshape(B, K)
        if analytic_top:
            top = dist.kl_standard_normal(*qs[-1]).reshape(B, K)
        else:
            top = dist.standard_normal_log_prob(zs[-1]).reshape(B, K)
        self._cache_chain = (x, eps_l, eps_rows, zs, qs, ps, out_bk, analytic_top)
        return dict(log_px_z=log_px_z, log_p_mid=log_p_mid, log_q=log_q, top=top)

    def _backward_chain(self, w_rec, w_mid, w_top):
        """Weights (B, K) of log p(x|z_1), of (log p_mid - log q), and of the top term -> grads.

        Top-down: each dz_l sums every place z_l feeds (p(z_{l-1}|z_l)'s input,
        p(z_l|z_{l+1})'s target, q(z_{l+1}|z_l)'s input, p(z_L) at the top)
        before the reparameterization sends it into layer l's mu and log_sigma.
        """
        x, eps_l, eps_rows, zs, qs, ps, out_bk, analytic_top = self._cache_chain
        B, K = w_rec.shape
        L = len(self.layers)
        w_rec, w_mid, w_top = (np.asarray(w, self.dtype) for w in (w_rec, w_mid, w_top))
        w_mid_rows, w_top_rows = w_mid.reshape(B * K), w_top.reshape(B * K)
        # z_1 feeds p(x|z_1)
        dz = [self._decode_backward(_all_samples(self._log_px_z_grad(w_rec, x[:, None, :], out_bk), B, K))]
        dz += [np.zeros_like(z) for z in zs[1:]]                             # (BK, Z_l)
        for l in range(2, L + 1):
            # log N(z_{l-1}; mu_p(z_l), sigma_p(z_l)): z_{l-1} is its target, z_l its networks' input
            dmu_p, dlog_sigma_p = dist.gaussian_log_prob_grad(w_mid_rows, zs[l - 2], *ps[l - 2])
            dz[l - 2] -= dmu_p                        # d/dz of log N(z; mu, sigma) is -(z - mu)/sigma^2
            dz[l - 1] += self._gaussian_net_backward(self.p_nets[l - 2], dmu_p, dlog_sigma_p)
        if not analytic_top:
            dz[L - 1] -= w_top_rows[:, None] * zs[L - 1]      # log p(z_L) = log N(z_L; 0, I): d/dz = -z
        for l in range(L, 0, -1):
            mu, log_sigma = qs[l - 1]
            if l == 1:   # q(z_1|x): one mu per example, K samples each
                dmu, dlog_sigma = dist.reparameterize_grad(dz[0].reshape(B, K, -1), log_sigma[:, None], eps_l[0])
                dmu, dlog_sigma = dmu.sum(axis=1), dlog_sigma.sum(axis=1)    # (B, Z_1)
                w_q = w_mid.sum(axis=1)[:, None] if L > 1 else w_top.sum(axis=1)[:, None]
            else:
                dmu, dlog_sigma = dist.reparameterize_grad(dz[l - 1], log_sigma, eps_rows[l - 1])
                w_q = w_top_rows[:, None] if l == L else w_mid_rows[:, None]
            if analytic_top and l == L:
                # the term `top` is KL(q(z_L|.) || N(0, I)) itself, closed form, with weight w_top
                dmu_kl, dlog_sigma_kl = dist.kl_standard_normal_grad(w_q.reshape(-1), mu, log_sigma)
                dmu, dlog_sigma = dmu + dmu_kl, dlog_sigma + dlog_sigma_kl
            else:
                # -log q(z_l|.) at z_l = mu + sigma * eps: d/dmu = 0, d/dlog_sigma = +1 (inside the clip)
                dlog_sigma = dlog_sigma + w_q * dist._in_range(log_sigma)
            if l == 1:
                self._encode_backward(dmu, dlog_sigma)
            else:
                dz[l - 2] += self._gaussian_net_backward(self.q_nets[l - 2], dmu, dlog_sigma)
        return self.grads

    # --- the ELBO (K = 1) and the IWAE bound: VAE's interface over the chain -----------

    def forward(self, x, eps):
        """x (B, D), eps (B, z_dim) -> (log_px_z, kl), each (B,); elbo = log_px_z - kl.

        kl = KL(q(z_L|z_{L-1}) || N(0, I)) - sum_{l<L} [log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})].
        """
        t = self._forward_chain(x, eps[:, None, :], analytic_top=True)
        return t["log_px_z"][:, 0], (t["top"] - t["log_p_mid"] + t["log_q"])[:, 0]

    def backward(self, dlog_px_z, dkl):
        """Upstream gradients (B,), (B,) -> grads dict. kl holds +top, -log p_mid, +log q."""
        dlog_px_z = np.asarray(dlog_px_z, self.dtype)[:, None]
        dkl = np.asarray(dkl, self.dtype)[:, None]
        return self._backward_chain(dlog_px_z, -dkl, dkl)

    def forward_iwae(self, x, eps):
        """x (B, D), eps (B, K, z_dim) -> bound (B,); keeps what backward_iwae needs."""
        B, K, _ = eps.shape
        log_w = self.log_weights(x, eps)
        self._cache_iwae = (eps, log_w)
        from scipy.special import logsumexp
        return logsumexp(log_w, axis=1) - math.log(K)

    def log_weights(self, x, eps):
        """x (B, D), eps (B, K, z_dim) -> log_w (B, K) = log p(x, z_1..z_L) - log q(z_1..z_L|x)."""
        t = self._forward_chain(x, eps, analytic_top=False)
        return t["log_px_z"] + t["log_p_mid"] + t["top"] - t["log_q"]

    def backward_iwae(self, dbound):
        """Upstream gradient (B,) -> grads dict. Local derivative: d bound / d log_w_k = softmax_k(log_w)."""
        from scipy.special import softmax
        eps, log_w = self._cache_iwae
        dlog_w = (np.asarray(dbound, dtype=self.dtype)[:, None] * softmax(log_w, axis=1)).astype(self.dtype)
        return self._backward_chain(dlog_w, dlog_w, dlog_w)

    # --- generation ---------------------------------------------------------------------

    def sample(self, n, rng=None):
        """(n, D): the mean of p(x|z_1), z_L ~ N(0, I), z_l ~ p(z_l|z_{l+1}) down to z_1."""
        n = _check_positive_int("n", n)
        z = self._noise((n, self.z_dims[-1]), None, rng)
        rng = self.rng if rng is None else rng
        for l in range(len(self.layers), 1, -1):
            mu, log_sigma = self._gaussian_net(self.p_nets[l - 2], z)
            z = dist.reparameterize(mu, log_sigma, rng.standard_normal(mu.shape, dtype=self.dtype))
        return self.mean_px_z(self._decode(z))

    def reconstruct(self, x):
        """x (B, D) -> (B, D): the mean of p(x|z_1) at z_1 = mu_1(x)."""
        mu, _ = self._encode(self._as_x(x))
        return self.mean_px_z(self._decode(mu))


# --- evaluation ------------------------------------------------------------------------------

def log_likelihood_of_seeds(model, x, k, seeds, batch_size=None, chunk=None, progress=None):
    """log p(x) (n,) float64 by importance sampling through every layer; example i's noise from seeds[i].

        log p(x) ~= logsumexp_k log_w_k - log K,   z_k ~ q(z_1|x) q(z_2|z_1) ... (log_w: HierarchicalVAE)

    Works on batch_size examples x chunk samples at a time (evaluate.chunk_sizes),
    combined by a running log-sum-exp in float64, so the estimates depend neither
    on the chunking nor on a split of the examples.
    """
    from scipy.special import logsumexp

    from .evaluate import _draw_eps, batches, chunk_sizes
    N = x.shape[0]
    B_, K_ = chunk_sizes(model, N, k, batch_size, chunk)
    log_px = np.empty(N)
    for s in batches(N, B_):
        streams = [np.random.default_rng(seed) for seed in seeds[s]]
        total = np.full(s.stop - s.start, -np.inf)
        for start in range(0, k, K_):
            eps = _draw_eps(streams, min(K_, k - start), model.z_dim, model.dtype)
            log_w = model.log_weights(x[s], eps).astype(np.float64)        # (b, K')
            total = np.logaddexp(total, logsumexp(log_w, axis=1))
        log_px[s] = total - math.log(k)
        if progress is not None:
            progress(s.stop, N)
    return log_px


def log_likelihood(model, x, k=5000, rng=None, batch_size=None, chunk=None, progress=None):
    """x (N, D) -> (N,) float64 estimates of log p(x) with q(z_1|x) q(z_2|z_1) ... as the proposal.

    The same estimator as npvae.evaluate.log_likelihood, through every layer;
    its expectation is the IWAE bound with K = k samples.
    """
    from .evaluate import _check_rng, _noise_seeds
    k = _check_positive_int("k", k)
    x = model._as_x(x)
    rng = _check_rng(rng)
    return log_likelihood_of_seeds(model, x, k, _noise_seeds(rng, x.shape[0]), batch_size, chunk, progress)


def active_units(model, x, threshold=0.01, n_samples=100, rng=None, batch_size=500):
    """Per layer: (count, variances (Z_l,)) of Var_x(E_q[z_l|x]) > threshold (Burda et al. 2015).

    E_q[z_1|x] = mu_1(x) exactly; E_q[z_l|x] = E_{q(z_{l-1}|x)}[mu_l(z_{l-1})]
    for l >= 2 is averaged over n_samples draws of the chain below.
    """
    from .evaluate import _check_rng, _check_stored, batches, column_variance
    N = _check_stored(x)[0]
    rng = _check_rng(np.random.default_rng(0) if rng is None else rng)

    def means():   # per batch of x (read a batch at a time): [E_q[z_1|x] | E_q[z_2|x] | ...], (b, sum of Z_l)
        for s in batches(N, batch_size):
            mu, log_sigma = model._encode(model._as_x(x[s]))                  # (b, Z_1)
            layers = [mu]
            b = mu.shape[0]
            z = dist.reparameterize(mu[:, None], log_sigma[:, None],
                                    rng.standard_normal((b, n_samples, mu.shape[1]), dtype=model.dtype))
            z = z.reshape(b * n_samples, -1)
            for net in model.q_nets:
                mu, log_sigma = model._gaussian_net(net, z)                   # (b S, Z_l)
                layers.append(mu.reshape(b, n_samples, -1).mean(axis=1))
                z = dist.reparameterize(mu, log_sigma, rng.standard_normal(mu.shape, dtype=model.dtype))
            yield np.concatenate(layers, axis=1)
    variances = np.split(column_variance(means()), np.cumsum(model.z_dims)[:-1])
    return [(int(np.sum(v > threshold)), v) for v in variances]
