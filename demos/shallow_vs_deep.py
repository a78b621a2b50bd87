"""A Gaussian mixture (shallow, exact) and a VAE (deep, latent) fitted to the same 2-D data.

The mixture's density is a sum of K Gaussians, fitted by EM, and exact. The
VAE's is p(x) = integral N(x; mean(z), sigma(z)^2) N(z; 0, I) dz: a continuous
mixture whose components the decoder bends along the data; it is computed on
the grid by importance sampling with the encoder's q (npvae.evaluate.log_likelihood).
Both are scored by their mean log-likelihood on held-out points.

    python demos/shallow_vs_deep.py [--quick] [--out DIR]
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

from npvae import plots
from npvae.gmm import GaussianMixture, compare_on
from npvae.train import TrainConfig, Trainer

DATASET = "pinwheel"             # or "ring", "moons"
N_COMPONENTS = 10                # of the mixture: two per arm of the pinwheel
HIDDEN = (64, 64)
EPOCHS, QUICK_EPOCHS = 300, 15   # the full run: ~1.5 min on 2 cores
WARMUP = 10                      # epochs of KL warm-up: a learned-variance decoder needs it
LR, LR_FINAL = 1e-3, 1e-4
K_TEST, QUICK_K_TEST = 5000, 200     # importance samples per test point
K_GRID, QUICK_K_GRID = 500, 50       # ... per grid point of the density picture
N_GRID, QUICK_N_GRID = 120, 50
SEED = 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, a coarse grid (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "shallow_vs_deep")
    parser.add_argument("--data-dir", help="unused: the toy sets are generated")
    args = parser.parse_args()
    q = args.quick
    epochs, k_test, k_grid, n_grid = ((QUICK_EPOCHS, QUICK_K_TEST, QUICK_K_GRID, QUICK_N_GRID) if q
                                      else (EPOCHS, K_TEST, K_GRID, N_GRID))
    start = time.perf_counter()

    config = TrainConfig(dataset=DATASET, epochs=epochs, batch_size=100, hidden=HIDDEN, z_dim=2,
                         likelihood="gaussian", x_sigma=None, lr=LR, lr_schedule="exponential",
                         lr_final=LR_FINAL, warmup=min(WARMUP, epochs / 2), seed=SEED)
    trainer = Trainer(config, args.out / "run", quiet=True)
    x_train, x_test = np.asarray(trainer.x_train, np.float64), trainer.data.x_test.astype(np.float64)
    t = time.perf_counter()
    gmm = GaussianMixture(N_COMPONENTS, seed=SEED).fit(x_train)
    print(f"{DATASET}: {len(x_train)} training and {len(x_test)} test points")
    print(f"GMM, {N_COMPONENTS} components: EM converged={gmm.converged} after {gmm.n_iter} iterations "
          f"({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    trainer.run()
    model, h = trainer.model, trainer.history
    print(f"VAE, {HIDDEN} hidden, Z = 2, learned variance: {epochs} epochs ({time.perf_counter() - t:.1f} s), "
          f"final valid ELBO {h['valid_elbo'][-1]:.3f} nats")

    rng = np.random.default_rng(SEED)
    scores = compare_on(x_test, gmm, model, k=k_test, rng=rng)
    print(f"\ntest log-likelihood, nats per point: GMM {scores['gmm']:.3f} (exact), "
          f"VAE {scores['vae']:.3f} (importance sampling, K = {k_test})")

    extent = plots.data_extent(x_train)
    xx, yy, points = plots.grid_2d(extent, n_grid)
    log_gmm = gmm.log_prob(points).reshape(xx.shape)
    log_vae = plots.vae_log_density(model, points, k=k_grid, rng=rng).reshape(xx.shape)

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), layout="constrained")
    axes[0].scatter(x_test[:, 0], x_test[:, 1], s=2, alpha=0.6, linewidths=0)
    axes[0].set(xlim=extent[:2], ylim=extent[2:], aspect="equal", xlabel="x1", ylabel="x2",
                title=f"{DATASET}: {len(x_test)} test points")
    plots.show_density(axes[1], xx, yy, log_gmm,
                       f"GMM, {N_COMPONENTS} Gaussians (EM): exact density\ntest log p(x) = {scores['gmm']:.3f} nats")
    axes[1].plot(gmm.means[:, 0], gmm.means[:, 1], "+", color="cyan", ms=6, label="component means")
    axes[1].legend(loc="lower right", fontsize=7)
    plots.show_density(axes[2], xx, yy, log_vae,
                       f"VAE, Z = 2: importance-sampled density (K = {k_grid})\n"
                       f"test log p(x) = {scores['vae']:.3f} nats")
    fig.suptitle("shallow vs deep: the same data, two density models (colour: p(x), linear scale)")
    paths = [plots.save_figure(fig, args.out / "shallow_vs_deep.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
