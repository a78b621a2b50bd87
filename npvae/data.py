"""Datasets for the VAE: real image sets read from disk, and small sets generated from a seed.

Where files are looked for
    `resolve_data_dir` picks the folder: the `data_dir` argument, else the environment variable
    NPVAE_DATA, else DEFAULT_DATA_DIR (~/.npvae/data). Inside it, each loader accepts the layouts
    people already have, and takes the first folder that holds every file it needs:
      mnist            mnist/, the folder itself, MNIST/raw/ (torchvision): the four IDX files, each
                       plain or .gz (.gz wins when both exist, since only it has a published hash);
                       then Keras' mnist.npz in the folder itself or in mnist/
      fashion-mnist    fashion-mnist/, the folder itself, FashionMNIST/raw/ (torchvision): IDX files
      binarized-mnist  binarized-mnist/, the folder itself: binarized_mnist_{train,valid,test}.amat[.gz]
      frey             frey/, the folder itself: frey_rawface.mat
    Nothing is downloaded. A missing set raises FileNotFoundError naming the folders and files.

What is stored, and how to turn it into model input
    Grey images (mnist, fashion-mnist) stay uint8 0..255, 47 MB for MNIST's training set instead of
    188 MB as float32. Binary images (binarized-mnist, shapes) are bool, also one byte per pixel.
    The dtype carries the meaning, so `to_float(batch)` is right for every set: uint8 is read as grey
    levels k/255, bool and other numbers keep their value. (Binary data is bool rather than uint8 0/1
    because uint8 0/1 would come out of to_float as 0 and 1/255.) Arrays read from IDX files are
    read-only views of the file's bytes. A Bernoulli model then draws a fresh binarization of grey
    batches with `binarize` (Burda et al. 2015); `Dataset.kind` says whether that is needed.

Checksum policy
    KNOWN_SHA256 holds the published sha256, keyed by (dataset, file name), of the files as they are
    distributed (the .gz files in /work/shared/data/SHA256SUMS, frey_rawface.mat, Keras' mnist.npz,
    and Larochelle's uncompressed .amat files). Whenever a loader reads a file whose name is known,
    it hashes it (streamed in 1 MiB chunks; about 0.1 s for 26 MB). On a mismatch it warns with a
    ChecksumWarning naming the file and both hashes, and still loads it, because every content
    check (header, sizes, value ranges) still applies; with strict=True (default: the module
    constant STRICT_CHECKSUMS) it raises ValueError instead. A file whose hash is the published hash
    of another dataset's file (Fashion-MNIST sitting where MNIST was expected) is always an error.

Fixed splits
    frey has no test split: the last 10% of its frames (1769 train / 196 test) are held out.
    The frames are consecutive video frames, so neighbours are near-duplicates and a random split
    would leak test frames into training; the tail split does not.
    A user's .npy has no test split either: x_test is an empty (0, D) array of the same dtype.
    `split_validation` holds out a seeded random validation set, or returns the predefined one.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = Path("~/.npvae/data")
DATA_ENV_VAR = "NPVAE_DATA"
STRICT_CHECKSUMS = False

DATASETS = ("mnist", "fashion-mnist", "binarized-mnist", "frey", "shapes", "pinwheel", "moons", "ring")
KINDS = ("grey", "binary", "real")
LIKELIHOODS = ("bernoulli", "gaussian")
SHAPE_KINDS = ("square", "disc", "triangle", "cross")

# Larochelle's text files have no header, so their row counts can only be checked against these.
BINARIZED_MNIST_ROWS = {"train": 50000, "valid": 10000, "test": 10000}
FREY_SHAPE = (560, 1965)  # (pixels, frames): one 28x20 image per column
FREY_IMAGE_SHAPE = (28, 20)
# (n_train, n_test) drawn from one seeded stream by load(); the test part is simply its tail.
BUILTIN_SIZES = {"shapes": (60000, 10000), "pinwheel": (5000, 1000), "moons": (5000, 1000), "ring": (5000, 1000)}

KNOWN_SHA256 = {
    ("mnist", "train-images-idx3-ubyte.gz"): "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ("mnist", "train-labels-idx1-ubyte.gz"): "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    # the file_hash Keras' mnist.py passes to get_file for its mnist.npz
    ("mnist", "mnist.npz"): "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ("binarized-mnist", "binarized_mnist_train.amat.gz"): "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
    ("binarized-mnist", "binarized_mnist_valid.amat.gz"): "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
    ("binarized-mnist", "binarized_mnist_test.amat.gz"): "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
    # Larochelle's original uncompressed files, as recorded by TensorFlow Datasets
    ("binarized-mnist", "binarized_mnist_train.amat"): "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    ("binarized-mnist", "binarized_mnist_valid.amat"): "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    ("binarized-mnist", "binarized_mnist_test.amat"): "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    ("frey", "frey_rawface.mat"): "265a83a23adb081755cd3de375509828e690324d1d60f076b8ecebc840d59c64",
}


class ChecksumWarning(UserWarning):
    """A data file's sha256 differs from the published one."""


@dataclasses.dataclass(eq=False, repr=False)
class Dataset:
    """A train/test split of (N, D) arrays, with what a model needs to know about the values."""

    name: str
    x_train: np.ndarray  # (N_train, D)
    x_test: np.ndarray  # (N_test, D)
    y_train: np.ndarray | None = None  # (N_train,) int64
    y_test: np.ndarray | None = None  # (N_test,) int64
    x_valid: np.ndarray | None = None  # (N_valid, D), only where the dataset defines a validation split
    y_valid: np.ndarray | None = None  # (N_valid,) int64
    image_shape: tuple | None = None  # (rows, cols) with rows * cols == D, or None for non-images
    kind: str = "real"  # "grey", "binary" or "real": see KINDS
    likelihood: str | None = None  # default decoder likelihood; None picks it from kind
    factors: dict | None = None  # name -> (N_train,) generating factors (shapes only)

    def __post_init__(self):
        """Check that the fields agree, so no loader can hand out mismatched shapes."""
        if self.kind not in KINDS:
            raise ValueError(f"Dataset {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.likelihood is None:
            # grey levels are treated as Bernoulli probabilities (after binarize); only real values need a Gaussian
            self.likelihood = "gaussian" if self.kind == "real" else "bernoulli"
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"Dataset {self.name!r}: likelihood {self.likelihood!r} is not one of {LIKELIHOODS}")
        for split in ("train", "test", "valid"):
            x, y = getattr(self, "x_" + split), getattr(self, "y_" + split)
            if x is None:
                if split != "valid":
                    raise ValueError(f"Dataset {self.name!r}: x_{split} is required")
                if y is not None:
                    raise ValueError(f"Dataset {self.name!r}: y_valid given without x_valid")
                continue
            if not isinstance(x, np.ndarray) or x.ndim != 2:
                raise ValueError(f"Dataset {self.name!r}: x_{split} must be a 2-D (N, D) array, got {_describe(x)}")
            if x.shape[1] != self.x_train.shape[1]:
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} has D={x.shape[1]}, x_train has D={self.x_train.shape[1]}"
                )
            if y is not None and (not isinstance(y, np.ndarray) or y.shape != (x.shape[0],)):
                raise ValueError(
                    f"Dataset {self.name!r}: y_{split} must have shape ({x.shape[0]},), got {_describe(y)}"
                )
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)
            if int(np.prod(self.image_shape)) != self.dim:
                raise ValueError(
                    f"Dataset {self.name!r}: image_shape {self.image_shape} does not hold D={self.dim} values"
                )
        for key, value in (self.factors or {}).items():
            if np.shape(value) != (self.x_train.shape[0],):
                raise ValueError(f"Dataset {self.name!r}: factor {key!r} must have shape ({self.x_train.shape[0]},)")

    @property
    def dim(self):
        """D, the number of values per example."""
        return self.x_train.shape[1]

    def __repr__(self):
        parts = [f"name={self.name!r}", f"kind={self.kind!r}", f"likelihood={self.likelihood!r}"]
        for field in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"):
            value = getattr(self, field)
            if value is not None:
                parts.append(f"{field}={value.shape} {value.dtype}")
        if self.image_shape is not None:
            parts.append(f"image_shape={self.image_shape}")
        if self.factors is not None:
            parts.append(f"factors={sorted(self.factors)}")
        return f"Dataset({', '.join(parts)})"


def _describe(a):
    """A short description of a value for error messages."""
    if isinstance(a, np.ndarray):
        return f"shape {a.shape} dtype {a.dtype}"
    return type(a).__name__


# ---------------------------------------------------------------------------------------------
# From stored values to model input


def to_float(x, dtype=np.float32):
    """Values in model units: x (B, D) uint8/bool/int/float -> (B, D) dtype; uint8 means grey levels k/255."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"to_float expects a numpy array, got {type(x).__name__}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"to_float needs a floating dtype, got {dtype}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"to_float expects numbers, got dtype {x.dtype}")
    if x.dtype == np.uint8:
        # division rather than x * (1/255) rounds each k/255 correctly, so 255 maps to exactly 1.0
        return np.divide(x, dtype.type(255), dtype=dtype)
    if isinstance(x, np.memmap):
        # a cast with copy=False could hand back a view of the file; the batch must live in memory
        return np.array(x, dtype=dtype)
    return x.astype(dtype, copy=False)


def binarize(x, rng=None, threshold=None):
    """Binary x: x (B, D) float in [0, 1] -> (B, D) same dtype: Bernoulli(x) draws from rng, or x > threshold.

    A fresh draw for every minibatch is dynamic binarization: the model never
    sees the same binary image twice, which stops it overfitting one fixed
    sample (Burda et al. 2015). Pixel d is on when u_d < x_d, u_d uniform on [0, 1).
    """
    _check_probabilities(x)
    if threshold is not None:
        return (x > threshold).astype(x.dtype)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"binarize needs rng=np.random.Generator when threshold is None, got {type(rng).__name__}")
    return (rng.random(x.shape, dtype=x.dtype) < x).astype(x.dtype)


def _check_probabilities(x):
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64) or x.ndim != 2:
        raise TypeError(f"binarize: x must be a 2-D float32 or float64 array of probabilities (see to_float), got {_describe(x)}")


class Rows:
    """The rows x[index] of stored rows x (N, D), held as the index: a split of a memory-mapped set copies nothing.

    rows[key] is x[index[key]], the key's rows read from x (key: an int, a slice or an index array,
    or a tuple of one and column keys);
    len(rows), rows.shape (M, D) and rows.dtype are those of x[index], and np.asarray(rows) reads every row.
    rows.subset(key) is Rows(x, index[key]), again without reading x.
    """

    def __init__(self, x, index):
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise TypeError(f"Rows: index must be a 1-D array of integers, got {_describe(index)}")
        self.x, self.index = x, index

    @property
    def shape(self):
        return (self.index.shape[0],) + self.x.shape[1:]

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def ndim(self):
        return self.x.ndim

    def __len__(self):
        return self.index.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):   # rows[i, j]: the rows of i, then j within them
            rows = self[key[0]]
            return rows[((slice(None),) if rows.ndim == self.ndim else ()) + key[1:]]
        return self.x[self.index[key]]

    def __array__(self, dtype=None, copy=None):
        rows = self.x[self.index]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def subset(self, key):
        return Rows(self.x, self.index[key])

    def __repr__(self):
        return f"Rows({self.shape} {self.dtype} of {type(self.x).__name__} {self.x.shape})"


def split_validation(dataset, n_valid, seed):
    """Hold out a validation set: -> x_train Rows (N - n_valid, D), y_train, x_valid Rows (n_valid, D), y_valid.

    The x parts are Rows of dataset.x_train (or of dataset.x_valid): indices, not copies, so that
    a memory-mapped set larger than memory can be split. Labels, 8 bytes a row, are copied.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"split_validation expects a Dataset, got {type(dataset).__name__}")
    if isinstance(n_valid, bool) or not isinstance(n_valid, (int, np.integer)):
        raise TypeError(f"n_valid must be an int, got {type(n_valid).__name__}")
    n = dataset.x_train.shape[0]
    if not 0 <= n_valid < n:
        raise ValueError(f"n_valid must be in [0, {n}) for {dataset.name!r} with {n} training examples, got {n_valid}")
    if dataset.x_valid is not None:
        # a published validation split makes results comparable across papers, so it wins over n_valid and seed
        return (Rows(dataset.x_train, np.arange(n)), dataset.y_train,
                Rows(dataset.x_valid, np.arange(dataset.x_valid.shape[0])), dataset.y_valid)
    order = np.random.default_rng(seed).permutation(n)
    # sorted indices keep reads of a memory-mapped array sequential
    valid = np.sort(order[:n_valid])
    del order   # the training rows are the rest, sorted: a mask finds them without a second (N,) sort
    kept = np.ones(n, dtype=bool)
    kept[valid] = False
    train = np.flatnonzero(kept)
    del kept
    x, y = dataset.x_train, dataset.y_train
    if y is None:
        return Rows(x, train), None, Rows(x, valid), None
    return Rows(x, train), y[train], Rows(x, valid), y[valid]


# ---------------------------------------------------------------------------------------------
# Finding and verifying files


def resolve_data_dir(data_dir=None):
    """The data folder: the argument, else $NPVAE_DATA, else DEFAULT_DATA_DIR, with ~ expanded."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path, got {type(data_dir).__name__}")
    return Path(data_dir).expanduser()


def sha256_file(path):
    """The hex sha256 of a file, read in 1 MiB chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path, dataset, strict):
    """Compare a file with its published sha256, if its name is known: warn, or raise when strict."""
    key = (dataset, path.name)
    expected = KNOWN_SHA256.get(key)
    if expected is None:
        return
    actual = sha256_file(path)
    if actual == expected:
        return
    for (other, name), value in KNOWN_SHA256.items():
        if value == actual and other != dataset:
            raise ValueError(f"{path}: this is the published {other} file {name}, not {dataset}'s {path.name}")
    message = f"{path}: sha256 {actual} differs from the published {expected}"
    if STRICT_CHECKSUMS if strict is None else strict:
        raise ValueError(message + " (strict checksums)")
    warnings.warn(message + "; loading it anyway", ChecksumWarning, stacklevel=2)


def _read_bytes(path):
    """A file's contents, decompressed when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read ({err})") from err


def _find(folder, name):
    """folder/name.gz or folder/name, whichever exists (.gz first), else None."""
    for candidate in (folder / (name + ".gz"), folder / name):
        if candidate.is_file():
            return candidate
    return None


def _find_all(folders, names):
    """The first folder holding every name (plain or .gz): -> {name: path}, or None and notes on near misses."""
    notes = []
    for folder in folders:
        found = {name: _find(folder, name) for name in names}
        missing = [name for name, path in found.items() if path is None]
        if not missing:
            return found, notes
        if len(missing) < len(names):
            notes.append(f"{folder} lacks {', '.join(missing)}")
    return None, notes


def _not_found(title, folders, names, notes=(), extra=""):
    """A FileNotFoundError that tells the user where to put the files."""
    where = ", ".join(str(f) for f in folders)
    message = f"{title} not found: looked in {where} for {', '.join(names)} (each plain or .gz){extra}"
    if notes:
        message += f"; incomplete: {'; '.join(notes)}"
    return FileNotFoundError(message + f"; put the files there, or pass --data-dir or set {DATA_ENV_VAR}")


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # 0x0803: uint8 data in 3 dims; 0x0801: uint8 in 1 dim


def _check_magic(path, data, expected, what, header_bytes):
    """The magic number comes first, so a label file where images belong is named as such, not as too short."""
    if len(data) >= 4:
        magic = int(np.frombuffer(data, ">u4", count=1)[0])
        if magic != expected:
            raise ValueError(f"{path}: IDX magic number {magic}, expected {expected} for {what} data")
    if len(data) < header_bytes:
        raise ValueError(
            f"{path}: truncated: {len(data)} bytes, shorter than the {header_bytes}-byte IDX {what} header"
        )


def _read_idx_images(path):
    """An IDX image file: -> (N, 784) uint8, a read-only view of the file's bytes."""
    data = _read_bytes(path)
    _check_magic(path, data, _IMAGE_MAGIC, "image", header_bytes=16)
    _, n, rows, cols = np.frombuffer(data, ">u4", count=4).tolist()
    expected = 16 + n * rows * cols
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "oversized"
        raise ValueError(f"{path}: {problem}: {len(data)} bytes, the header ({n}x{rows}x{cols}) implies {expected}")
    if (rows, cols) != (28, 28):
        raise ValueError(f"{path}: images are {rows}x{cols}, expected 28x28")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows * cols)


def _read_idx_labels(path, n_images):
    """An IDX label file: -> (N,) int64 in 0..9, N equal to the image count."""
    data = _read_bytes(path)
    _check_magic(path, data, _LABEL_MAGIC, "label", header_bytes=8)
    _, n = np.frombuffer(data, ">u4", count=2).tolist()
    if len(data) != 8 + n:
        problem = "truncated" if len(data) < 8 + n else "oversized"
        raise ValueError(f"{path}: {problem}: {len(data)} bytes, the header ({n} labels) implies {8 + n}")
    if n != n_images:
        raise ValueError(f"{path}: {n} labels for {n_images} images")
    y = np.frombuffer(data, np.uint8, offset=8)
    _check_labels(path, y)
    return y.astype(np.int64)


def _check_labels(path, y):
    """Labels must be the ten classes 0..9."""
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9, found {y.min()}..{y.max()}")


def _load_keras_npz(path, strict):
    """Keras' mnist.npz: -> x_train, y_train, x_test, y_test as (N, 784) uint8 and (N,) int64."""
    _check_sha256(path, "mnist", strict)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from err
    out = []
    for split in ("train", "test"):
        x, y = arrays.get("x_" + split), arrays.get("y_" + split)
        if x is None or y is None:
            raise ValueError(f"{path}: expected keys x_train, y_train, x_test, y_test, found {sorted(arrays)}")
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{path}: x_{split} must be (N, 28, 28) uint8, got {_describe(x)}")
        if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
            raise ValueError(f"{path}: y_{split} must be ({x.shape[0]},) integers, got {_describe(y)}")
        _check_labels(path, y)
        out += [x.reshape(len(x), 784), y.astype(np.int64)]
    return tuple(out)


def _load_idx_dataset(name, title, subdir, torchvision_dir, data_dir, strict, keras_npz):
    """MNIST-layout data from the first folder that has it: -> Dataset of uint8 grey images."""
    root = resolve_data_dir(data_dir)
    folders = [root / subdir, root, root / torchvision_dir / "raw"]
    names = [f for pair in _IDX_FILES.values() for f in pair]
    found, notes = _find_all(folders, names)
    if found is None:
        npz_paths = [root / "mnist.npz", root / subdir / "mnist.npz"] if keras_npz else []
        for path in npz_paths:
            if path.is_file():
                x_train, y_train, x_test, y_test = _load_keras_npz(path, strict)
                break
        else:
            extra = f", or for {' or '.join(str(p) for p in npz_paths)}" if npz_paths else ""
            raise _not_found(title, folders, names, notes, extra)
    else:
        for path in found.values():
            _check_sha256(path, name, strict)
        x_train = _read_idx_images(found[_IDX_FILES["train"][0]])
        y_train = _read_idx_labels(found[_IDX_FILES["train"][1]], len(x_train))
        x_test = _read_idx_images(found[_IDX_FILES["test"][0]])
        y_test = _read_idx_labels(found[_IDX_FILES["test"][1]], len(x_test))
    return Dataset(name, x_train, x_test, y_train, y_test, image_shape=(28, 28), kind="grey")


def load_mnist(data_dir=None, strict=None):
    """MNIST: x_train (60000, 784) uint8 0..255, y_train (60000,) int64, x_test (10000, 784), y_test (10000,)."""
    return _load_idx_dataset("mnist", "MNIST", "mnist", "MNIST", data_dir, strict, keras_npz=True)


def load_fashion_mnist(data_dir=None, strict=None):
    """Fashion-MNIST: x_train (60000, 784) uint8 0..255, y_train (60000,) int64, x_test (10000, 784), y_test."""
    return _load_idx_dataset(
        "fashion-mnist", "Fashion-MNIST", "fashion-mnist", "FashionMNIST", data_dir, strict, keras_npz=False
    )


# ---------------------------------------------------------------------------------------------
# Binarized MNIST (Larochelle)


_AMAT_LINE = 784 * 2  # 784 digits, 783 spaces, one newline


def _read_amat(path, n_rows):
    """A Larochelle .amat file: -> (n_rows, 784) bool."""
    data = _read_bytes(path)
    raw = np.frombuffer(data, np.uint8)
    if raw.size and raw.size % _AMAT_LINE == 0:
        lines = raw.reshape(-1, _AMAT_LINE)
        digits, separators = lines[:, 0::2], lines[:, 1::2]
        x = digits - ord("0")  # uint8 arithmetic: any other character wraps to a value > 1
        if (x <= 1).all() and (separators[:, :-1] == ord(" ")).all() and (separators[:, -1] == ord("\n")).all():
            x = x.astype(bool)
        else:
            x = None
    else:
        x = None
    if x is None:
        # not the exact published layout (CRLF endings, tabs, a stray value): parse it as text and check what it holds
        try:
            values = np.loadtxt(io.BytesIO(data), dtype=np.float32, ndmin=2)
        except ValueError as err:
            raise ValueError(f"{path}: not a table of 784 values 0/1 per line ({err})") from err
        if values.shape[1] != 784:
            raise ValueError(f"{path}: {values.shape[1]} values per line, expected 784")
        if not np.isin(values, (0.0, 1.0)).all():
            bad = values[~np.isin(values, (0.0, 1.0))][0]
            raise ValueError(f"{path}: values must be 0 or 1, found {bad:g}")
        x = values.astype(bool)
    if len(x) != n_rows:
        raise ValueError(f"{path}: {len(x)} rows, expected {n_rows}")
    return x


def load_binarized_mnist(data_dir=None, strict=None):
    """Binarized MNIST: x_train (50000, 784), x_valid (10000, 784), x_test (10000, 784), all bool, no labels."""
    root = resolve_data_dir(data_dir)
    folders = [root / "binarized-mnist", root]
    names = [f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")]
    found, notes = _find_all(folders, names)
    if found is None:
        raise _not_found("binarized MNIST", folders, names, notes)
    x = {}
    for split, name in zip(("train", "valid", "test"), names):
        _check_sha256(found[name], "binarized-mnist", strict)
        x[split] = _read_amat(found[name], BINARIZED_MNIST_ROWS[split])
    return Dataset(
        "binarized-mnist", x["train"], x["test"], x_valid=x["valid"], image_shape=(28, 28), kind="binary"
    )


# ---------------------------------------------------------------------------------------------
# Frey faces


def load_frey(data_dir=None, strict=None):
    """Frey faces: x_train (1769, 560), x_test (196, 560) float32 in [0, 1], 28x20 images, the last 10% as test."""
    root = resolve_data_dir(data_dir)
    folders = [root / "frey", root]
    path = next((f / "frey_rawface.mat" for f in folders if (f / "frey_rawface.mat").is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"Frey faces not found: looked in {', '.join(map(str, folders))} for frey_rawface.mat; "
            f"put the file there, or pass --data-dir or set {DATA_ENV_VAR}"
        )
    _check_sha256(path, "frey", strict)
    import scipy.io  # only this loader needs scipy.io; keep `import npvae.data` cheap

    try:
        contents = scipy.io.loadmat(path)
    except Exception as err:  # loadmat raises many types for a damaged file; all mean the same here
        raise ValueError(f"{path}: not a readable MATLAB file ({type(err).__name__}: {err})") from err
    if "ff" not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"{path}: no variable 'ff' (found {found})")
    ff = contents["ff"]
    if ff.dtype != np.uint8 or ff.shape != FREY_SHAPE:
        raise ValueError(f"{path}: 'ff' must be uint8 of shape {FREY_SHAPE}, got {_describe(ff)}")
    x = to_float(np.ascontiguousarray(ff.T))  # (1965, 560): one frame per row
    n_test = len(x) // 10
    return Dataset(
        "frey", x[:-n_test], x[-n_test:], image_shape=FREY_IMAGE_SHAPE, kind="real", likelihood="gaussian"
    )


# ---------------------------------------------------------------------------------------------
# A user's own arrays


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "x_valid", "y_valid")


def _flat_chunks(x, chunk_bytes=8 << 20):
    """x's values in memory order, in chunks of about 8 MB: -> (flat index of the chunk's start, chunk) pairs."""
    step = max(1, chunk_bytes // x.itemsize)
    if isinstance(x, np.memmap) and x.filename is not None:
        # reading the file directly, not through the mapping, leaves no scanned pages in this process's memory
        with open(x.filename, "rb") as f:
            f.seek(x.offset)
            for start in range(0, x.size, step):
                yield start, np.fromfile(f, x.dtype, count=min(step, x.size - start))
    else:
        flat = x.ravel(order="K")
        for start in range(0, x.size, step):
            yield start, flat[start : start + step]


def _value_summary(path, key, x, one):
    """Scan x in chunks, memory flat even for a huge memmap: -> (min, max, whether every value is 0 or `one`)."""
    if x.dtype == np.bool_:
        return 0, 1, True
    lo, hi = np.inf, -np.inf
    for start, chunk in _flat_chunks(x):
        if x.dtype.kind == "f" and not np.isfinite(chunk).all():
            index = start + int(np.flatnonzero(~np.isfinite(chunk))[0])
            row = index // x.shape[1] if x.flags.c_contiguous else index % x.shape[0]
            raise ValueError(f"{path}: {key} has a non-finite value (NaN or inf) in row {row}")
        lo, hi = min(lo, chunk.min()), max(hi, chunk.max())
    # a second pass only when the range allows binary data, which is the only case it can change the answer
    binary = lo in (0, one) and hi in (0, one) and all(((c == 0) | (c == one)).all() for _, c in _flat_chunks(x))
    return lo, hi, binary


def _kind_of(path, arrays):
    """The kind of the x arrays as to_float will return them: binary if 0/1, grey if in [0, 1], else real."""
    kinds = []
    for key in ("x_train", "x_test", "x_valid"):
        x = arrays.get(key)
        if x is None or x.shape[0] == 0:
            continue
        # to_float divides uint8 by 255, so for uint8 the binary values are 0 and 255
        scale = 255 if x.dtype == np.uint8 else 1
        lo, hi, binary = _value_summary(path, key, x, one=scale)
        if scale == 255 and hi <= 1:
            warnings.warn(
                f"{path}: {key} is uint8 with values 0/1 only; to_float reads uint8 as grey levels k/255, "
                "so save binary data as bool",
                UserWarning,
                stacklevel=3,
            )
        kinds.append("binary" if binary else "grey" if lo >= 0 and hi <= scale else "real")
    # the widest kind wins: binary data is also grey, grey data is also real
    return max(kinds, key=("binary", "grey", "real").index)


def _check_x(path, key, x, allow_empty):
    """An x array must be numeric, non-empty (train), 2-D (N, D) or 3-D images (N, rows, cols): -> (N, D), a view."""
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key} must be numeric (bool, int or float), got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{path}: {key} must be 2-D (N, D) or 3-D images (N, rows, cols), got shape {x.shape}; "
                         "reshape to (N, -1) first")
    if min(x.shape[1:]) < 1 or (x.shape[0] < 1 and not allow_empty):
        raise ValueError(f"{path}: {key} has shape {x.shape}, expected at least one row and one column")
    if x.ndim == 3:
        # each image's rows must follow one another in memory, or reshape would copy (a 3-D file larger
        # than memory must stay on disk)
        if x.shape[1] > 1 and x.shape[2] > 1 and x.strides[1] != x.shape[2] * x.strides[2]:
            raise ValueError(f"{path}: {key} of shape {x.shape} is not stored image by image (Fortran order?), "
                             "so it cannot be flattened without a copy; save it with np.ascontiguousarray")
        x = x.reshape(x.shape[0], x.shape[1] * x.shape[2])
    return x


def load_array(path, image_shape=None):
    """A user's (N, D) data from .npy (memory-mapped, x_test empty (0, D)) or .npz (x_train and optional keys).

    Images stored 3-D, (N, rows, cols), are flattened to (N, rows * cols) as a view (a memory-mapped
    file stays on disk), and give the image_shape when none is passed.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a .npy of shape (N, D) or a .npz with key x_train")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            # mmap_mode: pages are read on demand and can be dropped again, so a 10 GB file needs no 10 GB of RAM
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable numeric .npy ({err})") from err
        arrays = {"x_train": x}
    elif suffix == ".npz":
        # members of an .npz are (possibly compressed) zip entries, which cannot be memory-mapped: they are read whole
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zlib.error) as err:
            raise ValueError(f"{path}: not a readable numeric .npz ({err})") from err
        unknown = sorted(set(arrays) - set(_NPZ_KEYS))
        if unknown:
            raise ValueError(f"{path}: unexpected keys {unknown}; allowed keys are {list(_NPZ_KEYS)}")
        if "x_train" not in arrays:
            raise ValueError(f"{path}: missing key x_train; found {sorted(arrays)}")
    else:
        raise ValueError(f"{path}: expected a .npy or .npz file")

    if image_shape is None and arrays["x_train"].ndim == 3:
        image_shape = arrays["x_train"].shape[1:]   # (N, rows, cols), as Keras' mnist.npz stores its images
    x_train = arrays["x_train"] = _check_x(path, "x_train", arrays["x_train"], allow_empty=False)
    for key in ("x_test", "x_valid"):
        if key in arrays:
            x = arrays[key] = _check_x(path, key, arrays[key], allow_empty=True)
            if x.shape[1] != x_train.shape[1] or x.dtype != x_train.dtype:
                raise ValueError(
                    f"{path}: {key} is {_describe(x)}, but x_train is {_describe(x_train)}; D and dtype must agree"
                )
    for split in ("train", "test", "valid"):
        y = arrays.get("y_" + split)
        if y is None:
            continue
        if "x_" + split not in arrays:
            raise ValueError(f"{path}: y_{split} given without x_{split}")
        if y.dtype.kind not in "iu" or y.shape != (arrays["x_" + split].shape[0],):
            raise ValueError(
                f"{path}: y_{split} must be ({arrays['x_' + split].shape[0]},) integers, got {_describe(y)}"
            )
        arrays["y_" + split] = y.astype(np.int64)
    if "x_test" not in arrays:
        # no held-out data was given: an empty test split keeps every consumer's code path the same
        arrays["x_test"] = np.empty((0, x_train.shape[1]), x_train.dtype)
    kind = _kind_of(path, arrays)
    return Dataset(
        path.name,
        x_train,
        arrays["x_test"],
        arrays.get("y_train"),
        arrays.get("y_test"),
        arrays.get("x_valid"),
        arrays.get("y_valid"),
        image_shape=image_shape,
        kind=kind,
    )


# ---------------------------------------------------------------------------------------------
# Generated data: no files, fixed by the seed


def _check_n(n):
    """n must be a positive int."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")


def make_shapes(n=12000, seed=0):
    """Binary 28x28 images of one shape each: -> x (n, 784) bool, factors {kind, x_position, y_position, size: (n,)}."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    kind = rng.integers(len(SHAPE_KINDS), size=n)  # index into SHAPE_KINDS
    size = rng.uniform(3.0, 7.0, n)  # half-width in pixels
    # the centre keeps `size` pixels from every edge, so no shape is clipped and every factor is visible
    x_position = rng.uniform(size, 27.0 - size)  # column of the centre
    y_position = rng.uniform(size, 27.0 - size)  # row of the centre
    grid = np.arange(28, dtype=np.float32)
    # broadcasting (n, 1, 28) against (n, 28, 1) draws all images at once without materialising (n, 28, 28) offsets
    dx = grid[None, None, :] - x_position[:, None, None].astype(np.float32)  # (n, 1, 28)
    dy = grid[None, :, None] - y_position[:, None, None].astype(np.float32)  # (n, 28, 1)
    s = size[:, None, None].astype(np.float32)  # (n, 1, 1)

    def square(dx, dy, s):
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)

    def disc(dx, dy, s):
        return dx**2 + dy**2 <= s**2

    def triangle(dx, dy, s):
        # apex at the top row (dy = -s), base 2s wide at the bottom (dy = s): half-width grows as (dy + s) / 2
        return (np.abs(dy) <= s) & (np.abs(dx) <= (dy + s) / 2)

    def cross(dx, dy, s):
        w = s / 3  # arm half-width: thin enough to tell from a square, thick enough to survive pixelation
        return ((np.abs(dx) <= s) & (np.abs(dy) <= w)) | ((np.abs(dy) <= s) & (np.abs(dx) <= w))

    images = np.empty((n, 28, 28), dtype=bool)
    for k, draw in enumerate((square, disc, triangle, cross)):
        chosen = kind == k
        images[chosen] = draw(dx[chosen], dy[chosen], s[chosen])
    factors = {"kind": kind.astype(np.int64), "x_position": x_position, "y_position": y_position, "size": size}
    return images.reshape(n, 784), factors


def make_pinwheel(n=6000, seed=0, n_arms=5, radial_std=0.3, tangential_std=0.05, rate=0.25):
    """The pinwheel of Johnson et al. (2016), without their x10 scale: -> x (n, 2) float32, y (n,) int64 arm index."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    y = rng.integers(n_arms, size=n)
    radial = 1.0 + radial_std * rng.standard_normal(n)
    tangential = tangential_std * rng.standard_normal(n)
    # the angle grows with exp(radius), so points further out are swept further round: that bends blobs into arms
    angle = 2 * np.pi * y / n_arms + rate * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    x = np.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def make_two_moons(n=6000, seed=0, noise=0.1):
    """Two interleaved half circles, centred on 0: -> x (n, 2) float32, y (n,) int64 moon index."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)  # balanced classes in random order
    t = rng.uniform(0.0, np.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], axis=1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    # (0.5, 0.25) is the centre of the noiseless pair, so the data sit around the prior's mean
    x = np.where(y[:, None] == 0, upper, lower) + noise * rng.standard_normal((n, 2)) - np.array([0.5, 0.25])
    return x.astype(np.float32), y.astype(np.int64)


def make_ring(n=6000, seed=0, n_modes=8, radius=2.0, std=0.1):
    """A ring of n_modes equal Gaussians: -> x (n, 2) float32, y (n,) int64 mode index."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    y = rng.integers(n_modes, size=n)
    angle = 2 * np.pi * y / n_modes
    x = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1) + std * rng.standard_normal((n, 2))
    return x.astype(np.float32), y.astype(np.int64)


def _load_builtin(name, seed):
    """A generated set as a Dataset: one seeded stream, its tail held out as the test split."""
    n_train, n_test = BUILTIN_SIZES[name]
    if name == "shapes":
        x, factors = make_shapes(n_train + n_test, seed)
        y = factors["kind"]
        return Dataset(
            name,
            x[:n_train],
            x[n_train:],
            y[:n_train],
            y[n_train:],
            image_shape=(28, 28),
            kind="binary",
            factors={key: value[:n_train] for key, value in factors.items()},
        )
    make = {"pinwheel": make_pinwheel, "moons": make_two_moons, "ring": make_ring}[name]
    x, y = make(n_train + n_test, seed)
    return Dataset(name, x[:n_train], x[n_train:], y[:n_train], y[n_train:], kind="real")


def load(name, data_dir=None, seed=0, strict=None):
    """A dataset by name (see DATASETS) or by path to a .npy/.npz; seed only affects generated sets."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a path, got {type(name).__name__}")
    key = name.lower().replace("_", "-") if isinstance(name, str) else None
    if key in ("mnist", "fashion-mnist", "binarized-mnist", "frey"):
        loader = {
            "mnist": load_mnist,
            "fashion-mnist": load_fashion_mnist,
            "binarized-mnist": load_binarized_mnist,
            "frey": load_frey,
        }[key]
        return loader(data_dir, strict=strict)
    if key in BUILTIN_SIZES:
        return _load_builtin(key, seed)
    path = Path(name).expanduser()
    if path.suffix.lower() in (".npy", ".npz") or path.is_file():
        return load_array(path)
    raise ValueError(
        f"unknown dataset {str(name)!r}: expected one of {', '.join(DATASETS)}, or a path to a .npy/.npz file"
    )


def name_or_fallback(name, fallback, data_dir=None):
    """name if that dataset loads from data_dir, else fallback (a built-in set), with a note on stdout.

    For demos that run anywhere: the note says which files were missing and where they were looked for.
    """
    try:
        load(name, data_dir)
    except FileNotFoundError as e:
        print(f"note: {e}\nnote: using the built-in {fallback!r} set instead")
        return fallback
    return name
