"""A shallow baseline: a Gaussian mixture with full covariances, fitted by EM.

    p(x) = sum_k pi_k N(x; m_k, S_k)

EM alternates two steps, each of which cannot lower the (penalized) log-likelihood:

    E-step   r_nk = pi_k N(x_n; m_k, S_k) / p(x_n)         responsibilities, in the log domain
    M-step   N_k = sum_n r_nk,   pi_k = N_k / N,   m_k = sum_n r_nk x_n / N_k
             S_k = (sum_n r_nk (x_n - m_k)(x_n - m_k)^T + reg I) / N_k

The reg I term keeps every S_k invertible (a component that collapses onto one
point would send the likelihood to infinity). Written this way it is the exact
maximizer of the log-likelihood plus the penalty -reg/2 sum_k tr(S_k^-1), so EM
increases that penalized objective monotonically; fit() records both it and
the plain log-likelihood.

On the 2-D toy sets (pinwheel, moons, ring) log_prob is the exact log density,
to set against a VAE's estimate: compare_on(x_test, gmm, vae) does both.

Shapes: N points, D dimensions, K components. Values in nats per point.
"""
import numpy as np
from scipy.special import logsumexp

from .model import _check_positive_int

LOG_2PI = float(np.log(2.0 * np.pi))


def _as_points(x, dim=None):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"x must be a non-empty {want} array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values")
    return x


def gaussian_log_prob_full(x, mean, cov):
    """log N(x; mean, cov) with a full covariance: x (N, D), mean (D,), cov (D, D) -> (N,).

    With cov = L L^T (Cholesky): log N = -1/2 |L^-1 (x - mean)|^2 - sum log diag L - D/2 log 2 pi.
    """
    L = np.linalg.cholesky(cov)
    # inverting the small triangular factor once beats a triangular solve per call for D = 2
    r = (x - mean) @ np.linalg.inv(L).T                        # (N, D) whitened residuals
    return -0.5 * np.sum(r * r, axis=1) - np.sum(np.log(np.diag(L))) - 0.5 * x.shape[1] * LOG_2PI


class GaussianMixture:
    """K full-covariance Gaussians fitted by EM from k-means++ starting points.

    seed fixes the initialization; fit stops when the mean penalized
    log-likelihood rises by less than tol, or after max_iter iterations.
    After fit: weights (K,), means (K, D), covariances (K, D, D),
    log_likelihoods / objectives (one mean value per iteration), n_iter, converged.
    """

    def __init__(self, n_components, seed=0, max_iter=500, tol=1e-7, reg=1e-6):
        self.n_components = _check_positive_int("n_components", n_components)
        self.seed = seed
        self.max_iter = _check_positive_int("max_iter", max_iter)
        if not (np.isfinite(tol) and tol >= 0) or not (np.isfinite(reg) and reg > 0):
            raise ValueError(f"need tol >= 0 and reg > 0, got tol={tol}, reg={reg}")
        self.tol, self.reg = float(tol), float(reg)
        self.weights = self.means = self.covariances = None

    # --- the two steps -----------------------------------------------------------------

    def _log_joint(self, x):
        """log pi_k + log N(x_n; m_k, S_k): (N, K)."""
        return np.stack([np.log(w) + gaussian_log_prob_full(x, m, S)
                         for w, m, S in zip(self.weights, self.means, self.covariances)], axis=1)

    def _m_step(self, x, r):
        """Weights, means and covariances from responsibilities r (N, K)."""
        n_k = r.sum(axis=0) + 10 * np.finfo(np.float64).tiny     # (K,); an empty component must not divide by 0
        self.weights = n_k / x.shape[0]
        self.means = (r.T @ x) / n_k[:, None]                      # (K, D)
        eye = np.eye(x.shape[1])
        covs = []
        for k in range(self.n_components):
            d = x - self.means[k]                                  # (N, D)
            covs.append(((r[:, k, None] * d).T @ d + self.reg * eye) / n_k[k])
        self.covariances = np.array(covs)                          # (K, D, D)

    def _penalty(self):
        """-reg/2 sum_k tr(S_k^-1), the term that makes the regularized M-step exact."""
        return -0.5 * self.reg * float(np.trace(np.linalg.inv(self.covariances), axis1=1, axis2=2).sum())

    # --- fitting ---------------------------------------------------------------------------

    def _init_centres(self, x, rng):
        """Greedy k-means++ (Arthur & Vassilvitskii 2007): each new centre is the best of a few
        data points drawn with probability proportional to their squared distance from the
        nearest centre so far, so the centres spread over the modes. Plain k-means++ (one
        draw) puts two centres in one of the ring's 8 modes for 2 seeds in 5."""
        n_trials = 2 + int(np.log(self.n_components))
        centres = [x[rng.integers(x.shape[0])]]
        d2 = np.sum((x - centres[0]) ** 2, axis=1)                 # (N,) to the nearest centre
        for _ in range(1, self.n_components):
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(x.shape[0], 1.0 / x.shape[0])
            candidates = x[rng.choice(x.shape[0], size=n_trials, p=p)]            # (T, D)
            d2_new = np.minimum(d2, ((x[None] - candidates[:, None]) ** 2).sum(axis=-1))  # (T, N)
            best = np.argmin(d2_new.sum(axis=1))                   # the candidate that leaves least spread
            centres.append(candidates[best])
            d2 = d2_new[best]
        return np.array(centres)                                   # (K, D)

    def fit(self, x):
        """Fit to x (N, D) by EM; returns self."""
        x = _as_points(x)
        rng = np.random.default_rng(self.seed)
        centres = self._init_centres(x, rng)
        nearest = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(axis=-1), axis=1)
        self._m_step(x, np.eye(self.n_components)[nearest])       # hard assignments start EM
        self.log_likelihoods, self.objectives = [], []
        self.converged = False
        for self.n_iter in range(1, self.max_iter + 1):
            log_joint = self._log_joint(x)                         # (N, K)
            log_px = logsumexp(log_joint, axis=1)                  # (N,)
            # these describe the parameters the E-step uses, i.e. those of the previous M-step
            self.log_likelihoods.append(float(np.mean(log_px)))
            self.objectives.append(self.log_likelihoods[-1] + self._penalty() / x.shape[0])
            if len(self.objectives) > 1 and self.objectives[-1] - self.objectives[-2] < self.tol:
                self.converged = True
                break
            r = np.exp(log_joint - log_px[:, None])                # E-step: responsibilities (N, K)
            self._m_step(x, r)
        return self

    # --- using the fit ---------------------------------------------------------------------

    def _check_fitted(self):
        if self.means is None:
            raise RuntimeError("call fit(x) first")

    def log_prob(self, x):
        """x (N, D) -> (N,) log p(x) = logsumexp_k [log pi_k + log N(x; m_k, S_k)], exact."""
        self._check_fitted()
        return logsumexp(self._log_joint(_as_points(x, self.means.shape[1])), axis=1)

    def responsibilities(self, x):
        """x (N, D) -> (N, K) posterior probabilities of the components."""
        self._check_fitted()
        log_joint = self._log_joint(_as_points(x, self.means.shape[1]))
        return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))

    def sample(self, n, rng=None):
        """(n, D) points: a component k ~ pi, then x = m_k + L_k eps with S_k = L_k L_k^T."""
        self._check_fitted()
        n = _check_positive_int("n", n)
        rng = np.random.default_rng() if rng is None else rng
        k = rng.choice(self.n_components, size=n, p=self.weights / self.weights.sum())
        eps = rng.standard_normal((n, self.means.shape[1]))
        L = np.linalg.cholesky(self.covariances)                   # (K, D, D)
        return self.means[k] + np.einsum("nij,nj->ni", L[k], eps)


def compare_on(x_test, gmm, vae_model, k=5000, rng=None):
    """Mean test log-likelihood (nats per point) of a fitted GaussianMixture (exact) and of a
    VAE (importance-sampled with k samples, npvae.evaluate.log_likelihood) on the same x_test."""
    from .evaluate import log_likelihood
    x_test = _as_points(x_test)
    return {"gmm": float(np.mean(gmm.log_prob(x_test))),
            "vae": float(np.mean(log_likelihood(vae_model, x_test, k=k, rng=rng))),
            "n": int(x_test.shape[0])}
