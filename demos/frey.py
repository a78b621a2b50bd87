"""Frey Face with a Gaussian decoder that learns its variance, and Z = 2: the manifold of faces.

The decoder gives each pixel a mean and a log standard deviation, so the
ELBO is a log density of real-valued pixels: positive, in the hundreds of
nats, and not comparable with Bernoulli numbers. Learned variances are
finicky: a pixel whose sigma shrinks early gets huge gradients. Two things
keep this stable: the KL warm-up (beta rises from 0 over WARMUP epochs, so the
decoder learns to use z before the prior pulls q together) and tanh rather
than ReLU (a ReLU decoder extrapolates linearly, and away from the data its
faces dissolve into noise).

    python demos/frey.py [--quick] [--out DIR] [--data-dir DIR]
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
from npvae.engine.evaluate import log_likelihood   # evaluate's, with the examples split over threads
from npvae.train import TrainConfig, Trainer

DATASET = "frey"
FALLBACK = "shapes"              # built in, used when Frey is not found (with a fixed sigma: see main)
HIDDEN = (200,)
ACTIVATION = "tanh"
EPOCHS, WARMUP = 300, 20         # the full run: ~2.5 min on 2 cores
QUICK_EPOCHS, QUICK_WARMUP = 8, 3
BATCH_SIZE = 20                  # 1769 faces: small batches give enough steps per epoch
LR, LR_FINAL = 1e-3, 1e-4        # decayed exponentially over the run
N_GRID = 12                      # the manifold is N_GRID x N_GRID faces
K_LOG_PX = 1000                  # importance samples for the test log p(x)
SEED = 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "frey")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    epochs, warmup = (QUICK_EPOCHS, QUICK_WARMUP) if args.quick else (EPOCHS, WARMUP)
    start = time.perf_counter()

    dataset, x_sigma, n_train = DATASET, None, None
    try:
        datasets.load(DATASET, args.data_dir)
    except FileNotFoundError as e:
        # Binary pixels are the worst case for a learned variance: a pixel that is always 0 is
        # fitted ever better as sigma -> 0, and the ELBO grows without bound. So a fixed sigma.
        print(f"note: {e}\nnote: using the built-in {FALLBACK!r} set instead, with a fixed x_sigma = 0.2")
        dataset, x_sigma, n_train = FALLBACK, 0.2, 1500 if args.quick else 20000
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                         batch_size=BATCH_SIZE, hidden=HIDDEN, activation=ACTIVATION, z_dim=2,
                         likelihood="gaussian", x_sigma=x_sigma, lr=LR, lr_schedule="exponential",
                         lr_final=LR_FINAL, warmup=warmup, seed=SEED)
    print(f"training on {dataset}: Gaussian likelihood, {'learned' if x_sigma is None else 'fixed'} sigma, "
          f"{HIDDEN} {ACTIVATION}, Z = 2, {epochs} epochs, KL warm-up over {warmup}")
    trainer = Trainer(config, args.out / "run", quiet=True)
    trainer.run()
    model, data, h = trainer.model, trainer.data, trainer.history
    for e in sorted({0, len(h["epoch"]) // 4, len(h["epoch"]) // 2, len(h["epoch"]) - 1}):
        print(f"epoch {h['epoch'][e]:4.0f}  beta {h['beta'][e]:.2f}  train ELBO {h['train_elbo'][e]:9.2f}  "
              f"valid ELBO {h['valid_elbo'][e]:9.2f}  KL {h['valid_kl'][e]:6.2f}")

    x_test = datasets.to_float(data.x_test[:1000], model.dtype)
    rng = np.random.default_rng(SEED)
    stats = evaluate.elbo_stats(model, x_test, rng)
    print(f"\ntest set ({len(x_test)} images): ELBO {stats['elbo']:.2f} = recon {stats['recon']:.2f} "
          f"- KL {stats['kl']:.2f} nats per image")
    if dataset == "frey":
        # The validation frames are drawn at random from the video, so each has near-duplicate
        # neighbours in the training set; the test frames are the video's tail and have none.
        print("(below the validation ELBO: the test faces are the last 10% of the video, held out whole)")
    if not args.quick:
        log_px = log_likelihood(model, x_test, k=K_LOG_PX, rng=rng)
        print(f"test log p(x), importance sampling with K = {K_LOG_PX}: {log_px.mean():.2f} nats per image")
    if x_sigma is None:
        _, log_sigma = model.decode(np.zeros((1, 2), model.dtype))
        sigma = np.exp(log_sigma[0])
        print(f"decoder sigma at z = 0: {sigma.min():.3f} to {sigma.max():.3f} (median {np.median(sigma):.3f}), "
              f"pixel values in [0, 1]")

    title = f"{dataset}, Z = 2"
    paths = [
        plots.plot_manifold(model, data.image_shape, args.out / "manifold.png", n=N_GRID,
                            title=f"{title}: mean of p(x|z) over a grid of prior quantiles"),
        plots.plot_training_curves(h, args.out / "curves.png", f"{title}: nats per image"),
    ]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
