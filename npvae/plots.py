"""Figures for trained runs and for the demos (matplotlib is imported here only, with the Agg backend).

Each figure has its own function, which takes arrays or a model and a path and
returns the path, so demos can reuse it; `plot_run` draws the standard set for
a run directory:

    reconstructions.png  test images next to their reconstructions, the mean of p(x|z = mu(x))   (images)
    samples.png          the mean of p(x|z) for z ~ N(0, I)                                       (images)
    curves.png           ELBO, reconstruction term and KL per epoch, training and validation
    latent.png           the test set's mu in latent space, coloured by label                     (labels)
    manifold.png         decoded means over a grid of prior quantiles                             (Z = 2, images)
    density.png          the model's density and samples next to the data                         (2-D data)

Values are in nats per example, as everywhere in npvae.
"""
import warnings
from pathlib import Path

import numpy as np

DPI = 100
FONT_SIZE = 9
# Names for the labels of the datasets that have them, so legends say "7", "Sneaker" or "disc".
LABEL_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "binarized-mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "shapes": ["square", "disc", "triangle", "cross"],
}


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display) and this module's font sizes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1,
                         "axes.labelsize": FONT_SIZE, "legend.fontsize": FONT_SIZE - 1})
    return plt


def save_figure(fig, path):
    """Write fig as a compact PNG at DPI, close it, return the path.

    matplotlib writes 8-bit RGBA; a figure of grey images is stored as one grey
    channel instead, and any other as a 256-colour palette, which halves the
    file or better. Pillow, which does the conversion, is a dependency of
    matplotlib; without it the RGBA file is kept.
    """
    import io
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    try:
        from PIL import Image
    except ImportError:
        path.write_bytes(buffer.getvalue())
        return path
    image = Image.open(buffer).convert("RGB")
    rgb = np.asarray(image)
    grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    (image.convert("L") if grey else image.quantize(256)).save(path, optimize=True)
    return path


# --- images ------------------------------------------------------------------------------

def tile(images, shape, n_cols=None):
    """(N, D) images of shape (rows, cols) -> one (R * rows, C * cols) mosaic with 1-pixel gaps."""
    images = np.asarray(images, dtype=np.float64).reshape((-1,) + tuple(shape))
    n = images.shape[0]
    n_cols = n_cols or int(np.ceil(np.sqrt(n)))
    n_rows = int(np.ceil(n / n_cols))
    h, w = shape
    grid = np.ones((n_rows * (h + 1) - 1, n_cols * (w + 1) - 1))
    for i in range(n):
        r, c = divmod(i, n_cols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[i]
    return grid


def show_tiles(ax, images, shape, title="", n_cols=None):
    """Draw (N, D) images in [0, 1] as one mosaic on ax, without axes."""
    ax.imshow(tile(np.clip(images, 0, 1), shape, n_cols), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def save_image_grid(images, shape, path, title="", n_cols=None):
    """Save (N, D) images with values in [0, 1] as a grid PNG."""
    plt = pyplot()
    grid = tile(np.clip(images, 0, 1), shape, n_cols)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.5))
    show_tiles(ax, images, shape, title, n_cols)
    return save_figure(fig, path)


def plot_reconstructions(x, x_rec, shape, path, title="test images and their reconstructions", n_cols=8):
    """Inputs x (N, D) and reconstructions x_rec (N, D) side by side, image i in the same place in both."""
    plt = pyplot()
    rows = int(np.ceil(len(x) / n_cols))
    h, w = shape
    fig, axes = plt.subplots(1, 2, figsize=(8, 4 * rows * (h + 1) / (n_cols * (w + 1)) + 0.7))
    show_tiles(axes[0], x, shape, "input x", n_cols)
    show_tiles(axes[1], x_rec, shape, "reconstruction: mean of p(x | z = mu(x))", n_cols)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_samples(images, shape, path, title="samples: mean of p(x|z), z ~ N(0, I)", n_cols=None):
    """Images drawn from the model, (N, D) in [0, 1]."""
    return save_image_grid(images, shape, path, title, n_cols)


def manifold(model, n=20, lo=0.03, hi=0.97):
    """(z values (n,), decoded means (n * n, D)) over the grid z = Phi^-1(quantiles) of a Z = 2 model.

    Equal steps in quantile rather than in z give each image an equal share of the
    prior's mass, so the grid spends its rows where the codes actually are. Row i,
    column j of the returned images (row-major) has z = (z[j], z[n - 1 - i]): the
    second coordinate grows upwards, as on a plot.
    """
    from scipy.special import ndtri      # Phi^-1, scipy.stats.norm.ppf without importing scipy.stats (~1 s)
    if model.z_dim != 2:
        raise ValueError(f"the manifold is drawn for Z = 2, the model has Z = {model.z_dim}")
    z1 = ndtri(np.linspace(lo, hi, n))
    zz1, zz2 = np.meshgrid(z1, z1[::-1])                                       # (n, n) each
    z = np.stack([zz1.ravel(), zz2.ravel()], axis=1).astype(model.dtype)       # (n * n, 2)
    return z1, model.mean_px_z(model.decode(z))


def plot_manifold(model, shape, path, n=20, title="decoded means over a grid of prior quantiles"):
    """The Z = 2 manifold: the mean of p(x|z) on an n x n grid, axes in z."""
    plt = pyplot()
    z1, images = manifold(model, n)
    h, w = shape
    grid = tile(np.clip(images, 0, 1), shape, n)
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    # about five ticks per axis, each at the centre of an image and labelled with its z
    ticks = np.arange(0, n, max(1, n // 5))
    ax.set_xticks(ticks * (w + 1) + (w - 1) / 2, [f"{v:.1f}" for v in z1[ticks]])
    ax.set_yticks(ticks * (h + 1) + (h - 1) / 2, [f"{v:.1f}" for v in z1[::-1][ticks]])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title)
    return save_figure(fig, path)


# --- training ------------------------------------------------------------------------------

def plot_training_curves(history, path, title="training curves"):
    """ELBO, reconstruction log p(x|z) and KL per epoch, training and validation, from a run's history."""
    plt = pyplot()
    epoch = np.asarray(history["epoch"])
    marker = "o" if len(epoch) <= 12 else None     # a line through 1-3 points is easy to miss
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = [("elbo", "ELBO (nats)"), ("recon", "E_q log p(x|z) (nats)"), ("kl", "KL(q(z|x) || p(z)) (nats)")]
    for ax, (key, label) in zip(axes, panels):
        series = [np.asarray(history[split + key], dtype=np.float64) for split in ("train_", "valid_")]
        ax.plot(epoch, series[0], marker=marker, ms=3, label="training")
        ax.plot(epoch, series[1], marker=marker, ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        _zoom_past_first_epochs(ax, series)
    beta = np.asarray(history.get("beta", []))
    if beta.size and beta.min() < beta.max():
        # The ELBO dips while the KL weight rises: mark where the warm-up ends.
        end = epoch[int(np.argmax(beta >= beta.max()))]
        for ax in axes:
            ax.axvline(end, color="grey", ls=":", lw=1)
        axes[2].text(end, axes[2].get_ylim()[0], " end of KL warm-up", color="grey", fontsize=7,
                     va="bottom")
    axes[0].legend()
    axes[0].set_title("ELBO")
    axes[1].set_title("reconstruction term")
    axes[2].set_title("KL term")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _zoom_past_first_epochs(ax, series):
    """Fit the y-axis to the epochs after the first tenth when the first ones are far off that range.

    The first epoch's average includes the untrained model (thousands of nats
    below the end for a learned-variance decoder), and would flatten the rest.
    """
    skip = max(1, len(series[0]) // 10)
    if len(series[0]) < 4:
        return
    rest = np.concatenate([s[skip:] for s in series])
    lo, hi = rest.min(), rest.max()
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    first = np.concatenate([s[:skip] for s in series])
    if first.min() < lo - 3 * pad or first.max() > hi + 3 * pad:
        ax.set_ylim(lo - pad, hi + pad)
        ax.text(0.98, 0.02, "first epochs off scale", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="grey")


# --- latent space ------------------------------------------------------------------------------

def latent_2d(mu):
    """mu (N, Z) -> (points (N, 2), axis labels): the first two dimensions, or a 2-D PCA when Z > 2."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape[1] == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))]), ("mu_1", "")
    if mu.shape[1] == 2:
        return mu, ("mu_1", "mu_2")
    centred = mu - mu.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = s[:2] ** 2 / np.sum(s ** 2)
    return centred @ vt[:2].T, (f"PC 1 of mu ({share[0]:.0%} of variance)",
                                f"PC 2 of mu ({share[1]:.0%} of variance)")


def plot_latent(mu, labels, path, title="test set in latent space", names=None, max_points=5000):
    """Scatter of mu (N, Z) coloured by integer labels (N,); names[label] for the legend."""
    plt = pyplot()
    mu, labels = np.asarray(mu), np.asarray(labels)
    if len(mu) > max_points:
        # a fixed subset: 10k overlapping dots say no more than 5k, at twice the file size
        keep = np.random.default_rng(0).choice(len(mu), max_points, replace=False)
        mu, labels = mu[keep], labels[keep]
    points, (xlabel, ylabel) = latent_2d(mu)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    for i, c in enumerate(classes):
        sel = labels == c
        name = names[c] if names is not None and 0 <= c < len(names) else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=name,
                   linewidths=0, rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


# --- 2-D data ------------------------------------------------------------------------------------

def sample_x(model, n, rng):
    """(n, D) draws x ~ p(x|z), z ~ N(0, I): with the likelihood's noise, not just its mean."""
    z = rng.standard_normal((n, model.z_dim)).astype(model.dtype)
    out = model.decode(z)
    if model.likelihood == "bernoulli":
        return (rng.random((n, model.x_dim)) < model.mean_px_z(out)).astype(model.dtype)
    from .distributions import std
    mean, log_sigma = out
    return mean + std(log_sigma) * rng.standard_normal(mean.shape).astype(model.dtype)


def grid_2d(extent, n=100):
    """(xx, yy) each (n, n), and the points (n * n, 2) of a grid over extent = (x0, x1, y0, y1)."""
    xx, yy = np.meshgrid(np.linspace(extent[0], extent[1], n), np.linspace(extent[2], extent[3], n))
    return xx, yy, np.column_stack([xx.ravel(), yy.ravel()])


def data_extent(x, margin=0.15):
    """(x0, x1, y0, y1) around 2-D points, with a margin of the larger range, square."""
    lo, hi = np.percentile(x, 0.5, axis=0), np.percentile(x, 99.5, axis=0)
    centre, half = (lo + hi) / 2, (1 + 2 * margin) * np.max(hi - lo) / 2
    return (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)


def vae_log_density(model, points, k=500, rng=None):
    """points (N, 2) -> (N,) log p(x) of a VAE by importance sampling with k samples (npvae.evaluate)."""
    from .evaluate import log_likelihood
    return log_likelihood(model, points.astype(model.dtype), k=k, rng=rng)


def show_density(ax, xx, yy, log_p, title):
    """A density exp(log_p) (n, n) as an image on a linear scale, shared by every panel that calls it.

    The colour scale tops out at the 99.7th percentile rather than the maximum: an
    importance-sampled density has a few grid points where one lucky sample
    overshoots, and scaling to those would leave the rest of the picture dark.
    """
    p = np.exp(log_p - np.max(log_p))
    ax.imshow(p, origin="lower", extent=(xx.min(), xx.max(), yy.min(), yy.max()), cmap="magma",
              vmin=0, vmax=np.percentile(p, 99.7), interpolation="bilinear", aspect="equal")
    ax.set_title(title)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")


def plot_density_2d(model, x_data, path, title="model vs data", k=300, n_grid=80, n_samples=2000, rng=None):
    """Three panels for 2-D data: the data, samples x ~ p(x), and the model's density (importance-sampled)."""
    plt = pyplot()
    rng = np.random.default_rng(0) if rng is None else rng
    x_data = np.asarray(x_data, dtype=np.float64)
    extent = data_extent(x_data)
    xx, yy, points = grid_2d(extent, n_grid)
    log_p = vae_log_density(model, points, k=k, rng=rng).reshape(xx.shape)
    samples = sample_x(model, n_samples, rng)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, pts, name in ((axes[0], x_data[:n_samples], "data"), (axes[1], samples, "samples x ~ p(x)")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0, rasterized=True)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    show_density(axes[2], xx, yy, log_p, f"density p(x), importance sampling (K = {k})")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


# --- a run directory ---------------------------------------------------------------------------------

def _test_inputs(run_config, data_dir, n, rng):
    """(x (n, D) as the model sees it, labels or None, dataset name) from the run's test split."""
    from . import data as datasets
    from .engine.binarize import make_prepare
    from .train import TrainConfig
    train = TrainConfig.from_dict(run_config["train"])
    data = datasets.load(train.dataset, data_dir if data_dir is not None else train.data_dir, seed=train.seed)
    x, y = data.x_test, data.y_test
    if x.shape[0] == 0:
        # a user's .npy has no test split: its last rows stand in
        x, y = data.x_train[-n:], None if data.y_train is None else data.y_train[-n:]
    likelihood = run_config["model"]["likelihood"]
    prepare = make_prepare(train.binarize, train.threshold, likelihood, data.kind, np.dtype(train.dtype))
    return prepare(np.asarray(x[:n]), rng), None if y is None else np.asarray(y[:n]), data.name


def plot_run(run, out=None, data_dir=None, which="best"):
    """Draw the standard figures of a run directory into out (default RUN/plots); returns their paths.

    Figures that need the data (reconstructions, latent space, 2-D density) are
    skipped with a warning when the dataset cannot be found.
    """
    from . import checkpoint as ckpt
    run = Path(run)
    model = ckpt.load(run, which)
    config = ckpt.read_json(run / ckpt.CONFIG)
    out = run / "plots" if out is None else Path(out)
    shape = config["data"].get("image_shape")
    name = config["data"].get("name", run.name)
    rng = np.random.default_rng(0)
    paths = []

    if shape:
        paths.append(plot_samples(model.sample(64, rng=rng), shape, out / "samples.png",
                                  f"{name}: samples, mean of p(x|z), z ~ N(0, I)", n_cols=8))
        if model.z_dim == 2 and not hasattr(model, "layers"):
            paths.append(plot_manifold(model, shape, out / "manifold.png",
                                       title=f"{name}: decoded means over a grid of prior quantiles"))
    history = ckpt.history_of(ckpt.read_state(run / ckpt.LATEST))
    if history.get("epoch"):
        paths.append(plot_training_curves(history, out / "curves.png", f"{name}: training curves"))

    try:
        x, y, data_name = _test_inputs(config, data_dir, 5000, rng)
    except (FileNotFoundError, ValueError) as e:
        warnings.warn(f"plot_run: no data for the data-dependent figures ({e})", stacklevel=2)
        return paths
    if shape:
        paths.append(plot_reconstructions(x[:32], model.reconstruct(x[:32]), shape,
                                          out / "reconstructions.png",
                                          f"{name}: test images and their reconstructions"))
    if y is not None:
        # a HierarchicalVAE's encode gives every layer's (mu, log_sigma): z_1's mu is drawn
        mu = np.concatenate([model._encode(model._as_x(x[i:i + 1000]))[0] for i in range(0, len(x), 1000)])
        paths.append(plot_latent(mu, y, out / "latent.png", f"{name}: test set in latent space (mu of q(z|x))",
                                 names=LABEL_NAMES.get(data_name)))
    if model.x_dim == 2 and model.likelihood == "gaussian":
        paths.append(plot_density_2d(model, x, out / "density.png", f"{name}: data, samples and density", rng=rng))
    return paths
