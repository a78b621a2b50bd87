# %% [markdown]
# # A variational autoencoder, step by step
#
# This tutorial tells the story of the VAE in eight steps, each one computed with npvae: the model,
# why its likelihood is hard, two ways to estimate it, the ELBO and its gap, the reparameterization
# and its gradient check, training, the true posterior next to the encoder's guess, and the
# amortization gap. Most steps use a 2-D toy set with a 2-D latent, where log p(x) can be computed
# exactly and everything can be drawn; step 6 also trains on MNIST (or the built-in shapes set).
#
#     python demos/tutorial.py [--quick] [--out DIR] [--data-dir DIR]
#
# It is a plain script in the percent format: `# %%` starts a code cell, `# %% [markdown]` a text
# cell, so Jupyter (with jupytext) and VS Code open it as a notebook. Figures go to `--out`
# (default demos/out/tutorial).

# %%
import os

# One BLAS thread unless told otherwise: OpenBLAS's threads spin while they wait for each other,
# and on 2 cores shared with other work that made the small matrix products here up to 16x slower
# (frey.py --quick: 99 s with two threads, 6 s with one). OPENBLAS_NUM_THREADS=2 overrides this.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import npvae
from npvae import data as datasets
from npvae import distributions as dist
from npvae import evaluate, gradcheck, plots
from npvae.train import TrainConfig, Trainer, prepare_batch

# The toy model (steps 1-5, 7, 8): a Gaussian likelihood with a fixed standard deviation. With a
# learned one the decoder can explain the data as noise and ignore z (the posterior collapses to
# the prior), and there would be little to see.
TOY = "pinwheel"
TOY_HIDDEN = (64, 64)
ACTIVATION = "relu"
X_SIGMA = 0.1
TOY_LR, BATCH = 3e-3, 100
TOY_EPOCHS, QUICK_TOY_EPOCHS = 40, 20          # Trainer's fit in step 1 (45 steps per epoch)
LOOP_STEPS, QUICK_LOOP_STEPS = 800, 300        # the loop written out in step 6
N_TEST, QUICK_N_TEST = 200, 50                 # toy test points scored exactly
EXAMPLES = (0, 1, 2)                           # test points followed through steps 2-4
GRID_N, QUICK_GRID_N = 401, 201                # quadrature points per axis on [-6, 6]^2
DENSITY_N, QUICK_DENSITY_N = 80, 50            # x-plane points per axis for the density picture
KS, QUICK_KS = (1, 10, 100, 1000, 10000), (1, 10, 100, 1000)
REPEATS, QUICK_REPEATS = 50, 20                # independent estimates per K
GAP_STEPS, QUICK_GAP_STEPS = 500, 200          # gradient steps fitting q* to each point (step 8)
N_EVAL, QUICK_N_EVAL = 10000, 2000             # samples for each ELBO in step 8
KL_QUANTILES = (0.5, 0.9, 1.0)                 # step 7 draws the points at these quantiles of the KL
MASS_LEVELS = (0.5, 0.9, 0.99)                 # contours enclose these shares of a density's mass
# The image model (step 6)
IMAGES, FALLBACK = "mnist", "shapes"
IMAGE_HIDDEN, IMAGE_Z = (400,), 20
IMAGE_EPOCHS, IMAGE_N_TRAIN = 5, None          # None: all of the training set
QUICK_IMAGE_EPOCHS, QUICK_IMAGE_N_TRAIN = 2, 10000
SEED = 0

IN_NOTEBOOK = "ipykernel" in sys.modules
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
parser = argparse.ArgumentParser(description="A variational autoencoder, step by step.")
parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (~10 s)")
parser.add_argument("--out", type=Path, default=HERE / "out" / "tutorial")
parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
# A notebook's kernel has its own command line; there, put the options in this list, e.g. ["--quick"].
args = parser.parse_args([] if IN_NOTEBOOK else None)
QUICK, OUT = args.quick, args.out
toy_epochs, loop_steps, n_test = (QUICK_TOY_EPOCHS, QUICK_LOOP_STEPS, QUICK_N_TEST) if QUICK else (
    TOY_EPOCHS, LOOP_STEPS, N_TEST)
grid_n, density_n, ks, repeats = (QUICK_GRID_N, QUICK_DENSITY_N, QUICK_KS, QUICK_REPEATS) if QUICK else (
    GRID_N, DENSITY_N, KS, REPEATS)
gap_steps, n_eval = (QUICK_GAP_STEPS, QUICK_N_EVAL) if QUICK else (GAP_STEPS, N_EVAL)
image_epochs, image_n_train = (QUICK_IMAGE_EPOCHS, QUICK_IMAGE_N_TRAIN) if QUICK else (IMAGE_EPOCHS, IMAGE_N_TRAIN)
start = time.perf_counter()
plt = plots.pyplot()
figures = []


def show(path):
    """Note a written figure; in a notebook, also display it (plots draws off screen, with Agg)."""
    figures.append(path)
    print("wrote", path)
    if IN_NOTEBOOK:
        from IPython.display import Image, display
        display(Image(str(path)))


def save(fig, name):
    show(plots.save_figure(fig, OUT / name))


# %% [markdown]
# ## 1. A latent variable model
#
# A latent variable model explains each data point x by an unseen code z: first z ~ p(z) = N(0, I),
# then x ~ p(x|z). Here z has Z = 2 dimensions, and p(x|z) = N(mean(z), X_SIGMA^2 I), where mean(z)
# is the decoder, a small MLP. The density of x is the continuous mixture
# `p(x) = integral p(x|z) p(z) dz`, one Gaussian blob per z, which can bend into any shape the
# decoder can draw. The data are the 2-D "pinwheel": five curved arms, built into npvae.data.

# %%
toy = datasets.load(TOY, args.data_dir, seed=SEED)
print(toy)

# %% [markdown]
# We fit the model right away with npvae's `Trainer` (with the reference engine: the textbook
# loop), so that the next steps have a model that has learned something; step 6 opens that loop
# up. The encoder `mu, log_sigma = model.encode(x)` gives each x its Gaussian q(z|x), whose means
# are drawn in the middle panel; the right panel draws x from the model, z first, then x given z.

# %%
toy_config = TrainConfig(dataset=TOY, data_dir=args.data_dir, epochs=toy_epochs, batch_size=BATCH,
                         hidden=TOY_HIDDEN, z_dim=2, activation=ACTIVATION, x_sigma=X_SIGMA, lr=TOY_LR,
                         seed=SEED)
toy_trainer = Trainer(toy_config, OUT / "runs" / TOY, quiet=True, engine="reference")
toy_trainer.run()
model = toy_trainer.model
x_test = toy.x_test[:n_test]                                     # (N, 2) float32
print(f"{TOY}: {len(toy_trainer.x_train)} training points, D = {toy.dim}; VAE {TOY_HIDDEN} hidden, Z = 2, "
      f"{toy_epochs} epochs; validation ELBO {toy_trainer.history['valid_elbo'][-1]:.3f} nats")

rng = np.random.default_rng(SEED)
mu_train, _ = model.encode(toy_trainer.x_train)                  # (N, 2)
samples = plots.sample_x(model, 3000, rng)                       # x ~ p(x|z), z ~ p(z)
extent = plots.data_extent(toy.x_train)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
panels = ((toy_trainer.x_train, toy_trainer.y_train, "data x (colour: arm)", "x"),
          (mu_train, toy_trainer.y_train, "the encoder's mu(x), in z space", "z"),
          (samples, None, "samples x ~ p(x|z), z ~ N(0, I)", "x"))
for ax, (points, colour, title, space) in zip(axes, panels):
    colours = {} if colour is None else dict(c=colour[:3000], cmap="tab10", vmin=0, vmax=9)
    ax.scatter(points[:3000, 0], points[:3000, 1], s=2, alpha=0.6, linewidths=0, rasterized=True, **colours)
    if space == "x":
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
    else:
        ax.add_patch(plt.Circle((0, 0), 2.0, fill=False, ls="--", color="grey", label="prior, 2 sigma"))
        ax.legend(loc="upper right", fontsize=7)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel(f"{space}1")
    ax.set_ylabel(f"{space}2")
fig.tight_layout()
save(fig, "1_data.png")

# %% [markdown]
# ## 2. log p(x) is an integral
#
# To score a point we need `log p(x) = log integral p(x|z) p(z) dz`. For a neural decoder the
# integral has no closed form, and a grid over z needs n^Z points: fine for Z = 2, hopeless for
# Z = 20. With Z = 2, `evaluate.exact_log_likelihood` sums p(x|z) p(z) over a grid of `grid_n`^2
# points on [-6, 6]^2 (the trapezoid rule), and `evaluate.quadrature_error_estimate` says how
# far to trust it. This is the truth the estimates below are measured against. The figure shows
# p(x) over the whole plane, one quadrature per pixel.

# %%
grid = evaluate.latent_grid(2, grid_n)
log_px = evaluate.exact_log_likelihood(model, x_test, grid)      # (N,) nats
print(f"a grid of {grid_n} points per axis: {grid_n ** 2:,} points for Z = 2, {float(grid_n) ** 20:.1e} for Z = 20")
print(f"exact log p(x), mean over {n_test} test points: {log_px.mean():.3f} nats")
check = evaluate.quadrature_error_estimate(model, x_test[list(EXAMPLES)], n=grid_n)
print(f"quadrature error on the examples: discretization {check['discretization'].max():.1e}, "
      f"tail {check['tail'].max():.1e} nats; q's mass on the grid {check['q_mass'].min():.6f}")

xx, yy, points = plots.grid_2d(extent, density_n)
log_density = evaluate.exact_log_likelihood(model, points.astype(model.dtype), grid).reshape(xx.shape)
fig, ax = plt.subplots(figsize=(4.6, 4.4))
plots.show_density(ax, xx, yy, log_density, f"p(x) by quadrature ({grid_n}^2 points in z)")
ax.scatter(*x_test[list(EXAMPLES)].T, s=30, facecolors="none", edgecolors="cyan", label="the examples")
ax.legend(loc="upper right", fontsize=7)
save(fig, "2_density.png")

# %% [markdown]
# ## 3. Estimating log p(x) by sampling
#
# Without a grid, p(x) is an average: `p(x) = E_{z ~ p(z)} p(x|z)`, so K prior samples give
# `log 1/K sum_k p(x|z_k)` (`evaluate.log_likelihood_prior`). But p(x|z) is large only where the
# posterior p(z|x) sits, a small patch of the prior, and few prior samples land there.
# Importance sampling draws z_k from the encoder's q(z|x) instead and reweights:
# `log_w = log p(x|z_k) + log p(z_k) - log q(z_k|x)`, `log p(x) ~= logsumexp_k(log_w) - log K`
# (`evaluate.log_likelihood`). Both are low on average (the log of an unbiased estimate) and
# converge as K grows; the one with q needs far fewer samples.

# %%
rng = np.random.default_rng(SEED)
errors = {"prior": [], "q": []}                                  # each: K -> (examples * repeats,)
for k in ks:
    for name, estimator in (("prior", evaluate.log_likelihood_prior), ("q", evaluate.log_likelihood)):
        estimates = [estimator(model, np.repeat(x_test[i:i + 1], repeats, axis=0), k=k, rng=rng) - log_px[i]
                     for i in EXAMPLES]
        errors[name].append(np.concatenate(estimates))
print(f"estimate - exact log p(x), over {len(EXAMPLES)} examples x {repeats} repeats (nats)")
print(f"{'K':>6s} {'prior: mean':>12s} {'sd':>7s} {'q: mean':>9s} {'sd':>7s}")
for j, k in enumerate(ks):
    print(f"{k:6d} {errors['prior'][j].mean():12.3f} {errors['prior'][j].std():7.3f} "
          f"{errors['q'][j].mean():9.4f} {errors['q'][j].std():7.4f}")

fig, ax = plt.subplots(figsize=(6, 4))
for name, colour, label in (("prior", "tab:orange", "z ~ p(z), naive Monte Carlo"),
                            ("q", "tab:blue", "z ~ q(z|x), importance sampling")):
    lo, median, hi = np.percentile(np.array(errors[name]), [10, 50, 90], axis=1)
    ax.fill_between(ks, lo, hi, color=colour, alpha=0.25, lw=0)
    ax.plot(ks, median, "o-", color=colour, ms=3, label=f"{label}: median, 10-90%")
ax.axhline(0, color="black", lw=1, label="exact (quadrature)")
ax.set_xscale("log")
ax.set_ylim(-6, 1)
ax.set_xlabel("K, samples per estimate")
ax.set_ylabel("estimate - exact log p(x) (nats)")
ax.set_title("two estimates of log p(x) against the truth\n(below the frame: see the table)")
ax.legend(loc="lower right")
ax.grid(alpha=0.3)
save(fig, "3_estimators.png")

# %% [markdown]
# ## 4. The ELBO and its gap
#
# Training cannot afford the integral either, so a VAE maximizes a lower bound,
# `elbo = E_q[log p(x|z)] - KL(q(z|x) || p(z))`. What it leaves out is exactly how far q is from
# the true posterior: `log p(x) - elbo = KL(q(z|x) || p(z|x))`, which is never negative, so the
# ELBO is a bound, and it is tight only when q equals p(z|x). With Z = 2 all three numbers can be
# computed on the grid (`evaluate.exact_elbo`, `evaluate.kl_to_posterior`), and they add up.

# %%
elbo = evaluate.exact_elbo(model, x_test, grid)                  # (N,)
kl = evaluate.kl_to_posterior(model, x_test, grid)               # (N,) KL(q(z|x) || p(z|x))
print(f"{'':>12s} {'log p(x)':>9s} {'ELBO':>9s} {'KL(q||p)':>9s} {'log p(x) - ELBO - KL':>21s}")
for i in EXAMPLES:
    print(f"{'test ' + str(i):>12s} {log_px[i]:9.4f} {elbo[i]:9.4f} {kl[i]:9.4f} {log_px[i] - elbo[i] - kl[i]:21.1e}")
print(f"{'mean of ' + str(n_test):>12s} {log_px.mean():9.4f} {elbo.mean():9.4f} {kl.mean():9.4f} "
      f"{np.mean(log_px - elbo - kl):21.1e}")
residual = np.max(np.abs(log_px - elbo - kl))
print(f"largest |log p(x) - ELBO - KL| over the {n_test} points: {residual:.1e} nats (quadrature error only)")
assert residual < 1e-3

# %% [markdown]
# ## 5. The reparameterization, and a gradient check
#
# The ELBO is an expectation over z ~ q(z|x), and to follow its gradient back to the encoder the
# sample is written as a function of the encoder's outputs and fixed noise:
# `z = mu + sigma * eps`, `sigma = exp(log_sigma)`, `eps ~ N(0, I)`
# (`distributions.reparameterize`). Then `dz/dmu = 1` and `dz/dlog_sigma = sigma * eps`
# (`distributions.reparameterize_grad`). First a check of meaning (the samples have mean mu and
# standard deviation exp(log_sigma)), then of the gradients, against central finite differences
# in float64 (`gradcheck.check_entries`): for the reparameterization, and for a whole small VAE's
# loss.

# %%
rng = np.random.default_rng(SEED)
mu = np.array([[0.5, -1.0]])
log_sigma = np.log([[0.3, 2.0]])
z = dist.reparameterize(mu, log_sigma, rng.standard_normal((100_000, 2)))    # (100000, 2)
print(f"z = mu + sigma * eps: sample mean {z.mean(axis=0).round(3)}, mu {mu[0]}; "
      f"sample std {z.std(axis=0).round(3)}, exp(log_sigma) {dist.std(log_sigma)[0]}")

mu, log_sigma, eps = rng.standard_normal((3, 4, 2))              # each (B, Z) = (4, 2)
dz = rng.standard_normal((4, 2))        # a random upstream gradient: all ones could hide a transpose
f = lambda: float(np.sum(dz * dist.reparameterize(mu, log_sigma, eps)))  # noqa: E731
dmu, dlog_sigma = dist.reparameterize_grad(dz, log_sigma, eps)
error = gradcheck.check_entries(f, {"mu": mu, "log_sigma": log_sigma}, {"mu": dmu, "log_sigma": dlog_sigma})
print("reparameterize_grad, relative error:", {name: f"{e:.1e}" for name, e in error.items()})
assert max(error.values()) <= gradcheck.TOLERANCE

# tanh rather than ReLU: a smooth network gives the finite differences no kink to straddle
small = npvae.VAE(2, hidden=(8,), z_dim=2, likelihood="gaussian", activation="tanh", x_sigma=X_SIGMA,
                  dtype=np.float64, seed=SEED)
x, eps = x_test[:4].astype(np.float64), rng.standard_normal((4, 2))   # fixed eps: the loss is a function
_, grads = small.loss_and_grads(x, eps=eps, copy=True)
error = gradcheck.check_entries(lambda: -np.mean(small.elbo(x, eps=eps)), small.params, grads)
worst = max(error, key=error.get)
print(f"a float64 VAE's loss_and_grads, {small.n_params} parameters in {len(error)} arrays: "
      f"largest relative error {error[worst]:.1e} ({worst}); tolerance {gradcheck.TOLERANCE:g}")
assert error[worst] <= gradcheck.TOLERANCE

# %% [markdown]
# ## 6. Training
#
# Training is stochastic gradient ascent on the ELBO: draw a minibatch, draw eps, compute
# `loss = -mean(elbo)` and its gradient by the hand-written backward pass, and let Adam update the
# parameters in place. This is the whole loop, the one `Trainer` ran in step 1 (its reference
# engine is `train.reference_step`); here it trains a fresh copy of the toy model. The loss is
# noisy because every step draws new data and new noise.

# %%
def train_loop(model, opt, x_train, steps, rng):
    """The README's loop on minibatches of x_train (N, D); returns the loss of every step (steps,)."""
    losses = np.empty(steps)
    for step in range(steps):
        x = x_train[rng.integers(len(x_train), size=BATCH)]      # (B, D)
        loss, grads = model.loss_and_grads(x, rng=rng)
        opt.step(grads)
        losses[step] = loss
    return losses


loop_model = npvae.VAE(2, hidden=TOY_HIDDEN, z_dim=2, likelihood="gaussian", activation=ACTIVATION,
                       x_sigma=X_SIGMA, seed=SEED)
x_train = toy_trainer.x_train
losses = train_loop(loop_model, npvae.Adam(loop_model.params, lr=TOY_LR), x_train, loop_steps,
                    np.random.default_rng(SEED))
loop_elbo = evaluate.exact_elbo(loop_model, x_test, grid).mean()
print(f"{loop_steps} steps: test ELBO {loop_elbo:.3f} nats; the model of step 1 "
      f"({toy_epochs * -(-len(x_train) // BATCH)} steps): {elbo.mean():.3f}")

fig, ax = plt.subplots(figsize=(6, 3.8))
ax.plot(np.arange(1, loop_steps + 1), losses, color="tab:blue", lw=0.5, alpha=0.5, label="loss per step")
window = 25
ax.plot(np.arange(window, loop_steps + 1), np.convolve(losses, np.ones(window) / window, mode="valid"),
        color="tab:blue", lw=1.5, label=f"mean of {window} steps")
ax.axhline(-elbo.mean(), color="black", ls="--", lw=1, label="-ELBO of the model of step 1 (test, exact)")
ax.set_ylim(np.percentile(losses, 1) - 0.5, np.percentile(losses, 90))
ax.set_xlabel("step")
ax.set_ylabel("loss = -mean(elbo) (nats)")
ax.set_title(f"{TOY}: the training loop written out")
ax.legend(loc="upper right")
ax.grid(alpha=0.3)
save(fig, "6_loss.png")

# %% [markdown]
# The same model with a Bernoulli likelihood, `log p(x|z) = sum(x * logits - softplus(logits))`,
# trains on images. `Trainer` runs the same loop on npvae's fast engine, with minibatches drawn
# from shuffled epochs and the grey images binarized afresh for each minibatch. Without MNIST it
# uses the built-in shapes set. Samples decode z ~ N(0, I); reconstructions decode z = mu(x).

# %%
images = datasets.name_or_fallback(IMAGES, FALLBACK, args.data_dir)
image_config = TrainConfig(dataset=images, data_dir=args.data_dir, epochs=image_epochs, n_train=image_n_train,
                           n_valid=1000 if image_n_train else None, hidden=IMAGE_HIDDEN, z_dim=IMAGE_Z, seed=SEED)
print(f"training on {images}: {IMAGE_HIDDEN} hidden, Z = {IMAGE_Z}, {image_epochs} epochs")
image_trainer = Trainer(image_config, OUT / "runs" / images)
image_trainer.run()
image_model, image_data = image_trainer.model, image_trainer.data
rng = np.random.default_rng(SEED)
# the test images binarized once, as the model sees them
x_images = prepare_batch(image_data.x_test[:1000], image_config, image_model.likelihood, image_data.kind,
                         image_model.dtype, rng)
stats = evaluate.elbo_stats(image_model, x_images, rng)
print(f"{images}, {stats['n']} test images: ELBO {stats['elbo']:.1f} = log p(x|z) {stats['recon']:.1f} "
      f"- KL {stats['kl']:.1f} nats")
shape = image_data.image_shape
show(plots.plot_samples(image_model.sample(64, rng=rng), shape, OUT / "6_samples.png",
                        f"{images}, Z = {IMAGE_Z}: samples, mean of p(x|z), z ~ N(0, I)", n_cols=8))
show(plots.plot_reconstructions(x_images[:32], image_model.reconstruct(x_images[:32]), shape,
                                OUT / "6_reconstructions.png", f"{images}, Z = {IMAGE_Z}: test images and "
                                "their reconstructions"))

# %% [markdown]
# ## 7. The true posterior next to q
#
# With Z = 2 the posterior `p(z|x) = p(x|z) p(z) / p(x)` can be drawn
# (`evaluate.exact_posterior`), next to the encoder's `q(z|x) = N(mu, diag(sigma^2))`. The
# panels are the toy test points whose KL(q || p(z|x)) from step 4 is typical, high, and the
# highest. A diagonal Gaussian cannot follow a posterior that is tilted, curved or split in two,
# and the encoder, one network shared by all x, may also put q off-centre or make it too wide.

# %%
def mass_thresholds(log_density, levels):
    """Density values whose upper level sets hold each share in levels of a gridded density's mass."""
    p = np.sort(np.exp(log_density).ravel())[::-1]
    cumulative = np.cumsum(p) / p.sum()
    return sorted(p[np.searchsorted(cumulative, level)] for level in levels)


order = np.argsort(kl)
picks = [order[min(int(round(f * (len(kl) - 1))), len(kl) - 1)] for f in KL_QUANTILES]
fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 3.9))
for ax, i, f in zip(axes, picks, KL_QUANTILES):
    axes_z, log_post = evaluate.exact_posterior(model, x_test[i], grid)      # (n, n), axis 0 is z1
    mu, log_sigma = model.encode(x_test[i:i + 1])
    log_q = dist.gaussian_log_prob(grid.z, mu.astype(np.float64), log_sigma.astype(np.float64)).reshape(grid.shape)
    zz1, zz2 = np.meshgrid(*axes_z, indexing="ij")
    ax.contourf(zz1, zz2, np.exp(log_post), levels=mass_thresholds(log_post, MASS_LEVELS) + [np.exp(log_post).max()],
                cmap="Blues", alpha=0.9)
    ax.contour(zz1, zz2, np.exp(log_q), levels=mass_thresholds(log_q, MASS_LEVELS), colors="crimson", linewidths=1.2)
    # zoom in: the posterior covers a small patch of the [-6, 6]^2 grid
    inside = (log_post > log_post.max() - 9) | (log_q > log_q.max() - 9)
    centre = (np.array([zz1[inside].min(), zz2[inside].min()]) + [zz1[inside].max(), zz2[inside].max()]) / 2
    half = 0.7 * max(np.ptp(zz1[inside]), np.ptp(zz2[inside]))
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"test point {i}: KL(q || p(z|x)) = {kl[i]:.3f}\n({f:.0%} quantile of {n_test})", fontsize=9)
    inset = ax.inset_axes([0.0, 0.75, 0.25, 0.25])           # where x is, in data space
    inset.scatter(*toy_trainer.x_train[:1000].T, s=0.5, color="grey", rasterized=True)
    inset.scatter(*x_test[i], s=12, color="crimson")
    inset.set_xticks([])
    inset.set_yticks([])
axes[0].plot([], [], color="steelblue", lw=6, label="p(z|x), exact")
axes[0].plot([], [], color="crimson", lw=1.2, label="q(z|x), encoder")
axes[0].legend(loc="lower right", fontsize=7, framealpha=0.8)
fig.suptitle(f"{TOY}, Z = 2: the true posterior and q, contours at "
             f"{', '.join(f'{m:.0%}' for m in MASS_LEVELS)} of the mass")
fig.tight_layout()
save(fig, "7_posterior.png")

# %% [markdown]
# ## 8. The amortization gap
#
# The gap log p(x) - ELBO has two causes (Cremer, Li & Duvenaud 2018). The encoder is one network
# for all x, so its q for a given x need not be the best Gaussian for that x: fitting a q* to each
# x alone, by gradient ascent on its ELBO with the decoder fixed (`evaluate.optimize_local`),
# gives the *amortization gap* `ELBO(q*) - ELBO(q_encoder)`. What remains,
# `log p(x) - ELBO(q*)`, is the *approximation gap*: no diagonal Gaussian can do better.
# `evaluate.amortization_gaps` computes both, here with the exact log p(x) of step 2. The two
# ELBOs are Monte Carlo estimates with the same `n_eval` draws of noise, so where q* is nearly the
# posterior the approximation gap can come out a hair below 0.

# %%
gaps = evaluate.amortization_gaps(model, x_test, rng=np.random.default_rng(SEED), n_eval=n_eval,
                                  steps=gap_steps, log_px=log_px)
print(f"{'':>16s} {'log p(x)':>9s} {'ELBO(q*)':>9s} {'ELBO(enc)':>10s} {'amortization':>13s} {'approximation':>14s}")
rows = [(f"test point {i}", {key: gaps[key][i] for key in gaps if key != "mean"}) for i in picks]
for name, g in rows + [(f"mean of {n_test}", gaps["mean"])]:
    print(f"{name:>16s} {g['log_px']:9.3f} {g['elbo_optimized']:9.3f} {g['elbo_encoder']:10.3f} "
          f"{g['amortization_gap']:13.3f} {g['approximation_gap']:14.3f}")
share = gaps["mean"]["amortization_gap"] / gaps["mean"]["inference_gap"]
print(f"the encoder's share of the gap: {share:.0%}. The rest is the price of a diagonal Gaussian q.")

# %% [markdown]
# A large amortization gap says the encoder is the weak part (a bigger encoder, or a few steps of
# per-example refinement, would help); a large approximation gap says the family of q is
# (a richer q, or importance weighting as in step 3, would help).

# %%
print("\nfigures:", *figures, sep="\n  ")
print(f"done in {time.perf_counter() - start:.1f} s")
