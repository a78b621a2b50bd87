"""The true posterior p(z|x) next to the encoder's q(z|x), for a VAE with a 2-D latent.

With Z = 2 the posterior can be computed on a grid, p(z|x) = p(x|z) p(z) / p(x),
so the gap log p(x) - ELBO = KL(q(z|x) || p(z|x)) can be seen as well as measured.
The panels show test images whose KL is typical and progressively worse: a
diagonal Gaussian cannot follow a tilted or curved posterior, and an encoder
shared by all images often puts q off-centre, too wide, or somewhere else.

    python demos/posterior.py [--quick] [--out DIR] [--data-dir DIR]
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

from npvae import data as datasets
from npvae import distributions as dist
from npvae import evaluate, plots
from npvae.train import TrainConfig, Trainer

DATASET = "binarized-mnist"
FALLBACK = "shapes"
HIDDEN = (200,)
EPOCHS, N_TRAIN = 10, None       # the full run: ~3 min on 2 cores
QUICK_EPOCHS, QUICK_N_TRAIN = 2, 2000
N_CANDIDATES, QUICK_N_CANDIDATES = 200, 30   # test images scored exactly; panels are picked from them
KL_QUANTILES = (0.5, 0.8, 0.95, 1.0)          # which images get a panel: by the quantile of their KL
GRID_N, QUICK_GRID_N = 401, 121  # quadrature points per axis on [-6, 6]^2 (evaluate.latent_grid)
PANEL_N = 150                    # points per axis of the zoomed grid each panel is drawn on
MASS_LEVELS = (0.5, 0.9, 0.99)   # contours enclose these shares of each density's mass
SEED = 0


def log_joint(model, x, z):
    """log p(x|z) + log p(z) for one x (D,) at points z (G, 2) -> (G,)."""
    out = model.decode(z.astype(model.dtype))
    x = np.broadcast_to(x.astype(model.dtype), (z.shape[0], x.size))
    return model.log_px_z(x, out).astype(np.float64) + dist.standard_normal_log_prob(z)


def mass_thresholds(log_density, levels):
    """Density values whose upper level sets hold each share in levels of a gridded density's mass."""
    p = np.sort(np.exp(log_density).ravel())[::-1]
    cumulative = np.cumsum(p) / p.sum()
    return sorted(p[np.searchsorted(cumulative, level)] for level in levels)


def window(axes, log_post, mu, sigma):
    """A square box around the posterior's mass (on the coarse grid) and q's +-4 sigma."""
    zz1, zz2 = np.meshgrid(*axes, indexing="ij")
    inside = log_post > log_post.max() + np.log(1e-4)
    lo = np.minimum([zz1[inside].min(), zz2[inside].min()], mu - 4 * sigma)
    hi = np.maximum([zz1[inside].max(), zz2[inside].max()], mu + 4 * sigma)
    centre, half = (lo + hi) / 2, 0.6 * np.max(hi - lo)
    return centre - half, centre + half


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, few epochs, a coarse grid (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "posterior")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    q = args.quick
    epochs, n_train = (QUICK_EPOCHS, QUICK_N_TRAIN) if q else (EPOCHS, N_TRAIN)
    n_candidates, grid_n = (QUICK_N_CANDIDATES, QUICK_GRID_N) if q else (N_CANDIDATES, GRID_N)
    start = time.perf_counter()

    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                         hidden=HIDDEN, z_dim=2, seed=SEED)
    print(f"training on {dataset}: {HIDDEN} hidden, Z = 2, {epochs} epochs")
    trainer = Trainer(config, args.out / "run")
    trainer.run()
    model, data = trainer.model, trainer.data

    # evenly spaced through the test set, which for binarized MNIST is sorted by digit
    index = np.arange(n_candidates) * (len(data.x_test) // n_candidates)
    x = datasets.to_float(data.x_test[index], model.dtype)
    grid = evaluate.latent_grid(2, grid_n)
    log_px = evaluate.exact_log_likelihood(model, x, grid)
    elbo = evaluate.exact_elbo(model, x, grid)
    kl = evaluate.kl_to_posterior(model, x, grid)
    print(f"\n{n_candidates} test images, exact on a {grid_n}^2 grid (nats): mean log p(x) {log_px.mean():.2f}, "
          f"ELBO {elbo.mean():.2f}, KL(q || p(z|x)) {kl.mean():.3f}")
    print(f"largest |log p(x) - ELBO - KL| (should be ~0): {np.max(np.abs(log_px - elbo - kl)):.2e}")

    order = np.argsort(kl)
    picks = [order[min(int(round(f * (len(kl) - 1))), len(kl) - 1)] for f in KL_QUANTILES]
    mu, log_sigma = model.encode(x[picks])
    sigma = dist.std(log_sigma)

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(picks), figsize=(3.3 * len(picks), 3.9))
    print(f"\n{'test image':>10s} {'KL rank':>8s} {'log p(x)':>9s} {'ELBO':>9s} {'KL(q||p)':>9s}")
    for ax, i, m, s, f in zip(axes, picks, mu, sigma, KL_QUANTILES):
        print(f"{index[i]:10d} {f:8.0%} {log_px[i]:9.2f} {elbo[i]:9.2f} {kl[i]:9.3f}")
        coarse_axes, log_post = evaluate.exact_posterior(model, x[i], grid)
        lo, hi = window(coarse_axes, log_post, m, s)
        zz1, zz2, z = plots.grid_2d((lo[0], hi[0], lo[1], hi[1]), PANEL_N)
        log_p = log_joint(model, x[i], z).reshape(zz1.shape) - log_px[i]       # log p(z|x)
        log_q = dist.gaussian_log_prob(z, m.astype(np.float64), np.log(s).astype(np.float64)).reshape(zz1.shape)
        ax.contourf(zz1, zz2, np.exp(log_p), levels=mass_thresholds(log_p, MASS_LEVELS) + [np.exp(log_p).max()],
                    cmap="Blues", alpha=0.9)
        ax.contour(zz1, zz2, np.exp(log_q), levels=mass_thresholds(log_q, MASS_LEVELS), colors="crimson",
                   linewidths=1.2)
        ax.set_aspect("equal")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        ax.set_title(f"log p(x) = {log_px[i]:.1f}, ELBO = {elbo[i]:.1f}\nKL(q || p(z|x)) = {kl[i]:.2f} nats",
                     fontsize=9)
        inset = ax.inset_axes([0.0, 0.72, 0.28, 0.28])
        inset.imshow(x[i].reshape(data.image_shape), cmap="gray_r", interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    axes[0].plot([], [], color="steelblue", lw=6, label="p(z|x), exact")
    axes[0].plot([], [], color="crimson", lw=1.2, label="q(z|x), encoder")
    axes[0].legend(loc="lower right", fontsize=7, framealpha=0.8)
    fig.suptitle(f"{dataset}, Z = 2: true posterior vs q, contours at "
                 f"{', '.join(f'{m:.0%}' for m in MASS_LEVELS)} of the mass; panels by KL "
                 f"({', '.join(f'{f:.0%}' for f in KL_QUANTILES)} quantile)")
    fig.tight_layout()
    paths = [plots.save_figure(fig, args.out / "posterior.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
