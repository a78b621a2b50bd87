"""Forward vs reverse KL: one Gaussian q fitted to a two-mode mixture p, both ways.

    KL(p || q) = E_p[log p - log q]   minimized by matching p's mean and covariance
                                      (closed form): q spreads over both modes,
                                      mass-covering, with its peak where p has none.
    KL(q || p) = E_q[log q - log p]   minimized by gradient descent on the
                                      reparameterized z = m + L eps: q settles on
                                      one mode, mode-seeking; which one depends on the start.

The ELBO is log p(x) - KL(q(z|x) || p(z|x)), the reverse direction, which is
why a VAE's q sits inside its posterior's mass rather than covering it.

    python demos/kl_directions.py [--quick] [--out DIR]
"""
import os

# One BLAS thread unless told otherwise: OpenBLAS's threads spin while they wait for each other,
# and on 2 cores shared with other work that made the small matrix products here up to 16x slower
# (frey.py --quick: 99 s with two threads, 6 s with one). OPENBLAS_NUM_THREADS=2 overrides this.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from npvae import Adam, plots

# p(z) = sum_k WEIGHTS_k N(z; MEANS_k, COVS_k)
WEIGHTS = np.array([0.6, 0.4])
MEANS = np.array([[-2.0, -0.6], [1.8, 1.0]])
COVS = np.array([[[0.55, 0.25], [0.25, 0.45]],
                 [[0.30, -0.15], [-0.15, 0.70]]])
STARTS = np.array([[-3.5, 2.5], [0.0, 3.0], [3.5, -2.0], [-0.5, -2.5], [0.4, 0.2], [3.0, 2.5]])
STEPS, QUICK_STEPS = 2000, 400
SAMPLES = 64                      # eps draws per gradient step
LR = 0.05                         # Adam, decayed linearly to LR / 20
N_EVAL, QUICK_N_EVAL = 200_000, 20_000   # Monte Carlo draws for each reported KL
SEED = 0

PRECISIONS = np.linalg.inv(COVS)
LOG_NORMS = -0.5 * np.linalg.slogdet(2 * np.pi * COVS)[1]


def log_p_and_grad(z):
    """log p(z) (N,) and its gradient (N, 2): sum_k r_k(z) * -S_k^-1 (z - m_k), r the responsibilities."""
    d = z[:, None, :] - MEANS[None]                                     # (N, K, 2)
    pd = np.einsum("kij,nkj->nki", PRECISIONS, d)                       # S_k^-1 (z - m_k)
    log_joint = np.log(WEIGHTS) + LOG_NORMS - 0.5 * np.sum(d * pd, axis=-1)   # (N, K)
    log_p = logsumexp(log_joint, axis=1)
    r = np.exp(log_joint - log_p[:, None])
    return log_p, -np.einsum("nk,nki->ni", r, pd)


def log_q(z, m, L):
    """log N(z; m, L L^T) for z (N, 2)."""
    r = np.linalg.solve(L, (z - m).T).T                                 # L^-1 (z - m)
    return -0.5 * np.sum(r * r, axis=1) - np.sum(np.log(np.diag(L))) - np.log(2 * np.pi)


def kl_qp(m, L, rng, n):
    """KL(q || p) = E_q[log q - log p] by Monte Carlo with n draws."""
    z = m + rng.standard_normal((n, 2)) @ L.T
    return float(np.mean(log_q(z, m, L) - log_p_and_grad(z)[0]))


def kl_pq(m, L, rng, n):
    """KL(p || q) = E_p[log p - log q] by Monte Carlo with n draws z ~ p."""
    k = rng.choice(len(WEIGHTS), size=n, p=WEIGHTS)
    z = MEANS[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(COVS)[k], rng.standard_normal((n, 2)))
    return float(np.mean(log_p_and_grad(z)[0] - log_q(z, m, L)))


def moment_match():
    """The minimizer of KL(p || q) over Gaussians q: p's own mean and covariance."""
    mean = WEIGHTS @ MEANS
    second = np.einsum("k,kij->ij", WEIGHTS, COVS + np.einsum("ki,kj->kij", MEANS, MEANS))
    return mean, np.linalg.cholesky(second - np.outer(mean, mean))


def fit_reverse(start, steps, rng):
    """Minimize KL(q || p) over q = N(m, L L^T) from mean `start`; -> (m, L, path of m, KL estimate per step).

    With z = m + L eps, eps ~ N(0, I), and H(q) = sum_i log L_ii + const:
        KL      = -E[log p(z)] - sum_i log L_ii + const
        dKL/dm  = -E[grad log p(z)]
        dKL/dL  = -E[grad log p(z) eps^T] (lower triangle) - diag(1 / L_ii)
    L's diagonal is stored as its log, so it stays positive: dKL/dlog L_ii = L_ii dKL/dL_ii.
    """
    params = {"m": np.array(start, dtype=np.float64), "L_off": np.zeros(1), "log_L_diag": np.zeros(2)}
    adam = Adam(params, lr=LR)
    path, trace = [params["m"].copy()], []
    for t in range(steps):
        adam.lr = LR * (1 - 0.95 * t / steps)
        L = np.diag(np.exp(params["log_L_diag"]))
        L[1, 0] = params["L_off"][0]
        eps = rng.standard_normal((SAMPLES, 2))
        z = params["m"] + eps @ L.T
        log_p, g = log_p_and_grad(z)                                    # (S,), (S, 2)
        dL = -np.einsum("si,sj->ij", g, eps) / SAMPLES - np.diag(1 / np.diag(L))
        grads = {"m": -g.mean(axis=0), "L_off": np.array([dL[1, 0]]),
                 "log_L_diag": np.diag(dL) * np.diag(L)}
        trace.append(float(np.mean(log_q(z, params["m"], L) - log_p)))
        adam.step(grads)
        path.append(params["m"].copy())
    L = np.diag(np.exp(params["log_L_diag"]))
    L[1, 0] = params["L_off"][0]
    return params["m"], L, np.array(path), np.array(trace)


def moving_average(trace, weight=0.05):
    """An exponential moving average: each step's estimate uses only SAMPLES draws and is noisy."""
    out, running = np.empty_like(trace), trace[0]
    for t, v in enumerate(trace):
        running += weight * (v - running)
        out[t] = running
    return out


def ellipse(m, L, n_sigma):
    """Points of the n_sigma contour of N(m, L L^T)."""
    t = np.linspace(0, 2 * np.pi, 100)
    return m + n_sigma * np.stack([np.cos(t), np.sin(t)], axis=1) @ L.T


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer gradient steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "kl_directions")
    parser.add_argument("--data-dir", help="unused: p is written down above")
    args = parser.parse_args()
    steps, n_eval = (QUICK_STEPS, QUICK_N_EVAL) if args.quick else (STEPS, N_EVAL)
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()

    m_fwd, L_fwd = moment_match()
    fits = [fit_reverse(s, steps, rng) for s in STARTS]
    fwd_pq, fwd_qp = kl_pq(m_fwd, L_fwd, rng, n_eval), kl_qp(m_fwd, L_fwd, rng, n_eval)
    print(f"{'q':24s} {'mean':>16s} {'KL(p || q)':>11s} {'KL(q || p)':>11s}   (nats, Monte Carlo, {n_eval} draws)")
    print(f"{'moment matching':24s} {np.array2string(m_fwd, precision=2):>16s} {fwd_pq:11.3f} {fwd_qp:11.3f}")
    kl_reverse = []
    for s, (m, L, _, _) in zip(STARTS, fits):
        kl_reverse.append(kl_qp(m, L, rng, n_eval))
        print(f"{'reverse from ' + np.array2string(s, precision=1):24s} {np.array2string(m, precision=2):>16s} "
              f"{kl_pq(m, L, rng, n_eval):11.3f} {kl_reverse[-1]:11.3f}")
    print(f"(at each mode the best reverse-KL q sits near -log of that mode's weight: "
          f"{', '.join(f'{-np.log(w):.3f}' for w in WEIGHTS)})")

    plt = plots.pyplot()
    xx, yy, z = plots.grid_2d((-5, 5, -4, 4), 200)
    p = np.exp(log_p_and_grad(z)[0]).reshape(xx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.9]},
                             layout="constrained")
    for ax in axes[:2]:
        ax.contourf(xx, yy, p, levels=8, cmap="Greys")
        ax.set_aspect("equal")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    for n_sigma in (1, 2):
        e = ellipse(m_fwd, L_fwd, n_sigma)
        axes[0].plot(e[:, 0], e[:, 1], color="tab:blue", lw=1.5)
    axes[0].plot(*m_fwd, "o", color="tab:blue")
    axes[0].set_title(f"min KL(p || q): mass-covering\nKL(p||q) = {fwd_pq:.2f}, KL(q||p) = {fwd_qp:.2f} nats")
    colors = plt.get_cmap("tab10")
    for i, (m, L, path, trace) in enumerate(fits):
        c = colors(i + 1)
        axes[1].plot(path[:, 0], path[:, 1], color=c, lw=0.8, alpha=0.8)
        axes[1].plot(*path[0], "x", color=c)
        for n_sigma in (1, 2):
            e = ellipse(m, L, n_sigma)
            axes[1].plot(e[:, 0], e[:, 1], color=c, lw=1.2)
        axes[2].plot(np.arange(1, len(trace) + 1), moving_average(trace), color=c, lw=1)
    axes[1].set_title(f"min KL(q || p) from {len(STARTS)} starts (x): mode-seeking\n"
                      f"final KL(q||p) = {min(kl_reverse):.2f} to {max(kl_reverse):.2f} nats")
    axes[1].set_xlim(-5, 5)
    axes[1].set_ylim(-4, 4)
    axes[2].axhline(fwd_qp, color="tab:blue", ls="--", lw=1, label="moment-matched q")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")      # the two modes end 0.4 nats apart, below a start 25 nats up
    axes[2].set_xlabel("gradient step")
    axes[2].set_ylabel("KL(q || p) estimate (nats)")
    axes[2].set_title("reverse-KL descent, one line per start")
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.suptitle("one Gaussian q fitted to a mixture p (grey) of two Gaussians: 1- and 2-sigma ellipses of q")
    paths = [plots.save_figure(fig, args.out / "kl_directions.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
