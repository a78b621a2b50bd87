"""Figures for trained runs (matplotlib is imported here only, with the Agg backend)."""
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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


def save_image_grid(images, shape, path, title="", n_cols=None):
    """Save (N, D) images with values in [0, 1] as a grid PNG."""
    plt = _pyplot()
    grid = tile(np.clip(images, 0, 1), shape, n_cols)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.5))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
