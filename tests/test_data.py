"""Tests for npvae.data: real files when present, every accepted layout and every rejected file on fakes."""

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from npvae import data

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers that write small files in the published formats


def idx_image_bytes(x, magic=2051):
    """IDX bytes for images x (n, rows, cols) uint8."""
    n, rows, cols = x.shape
    return struct.pack(">IIII", magic, n, rows, cols) + x.astype(np.uint8).tobytes()


def idx_label_bytes(y, magic=2049):
    """IDX bytes for labels y (n,)."""
    return struct.pack(">II", magic, len(y)) + np.asarray(y, np.uint8).tobytes()


def write(path, content, gz=False):
    """Write bytes, gzipped (and named .gz) if asked: -> the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def fake_mnist(folder, gz=False, n_train=5, n_test=3, seed=0):
    """Write the four IDX files into folder: -> x_train (n, 784), y_train, x_test, y_test as written."""
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_train, y_test = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    write(folder / "train-images-idx3-ubyte", idx_image_bytes(x_train), gz)
    write(folder / "train-labels-idx1-ubyte", idx_label_bytes(y_train), gz)
    write(folder / "t10k-images-idx3-ubyte", idx_image_bytes(x_test), gz)
    write(folder / "t10k-labels-idx1-ubyte", idx_label_bytes(y_test), gz)
    return x_train.reshape(n_train, 784), y_train, x_test.reshape(n_test, 784), y_test


def amat_bytes(x, newline="\n"):
    """Larochelle's text layout for rows of 0/1 values x (n, D)."""
    return "".join(" ".join(str(int(v)) for v in row) + newline for row in x).encode()


AMAT_ROWS = {"train": 4, "valid": 2, "test": 3}


def fake_binarized(folder, gz=False, newline="\n", seed=0):
    """Write the three .amat files into folder: -> {split: (n, 784) bool} as written."""
    rng = np.random.default_rng(seed)
    x = {split: rng.random((n, 784)) < 0.3 for split, n in AMAT_ROWS.items()}
    for split, values in x.items():
        write(folder / f"binarized_mnist_{split}.amat", amat_bytes(values, newline), gz)
    return x


def assert_message(excinfo, *parts):
    """The exception's message is one line and contains every part."""
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"


@pytest.fixture
def no_known_hashes(monkeypatch):
    """Fake files carry the published names but not the published bytes: switch the checksum check off."""
    monkeypatch.setattr(data, "KNOWN_SHA256", {})


@pytest.fixture
def small_binarized(monkeypatch):
    """Let the .amat loader accept the small row counts of fake files."""
    monkeypatch.setattr(data, "BINARIZED_MNIST_ROWS", dict(AMAT_ROWS))


# ---------------------------------------------------------------------------------------------
# Real data, when it is there


def real_data_dir():
    """The shared data folder: $NPVAE_DATA (relative to cwd or the repo), else <repo>/../shared/data."""
    env = os.environ.get("NPVAE_DATA")
    candidates = [Path(env), REPO / env] if env else [REPO / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.expanduser().is_dir():
            return candidate.expanduser()
    return candidates[0]


def load_real(name):
    """Load a real dataset once, strictly checksummed, or skip saying where it was looked for."""
    folder = real_data_dir()
    try:
        return data.load(name, folder, strict=True)
    except FileNotFoundError:
        pytest.skip(f"real {name} data not found under {folder}; set NPVAE_DATA to the shared data folder")


def grey_mean(x):
    """Mean of uint8 grey levels read as k/255, summed exactly in integers."""
    return x.sum(dtype=np.int64) / (255 * x.size)


@pytest.fixture(scope="module")
def mnist():
    return load_real("mnist")


@pytest.fixture(scope="module")
def fashion_mnist():
    return load_real("fashion-mnist")


@pytest.fixture(scope="module")
def binarized_mnist():
    return load_real("binarized-mnist")


@pytest.fixture(scope="module")
def frey():
    return load_real("frey")


def test_real_mnist(mnist):
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.int64
    assert (mnist.kind, mnist.likelihood, mnist.image_shape) == ("grey", "bernoulli", (28, 28))
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    # the published class counts of MNIST
    assert np.bincount(mnist.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.x_train.min() == 0 and mnist.x_train.max() == 255
    # 0.1307 is the training-set mean every MNIST normalisation uses; a misread header would shift it
    assert grey_mean(mnist.x_train) == pytest.approx(0.1307, abs=1e-4)
    assert grey_mean(mnist.x_test) == pytest.approx(0.1325, abs=1e-4)


def test_real_fashion_mnist(fashion_mnist):
    assert fashion_mnist.x_train.shape == (60000, 784) and fashion_mnist.x_test.shape == (10000, 784)
    assert fashion_mnist.x_train.dtype == np.uint8
    assert np.bincount(fashion_mnist.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion_mnist.y_test).tolist() == [1000] * 10
    assert fashion_mnist.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert grey_mean(fashion_mnist.x_train) == pytest.approx(0.2860, abs=1e-4)


def test_real_binarized_mnist(binarized_mnist):
    ds = binarized_mnist
    assert ds.x_train.shape == (50000, 784) and ds.x_valid.shape == (10000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.bool_ and (ds.kind, ds.likelihood) == ("binary", "bernoulli")
    assert ds.y_train is None and ds.y_valid is None and ds.y_test is None
    assert set(np.unique(data.to_float(ds.x_train[:100])).tolist()) == {0.0, 1.0}
    # a Bernoulli draw per pixel keeps the mean grey level of MNIST (0.1307) in expectation
    assert ds.x_train.mean() == pytest.approx(0.1307, abs=2e-3)


def test_real_frey(frey):
    assert frey.x_train.shape == (1769, 560) and frey.x_test.shape == (196, 560)
    assert frey.x_train.dtype == np.float32 and frey.image_shape == (28, 20)
    assert (frey.kind, frey.likelihood) == ("real", "gaussian")
    both = np.concatenate([frey.x_train, frey.x_test])
    # README: the stored grey levels run from 8 to 238
    assert both.min() == pytest.approx(8 / 255) and both.max() == pytest.approx(238 / 255)
    # one frame per column of ff, in time order, the last frames held out
    ff = scipy.io.loadmat(real_data_dir() / "frey" / "frey_rawface.mat")["ff"]
    np.testing.assert_array_equal(frey.x_train[0], ff[:, 0] / np.float32(255))
    np.testing.assert_array_equal(frey.x_test[-1], ff[:, -1] / np.float32(255))


def test_real_files_match_published_sha256():
    folder = real_data_dir()
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"no SHA256SUMS under {folder}; set NPVAE_DATA to the shared data folder")
    for line in sums.read_text().splitlines():
        digest, relative = line.split()
        dataset, name = relative.split("/")
        assert data.KNOWN_SHA256[dataset, name] == digest
        assert data.sha256_file(folder / relative) == digest


# ---------------------------------------------------------------------------------------------
# Layouts people already have


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("where", ["mnist", ".", "MNIST/raw"])
def test_mnist_idx_layouts(tmp_path, no_known_hashes, gz, where):
    x_train, y_train, x_test, y_test = fake_mnist(tmp_path / where, gz=gz)
    ds = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.kind == "grey"


@pytest.mark.parametrize("where", ["fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_layouts(tmp_path, no_known_hashes, where):
    x_train, y_train, _, y_test = fake_mnist(tmp_path / where, gz=True, seed=1)
    ds = data.load("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist"
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_test, y_test)


def test_fashion_mnist_does_not_read_mnist_folder(tmp_path, no_known_hashes):
    fake_mnist(tmp_path / "mnist")
    with pytest.raises(FileNotFoundError):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("where", [".", "mnist"])
def test_mnist_keras_npz(tmp_path, no_known_hashes, where):
    rng = np.random.default_rng(2)
    arrays = {
        "x_train": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 4).astype(np.uint8),
        "x_test": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 2).astype(np.uint8),
    }
    (tmp_path / where).mkdir(exist_ok=True)
    np.savez(tmp_path / where / "mnist.npz", **arrays)
    ds = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"].reshape(4, 784))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.y_train.dtype == np.int64 and ds.image_shape == (28, 28)


def test_keras_npz_wrong_shape(tmp_path, no_known_hashes):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 784), np.uint8), y_train=np.zeros(2, np.uint8),
             x_test=np.zeros((1, 784), np.uint8), y_test=np.zeros(1, np.uint8))
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "mnist.npz", "(N, 28, 28)")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("where", ["binarized-mnist", "."])
def test_binarized_mnist_layouts(tmp_path, no_known_hashes, small_binarized, gz, where):
    x = fake_binarized(tmp_path / where, gz=gz)
    ds = data.load("binarized-mnist", tmp_path)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(ds, "x_" + split), x[split])
    assert ds.x_train.dtype == np.bool_ and ds.kind == "binary" and ds.y_train is None


def test_binarized_mnist_windows_line_endings_take_the_robust_parse(tmp_path, no_known_hashes, small_binarized):
    x = fake_binarized(tmp_path, newline="\r\n")
    ds = data.load_binarized_mnist(tmp_path)
    np.testing.assert_array_equal(ds.x_valid, x["valid"])


def test_frey_layout(tmp_path, no_known_hashes):
    ff = np.random.default_rng(3).integers(0, 256, data.FREY_SHAPE, dtype=np.uint8)
    (tmp_path / "frey").mkdir()
    scipy.io.savemat(tmp_path / "frey" / "frey_rawface.mat", {"ff": ff})
    ds = data.load_frey(tmp_path)
    assert ds.x_train.shape == (1769, 560) and ds.x_test.shape == (196, 560) and ds.x_train.dtype == np.float32
    # frame k is column k of ff; the test split is the last 196 frames
    np.testing.assert_allclose(ds.x_train[0], ff[:, 0] / 255, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[0], ff[:, 1769] / 255, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[-1], ff[:, -1] / 255, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Files that must be refused


def test_idx_wrong_magic(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    # a label file where the images should be: the magic number tells them apart
    write(tmp_path / "train-images-idx3-ubyte", idx_label_bytes(np.zeros(5)))
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "train-images-idx3-ubyte", "magic", "2049", "2051")


def test_idx_truncated_images(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "t10k-images-idx3-ubyte", "truncated", 16 + 3 * 784 - 10, 16 + 3 * 784)


def test_idx_oversized_images(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "train-images-idx3-ubyte", "oversized", 16 + 5 * 784 + 1, 16 + 5 * 784)


def test_idx_wrong_image_size(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_image_bytes(np.zeros((5, 27, 27), np.uint8)))
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "train-images-idx3-ubyte", "27x27", "28x28")


def test_idx_label_count_mismatch(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_label_bytes(np.zeros(4)))
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "train-labels-idx1-ubyte", "4 labels for 5 images")


def test_idx_label_out_of_range(tmp_path, no_known_hashes):
    fake_mnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_label_bytes([1, 10, 2]))
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "t10k-labels-idx1-ubyte", "0..9", "10")


def test_idx_corrupt_gzip(tmp_path, no_known_hashes):
    fake_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "train-labels-idx1-ubyte.gz")


def test_amat_wrong_column_count(tmp_path, no_known_hashes, small_binarized):
    fake_binarized(tmp_path)
    write(tmp_path / "binarized_mnist_test.amat", amat_bytes(np.zeros((3, 783))))
    with pytest.raises(ValueError) as excinfo:
        data.load_binarized_mnist(tmp_path)
    assert_message(excinfo, "binarized_mnist_test.amat", "783", "784")


def test_amat_value_two(tmp_path, no_known_hashes, small_binarized):
    fake_binarized(tmp_path)
    x = np.zeros((4, 784), int)
    x[1, 7] = 2
    write(tmp_path / "binarized_mnist_train.amat", amat_bytes(x))
    with pytest.raises(ValueError) as excinfo:
        data.load_binarized_mnist(tmp_path)
    assert_message(excinfo, "binarized_mnist_train.amat", "0 or 1", "found 2")


def test_amat_wrong_row_count(tmp_path, no_known_hashes, small_binarized):
    fake_binarized(tmp_path)
    write(tmp_path / "binarized_mnist_valid.amat", amat_bytes(np.zeros((5, 784))))
    with pytest.raises(ValueError) as excinfo:
        data.load_binarized_mnist(tmp_path)
    assert_message(excinfo, "binarized_mnist_valid.amat", "5 rows", "expected 2")


def test_frey_unreadable(tmp_path, no_known_hashes):
    (tmp_path / "frey_rawface.mat").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError) as excinfo:
        data.load_frey(tmp_path)
    assert_message(excinfo, "frey_rawface.mat")


def test_frey_without_ff(tmp_path, no_known_hashes):
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"faces": np.zeros((560, 3), np.uint8)})
    with pytest.raises(ValueError) as excinfo:
        data.load_frey(tmp_path)
    assert_message(excinfo, "frey_rawface.mat", "'ff'", "faces")


def test_frey_wrong_shape(tmp_path, no_known_hashes):
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": np.zeros((20, 28), np.uint8)})
    with pytest.raises(ValueError) as excinfo:
        data.load_frey(tmp_path)
    assert_message(excinfo, "frey_rawface.mat", "(560, 1965)")


# ---------------------------------------------------------------------------------------------
# Checksums


def test_sha256_file_streams_large_files(tmp_path):
    content = np.random.default_rng(0).bytes(5 * (1 << 20) // 2)  # 2.5 MiB: crosses chunk boundaries
    (tmp_path / "blob").write_bytes(content)
    assert data.sha256_file(tmp_path / "blob") == hashlib.sha256(content).hexdigest()


def test_checksum_mismatch_warns_then_loads(tmp_path, monkeypatch):
    x_train, *_ = fake_mnist(tmp_path, gz=True)
    expected = "0" * 64
    actual = data.sha256_file(tmp_path / "train-images-idx3-ubyte.gz")
    monkeypatch.setattr(data, "KNOWN_SHA256", {("mnist", "train-images-idx3-ubyte.gz"): expected})
    with pytest.warns(data.ChecksumWarning) as record:
        ds = data.load_mnist(tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert "train-images-idx3-ubyte.gz" in message and expected in message and actual in message
    np.testing.assert_array_equal(ds.x_train, x_train)

    with pytest.raises(ValueError) as excinfo:
        data.load("mnist", tmp_path, strict=True)
    assert_message(excinfo, "train-images-idx3-ubyte.gz", expected, actual)

    monkeypatch.setattr(data, "STRICT_CHECKSUMS", True)
    with pytest.raises(ValueError):
        data.load_mnist(tmp_path)


def test_checksum_match_is_silent(tmp_path, monkeypatch):
    fake_binarized(tmp_path, gz=True)
    monkeypatch.setattr(data, "BINARIZED_MNIST_ROWS", dict(AMAT_ROWS))
    name = "binarized_mnist_valid.amat.gz"
    monkeypatch.setattr(data, "KNOWN_SHA256", {("binarized-mnist", name): data.sha256_file(tmp_path / name)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_binarized_mnist(tmp_path, strict=True)


def test_checksum_of_another_dataset_is_an_error(tmp_path, monkeypatch):
    fake_mnist(tmp_path, gz=True)
    name = "train-labels-idx1-ubyte.gz"
    monkeypatch.setattr(
        data,
        "KNOWN_SHA256",
        {("mnist", name): "0" * 64, ("fashion-mnist", name): data.sha256_file(tmp_path / name)},
    )
    with pytest.raises(ValueError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, name, "fashion-mnist")


def test_checksum_table_keeps_mnist_and_fashion_apart():
    # both sets use the same four file names, which is why the table is keyed by (dataset, name)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        assert data.KNOWN_SHA256["mnist", name] != data.KNOWN_SHA256["fashion-mnist", name]
    assert ("frey", "frey_rawface.mat") in data.KNOWN_SHA256
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in data.KNOWN_SHA256.values())


# ---------------------------------------------------------------------------------------------
# Missing data, names and folders


def test_missing_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load("mnist", tmp_path)
    assert_message(
        excinfo, tmp_path / "mnist", tmp_path / "MNIST" / "raw", "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte", "mnist.npz", "--data-dir", "NPVAE_DATA",
    )


def test_incomplete_folder_names_the_missing_file(tmp_path, no_known_hashes):
    fake_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load_mnist(tmp_path)
    assert_message(excinfo, "incomplete", tmp_path / "mnist", "lacks t10k-labels-idx1-ubyte")


@pytest.mark.parametrize(
    "name, expected", [("binarized-mnist", "binarized_mnist_valid.amat"), ("frey", "frey_rawface.mat")]
)
def test_missing_files_say_where_they_looked(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load(name, tmp_path / "nowhere")
    assert_message(excinfo, tmp_path / "nowhere", expected, "NPVAE_DATA")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        data.load("cifar10")
    assert_message(excinfo, "cifar10", *data.DATASETS)
    with pytest.raises(TypeError):
        data.load(10)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NPVAE_DATA", raising=False)
    assert data.resolve_data_dir() == tmp_path / "home" / ".npvae" / "data"
    assert data.DEFAULT_DATA_DIR == Path("~/.npvae/data")
    monkeypatch.setenv("NPVAE_DATA", "~/from-env")
    assert data.resolve_data_dir() == tmp_path / "home" / "from-env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir("~/arg") == tmp_path / "home" / "arg"
    with pytest.raises(TypeError):
        data.resolve_data_dir(3)


def test_import_is_cheap():
    # load data.py on its own, so what the rest of the package imports cannot hide what this module imports
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('npvae_data', {str(REPO / 'npvae' / 'data.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'matplotlib')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# A user's own arrays


@pytest.mark.parametrize(
    "x, kind",
    [
        (np.random.default_rng(0).random((6, 3)), "grey"),
        (np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), "real"),
        ((np.arange(18).reshape(6, 3) % 2).astype(np.float64), "binary"),
        (np.arange(18).reshape(6, 3) % 2 == 0, "binary"),
        (np.arange(18, dtype=np.uint8).reshape(6, 3) * 10, "grey"),
        (np.where(np.arange(18).reshape(6, 3) % 3 == 0, 255, 0).astype(np.uint8), "binary"),
        (np.arange(18, dtype=np.int64).reshape(6, 3), "real"),
    ],
)
def test_load_array_npy_is_memory_mapped(tmp_path, x, kind):
    np.save(tmp_path / "mine.npy", x)
    ds = data.load(str(tmp_path / "mine.npy"))
    assert isinstance(ds.x_train, np.memmap)
    np.testing.assert_array_equal(ds.x_train, x)
    assert ds.x_test.shape == (0, 3) and ds.x_test.dtype == x.dtype
    assert ds.y_train is None and ds.y_test is None
    assert ds.kind == kind and ds.likelihood == ("gaussian" if kind == "real" else "bernoulli")


def test_load_array_uint8_zero_one_warns(tmp_path):
    np.save(tmp_path / "bits.npy", np.eye(4, dtype=np.uint8))
    with pytest.warns(UserWarning, match="bool"):
        ds = data.load_array(tmp_path / "bits.npy")
    assert ds.kind == "grey"  # what to_float will actually return: 0 and 1/255


@pytest.mark.parametrize(
    "x, problem",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 3, 4, 1)), "2-D (N, D) or 3-D images"),
        (np.zeros((2, 3, 4), order="F"), "Fortran order"),   # flattening it would copy it
        (np.zeros((0, 3)), "at least one row"),
        (np.zeros((2, 3), complex), "numeric"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "non-finite"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), "row 1"),
    ],
)
def test_load_array_refuses(tmp_path, x, problem):
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(ValueError) as excinfo:
        data.load_array(tmp_path / "bad.npy")
    assert_message(excinfo, "bad.npy", problem)


def test_load_array_flattens_3d_images_as_a_view_of_the_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 5), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    ds = data.load_array(tmp_path / "images.npy")
    assert isinstance(ds.x_train, np.memmap) and Path(ds.x_train.filename) == tmp_path / "images.npy"
    assert ds.x_train.shape == (6, 20) and ds.image_shape == (4, 5) and ds.kind == "grey"
    np.testing.assert_array_equal(ds.x_train, images.reshape(6, 20))
    # Keras' layout: (N, 28, 28) uint8 images and integer labels under x_train, y_train, x_test, y_test
    np.savez(tmp_path / "keras.npz", x_train=images, y_train=np.arange(6), x_test=images[:2], y_test=np.arange(2))
    ds = data.load_array(tmp_path / "keras.npz")
    assert ds.x_train.shape == (6, 20) and ds.x_test.shape == (2, 20) and ds.image_shape == (4, 5)
    np.testing.assert_array_equal(ds.x_test, images[:2].reshape(2, 20))
    assert ds.y_train.dtype == np.int64 and ds.y_test.tolist() == [0, 1]
    np.savez(tmp_path / "mixed.npz", x_train=images, x_test=images[:2, :2])
    with pytest.raises(ValueError) as excinfo:
        data.load_array(tmp_path / "mixed.npz")
    assert_message(excinfo, "mixed.npz", "x_test", "D and dtype must agree")


def test_load_array_finds_the_bad_row_in_any_memory_order(tmp_path):
    x = np.zeros((7, 3), ">f8")  # big-endian, as another machine may have written it
    x[5, 1] = np.nan
    for order in ("C", "F"):
        np.save(tmp_path / "bad.npy", np.asarray(x, order=order))
        with pytest.raises(ValueError) as excinfo:
            data.load_array(tmp_path / "bad.npy")
        assert_message(excinfo, "bad.npy", "row 5")
    x[5, 1] = 0.5
    np.save(tmp_path / "good.npy", np.asfortranarray(x))
    assert data.load_array(tmp_path / "good.npy").kind == "grey"


def test_load_array_refuses_object_arrays(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as excinfo:
        data.load_array(tmp_path / "objects.npy")
    assert_message(excinfo, "objects.npy")


def test_load_array_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load(str(tmp_path / "absent.npy"))
    assert_message(excinfo, "absent.npy")


def test_load_array_npz_keys(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.standard_normal((5, 4)),
        "y_train": np.arange(5, dtype=np.int32),
        "x_test": rng.standard_normal((2, 4)),
        "y_test": np.array([1, 0], dtype=np.uint8),
    }
    np.savez_compressed(tmp_path / "mine.npz", **arrays)
    ds = data.load(tmp_path / "mine.npz")
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(ds, key), value)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64 and ds.kind == "real"

    np.savez(tmp_path / "only_train.npz", x_train=np.ones((3, 2), bool))
    ds = data.load_array(tmp_path / "only_train.npz", image_shape=(1, 2))
    assert ds.x_test.shape == (0, 2) and ds.kind == "binary" and ds.image_shape == (1, 2)


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"x_test": np.zeros((2, 3))}, "missing key x_train"),
        ({"x_train": np.zeros((2, 3)), "labels": np.zeros(2)}, "unexpected keys ['labels']"),
        ({"x_train": np.zeros((2, 3)), "y_train": np.zeros(3, int)}, "y_train"),
        ({"x_train": np.zeros((2, 3)), "y_train": np.zeros(2)}, "integers"),
        ({"x_train": np.zeros((2, 3)), "x_test": np.zeros((2, 4))}, "x_test"),
        ({"x_train": np.zeros((2, 3)), "y_test": np.zeros(0, int)}, "y_test given without x_test"),
    ],
)
def test_load_array_npz_refuses(tmp_path, arrays, problem):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as excinfo:
        data.load_array(tmp_path / "bad.npz")
    assert_message(excinfo, "bad.npz", problem)


# ---------------------------------------------------------------------------------------------
# Generated sets


def test_make_shapes_is_seeded_and_binary():
    x, factors = data.make_shapes(500, seed=1)
    x_again, factors_again = data.make_shapes(500, seed=1)
    x_other, _ = data.make_shapes(500, seed=2)
    np.testing.assert_array_equal(x, x_again)
    for key in factors:
        np.testing.assert_array_equal(factors[key], factors_again[key])
    assert not np.array_equal(x, x_other)
    assert x.shape == (500, 784) and x.dtype == np.bool_
    assert set(factors) == {"kind", "x_position", "y_position", "size"}
    assert all(value.shape == (500,) for value in factors.values())
    assert set(np.unique(factors["kind"]).tolist()) == set(range(len(data.SHAPE_KINDS)))
    assert x.any(axis=1).all()  # every image shows its shape


def test_make_shapes_factors_describe_the_image():
    x, factors = data.make_shapes(400, seed=0)
    images = x.reshape(-1, 28, 28)
    rows, cols = np.mgrid[:28, :28]
    counts = images.sum(axis=(1, 2))
    # square, disc and cross are symmetric about their centre, so their pixels average to it
    symmetric = factors["kind"] != data.SHAPE_KINDS.index("triangle")
    centre_col = (images * cols).sum(axis=(1, 2)) / counts
    centre_row = (images * rows).sum(axis=(1, 2)) / counts
    np.testing.assert_allclose(centre_col[symmetric], factors["x_position"][symmetric], atol=0.5)
    np.testing.assert_allclose(centre_row[symmetric], factors["y_position"][symmetric], atol=0.5)
    # a square of half-width s covers about (2s)^2 pixels
    square = factors["kind"] == data.SHAPE_KINDS.index("square")
    np.testing.assert_allclose(counts[square], (2 * factors["size"][square]) ** 2, rtol=0.35)
    # no shape is clipped by the frame, so every factor stays visible
    for centre in (factors["x_position"], factors["y_position"]):
        assert (centre - factors["size"] >= 0).all() and (centre + factors["size"] <= 27).all()


def test_load_shapes():
    ds = data.load("shapes", seed=0)
    n_train, n_test = data.BUILTIN_SIZES["shapes"]
    assert ds.x_train.shape == (n_train, 784) and ds.x_test.shape == (n_test, 784)
    assert (ds.kind, ds.image_shape) == ("binary", (28, 28))
    assert all(value.shape == (n_train,) for value in ds.factors.values())
    np.testing.assert_array_equal(ds.y_train, ds.factors["kind"])
    assert not np.array_equal(data.load("shapes", seed=1).x_train[:100], ds.x_train[:100])


@pytest.mark.parametrize("make", [data.make_pinwheel, data.make_two_moons, data.make_ring])
def test_toy_sets_are_seeded_and_finite(make):
    x, y = make(300, seed=4)
    x_again, y_again = make(300, seed=4)
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert y.shape == (300,) and y.dtype == np.int64
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(y, y_again)
    assert not np.array_equal(x, make(300, seed=5)[0])
    with pytest.raises(ValueError):
        make(0)
    with pytest.raises(TypeError):
        make(2.5)


def test_toy_sets_have_their_shape():
    x, y = data.make_ring(4000, seed=0, n_modes=8, radius=2.0, std=0.1)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 2.0, atol=0.02)
    for k in range(8):
        angle = 2 * np.pi * k / 8
        np.testing.assert_allclose(x[y == k].mean(axis=0), [2 * np.cos(angle), 2 * np.sin(angle)], atol=0.05)
    x, y = data.make_two_moons(4000, seed=0)
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.0], atol=0.05)
    assert np.bincount(y).tolist() == [2000, 2000]
    x, y = data.make_pinwheel(4000, seed=0, n_arms=5)
    assert set(np.unique(y).tolist()) == set(range(5))
    # radii are 1 + 0.3 * noise along each arm
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 1.0, atol=0.05)


@pytest.mark.parametrize("name", ["pinwheel", "moons", "ring"])
def test_load_toy_sets(name):
    ds = data.load(name, seed=3)
    assert ds.x_train.shape == (5000, 2) and ds.x_test.shape == (1000, 2)
    assert (ds.kind, ds.likelihood, ds.image_shape) == ("real", "gaussian", None)
    np.testing.assert_array_equal(ds.x_train, data.load(name, seed=3).x_train)


# ---------------------------------------------------------------------------------------------
# From stored values to model input


def test_to_float():
    x = np.array([[0, 51, 255]], np.uint8)
    for dtype in (np.float32, np.float64):
        out = data.to_float(x, dtype)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, np.array([[0.0, 0.2, 1.0]], dtype))
    assert data.to_float(np.array([[True, False]])).tolist() == [[1.0, 0.0]]
    floats = np.zeros((2, 3), np.float32)
    assert data.to_float(floats) is floats  # no copy when nothing changes
    with pytest.raises(TypeError):
        data.to_float([[0, 1]])
    with pytest.raises(TypeError):
        data.to_float(floats, np.int32)


def test_to_float_reads_memmaps(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = data.to_float(mapped[:1])
    assert type(out) is np.ndarray and out.flags.writeable
    np.testing.assert_array_equal(out, [[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binarize_draws_bernoulli(dtype):
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 51, dtype=dtype)[None, :].repeat(4, axis=0)  # (4, 51): p = 0, 0.02, ..., 1
    draws = np.stack([data.binarize(x, rng) for _ in range(2000)])  # (2000, 4, 51)
    assert draws.dtype == dtype and set(np.unique(draws).tolist()) <= {0.0, 1.0}
    # the frequency of on-pixels is x, within binomial error: 8000 draws a level, 51 levels
    p = x[0].astype(np.float64)
    inner = slice(1, -1)
    se = np.sqrt(p[inner] * (1 - p[inner]) / 8000)
    assert np.max(np.abs(draws[:, :, inner].mean(axis=(0, 1)) - p[inner]) / se) < 5.0
    assert (draws[:, :, 0] == 0).all() and (draws[:, :, -1] == 1).all()  # p = 0 and p = 1 are certain
    assert not np.array_equal(draws[0], draws[1])  # a fresh sample each call
    # the pixels of a row are independent: two neighbours at p = 0.5 are both on a quarter of the time
    half = np.full((20000, 2), 0.5, dtype)
    both = data.binarize(half, rng).prod(axis=1).mean()
    assert abs(both - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 20000)


def test_binarize_is_the_textbook_draw():
    # pixel d is on when u_d < x_d, u_d = rng.random in x's dtype: one uniform per pixel, in order
    x = np.random.default_rng(1).random((9, 7))
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        expected = (np.random.default_rng(5).random(xd.shape, dtype=dtype) < xd).astype(dtype)
        np.testing.assert_array_equal(data.binarize(xd, np.random.default_rng(5)), expected)


def test_binarize_threshold_and_arguments():
    for dtype in (np.float32, np.float64):
        x = np.array([[0.2, 0.5, 0.7], [0.0, 0.51, 1.0]], dtype)
        out = data.binarize(x, threshold=0.5)
        assert out.dtype == dtype and out.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]   # on above, not at
    # a threshold draws nothing, even when an rng is given
    rng, twin = np.random.default_rng(2), np.random.default_rng(2)
    assert data.binarize(x, rng, threshold=0.5).tolist() == out.tolist()
    assert rng.random() == twin.random()
    with pytest.raises(TypeError, match="rng=np.random.Generator"):
        data.binarize(x)  # a draw needs an rng
    with pytest.raises(TypeError, match="rng=np.random.Generator.*got int"):
        data.binarize(x, 0)  # a seed is not a generator
    for bad in (np.array([[0, 255]], np.uint8), np.array([0.5, 0.5], np.float32), np.zeros((1, 2), np.float16)):
        with pytest.raises(TypeError, match="x must be a 2-D float32 or float64 array"):
            data.binarize(bad, np.random.default_rng(0))  # to_float first


def test_split_validation():
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    ds = data.Dataset("toy", x, x[:0], y_train=np.arange(50))
    x_train, y_train, x_valid, y_valid = data.split_validation(ds, 10, seed=0)
    assert x_train.shape == (40, 2) and x_valid.shape == (10, 2) and y_valid.shape == (10,)
    # labels travel with their rows
    np.testing.assert_array_equal(x_valid[:, 0], 2 * y_valid)
    assert x_valid[2, 1] == x[x_valid.index[2], 1] and np.asarray(x_valid, np.float64).dtype == np.float64
    np.testing.assert_array_equal(x_train[:][:, 0], 2 * y_train)
    np.testing.assert_array_equal(x_train[3:7], x[x_train.index[3:7]])
    # in increasing row order, so that reading a memory-mapped file goes forward
    assert (np.diff(x_train.index) > 0).all() and (np.diff(x_valid.index) > 0).all()
    # disjoint, and together they are the whole training set
    assert not set(y_train.tolist()) & set(y_valid.tolist())
    assert sorted(y_train.tolist() + y_valid.tolist()) == list(range(50))
    again = data.split_validation(ds, 10, seed=0)
    np.testing.assert_array_equal(again[3], y_valid)
    assert not np.array_equal(data.split_validation(ds, 10, seed=1)[3], y_valid)
    assert data.split_validation(ds, 0, seed=0)[2].shape == (0, 2)
    for bad in (-1, 50):
        with pytest.raises(ValueError):
            data.split_validation(ds, bad, seed=0)
    with pytest.raises(TypeError):
        data.split_validation(ds, 2.0, seed=0)


def test_split_validation_of_a_memory_mapped_set_copies_no_row(tmp_path):
    # a split that copied x[train] would need memory for the whole training set (the bug of issue 31)
    x = np.random.default_rng(0).integers(0, 256, (4000, 784), dtype=np.uint8)   # 3 MB
    np.save(tmp_path / "big.npy", x)
    ds = data.load_array(tmp_path / "big.npy")
    tracemalloc.start()
    x_train, _, x_valid, _ = data.split_validation(ds, 400, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 20   # the indices (8 bytes a row) and a mask, not the rows' 784 bytes
    for part in (x_train, x_valid):
        assert isinstance(part, data.Rows) and part.x is ds.x_train and part.index.dtype.kind == "i"
    assert x_train.shape == (3600, 784) and x_valid.shape == (400, 784)
    np.testing.assert_array_equal(x_train[[0, 5, 3599]], x[x_train.index[[0, 5, 3599]]])
    # the same split as sorting the rest of the seeded permutation (how it was made before)
    order = np.random.default_rng(0).permutation(4000)
    np.testing.assert_array_equal(x_train.index, np.sort(order[400:]))
    np.testing.assert_array_equal(x_valid.index, np.sort(order[:400]))


def test_split_validation_keeps_a_predefined_split(tmp_path, no_known_hashes, small_binarized):
    x = fake_binarized(tmp_path)
    ds = data.load_binarized_mnist(tmp_path)
    x_train, y_train, x_valid, y_valid = data.split_validation(ds, 1, seed=0)
    np.testing.assert_array_equal(x_train, x["train"])
    np.testing.assert_array_equal(x_valid, x["valid"])
    assert y_train is None and y_valid is None


def test_dataset_checks_its_fields():
    x = np.zeros((4, 6), np.float32)
    assert data.Dataset("d", x, x, kind="grey").likelihood == "bernoulli"
    assert data.Dataset("d", x, x).likelihood == "gaussian"
    with pytest.raises(ValueError):
        data.Dataset("d", x, x, y_train=np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        data.Dataset("d", x, np.zeros((4, 5)))
    with pytest.raises(ValueError):
        data.Dataset("d", x, x, image_shape=(2, 2))
    with pytest.raises(ValueError):
        data.Dataset("d", x, x, kind="colour")


def test_name_or_fallback_notes_a_missing_set_and_returns_the_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    assert data.name_or_fallback("mnist", "shapes", tmp_path) == "shapes"
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "using the built-in 'shapes' set instead" in out
    assert data.name_or_fallback("moons", "shapes", tmp_path) == "moons"   # a set that loads: no note
    assert capsys.readouterr().out == ""
