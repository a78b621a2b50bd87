"""Posterior families q(z|x): diagonal, full-covariance, planar flows and inverse autoregressive flows.

Every family starts from the encoder's diagonal Gaussian and gives, at K samples per example,
z (B, K, Z) and log q(z|x) (B, K) by the change of variables through the log-determinant of
the Jacobian of its map eps -> z:

    diagonal   z = mu + sigma * eps                     log q = log N(eps; 0, I) - sum_j log sigma_j
    full       z = mu + L eps,  L = diag(sigma) + strict lower triangle from the encoder
                                                        log q = log N(eps; 0, I) - sum_j log sigma_j
    planar:T   z_0 = mu + sigma * eps, then T steps     z_t = z_{t-1} + u_hat_t tanh(w_t . z_{t-1} + b_t)
               (Rezende & Mohamed 2015)                 log q -= log(1 + (1 - tanh^2) w_t . u_hat_t)
    iaf:T      z_0 = mu + sigma * eps, then T steps     m, s = MADE_t(z_{t-1}),  g = expit(s)
               (Kingma et al. 2016)                     z_t = g * z_{t-1} + (1 - g) * m,  log q -= sum_j log g_j

Planar flows are invertible only if w . u_hat >= -1; the paper's appendix makes it so for any u:

    u_hat = u + (m(w . u) - w . u) w / |w|^2,   m(a) = -1 + softplus(a) > -1,   so w . u_hat = m(w . u).

Where the flow parameters come from (a choice, and why):
- planar: amortized, as in the paper. The encoder grows a head of T (2Z + 1) outputs per example,
  u_t, w_t (Z each) and b_t; a planar step is one hyperplane's bend, and only a bend placed by x
  can follow each x's posterior (a global bend would have to suit every x at once).
- iaf: global. Each step's MADE weights are learned parameters shared across x, as in Kingma et
  al., who also feed an encoder context h into every MADE; that context is left out here (the
  flow still acts differently per x because its input z_0 is x's own). It keeps the hand-written
  backward to the masked weights alone. Step t's autoregressive order is 1..Z for even t and
  reversed for odd t (the masks are built for it, no z is permuted), so that each dimension is
  conditioned on every other one after two steps. The masked weights' gradients are masked too,
  so entries outside the masks stay at 0 for good.

Every *_grad returns the derivatives of sum(R * z) + sum(r * log_q) for upstream gradients
dz = R (B, K, Z) and dlog_q = r (B, K), summed over the K samples where a quantity is shared by them.

Shapes: B batch, K samples per example, Z latent, T flow steps, M the MADE's hidden width.
"""
import numpy as np

from . import distributions as dist

FAMILIES = ("diagonal", "full", "planar", "iaf")
IAF_HIDDEN_PER_Z = 4     # a MADE's hidden width M = 4 Z (at least 8): wide enough to carry Z - 1 conditionings
IAF_GATE_BIAS = 2.0      # s starts near 2, so g = expit(s) ~ 0.88 and each step starts close to the identity


def parse(spec):
    """'diagonal' | 'full' | 'planar:T' | 'iaf:T' -> (family, T); T is 0 for diagonal and full."""
    if not isinstance(spec, str):
        raise TypeError(f"posterior must be a string such as 'diagonal', 'full', 'planar:8' or 'iaf:4', got {spec!r}")
    family, _, steps = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"posterior must be one of 'diagonal', 'full', 'planar:T', 'iaf:T', got {spec!r}")
    if family in ("diagonal", "full"):
        if steps:
            raise ValueError(f"posterior {family!r} takes no number of steps, got {spec!r}")
        return family, 0
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"posterior {family!r} needs a positive number of flow steps, e.g. '{family}:4', got {spec!r}")
    return family, int(steps)


def make(spec, z_dim):
    """The family object for spec ('planar:8', ...) on Z = z_dim latent dimensions."""
    family, T = parse(spec)
    if family == "diagonal":
        return Diagonal(z_dim)
    if family == "full":
        return Full(z_dim)
    return Planar(z_dim, T) if family == "planar" else IAF(z_dim, T)


# --- the Gaussian bases ---------------------------------------------------------------------

def diagonal_sample(mu, log_sigma, eps):
    """mu, log_sigma (B, Z), eps (B, K, Z) -> z (B, K, Z), log_q (B, K)."""
    z = dist.reparameterize(mu[:, None], log_sigma[:, None], eps)
    return z, dist.log_q_reparameterized(eps, log_sigma[:, None])


def diagonal_sample_grad(dz, dlog_q, log_sigma, eps):
    """dz (B, K, Z), dlog_q (B, K) -> dmu, dlog_sigma (B, Z).

    Local derivative: dz/dmu = 1, dz/dlog_sigma = sigma * eps, dlog_q/dlog_sigma = -1 (inside the clip).
    """
    dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma[:, None], eps)
    dlog_sigma = dlog_sigma.sum(axis=1) - dlog_q.sum(axis=1)[:, None] * dist._in_range(log_sigma)
    return dmu.sum(axis=1), dlog_sigma


def cholesky_factor(log_sigma, lower):
    """log_sigma (B, Z), lower (B, Z(Z-1)/2) -> L (B, Z, Z): sigma on the diagonal, lower below it (row-major)."""
    B, Z = log_sigma.shape
    L = np.zeros((B, Z, Z), dtype=log_sigma.dtype)
    rows, cols = np.tril_indices(Z, -1)
    L[:, rows, cols] = lower
    L[:, np.arange(Z), np.arange(Z)] = dist.std(log_sigma)
    return L


def full_sample(mu, log_sigma, lower, eps):
    """mu, log_sigma (B, Z), lower (B, Z(Z-1)/2), eps (B, K, Z) -> z = mu + L eps (B, K, Z), log_q (B, K).

    L is triangular, so log |det L| = sum_j log sigma_j, and log q(z) = log N(eps; 0, I) - log |det L|.
    """
    L = cholesky_factor(log_sigma, lower)
    z = mu[:, None] + np.einsum("bij,bkj->bki", L, eps)     # (B, K, Z)
    return z, dist.log_q_reparameterized(eps, log_sigma[:, None])


def full_sample_grad(dz, dlog_q, log_sigma, eps):
    """dz (B, K, Z), dlog_q (B, K) -> dmu, dlog_sigma (B, Z), dlower (B, Z(Z-1)/2).

    Local derivative: dz_i/dL_ij = eps_j, so dL = sum_k dz_k eps_k^T; dL_jj/dlog_sigma_j = sigma_j;
    dlog_q/dlog_sigma_j = -1.
    """
    Z = log_sigma.shape[1]
    dL = np.einsum("bki,bkj->bij", dz, eps)                  # (B, Z, Z)
    rows, cols = np.tril_indices(Z, -1)
    diag = dL[:, np.arange(Z), np.arange(Z)]                  # (B, Z)
    dlog_sigma = (diag * dist.std(log_sigma) - dlog_q.sum(axis=1)[:, None]) * dist._in_range(log_sigma)
    return dz.sum(axis=1), dlog_sigma, dL[:, rows, cols]


# --- planar flows ----------------------------------------------------------------------------

def planar_m(a):
    """m(a) = -1 + softplus(a) > -1: the value w . u_hat is given."""
    return -1.0 + dist.softplus(a)


def planar_u_hat(u, w):
    """u, w (..., Z) -> u_hat (..., Z) with w . u_hat = m(w . u) >= -1 (the paper's appendix)."""
    wu = np.sum(w * u, axis=-1, keepdims=True)
    return u + (planar_m(wu) - wu) * w / np.sum(w * w, axis=-1, keepdims=True)


def planar_u_hat_grad(du_hat, u, w):
    """du_hat (..., Z) -> du, dw (..., Z).

    With c = (m(w.u) - w.u) / |w|^2 and u_hat = u + c w: dc/d(w.u) = (expit(w.u) - 1) / |w|^2,
    dc/d|w|^2 = -c / |w|^2, and both u and w feed w.u, w feeds |w|^2 too.
    """
    from scipy.special import expit
    wu = np.sum(w * u, axis=-1, keepdims=True)
    n2 = np.sum(w * w, axis=-1, keepdims=True)
    c = (planar_m(wu) - wu) / n2
    dc = np.sum(du_hat * w, axis=-1, keepdims=True)           # d/dc of sum(du_hat * u_hat)
    dwu = dc * (expit(wu) - 1.0) / n2
    dn2 = -dc * c / n2
    return du_hat + dwu * w, c * du_hat + dwu * u + 2.0 * dn2 * w


def planar_flow(z, log_q, u, w, b):
    """z (B, K, Z), log_q (B, K); u, w (B, T, Z), b (B, T) -> z_T, log_q - sum_t log|det J_t|, cache.

    Step t: z <- z + u_hat_t tanh(a), a = w_t . z + b_t, and det J_t = 1 + (1 - tanh(a)^2) w_t . u_hat_t
    (the matrix determinant lemma on I + u_hat (1 - tanh^2) w^T), positive because w . u_hat > -1.
    """
    u_hat = planar_u_hat(u, w)                                 # (B, T, Z)
    inputs, tanhs = [], []
    for t in range(u.shape[1]):
        a = np.sum(z * w[:, t, None], axis=-1) + b[:, t, None]          # (B, K)
        h = np.tanh(a)
        inputs.append(z)
        tanhs.append(h)
        wu_hat = np.sum(w[:, t] * u_hat[:, t], axis=-1)[:, None]        # (B, 1)
        z = z + u_hat[:, t, None] * h[..., None]
        log_q = log_q - np.log1p((1.0 - h * h) * wu_hat)
    return z, log_q, (u, w, u_hat, inputs, tanhs)


def planar_flow_grad(dz, dlog_q, cache):
    """dz (B, K, Z) at z_T, dlog_q (B, K) -> dz_0 (B, K, Z), du, dw (B, T, Z), db (B, T).

    Backward through step t, with D = 1 + (1 - h^2) w.u_hat and log_q -= log D:
    dh = dz.u_hat - dlog_q (w.u_hat)(-2h) / D, da = dh (1 - h^2), dz_{t-1} = dz + da w,
    dw += sum_k da z_{t-1} + d(w.u_hat) u_hat, du_hat += sum_k dz h + d(w.u_hat) w,
    with d(w.u_hat) = -sum_k dlog_q (1 - h^2) / D; then u_hat's own backward to u and w.
    """
    u, w, u_hat, inputs, tanhs = cache
    du_hat, dw = np.zeros_like(u_hat), np.zeros_like(w)
    db = np.zeros(w.shape[:2], dtype=w.dtype)
    for t in range(u.shape[1] - 1, -1, -1):
        z_in, h = inputs[t], tanhs[t]
        wu_hat = np.sum(w[:, t] * u_hat[:, t], axis=-1)[:, None]        # (B, 1)
        one_minus_h2 = 1.0 - h * h
        dD = -dlog_q / (1.0 + one_minus_h2 * wu_hat)                    # (B, K): d/dD of -log D
        dwu_hat = np.sum(dD * one_minus_h2, axis=1)                     # (B,)
        # h feeds z (through u_hat h) and log D (through 1 - h^2): sum both
        dh = np.sum(dz * u_hat[:, t, None], axis=-1) + dD * wu_hat * (-2.0 * h)
        da = dh * one_minus_h2                                          # (B, K)
        du_hat[:, t] = np.sum(dz * h[..., None], axis=1) + dwu_hat[:, None] * w[:, t]
        dw[:, t] = np.sum(da[..., None] * z_in, axis=1) + dwu_hat[:, None] * u_hat[:, t]
        db[:, t] = np.sum(da, axis=1)
        dz = dz + da[..., None] * w[:, t, None]                         # z_{t-1} feeds z_t directly and through a
    du, dw_u_hat = planar_u_hat_grad(du_hat, u, w)
    return dz, du, dw + dw_u_hat, db


# --- inverse autoregressive flows ------------------------------------------------------------

def made_masks(z_dim, hidden, reverse):
    """The MADE masks for the order 1..Z (reversed if reverse): M1 (Z, M) input->hidden, M2 (M, Z) hidden->output.

    Input j has degree d_j (its place in the order), hidden unit i degree k_i in 1..Z-1; a hidden unit sees
    inputs with d_j <= k_i, an output j sees hidden units with k_i < d_j: output j depends only on inputs
    earlier in the order, so the Jacobian of (m, s) is strictly triangular in that order.
    """
    d = np.arange(1, z_dim + 1)
    if reverse:
        d = d[::-1]
    k = np.arange(hidden) % max(z_dim - 1, 1) + 1
    return (d[:, None] <= k[None, :]).astype(float), (k[:, None] < d[None, :]).astype(float)


def iaf_step(z, p, masks):
    """One IAF step: z (B, K, Z), p = {W1 (Z, M), b1 (M,), Wm, Ws (M, Z), bm, bs (Z,)} -> z_out, log g (B, K, Z), cache.

    p may also hold one MADE per example, each weight with a leading B axis: W1 (B, Z, M), b1 (B, 1, M),
    ... (the family's q fitted to each x alone, evaluate.optimize_local); the products broadcast over B.
    """
    from scipy.special import expit, log_expit
    M1, M2 = masks
    h = np.tanh(z @ (p["W1"] * M1) + p["b1"])                  # (B, K, M)
    m = h @ (p["Wm"] * M2) + p["bm"]                           # (B, K, Z)
    s = h @ (p["Ws"] * M2) + p["bs"]
    g = expit(s)
    # the gated form (Kingma et al.'s eq. 14): g in (0, 1) keeps every step stable
    return g * z + (1.0 - g) * m, log_expit(s), (z, h, m, g)


def _dense_param_grads(inputs, d_out, weight):
    """inputs (B, K, I), d_out (B, K, O) -> (dW, db) of a layer inputs @ W + b, in the shapes of W and b.

    Local derivative: dW = sum over the rows that share W of inputs^T d_out, db = sum of d_out: over
    all B K rows for one W (I, O), over each example's K rows for per-example W (B, I, O), b (B, 1, O).
    """
    if weight.ndim == 3:
        return np.swapaxes(inputs, 1, 2) @ d_out, d_out.sum(axis=1, keepdims=True)
    i2, d2 = inputs.reshape(-1, inputs.shape[-1]), d_out.reshape(-1, d_out.shape[-1])
    return i2.T @ d2, d2.sum(axis=0)


def iaf_step_grad(dz_out, dlog_g, p, masks, cache):
    """dz_out (B, K, Z), dlog_g (B, K, Z) -> dz (B, K, Z), {name: d of p[name]} (masked, in p's shapes).

    Local derivative: dz_out/dz = g (direct), dz_out/dm = 1 - g, dz_out/dg = z - m,
    dg/ds = g (1 - g), dlog g/ds = 1 - g; the masked products' backward is that of a dense layer
    whose weights are W * M, and dW = (x^T da) * M.
    """
    M1, M2 = masks
    z, h, m, g = cache
    dm = dz_out * (1.0 - g)
    ds = dz_out * (z - m) * g * (1.0 - g) + dlog_g * (1.0 - g)
    grads = {}
    grads["Wm"], grads["bm"] = _dense_param_grads(h, dm, p["Wm"])
    grads["Ws"], grads["bs"] = _dense_param_grads(h, ds, p["Ws"])
    grads["Wm"], grads["Ws"] = grads["Wm"] * M2, grads["Ws"] * M2
    # h feeds m and s: sum both
    dh = dm @ np.swapaxes(p["Wm"] * M2, -1, -2) + ds @ np.swapaxes(p["Ws"] * M2, -1, -2)
    da = dh * (1.0 - h * h)
    grads["W1"], grads["b1"] = _dense_param_grads(z, da, p["W1"])
    grads["W1"] = grads["W1"] * M1
    dz = dz_out * g + da @ np.swapaxes(p["W1"] * M1, -1, -2)   # z feeds z_out directly and through the MADE
    return dz, grads


def iaf_flow(z, log_q, steps, masks):
    """z (B, K, Z), log_q (B, K), steps [p_t], masks [(M1, M2)_t] -> z_T, log_q - sum_t sum_j log g_tj, caches."""
    caches = []
    for p, mk in zip(steps, masks):
        z, log_g, cache = iaf_step(z, p, mk)
        log_q = log_q - log_g.sum(axis=-1)
        caches.append(cache)
    return z, log_q, caches


def iaf_flow_grad(dz, dlog_q, steps, masks, caches):
    """dz (B, K, Z) at z_T, dlog_q (B, K) -> dz_0 (B, K, Z), [grads of p_t]."""
    dlog_g = np.broadcast_to(-dlog_q[..., None], dz.shape)     # every step's log g enters log_q with -1
    grads = [None] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        dz, grads[t] = iaf_step_grad(dz, dlog_g, steps[t], masks[t], caches[t])
    return dz, grads


# --- the families as the model uses them ---------------------------------------------------------
# Each has: heads {name: width} (encoder outputs beyond mu and log_sigma), shapes {name: shape}
# (global parameters), init(params, rng), sample(mu, log_sigma, heads, params, eps) ->
# (z, log_q, cache), sample_grad(dz, dlog_q, cache) -> (dmu, dlog_sigma, dheads, dparams) and
# per_example(params, n) -> copies of the global parameters for each of n examples, which sample and
# sample_grad take in their place (a q fitted to each x alone: evaluate.optimize_local).

class Diagonal:
    """q = N(mu, diag(sigma^2)): no parameters beyond mu and log_sigma."""

    def __init__(self, z_dim):
        self.z_dim, self.heads, self.shapes = z_dim, {}, {}

    def init(self, params, rng):
        pass

    def per_example(self, params, n):
        return {}

    def sample(self, mu, log_sigma, heads, params, eps):
        z, log_q = diagonal_sample(mu, log_sigma, eps)
        return z, log_q, (log_sigma, eps)

    def sample_grad(self, dz, dlog_q, cache):
        return (*diagonal_sample_grad(dz, dlog_q, *cache), {}, {})


class Full:
    """q = N(mu, L L^T) with the strict lower triangle of L from the encoder head 'enc.L'."""

    def __init__(self, z_dim):
        self.z_dim, self.shapes = z_dim, {}
        self.heads = {"enc.L": z_dim * (z_dim - 1) // 2} if z_dim > 1 else {}

    def init(self, params, rng):
        pass

    def per_example(self, params, n):
        return {}

    def sample(self, mu, log_sigma, heads, params, eps):
        lower = heads.get("enc.L", np.zeros((mu.shape[0], 0), dtype=mu.dtype))
        z, log_q = full_sample(mu, log_sigma, lower, eps)
        return z, log_q, (log_sigma, eps)

    def sample_grad(self, dz, dlog_q, cache):
        dmu, dlog_sigma, dlower = full_sample_grad(dz, dlog_q, *cache)
        return dmu, dlog_sigma, ({"enc.L": dlower} if self.heads else {}), {}


class Planar:
    """T planar flows on the diagonal Gaussian; u_t, w_t, b_t per example from the encoder head 'enc.planar'."""

    def __init__(self, z_dim, steps):
        self.z_dim, self.steps, self.shapes = z_dim, steps, {}
        self.heads = {"enc.planar": steps * (2 * z_dim + 1)}

    def init(self, params, rng):
        """Start every step at the identity: u_hat = 0, for every x (the head's weights at 0).

        u_hat = 0 needs w.u = a0 with m(a0) = 0, a0 = log(e - 1), and then u = a0 w / |w|^2;
        each step's w is drawn with |w| ~ 1, away from w = 0 where u_hat bends as 1/|w|.
        """
        T, Z = self.steps, self.z_dim
        params["enc.planar.W"][...] = 0.0
        b = params["enc.planar.b"].reshape(T, 2 * Z + 1)
        w = rng.standard_normal((T, Z)) / np.sqrt(Z)
        b[:, :Z] = np.log(np.e - 1.0) * w / np.sum(w * w, axis=1, keepdims=True)
        b[:, Z:2 * Z] = w
        b[:, 2 * Z] = 0.0

    def per_example(self, params, n):
        return {}          # u, w, b are per example already: the head's outputs

    def _split(self, out):
        """Head output (B, T(2Z + 1)) -> u, w (B, T, Z), b (B, T)."""
        B, T, Z = out.shape[0], self.steps, self.z_dim
        out = out.reshape(B, T, 2 * Z + 1)
        return out[..., :Z], out[..., Z:2 * Z], out[..., 2 * Z]

    def sample(self, mu, log_sigma, heads, params, eps):
        z0, log_q0 = diagonal_sample(mu, log_sigma, eps)
        z, log_q, cache = planar_flow(z0, log_q0, *self._split(heads["enc.planar"]))
        return z, log_q, (log_sigma, eps, cache)

    def sample_grad(self, dz, dlog_q, cache):
        log_sigma, eps, flow = cache
        dz0, du, dw, db = planar_flow_grad(dz, dlog_q, flow)
        dmu, dlog_sigma = diagonal_sample_grad(dz0, dlog_q, log_sigma, eps)
        dhead = np.concatenate([du, dw, db[..., None]], axis=-1).reshape(du.shape[0], -1)
        return dmu, dlog_sigma, {"enc.planar": dhead}, {}


class IAF:
    """T inverse autoregressive steps on the diagonal Gaussian, each a global MADE 'q.iaf<t>.*'."""

    NAMES = ("W1", "b1", "Wm", "bm", "Ws", "bs")

    def __init__(self, z_dim, steps):
        Z, M = z_dim, max(8, IAF_HIDDEN_PER_Z * z_dim)
        self.z_dim, self.steps, self.hidden, self.heads = z_dim, steps, M, {}
        sizes = {"W1": (Z, M), "b1": (M,), "Wm": (M, Z), "bm": (Z,), "Ws": (M, Z), "bs": (Z,)}
        self.shapes = {f"q.iaf{t}.{n}": sizes[n] for t in range(steps) for n in self.NAMES}
        self.masks = [made_masks(Z, M, reverse=t % 2 == 1) for t in range(steps)]

    def init(self, params, rng):
        """Glorot-scaled masked weights into the MADE's tanh layer, small outputs, gate bias IAF_GATE_BIAS."""
        Z, M = self.z_dim, self.hidden
        for t, (M1, M2) in enumerate(self.masks):
            p = self.step_params(params, t)
            p["W1"][...] = rng.standard_normal((Z, M)) * np.sqrt(2.0 / (Z + M)) * M1
            p["Wm"][...] = rng.standard_normal((M, Z)) * 0.01 * M2
            p["Ws"][...] = rng.standard_normal((M, Z)) * 0.01 * M2
            p["bs"][...] = IAF_GATE_BIAS

    def per_example(self, params, n):
        """n copies of every MADE: weights (n, *shape), biases (n, 1, *shape), so they broadcast over K."""
        return {name: np.repeat(params[name][None] if params[name].ndim == 2 else params[name][None, None], n, axis=0)
                for name in self.shapes}

    def step_params(self, params, t):
        """{W1, b1, ...} of step t: views of params."""
        return {n: params[f"q.iaf{t}.{n}"] for n in self.NAMES}

    def sample(self, mu, log_sigma, heads, params, eps):
        z0, log_q0 = diagonal_sample(mu, log_sigma, eps)
        steps = [self.step_params(params, t) for t in range(self.steps)]
        masks = [(M1.astype(mu.dtype), M2.astype(mu.dtype)) for M1, M2 in self.masks]
        z, log_q, caches = iaf_flow(z0, log_q0, steps, masks)
        return z, log_q, (log_sigma, eps, steps, masks, caches)

    def sample_grad(self, dz, dlog_q, cache):
        log_sigma, eps, steps, masks, caches = cache
        dz0, grads = iaf_flow_grad(dz, dlog_q, steps, masks, caches)
        dmu, dlog_sigma = diagonal_sample_grad(dz0, dlog_q, log_sigma, eps)
        dparams = {f"q.iaf{t}.{n}": g[n] for t, g in enumerate(grads) for n in self.NAMES}
        return dmu, dlog_sigma, {}, dparams
