"""Flexible posteriors against the exact one: what a full covariance and normalizing flows buy, in nats.

With Z = 2, log p(x) is exact (quadrature), so each family's gap to it is measured, not estimated:

    log p(x) - ELBO(q_encoder) = KL(q_encoder || p(z|x))                 the inference gap
                               = [log p(x) - ELBO(q*)]                   approximation gap: the family's limit
                               + [ELBO(q*) - ELBO(q_encoder)]            amortization gap: one encoder for all x

q* is the family's best q for each image alone, fitted with the decoder fixed (evaluate.optimize_local:
mu, log_sigma, L's lower triangle, the planar steps' u, w, b, an IAF's MADE weights, per image).
Each family trains its own model (same architecture, epochs and seed) on the reference engine.
The figure draws, for the same test digits, each model's exact posterior with its encoder's q
over it (a flow's density from a histogram of its samples).

    python demos/flows.py [--quick] [--out DIR] [--data-dir DIR]
"""
import os

# One BLAS thread unless told otherwise: OpenBLAS's threads spin while they wait for each other,
# and on 2 cores shared with other work that made the small matrix products here up to 16x slower
# (frey.py --quick: 99 s with two threads, 6 s with one). OPENBLAS_NUM_THREADS=2 overrides this.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from npvae import data as datasets
from npvae import distributions as dist
from npvae import evaluate, plots
from npvae.model import VAE
from npvae.train import TrainConfig, Trainer

DATASET = "binarized-mnist"
FALLBACK = "shapes"
FAMILIES = ("diagonal", "full", "planar:16", "iaf:4")
HIDDEN = (200,)                  # the model of demos/posterior.py and demos/amortization.py
EPOCHS, N_TRAIN = 10, None
QUICK_EPOCHS, QUICK_N_TRAIN = 2, 2000
N_IMAGES, QUICK_N_IMAGES = 1000, 8   # test images, evenly spaced (binarized MNIST's test set is sorted by digit)
STEPS, QUICK_STEPS = 500, 40     # Adam steps fitting q* to each image
LR = 0.05                        # q*'s first step size (then down to LR / 100), one for all: a flow's weights need
                                 # less than 0.2, and diagonal and full reach the same q* at 0.05 as at 0.2
N_SAMPLES = 10                   # samples per step of the fit
N_EVAL, QUICK_N_EVAL = 2000, 200     # samples for each ELBO (common random numbers for the encoder's and q*'s)
GRID_N, QUICK_GRID_N = 401, 61
PANELS = (0.5, 0.9, 0.99)        # the digits drawn: the diagonal's KL(q || p(z|x)) at these quantiles
PANEL_N, QUICK_PANEL_N = 120, 60  # points per axis of each panel's grid
DRAWS, QUICK_DRAWS = 200_000, 20_000   # samples of q per panel, for its histogram density
MASS_LEVELS = (0.5, 0.9)
SEED = 0


def mass_thresholds(density, levels):
    """Density values whose upper level sets hold each share in levels of a gridded density's mass."""
    p = np.sort(density.ravel())[::-1]
    cumulative = np.cumsum(p) / p.sum()
    # distinct values only: contour levels must increase (one cell can hold 50% of a narrow q)
    return sorted({p[min(np.searchsorted(cumulative, level), p.size - 1)] for level in levels})


def q_density(z, extent, n):
    """q(z|x) on an n x n grid over extent, from a histogram of its samples z (S, 2), lightly smoothed."""
    # bins centred on the grid's points (plots.grid_2d: n points from edge to edge of extent)
    half = [(hi - lo) / (n - 1) / 2 for lo, hi in (extent[:2], extent[2:])]
    edges = [np.linspace(lo - h, hi + h, n + 1) for (lo, hi), h in zip((extent[:2], extent[2:]), half)]
    hist, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=edges)
    return gaussian_filter(hist.T, 1.0)       # (rows = z2, cols = z1), as plots.grid_2d lays its points out


def with_family(model, family):
    """The same encoder and decoder with q of another family, whose own parameters are at their initial values.

    Those start planar steps at the identity and an IAF near it; q* is fitted from there.
    """
    other = VAE(**{**model.config, "posterior": family})
    for name, p in model.params.items():
        if name in other.params:
            other.params[name][...] = p
    return other


def posterior_on(model, x, z):
    """p(z|x) at the points z (G, 2) of a regular grid, up to the grid's cell area: p(x|z) p(z) normalized."""
    out = model.decode(z.astype(model.dtype))
    log_joint = model.log_px_z(np.broadcast_to(x, (len(z), x.size)), out) + dist.standard_normal_log_prob(z)
    p = np.exp(log_joint - log_joint.max())
    return p / p.sum()


def window(model, x, grid, z):
    """(z1_lo, z1_hi, z2_lo, z2_hi): a square around the exact posterior's mass and q's samples z (S, 2)."""
    axes, log_post = evaluate.exact_posterior(model, x, grid)
    zz1, zz2 = np.meshgrid(*axes, indexing="ij")
    inside = log_post > log_post.max() + np.log(1e-3)
    lo = np.minimum([zz1[inside].min(), zz2[inside].min()], np.percentile(z, 0.5, axis=0))
    hi = np.maximum([zz1[inside].max(), zz2[inside].max()], np.percentile(z, 99.5, axis=0))
    centre, half = (lo + hi) / 2, 0.6 * np.max(hi - lo)
    return (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, few epochs, few images (~30 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "flows")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    quick = args.quick
    epochs, n_train = (QUICK_EPOCHS, QUICK_N_TRAIN) if quick else (EPOCHS, N_TRAIN)
    n_images, steps, n_eval, grid_n, draws, panel_n = (
        (QUICK_N_IMAGES, QUICK_STEPS, QUICK_N_EVAL, QUICK_GRID_N, QUICK_DRAWS, QUICK_PANEL_N) if quick
        else (N_IMAGES, STEPS, N_EVAL, GRID_N, DRAWS, PANEL_N))
    start = time.perf_counter()
    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)
    grid = evaluate.latent_grid(2, grid_n)
    print(f"{dataset}: {HIDDEN} hidden, Z = 2, {epochs} epochs per family; gaps on {n_images} test images")

    models, rows = {}, {}
    for family in FAMILIES:
        config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                             hidden=HIDDEN, z_dim=2, seed=SEED, posterior=family)
        trainer = Trainer(config, args.out / family.replace(":", ""), quiet=True, engine="reference")
        t = time.perf_counter()
        trainer.run()
        train_seconds = time.perf_counter() - t
        model, data = trainer.model, trainer.data
        index = np.arange(n_images) * (len(data.x_test) // n_images)
        x = datasets.to_float(data.x_test[index], model.dtype)
        t = time.perf_counter()
        log_px = evaluate.exact_log_likelihood(model, x, grid)
        gaps = evaluate.amortization_gaps(model, x, rng=np.random.default_rng(SEED), n_eval=n_eval, steps=steps,
                                          lr=LR, n_samples=N_SAMPLES, log_px=log_px)
        models[family] = (model, x, log_px, gaps)
        rows[family] = dict(gaps["mean"], train_seconds=train_seconds, gap_seconds=time.perf_counter() - t,
                            q_star_worse=int(np.sum(gaps["amortization_gap"] < 0)), n=n_images)
        r = rows[family]
        print(f"  {family:10s} trained in {train_seconds:6.1f} s; log p(x) {r['log_px']:8.3f}, inference gap "
              f"{r['inference_gap']:.3f} = approximation {r['approximation_gap']:.3f} + amortization "
              f"{r['amortization_gap']:.3f} nats ({r['gap_seconds']:.0f} s)")

    print(f"\nmean over {n_images} test images, nats (log p(x) exact, {grid_n}^2 grid; ELBOs by {n_eval} samples):")
    print(f"{'q(z|x)':>10s} {'train s':>8s} {'log p(x)':>9s} {'ELBO enc':>9s} {'ELBO q*':>9s} "
          f"{'inference':>9s} {'approx.':>8s} {'amort.':>8s}")
    for family, r in rows.items():
        print(f"{family:>10s} {r['train_seconds']:8.1f} {r['log_px']:9.3f} {r['elbo_encoder']:9.3f} "
              f"{r['elbo_optimized']:9.3f} {r['inference_gap']:9.3f} {r['approximation_gap']:8.3f} "
              f"{r['amortization_gap']:8.3f}")

    # Each model's decoder differs, so the approximation gaps above compare posteriors as well as
    # families. With the decoder fixed, every family's q* meets the same posterior: the cross table.
    cross = {}
    for trained in FAMILIES:
        model, x, log_px, gaps = models[trained]
        cross[trained] = {}
        for family in FAMILIES:
            if family == trained:
                cross[trained][family] = rows[trained]["approximation_gap"]
                continue
            other = with_family(model, family)
            fitted = evaluate.amortization_gaps(other, x, rng=np.random.default_rng(SEED), n_eval=n_eval, steps=steps,
                                                lr=LR, n_samples=N_SAMPLES, log_px=log_px)
            cross[trained][family] = fitted["mean"]["approximation_gap"]
    print(f"\napproximation gap log p(x) - ELBO(q*) with the decoder fixed, {n_images} test images, nats:")
    print(f"{'decoder of':>12s} " + " ".join(f"{f'q* {f}':>13s}" for f in FAMILIES))
    for trained, gaps in cross.items():
        print(f"{trained:>12s} " + " ".join(f"{gaps[f]:13.3f}" for f in FAMILIES))
    for family in FAMILIES[1:]:
        ratios = [cross[t][family] / cross[t]["diagonal"] for t in FAMILIES]
        print(f"{family}'s q* against the diagonal's on the same decoder: "
              + ", ".join(f"{r:.2f}x" for r in ratios) + f" (decoders of {', '.join(FAMILIES)})")
    rows = {family: dict(r, approximation_gap_with_decoder_fixed=cross[family]) for family, r in rows.items()}
    (args.out / "gaps.json").write_text(json.dumps(rows, indent=1) + "\n")

    # the same digits for every family: picked by the diagonal model's KL(q || p(z|x))
    kl = models["diagonal"][3]["inference_gap"]
    order = np.argsort(kl)
    picks = [order[min(int(round(f * (len(kl) - 1))), len(kl) - 1)] for f in PANELS]
    plt = plots.pyplot()
    fig, axes = plt.subplots(len(picks), len(FAMILIES), figsize=(3.0 * len(FAMILIES), 3.0 * len(picks)),
                             squeeze=False, layout="constrained")
    rng = np.random.default_rng(SEED)
    for col, family in enumerate(FAMILIES):
        model, x, _, gaps = models[family]
        for row, i in enumerate(picks):
            ax = axes[row, col]
            samples = model.sample_q(x[i][None], draws, rng=rng)[0][0].astype(np.float64)     # (draws, 2)
            extent = window(model, x[i], grid, samples)
            zz1, zz2, z = plots.grid_2d(extent, panel_n)
            post = posterior_on(model, x[i], z).reshape(zz1.shape)
            levels = [t for t in mass_thresholds(post, MASS_LEVELS) if t < post.max()] + [post.max()]
            ax.contourf(zz1, zz2, post, levels=levels, cmap="Blues")
            q = q_density(samples, extent, panel_n)
            ax.contour(zz1, zz2, q, levels=mass_thresholds(q, MASS_LEVELS), colors="crimson", linewidths=1.1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"KL(q || p(z|x)) = {gaps['inference_gap'][i]:.2f}\napprox. gap "
                         f"{gaps['approximation_gap'][i]:.2f}", fontsize=8)
            if row == 0:
                ax.text(0.5, 1.32, family, transform=ax.transAxes, ha="center", fontsize=11, weight="bold")
            if col == 0:
                inset = ax.inset_axes([0.0, 0.72, 0.28, 0.28])
                inset.imshow(x[i].reshape(data.image_shape), cmap="gray_r", interpolation="nearest")
                inset.set_xticks([])
                inset.set_yticks([])
    fig.suptitle(f"{dataset}, Z = 2: each family's exact posterior (blue) and its encoder's q (red), "
                 f"{', '.join(f'{m:.0%}' for m in MASS_LEVELS)} of the mass")
    paths = [plots.save_figure(fig, args.out / "flows.png"), args.out / "gaps.json"]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
