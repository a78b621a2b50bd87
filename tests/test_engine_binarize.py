"""The engine's binarization against the reference: binarize_rows and binarize_bytes draw data.binarize's
distribution (another stream), and Prepare gives the reference path's numbers bit for bit where no
randomness is involved.

Frequencies are compared per grey level within a stated number of binomial
standard errors; the keyed streams are checked for what the engine needs of
them (a block of rows draws what the whole batch does, threads do not mix).
"""
import threading

import numpy as np
import pytest

from npvae import data
from npvae.engine.binarize import (Prepare, _row_words, binarize_bytes, binarize_key, binarize_rows,
                                   make_prepare, prepare_batch)
from npvae.train import TrainConfig

LEVELS = np.arange(256, dtype=np.uint8)   # every grey level k, as stored


def on_frequencies(draw, n_keys, rows=2000):
    """(256,) float64: how often each grey level's pixel is on, over n_keys minibatches of `rows` rows.

    draw(k, rng) -> (rows, 256) binary, for k (rows, 256) uint8 holding every level in every row.
    """
    k = LEVELS[None, :].repeat(rows, axis=0)
    rng = np.random.default_rng(11)
    return np.mean([draw(k, rng).mean(axis=0, dtype=np.float64) for _ in range(n_keys)], axis=0)


# --- the same distribution as data.binarize ------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keyed_draws_have_the_references_distribution_at_every_grey_level(dtype):
    n = 20 * 2000                                                           # draws a level
    reference = on_frequencies(lambda k, rng: data.binarize(data.to_float(k, dtype), rng), 20)
    rows = on_frequencies(lambda k, rng: binarize_rows(data.to_float(k, dtype), binarize_key(rng)), 20)
    as_bytes = on_frequencies(lambda k, rng: binarize_bytes(k, binarize_key(rng), dtype=dtype), 20)
    # k = 0 is never on and k = 255 always, in every one of them
    for f in (reference, rows, as_bytes):
        assert f[0] == 0.0 and f[255] == 1.0
    p = LEVELS[1:255] / 255.0
    se = np.sqrt(p * (1 - p) / n)
    for name, f in (("reference", reference), ("binarize_rows", rows), ("binarize_bytes", as_bytes)):
        z = np.abs(f[1:255] - p) / se
        assert z.max() < 5.5, (name, int(np.argmax(z)) + 1, z.max())           # 254 levels: 5.5 se
    # and against each other: two independent frequencies differ by sqrt(2) standard errors
    for f in (rows, as_bytes):
        assert np.max(np.abs(f[1:255] - reference[1:255]) / (np.sqrt(2) * se)) < 5.5


@pytest.mark.parametrize("draw", ["rows", "bytes"])
def test_keyed_draws_are_independent_between_pixels_and_rows(draw):
    # Bernoulli(x) draws pixels independently; a stream that reused a word for two
    # pixels (four 16-bit words share a 64-bit draw) or two rows would correlate them
    k = np.full((4000, 64), 128, np.uint8)
    on = (binarize_bytes(k, 99) if draw == "bytes" else binarize_rows(data.to_float(k), 99)).astype(np.float64)
    limit = 5 / np.sqrt(on.size)                                            # correlation of independent draws
    for a, b in ((on[:, :-1], on[:, 1:]), (on[:, :-4], on[:, 4:]), (on[:-1], on[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < limit


# --- the keyed streams ---------------------------------------------------------------------------

@pytest.mark.parametrize("D", [5, 7, 8, 9])
@pytest.mark.parametrize("stored", ["floats", "bytes"])
def test_binarize_draws_each_row_alike_whatever_block_it_is_in(stored, D):
    # Processes binarize their own rows of a minibatch: a block that starts at
    # row a draws what the whole batch draws for those rows.
    grey = np.random.default_rng(0).integers(0, 256, (9, D), dtype=np.uint8)
    as_stored = (lambda k: k) if stored == "bytes" else data.to_float
    draw = binarize_bytes if stored == "bytes" else binarize_rows
    x = as_stored(grey)
    whole = draw(x, key=123)
    blocks = [draw(x[a:b], key=123, first_row=a) for a, b in ((0, 3), (3, 4), (4, 9))]
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert not np.array_equal(draw(x, key=124), whole)                    # another key, other draws
    same = draw(as_stored(np.full((9, D), 128, np.uint8)), key=123)
    assert len({r.tobytes() for r in same}) > 1                           # each row has its own draws


def test_binarize_key_and_the_streams_of_keys():
    # binarize_key: one raw 64-bit draw of the generator, its top 63 bits
    rng, twin = np.random.default_rng(8), np.random.default_rng(8)
    keys = [binarize_key(rng) for _ in range(200)]
    assert keys == [int(w) >> 1 for w in twin.bit_generator.random_raw(200)]
    assert all(0 <= k < 2**63 for k in keys) and max(keys) > 2**62 and len(set(keys)) == 200
    assert rng.random() == twin.random()                 # the generator goes on in step
    with pytest.raises(TypeError, match="binarize_key: rng must be a numpy.random.Generator"):
        binarize_key(8)
    # each key's words are uniform, and keys next to each other are unrelated
    words = np.stack([_row_words(k, 0, 4, 1000, np.uint16) for k in (0, 1, 2, 2**64 - 1)])
    assert words.dtype == np.uint16 and words.shape == (4, 4, 1000)
    for w in words:
        assert abs(w.mean() / 65535 - 0.5) < 0.02        # 4000 uniform words: standard error 0.005
    for a, b in ((0, 1), (1, 2), (0, 3)):
        assert np.mean(words[a] == words[b]) < 0.01       # equal by chance: 1 in 65536
    # a thread's stream is started afresh each call: the same key, the same words
    np.testing.assert_array_equal(_row_words(1, 0, 4, 1000, np.uint16), words[1])
    with pytest.raises(ValueError, match="key"):
        binarize_rows(np.zeros((1, 3), np.float32), key=2**64)
    with pytest.raises(ValueError, match="key"):
        binarize_bytes(np.zeros((1, 3), np.uint8), key=-1)
    with pytest.raises(TypeError, match="key must be an integer"):
        binarize_bytes(np.zeros((1, 3), np.uint8), key=1.5)


def test_row_words_in_threads_at_once_are_each_their_own():
    # the PCG64 that _row_words restarts is one per thread: threads drawing at once do not mix
    expected = {k: _row_words(k, 3, 20, 784, np.uint16).copy() for k in range(4)}
    failures, start = [], threading.Barrier(4)

    def draw(k):
        start.wait()
        for _ in range(200):
            if not np.array_equal(_row_words(k, 3, 20, 784, np.uint16), expected[k]):
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
    k = LEVELS[None, :].repeat(2000, axis=0)                             # every grey level, 2000 rows
    draws = np.stack([binarize_bytes(k, key, dtype=dtype) for key in range(20)])  # 40 000 a level
    assert draws.dtype == dtype and set(np.unique(draws).tolist()) <= {0.0, 1.0}
    assert (draws[..., 0] == 0).all() and (draws[..., 255] == 1).all()   # k = 0 never, k = 255 always
    assert binarize_bytes(np.full((1000, 512), 255, np.uint8), 5).all()  # w = 65535: ~8 a run if missed
    p = np.arange(255) * 257 / 65536                                     # k/255 (1 - 2^-16) below 255
    mean = draws[..., :255].mean(axis=(0, 1))
    se = np.sqrt(p * (1 - p) / 40000) + 1e-9
    assert np.max(np.abs(mean - p) / se) < 5.5                          # 254 levels, 5.5 standard errors
    np.testing.assert_allclose(p, np.arange(255) / 255, atol=2.0 ** -16)
    with pytest.raises(TypeError, match="2-D uint8"):
        binarize_bytes(data.to_float(k[:3], dtype), key=1)
    with pytest.raises(TypeError, match="2-D uint8"):
        binarize_bytes(k[0], key=1)
    # written into a given array: the same draws, in it
    out = np.full((3, 256), np.nan, dtype)
    assert binarize_bytes(k[:3], 77, dtype=dtype, out=out) is out
    np.testing.assert_array_equal(out, binarize_bytes(k[:3], 77, dtype=dtype))
    for bad in (np.empty((2, 256), dtype), np.empty((3, 256), np.float16), [[0.0] * 256] * 3):
        with pytest.raises(ValueError, match=f"out must be a {np.dtype(dtype)} array of shape \\(3, 256\\)"):
            binarize_bytes(k[:3], 77, dtype=dtype, out=bad)


# --- Prepare against the reference path ------------------------------------------------------------

def reference_input(x, binarize, threshold, likelihood, kind, dtype):
    """The model input by the README's loop, where no draw is involved: to_float, then x > threshold
    for a Bernoulli model on grey levels with binarize="threshold"."""
    x = data.to_float(x, dtype)
    if likelihood == "bernoulli" and kind == "grey" and binarize == "threshold":
        return data.binarize(x, threshold=threshold)
    return x


def stored(rows, rng):
    """7 rows of 12 values stored as `rows` says: grey uint8, their floats k/255, binary bool or real float32."""
    grey = rng.integers(0, 256, (7, 12), dtype=np.uint8)
    grey[0, :3] = 0, 51, 255                              # the ends, and a level at a threshold below
    return {"grey": grey, "grey floats": data.to_float(grey, np.float64), "binary": rng.random((7, 12)) < 0.4,
            "real": rng.standard_normal((7, 12)).astype(np.float32)}[rows]


# (binarize, threshold, likelihood, kind, stored rows): every case without a draw (0.2 is grey level 51,
# so a pixel sits exactly at the threshold and stays off)
NO_DRAW = [("threshold", 0.5, "bernoulli", "grey", "grey"), ("threshold", 0.2, "bernoulli", "grey", "grey"),
           ("threshold", 0.5, "bernoulli", "grey", "grey floats"), ("none", 0.5, "bernoulli", "grey", "grey"),
           ("none", 0.5, "bernoulli", "grey", "grey floats"), ("dynamic", 0.5, "bernoulli", "binary", "binary"),
           ("dynamic", 0.5, "gaussian", "grey", "grey"), ("dynamic", 0.5, "gaussian", "real", "real"),
           ("threshold", 0.5, "gaussian", "real", "real")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("binarize, threshold, likelihood, kind, rows", NO_DRAW,
                         ids=[f"{b}-{t}-{lik}-{k}-{r}" for b, t, lik, k, r in NO_DRAW])
def test_prepare_without_a_draw_is_the_reference_path_bit_for_bit(binarize, threshold, likelihood, kind, rows,
                                                                  dtype):
    x = stored(rows, np.random.default_rng(3))
    expected = reference_input(x, binarize, threshold, likelihood, kind, dtype)
    prepare = make_prepare(binarize, threshold, likelihood, kind, dtype)
    assert isinstance(prepare, Prepare) and not prepare.dynamic
    rng, twin = np.random.default_rng(4), np.random.default_rng(4)
    got = prepare(x, rng)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    assert rng.random() == twin.random()                  # nothing drawn: eps come from where they would
    np.testing.assert_array_equal(np.concatenate([prepare.rows(x[:3], 0, 0), prepare.rows(x[3:], 0, 3)]), expected)
    config = TrainConfig(binarize=binarize, threshold=threshold)
    np.testing.assert_array_equal(prepare_batch(x, config, likelihood, kind, dtype, np.random.default_rng(4)),
                                  expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dynamic_prepare_is_one_key_from_rng_and_the_keyed_draw_of_its_rows(dtype):
    k = np.random.default_rng(5).integers(0, 256, (9, 30), dtype=np.uint8)
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", dtype)
    assert prepare.dynamic and prepare.threshold is None
    rng, twin = np.random.default_rng(6), np.random.default_rng(6)
    key = binarize_key(twin)
    # stored bytes: binarize_bytes, no float pass on the way; floats: binarize_rows
    np.testing.assert_array_equal(prepare(k, rng), binarize_bytes(k, key, dtype=dtype))
    assert rng.random() == twin.random()                  # the minibatch took one key from rng, no more
    x = data.to_float(k, dtype)
    np.testing.assert_array_equal(prepare.rows(x, key), binarize_rows(x, key))
    # blocks of rows, each prepared on its own (as processes do), give the whole
    np.testing.assert_array_equal(np.concatenate([prepare.rows(k[:4], key, 0), prepare.rows(k[4:], key, 4)]),
                                  prepare.rows(k, key))
    out = np.full((9, 30), np.nan, dtype)
    assert prepare.rows(k, key, 0, out=out) is out
    np.testing.assert_array_equal(out, binarize_bytes(k, key, dtype=dtype))


@pytest.mark.parametrize("binarize, likelihood, kind, make", [
    ("dynamic", "bernoulli", "grey", lambda rng: (rng.random((37, 11)) * 255).astype(np.uint8)),
    ("dynamic", "bernoulli", "grey", lambda rng: rng.random((37, 11))),
    ("threshold", "bernoulli", "grey", lambda rng: rng.random((37, 11)).astype(np.float32)),
    ("none", "gaussian", "real", lambda rng: rng.standard_normal((37, 11)))])
def test_prepared_rows_in_slices_are_the_rows_prepared_whole(binarize, likelihood, kind, make):
    from npvae.engine.binarize import PreparedRows
    stored = make(np.random.default_rng(0))
    prepare = make_prepare(binarize, 0.5, likelihood, kind, np.float32)
    whole = prepare(stored, np.random.default_rng([0, 4]))
    rows = PreparedRows(stored, prepare, prepare.noise(np.random.default_rng([0, 4])))
    assert rows.shape == stored.shape and rows.dtype == np.float32 and len(rows) == 37
    assert np.array_equal(np.asarray(rows), whole)
    assert np.array_equal(np.concatenate([rows[a:a + 10] for a in range(0, 37, 10)]), whole)
    assert np.array_equal(rows[30:], whole[30:]) and np.array_equal(rows.first(5)[2:], whole[2:5])
    with pytest.raises(TypeError, match="slices of rows"):
        rows[3]
