"""Estimating log p(x): sampling from the prior vs importance sampling with q, as K grows.

For a VAE with a 2-D latent the exact log p(x) is a quadrature, so each
estimator can be compared with the truth:

    prior     log 1/K sum_k p(x|z_k),                 z_k ~ p(z)      (naive Monte Carlo)
    q         log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)  (importance sampling)

Both average to p(x) itself, so their logs are low on average (Jensen) and
converge from below. The mean of the q estimate over repeats is the IWAE
bound with K samples; with K = 1 it is the ELBO. The prior rarely lands where
p(z|x) has its mass and needs orders of magnitude more samples.

    python demos/estimators.py [--quick] [--out DIR] [--data-dir DIR]
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
from npvae import evaluate, plots
from npvae.engine.evaluate import log_likelihood, log_likelihood_prior   # evaluate's, with the examples split over threads
from npvae.train import TrainConfig, Trainer

DATASET = "binarized-mnist"
FALLBACK = "shapes"
HIDDEN = (200,)
EPOCHS, N_TRAIN = 5, None        # the full run: ~1.5 min on 2 cores
QUICK_EPOCHS, QUICK_N_TRAIN = 2, 2000
IMAGES = (1500, 4500, 7500)      # test images, one panel each (binarized MNIST's test set is sorted by digit)
KS = (1, 3, 10, 30, 100, 300, 1000, 5000)
QUICK_KS = (1, 10, 100, 1000)
REPEATS, QUICK_REPEATS = 20, 8   # independent estimates per K: the band is their interquartile range
GRID_N, QUICK_GRID_N = 401, 121  # quadrature points per axis for the exact log p(x)
SEED = 0


def spread(model, x, ks, repeats, rng, estimator):
    """(len(ks), repeats) estimates of log p(x) for one x (D,); every row of the repeat draws its own samples."""
    x_rep = np.repeat(x[None], repeats, axis=0)
    return np.stack([estimator(model, x_rep, k=k, rng=rng) for k in ks])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, few epochs, fewer K (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "estimators")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    q = args.quick
    epochs, n_train = (QUICK_EPOCHS, QUICK_N_TRAIN) if q else (EPOCHS, N_TRAIN)
    ks, repeats, grid_n = (QUICK_KS, QUICK_REPEATS, QUICK_GRID_N) if q else (KS, REPEATS, GRID_N)
    start = time.perf_counter()

    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                         hidden=HIDDEN, z_dim=2, seed=SEED)
    print(f"training on {dataset}: {HIDDEN} hidden, Z = 2, {epochs} epochs")
    trainer = Trainer(config, args.out / "run")
    trainer.run()
    model, data = trainer.model, trainer.data

    x = datasets.to_float(data.x_test[list(IMAGES)], model.dtype)
    grid = evaluate.latent_grid(2, grid_n)
    exact = evaluate.exact_log_likelihood(model, x, grid)
    elbo = evaluate.exact_elbo(model, x, grid)
    rng = np.random.default_rng(SEED)
    results = []
    for i, xi in enumerate(x):
        t = time.perf_counter()
        with_q = spread(model, xi, ks, repeats, rng, log_likelihood)
        prior = spread(model, xi, ks, repeats, rng, log_likelihood_prior)
        results.append((with_q, prior))
        print(f"\ntest image {IMAGES[i]}: exact log p(x) = {exact[i]:.2f}, ELBO = {elbo[i]:.2f} nats "
              f"({time.perf_counter() - t:.1f} s)")
        print(f"{'K':>6s} {'q: median':>10s} {'IQR':>6s} {'mean (IWAE)':>12s} {'prior: median':>14s} {'IQR':>7s}")
        for j, k in enumerate(ks):
            iqr_q, iqr_p = (np.subtract(*np.percentile(a[j], [75, 25])) for a in (with_q, prior))
            print(f"{k:6d} {np.median(with_q[j]):10.2f} {iqr_q:6.2f} {with_q[j].mean():12.2f} "
                  f"{np.median(prior[j]):14.2f} {iqr_p:7.2f}")

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(x), figsize=(4.2 * len(x), 4.0), layout="constrained", squeeze=False)
    for ax, xi, (with_q, prior), lp, el in zip(axes[0], x, results, exact, elbo):
        for est, color, name in ((with_q, "tab:blue", "importance sampling with q"),
                                 (prior, "tab:orange", "sampling from the prior")):
            lo, med, hi = np.percentile(est, [25, 50, 75], axis=1)
            ax.fill_between(ks, lo, hi, color=color, alpha=0.25, lw=0)
            ax.plot(ks, med, "o-", color=color, ms=3, label=f"{name}: median, IQR")
        ax.plot(ks, with_q.mean(axis=1), "--", color="tab:blue", lw=1,
                label="IWAE bound (mean of the q estimates)")
        ax.axhline(lp, color="black", lw=1.2, label="exact log p(x) (quadrature)")
        ax.axhline(el, color="grey", ls=":", lw=1.2, label="ELBO (exact)")
        gap = lp - el
        ax.set_ylim(lp - max(4 * gap, 5.0), lp + max(0.5 * gap, 1.0))
        ax.set_xscale("log")
        ax.set_xlabel("K, samples per estimate")
        ax.set_ylabel("estimate of log p(x) (nats)")
        ax.set_title(f"log p(x) = {lp:.1f}, ELBO = {el:.1f}")
        ax.grid(alpha=0.3)
        inset = ax.inset_axes([0.80, 0.03, 0.18, 0.18])
        inset.imshow(xi.reshape(data.image_shape), cmap="gray_r", interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    axes[0, 0].legend(loc="lower center", fontsize=7)
    fig.suptitle(f"{dataset}, Z = 2: estimates of log p(x) over {repeats} repeats per K")
    paths = [plots.save_figure(fig, args.out / "estimators.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
