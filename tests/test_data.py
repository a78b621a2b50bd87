"""Tests for npvae.data: real files when present, every accepted layout and every rejected file on fakes."""

import gzip
import hashlib
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from npvae import data
from npvae.train import make_prepare

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
        (np.zeros((2, 3, 4)), "2-D"),
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
    x = np.linspace(0, 1, 50, dtype=dtype)[None, :].repeat(4, axis=0)  # (4, 50)
    draws = np.stack([data.binarize(x, rng) for _ in range(2000)])  # (2000, 4, 50)
    assert draws.dtype == dtype and set(np.unique(draws).tolist()) <= {0.0, 1.0}
    # the mean of Bernoulli(x) draws is x; 2000 x 4 draws give a standard error below 0.006
    np.testing.assert_allclose(draws.mean(axis=(0, 1)), x[0], atol=0.03)
    assert not np.array_equal(draws[0], draws[1])  # a fresh sample each call
    assert (draws[:, :, 0] == 0).all() and (draws[:, :, -1] == 1).all()  # p = 0 and p = 1 are certain


@pytest.mark.parametrize("D", [5, 7, 8, 9])
@pytest.mark.parametrize("stored", ["floats", "bytes"])
def test_binarize_draws_each_row_alike_whatever_block_it_is_in(stored, D):
    # Processes binarize their own rows of a minibatch: a block that starts at
    # row a draws what the whole batch draws for those rows.
    grey = np.random.default_rng(0).integers(0, 256, (9, D), dtype=np.uint8)
    as_stored = (lambda k: k) if stored == "bytes" else data.to_float
    draw = data.binarize_bytes if stored == "bytes" else data.binarize_rows
    x = as_stored(grey)
    whole = draw(x, key=123)
    blocks = [draw(x[a:b], key=123, first_row=a) for a, b in ((0, 3), (3, 4), (4, 9))]
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert not np.array_equal(draw(x, key=124), whole)                    # another key, other draws
    same = draw(as_stored(np.full((9, D), 128, np.uint8)), key=123)
    assert len({r.tobytes() for r in same}) > 1                           # each row has its own draws


def test_binarize_is_binarize_rows_with_a_key_from_rng():
    x = np.random.default_rng(0).random((9, 7)).astype(np.float32)
    np.testing.assert_array_equal(data.binarize(x, np.random.default_rng(5)), data.binarize_rows(
        x, data.binarize_key(np.random.default_rng(5))))


def test_binarize_key_and_the_streams_of_keys():
    # binarize_key: one raw 64-bit draw of the generator, its top 63 bits
    rng, twin = np.random.default_rng(8), np.random.default_rng(8)
    keys = [data.binarize_key(rng) for _ in range(200)]
    assert keys == [int(w) >> 1 for w in twin.bit_generator.random_raw(200)]
    assert all(0 <= k < 2**63 for k in keys) and max(keys) > 2**62 and len(set(keys)) == 200
    assert rng.random() == twin.random()                 # the generator goes on in step
    # each key's words are uniform, and keys next to each other are unrelated
    words = np.stack([data._row_words(k, 0, 4, 1000, np.uint16) for k in (0, 1, 2, 2**64 - 1)])
    assert words.dtype == np.uint16 and words.shape == (4, 4, 1000)
    for w in words:
        assert abs(w.mean() / 65535 - 0.5) < 0.02        # 4000 uniform words: standard error 0.005
    for a, b in ((0, 1), (1, 2), (0, 3)):
        assert np.mean(words[a] == words[b]) < 0.01       # equal by chance: 1 in 65536
    # a thread's stream is started afresh each call: the same key, the same words
    np.testing.assert_array_equal(data._row_words(1, 0, 4, 1000, np.uint16), words[1])
    with pytest.raises(ValueError, match="key"):
        data.binarize_rows(np.zeros((1, 3), np.float32), key=2**64)
    with pytest.raises(ValueError, match="key"):
        data.binarize_bytes(np.zeros((1, 3), np.uint8), key=-1)
    with pytest.raises(TypeError, match="key must be an integer"):
        data.binarize_bytes(np.zeros((1, 3), np.uint8), key=1.5)


def test_row_words_in_threads_at_once_are_each_their_own():
    # the PCG64 that _row_words restarts is one per thread: threads drawing at once do not mix
    import threading
    expected = {k: data._row_words(k, 3, 20, 784, np.uint16).copy() for k in range(4)}
    failures, start = [], threading.Barrier(4)

    def draw(k):
        start.wait()
        for _ in range(200):
            if not np.array_equal(data._row_words(k, 3, 20, 784, np.uint16), expected[k]):
                failures.append(k)
                return
    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binarize_bytes_draws_bernoulli_of_the_grey_level(dtype):
    k = np.arange(256, dtype=np.uint8)[None, :].repeat(2000, axis=0)   # every grey level, 2000 rows
    draws = np.stack([data.binarize_bytes(k, key, dtype=dtype) for key in range(20)])  # 40 000 a level
    assert draws.dtype == dtype and set(np.unique(draws).tolist()) <= {0.0, 1.0}
    assert (draws[..., 0] == 0).all() and (draws[..., 255] == 1).all()   # k = 0 never, k = 255 always
    assert data.binarize_bytes(np.full((1000, 512), 255, np.uint8), 5).all()  # w = 65535: ~8 a run if missed
    p = np.arange(255) * 257 / 65536                                     # k/255 (1 - 2^-16) below 255
    mean = draws[..., :255].mean(axis=(0, 1))
    se = np.sqrt(p * (1 - p) / 40000) + 1e-9
    assert np.max(np.abs(mean - p) / se) < 5.5                          # 254 levels, 5.5 standard errors
    np.testing.assert_allclose(p, np.arange(255) / 255, atol=2.0 ** -16)
    # the same image, prepared for training: the bytes path, with no float pass on the way
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", dtype)
    np.testing.assert_array_equal(prepare.rows(k[:3], 77, 0), data.binarize_bytes(k[:3], 77, dtype=dtype))
    x = data.to_float(k[:3], dtype)
    np.testing.assert_array_equal(prepare.rows(x, 77, 0), data.binarize_rows(x, 77))   # floats: as before
    with pytest.raises(TypeError, match="2-D uint8"):
        data.binarize_bytes(x, key=1)
    with pytest.raises(TypeError, match="2-D uint8"):
        data.binarize_bytes(k[0], key=1)
    # written into a given array: the same draws, in it
    out = np.full((3, 256), np.nan, dtype)
    assert prepare.rows(k[:3], 77, 0, out=out) is out
    np.testing.assert_array_equal(out, data.binarize_bytes(k[:3], 77, dtype=dtype))
    for bad in (np.empty((2, 256), dtype), np.empty((3, 256), np.float16), [[0.0] * 256] * 3):
        with pytest.raises(ValueError, match=f"out must be a {np.dtype(dtype)} array of shape \\(3, 256\\)"):
            data.binarize_bytes(k[:3], 77, dtype=dtype, out=bad)


def test_binarize_threshold_and_arguments():
    x = np.array([[0.2, 0.5, 0.7]], np.float32)
    out = data.binarize(x, threshold=0.5)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(TypeError):
        data.binarize(x)  # a draw needs an rng
    with pytest.raises(TypeError):
        data.binarize(np.array([[0, 255]], np.uint8), np.random.default_rng(0))  # to_float first


def test_split_validation():
    x = np.arange(100, dtype=np.float32).reshape(50, 2)
    ds = data.Dataset("toy", x, x[:0], y_train=np.arange(50))
    x_train, y_train, x_valid, y_valid = data.split_validation(ds, 10, seed=0)
    assert x_train.shape == (40, 2) and x_valid.shape == (10, 2) and y_valid.shape == (10,)
    # labels travel with their rows
    np.testing.assert_array_equal(x_valid[:, 0], 2 * y_valid)
    np.testing.assert_array_equal(x_train[:, 0], 2 * y_train)
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
