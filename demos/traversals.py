"""Latent traversals on the built-in shapes: what each latent dimension of a trained VAE encodes.

Each row of the figure decodes z with one dimension swept over TRAVERSAL
while the others stay at the base code (0, or the mu of one test image). Rows
are ordered by the dimension's average KL(q(z_j|x) || p(z_j)), the nats it
carries about x, and are named after the generating factor (kind, x, y, size)
that its posterior mean mu_j follows most closely.

    python demos/traversals.py [--quick] [--out DIR] [--data-dir DIR]
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

HIDDEN = (400,)
Z_DIM = 6
BETA = 4.0                       # a beta-VAE: > 1 trades reconstruction for fewer, cleaner dimensions
EPOCHS, N_TRAIN = 20, None       # the full run: ~5 min on 2 cores
QUICK_EPOCHS, QUICK_N_TRAIN = 2, 2000
N_FACTORS = 5000                 # training images whose mu is set against the factors
TRAVERSAL = np.linspace(-3, 3, 9)
BASE = 0                         # None: the other dimensions at 0; an int: at that test image's mu
SEED = 0


def correlations(mu, factors):
    """mu (N, Z), factors name -> (N,) -> dict name -> (Z,) strength of association in [0, 1].

    Continuous factors: |Pearson r|. The shape's kind is a category whose
    index order means nothing, so it gets the correlation ratio eta instead:
    the share of mu_j's standard deviation explained by the kind's group means.
    """
    out = {}
    for name, f in factors.items():
        if name == "kind":
            means = np.zeros_like(mu)
            for k in np.unique(f):
                means[f == k] = mu[f == k].mean(axis=0)
            out[name] = np.sqrt(means.var(axis=0) / np.maximum(mu.var(axis=0), 1e-12))
        else:
            fc, mc = f - f.mean(), mu - mu.mean(axis=0)
            out[name] = np.abs(fc @ mc) / np.maximum(np.sqrt((fc @ fc) * np.sum(mc * mc, axis=0)), 1e-12)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset and few epochs (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "traversals")
    parser.add_argument("--data-dir", help="unused: the shapes are generated")
    args = parser.parse_args()
    epochs, n_train = (QUICK_EPOCHS, QUICK_N_TRAIN) if args.quick else (EPOCHS, N_TRAIN)
    start = time.perf_counter()

    config = TrainConfig(dataset="shapes", epochs=epochs, n_train=n_train, n_valid=1000, hidden=HIDDEN,
                         z_dim=Z_DIM, beta=BETA, seed=SEED)
    print(f"training on shapes: {HIDDEN} hidden, Z = {Z_DIM}, beta = {BETA}, {epochs} epochs")
    trainer = Trainer(config, args.out / "run")
    trainer.run()
    model, data = trainer.model, trainer.data

    # The factors are stored for the dataset's training split, so mu is taken on those images.
    x = datasets.to_float(data.x_train[:N_FACTORS], model.dtype)
    factors = {name: np.asarray(f[:N_FACTORS], dtype=np.float64) for name, f in data.factors.items()}
    mu, log_sigma = model.encode(x)
    kl = np.mean(0.5 * (mu ** 2 + dist.std(log_sigma) ** 2 - 1) - log_sigma, axis=0)   # (Z,) nats
    _, variance = evaluate.active_units(model, x)
    strength = correlations(mu.astype(np.float64), factors)
    order = np.argsort(-kl)

    names = list(factors)
    print(f"\n{'dim':>4s} {'KL':>6s} {'Var mu':>7s} " + " ".join(f"{n:>10s}" for n in names) + "   best")
    labels = []
    for j in order:
        row = [strength[n][j] for n in names]
        best = names[int(np.argmax(row))]
        print(f"{j:4d} {kl[j]:6.2f} {variance[j]:7.3f} " + " ".join(f"{v:10.2f}" for v in row) + f"   {best}")
        what = "inactive" if variance[j] <= 0.01 else f"{best} ({'eta' if best == 'kind' else '|r|'} {max(row):.2f})"
        labels.append(f"z{j}  KL {kl[j]:.1f}: {what}")
    print("(KL in nats, averaged over images; kind: correlation ratio eta, others: |Pearson r|)")

    base = np.zeros(Z_DIM) if BASE is None else model.encode(
        datasets.to_float(data.x_test[BASE:BASE + 1], model.dtype))[0][0]
    z = np.tile(base, (Z_DIM, len(TRAVERSAL), 1))                     # (Z rows, steps, Z)
    for row, j in enumerate(order):
        z[row, :, j] = TRAVERSAL
    images = model.mean_px_z(model.decode(z.reshape(-1, Z_DIM).astype(model.dtype)))

    plt = plots.pyplot()
    h, w = data.image_shape
    grid = plots.tile(images, (h, w), len(TRAVERSAL))
    fig, ax = plt.subplots(figsize=(7.5, 0.62 * Z_DIM + 0.8))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(np.arange(Z_DIM) * (h + 1) + h / 2, labels)
    ax.set_xticks(np.arange(len(TRAVERSAL)) * (w + 1) + w / 2, [f"{v:+.1f}" for v in TRAVERSAL])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("value of the traversed dimension" + (" (others at 0)" if BASE is None
                                                         else f" (others at test image {BASE}'s mu)"))
    ax.set_title(f"shapes, Z = {Z_DIM}: one latent dimension at a time, rows by KL")
    paths = [plots.save_figure(fig, args.out / "traversals.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
