"""The amortization gap: how much ELBO the encoder leaves behind, image by image.

Cremer, Li & Duvenaud (2018) split the distance from the encoder's ELBO to log p(x):

    log p(x) - ELBO(q_encoder) = [ELBO(q*) - ELBO(q_encoder)]   amortization gap: one network for all x
                               + [log p(x) - ELBO(q*)]          approximation gap: q is a diagonal Gaussian

where q* is a Gaussian fitted to each x alone by gradient ascent on its ELBO,
with the decoder fixed (npvae.evaluate.optimize_local). With Z = 2, log p(x) is
exact (quadrature); with more latents it is importance-sampled.

    python demos/amortization.py [--quick] [--out DIR] [--data-dir DIR]
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
from npvae.train import TrainConfig, Trainer

DATASET = "binarized-mnist"
FALLBACK = "shapes"
HIDDEN = (200,)
Z_DIM = 2                        # 1 or 2: exact log p(x); more: importance sampling with K_LOG_PX samples
EPOCHS, N_TRAIN = 10, None       # the full run: ~4 min on 2 cores
QUICK_EPOCHS, QUICK_N_TRAIN = 2, 2000
N_IMAGES, QUICK_N_IMAGES = 100, 20   # test images, evenly spaced (binarized MNIST's test set is sorted by digit)
STEPS, QUICK_STEPS = 500, 100    # gradient steps fitting q* to each image
N_EVAL, QUICK_N_EVAL = 2000, 200     # samples for each ELBO (the same noise for both, so their difference is sharp)
K_LOG_PX = 5000
GRID_N, QUICK_GRID_N = 401, 121
SEED = 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, few epochs, few images (~15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "amortization")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    q = args.quick
    epochs, n_train = (QUICK_EPOCHS, QUICK_N_TRAIN) if q else (EPOCHS, N_TRAIN)
    n_images, steps, n_eval, grid_n = ((QUICK_N_IMAGES, QUICK_STEPS, QUICK_N_EVAL, QUICK_GRID_N) if q
                                       else (N_IMAGES, STEPS, N_EVAL, GRID_N))
    start = time.perf_counter()

    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, n_train=n_train,
                         hidden=HIDDEN, z_dim=Z_DIM, seed=SEED)
    print(f"training on {dataset}: {HIDDEN} hidden, Z = {Z_DIM}, {epochs} epochs")
    trainer = Trainer(config, args.out / "run")
    trainer.run()
    model, data = trainer.model, trainer.data

    index = np.arange(n_images) * (len(data.x_test) // n_images)
    x = datasets.to_float(data.x_test[index], model.dtype)
    t = time.perf_counter()
    exact = Z_DIM <= 2
    log_px = evaluate.exact_log_likelihood(model, x, evaluate.latent_grid(Z_DIM, grid_n)) if exact else None
    rng = np.random.default_rng(SEED)
    gaps = evaluate.amortization_gaps(model, x, k=K_LOG_PX, rng=rng, n_eval=n_eval, steps=steps, log_px=log_px)
    # The same fit again, for its trace, which shows whether STEPS was enough: amortization_gaps
    # starts its fit with the same generator state, so this repeats it step for step.
    trace = evaluate.optimize_local(model, x, steps=steps, rng=np.random.default_rng(SEED), n_eval=None)["trace"]
    mean = gaps["mean"]
    how = f"exact, {grid_n}^2 grid" if exact else f"importance sampling, K = {K_LOG_PX}"
    print(f"\n{n_images} test images ({time.perf_counter() - t:.1f} s), mean over images, nats:")
    for name, key in ((f"log p(x), {how}", "log_px"), ("ELBO, optimized q*", "elbo_optimized"),
                      ("ELBO, encoder's q", "elbo_encoder"), ("amortization gap", "amortization_gap"),
                      ("approximation gap", "approximation_gap"), ("inference gap (the sum)", "inference_gap")):
        print(f"  {name:36s} {mean[key]:9.3f}")
    print(f"  images where q* is worse than the encoder's q: {np.sum(gaps['amortization_gap'] < 0)}")

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), layout="constrained", gridspec_kw={"width_ratios": [1.6, 1]})
    order = np.argsort(gaps["inference_gap"])
    rank = np.arange(n_images)
    ax = axes[0]
    ax.bar(rank, gaps["approximation_gap"][order], width=1.0, color="tab:orange",
           label=f"approximation gap, log p(x) - ELBO(q*): mean {mean['approximation_gap']:.2f}")
    ax.bar(rank, gaps["amortization_gap"][order], width=1.0, bottom=gaps["approximation_gap"][order],
           color="tab:blue", label=f"amortization gap, ELBO(q*) - ELBO(encoder): mean {mean['amortization_gap']:.2f}")
    ax.set_xlabel("test image, sorted by log p(x) - ELBO(encoder)")
    ax.set_ylabel("gap (nats)")
    ax.set_title(f"log p(x) - ELBO per image ({how})")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    ax.plot(np.arange(1, steps + 1), trace, color="tab:blue", lw=1, label="q* during the fit (noisy per-step estimate)")
    ax.axhline(mean["elbo_encoder"], color="grey", ls=":", label="encoder's q")
    ax.axhline(mean["elbo_optimized"], color="tab:blue", ls="--", lw=1, label="q* (averaged iterates)")
    ax.axhline(mean["log_px"], color="black", lw=1.2, label="log p(x)")
    span = mean["log_px"] - mean["elbo_encoder"]
    ax.set_ylim(mean["elbo_encoder"] - 1.5 * span, mean["log_px"] + 0.5 * span)
    ax.set_xlabel("gradient step")
    ax.set_ylabel("mean ELBO over the images (nats)")
    ax.set_title("fitting q* to each image, decoder fixed")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{dataset}, Z = {Z_DIM}: where the encoder's ELBO falls short of log p(x), {n_images} test images")
    paths = [plots.save_figure(fig, args.out / "amortization.png")]
    print("\nwrote", *paths, sep="\n  ")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
