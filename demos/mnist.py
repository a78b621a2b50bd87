"""MNIST: reconstructions, samples, training curves, the latent space, and the 2-D manifold.

Trains two VAEs on dynamically binarized MNIST with a Bernoulli likelihood: one
with Z_DIM latents for the pictures of what a VAE does, and one with Z = 2
whose whole latent space can be drawn. Without MNIST it falls back to the
built-in shapes set, so it runs anywhere.

    python demos/mnist.py [--quick] [--out DIR] [--data-dir DIR]
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
from npvae.train import TrainConfig, Trainer, prepare_batch

DATASET = "mnist"
FALLBACK = "shapes"              # built in: used when MNIST is not found
HIDDEN = (400,)
Z_DIM = 20
EPOCHS = 10                      # the full run: ~2.5 min on 2 cores for both models
N_TRAIN = None                   # None: all 55k (5k are held out for validation)
N_TEST = 10000                   # test images encoded for the figures and the test ELBO
QUICK_EPOCHS, QUICK_N_TRAIN, QUICK_N_TEST = 2, 1500, 2000
BATCH_SIZE = 128
LR = 1e-3
K_LOG_PX = 1000                  # importance samples for the test log p(x) (full run only)
N_LOG_PX = 500                   # test images it is estimated on
SEED = 0


def train(name, z_dim, args, dataset, epochs, n_train, out):
    """Train one VAE into out/runs/name; returns its Trainer (model, data, history)."""
    # On a small subset the default validation set (5000 images) would cost more than training.
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                         n_valid=1000 if n_train else None, batch_size=BATCH_SIZE, hidden=HIDDEN,
                         z_dim=z_dim, lr=LR, seed=SEED)
    print(f"training {name}: {dataset}, {HIDDEN} hidden, Z = {z_dim}, {epochs} epochs")
    trainer = Trainer(config, out / "runs" / name)
    trainer.run()
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset and few epochs (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "mnist")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    epochs, n_train, n_test = (QUICK_EPOCHS, QUICK_N_TRAIN, QUICK_N_TEST) if args.quick else (EPOCHS, N_TRAIN, N_TEST)
    start = time.perf_counter()

    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)

    main_run = train(f"z{Z_DIM}", Z_DIM, args, dataset, epochs, n_train, args.out)
    flat_run = train("z2", 2, args, dataset, epochs, n_train, args.out)
    model, data, config = main_run.model, main_run.data, main_run.config
    shape, names = data.image_shape, plots.LABEL_NAMES.get(data.name)

    # The test images binarized once, with a fixed generator, as the model sees them.
    rng = np.random.default_rng(SEED)
    x_test = prepare_batch(data.x_test[:n_test], config, model.likelihood, data.kind, model.dtype, rng)
    y_test = data.y_test[:n_test]
    out = args.out
    paths = [
        plots.plot_reconstructions(x_test[:32], model.reconstruct(x_test[:32]), shape, out / "reconstructions.png",
                                   f"{data.name}, Z = {Z_DIM}: test images and their reconstructions"),
        plots.plot_samples(model.sample(64, rng=rng), shape, out / "samples.png",
                           f"{data.name}, Z = {Z_DIM}: samples, mean of p(x|z), z ~ N(0, I)", n_cols=8),
        plots.plot_training_curves(main_run.history, out / "curves.png",
                                   f"{data.name}, Z = {Z_DIM}: nats per image"),
        plots.plot_latent(model.encode(x_test)[0], y_test, out / "latent.png",
                          f"{data.name}, Z = {Z_DIM}: test set, mu of q(z|x)", names=names),
        plots.plot_latent(flat_run.model.encode(x_test)[0], y_test, out / "latent_z2.png",
                          f"{data.name}, Z = 2: test set, mu of q(z|x)", names=names),
        plots.plot_manifold(flat_run.model, shape, out / "manifold.png",
                            title=f"{data.name}, Z = 2: mean of p(x|z) over a grid of prior quantiles"),
    ]

    print(f"\n{'model':8s} {'test ELBO':>10s} {'recon':>9s} {'KL':>7s}   (nats per image)")
    for name, trainer in ((f"Z = {Z_DIM}", main_run), ("Z = 2", flat_run)):
        s = evaluate.elbo_stats(trainer.model, x_test, np.random.default_rng(SEED))
        print(f"{name:8s} {s['elbo']:10.2f} {s['recon']:9.2f} {s['kl']:7.2f}")
    active, _ = evaluate.active_units(model, x_test)
    print(f"active units of the Z = {Z_DIM} model (Var_x mu_j > 0.01): {active} of {Z_DIM}")
    if not args.quick:
        log_px = log_likelihood(model, x_test[:N_LOG_PX], k=K_LOG_PX, rng=np.random.default_rng(SEED))
        print(f"test log p(x) of the Z = {Z_DIM} model, importance sampling with K = {K_LOG_PX} "
              f"on {N_LOG_PX} images: {log_px.mean():.2f} nats")
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
