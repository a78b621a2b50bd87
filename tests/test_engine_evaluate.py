"""The engine's log p(x) against the reference: npvae.engine.evaluate.log_likelihood (FastVAE, the examples
split over threads) gives npvae.evaluate.log_likelihood's estimates for the same rng.

float64: relative difference <= 1e-12; float32: a few ulps (the Bernoulli
kernel groups its float32 sums over D otherwise than the reference does).
"""
import threading

import numpy as np
import pytest

import npvae
from npvae import evaluate as reference
from npvae.engine import evaluate as engine
from npvae.engine import kernels
from npvae.engine.model import FastVAE
from npvae.model import VAE

RTOL = {np.float64: 1e-12, np.float32: 8 * np.finfo(np.float32).eps}
# (likelihood, x_sigma, data): binary and grey x for a Bernoulli decoder, real x for a Gaussian one
LIKELIHOODS = [("bernoulli", None, "binary"), ("bernoulli", None, "grey"), ("gaussian", None, "real"),
               ("gaussian", 0.7, "real")]
LIKELIHOOD_IDS = ["bernoulli-binary", "bernoulli-grey", "gaussian", "gaussian-fixed"]


def small_vae(likelihood="bernoulli", x_sigma=None, dtype=np.float64):
    return VAE(12, (9, 7), 3, likelihood=likelihood, activation="tanh", dtype=dtype, seed=2, x_sigma=x_sigma)


def rows(n, kind="binary", dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = {"binary": lambda: rng.random((n, 12)) < 0.5, "grey": lambda: rng.random((n, 12)),
         "real": lambda: rng.standard_normal((n, 12))}[kind]()
    return x.astype(dtype)


def other_q(n, seed=9):
    """A q(z|x) that is not the encoder's, so that splitting it by rows is checked."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3)), rng.uniform(-1.0, 0.0, (n, 3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("given_q", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("likelihood, x_sigma, kind", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_log_likelihood_is_the_references_for_any_thread_count(likelihood, x_sigma, kind, threads, given_q, dtype):
    model = small_vae(likelihood, x_sigma, dtype)
    x = rows(11, kind, dtype, seed=4)
    kw = dict(k=40, batch_size=2, chunk=16, q=other_q(11) if given_q else None)  # several batches and chunks a thread
    expected = reference.log_likelihood(model, x, rng=np.random.default_rng(3), **kw)
    got = engine.log_likelihood(model, x, rng=np.random.default_rng(3), threads=threads, **kw)
    assert got.shape == (11,) and got.dtype == np.float64 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=RTOL[dtype])
    # and the noise is each example's own: another seed moves every estimate, on average by far more
    # than the tolerance (so the agreement above is not one of estimates that hardly depend on the noise)
    other = engine.log_likelihood(model, x, rng=np.random.default_rng(4), threads=threads, **kw)
    assert np.all(other != got)
    assert np.mean(np.abs(other - got)) > 100 * RTOL[dtype] * np.mean(np.abs(got))


def test_each_thread_runs_the_engines_bernoulli_kernel(monkeypatch):
    # the engine's estimates are the reference's, but by its own work: FastVAE's
    # kernel on every thread, where the reference runs distributions.bernoulli_log_prob
    seen, lock = [], threading.Lock()
    kernel = kernels.bernoulli_log_prob

    def counted(*args, **kw):
        with lock:
            seen.append(threading.get_ident())
        return kernel(*args, **kw)
    monkeypatch.setattr(kernels, "bernoulli_log_prob", counted)
    model, x = small_vae(), rows(9, seed=8)
    expected = reference.log_likelihood(model, x, k=20, rng=np.random.default_rng(0), batch_size=3)
    assert seen == []
    got = engine.log_likelihood(model, x, k=20, rng=np.random.default_rng(0), batch_size=3, threads=3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert len(seen) == 3 and len(set(seen)) == 3           # 3 examples a thread, one batch each


def test_log_likelihood_of_a_fast_vae_and_with_auto_threads_is_the_references():
    model = small_vae()
    x = rows(9, seed=5)
    expected = reference.log_likelihood(model, x, k=30, rng=np.random.default_rng(1))
    for m, threads in ((FastVAE.like(model), 2), (model, "auto"), (model, None)):
        got = engine.log_likelihood(m, x, k=30, rng=np.random.default_rng(1), threads=threads)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the engine leaves the model it was given as it was
    np.testing.assert_array_equal(reference.log_likelihood(model, x, k=30, rng=np.random.default_rng(1)), expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("likelihood, x_sigma, kind", LIKELIHOODS, ids=LIKELIHOOD_IDS)
def test_log_likelihood_prior_is_the_references(likelihood, x_sigma, kind, threads):
    model = small_vae(likelihood, x_sigma)
    x = rows(7, kind, seed=6)
    expected = reference.log_likelihood_prior(model, x, k=30, rng=np.random.default_rng(2), batch_size=3)
    got = engine.log_likelihood_prior(model, x, k=30, rng=np.random.default_rng(2), batch_size=3, threads=threads)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the prior as proposal is not the encoder's q: the estimates differ
    encoder = engine.log_likelihood(model, x, k=30, rng=np.random.default_rng(2), batch_size=3, threads=threads)
    assert np.all(encoder != got)


@pytest.mark.parametrize("n, threads", [(1, 2), (2, 3), (2, 4), (3, 8)])
def test_log_likelihood_with_more_threads_than_examples(n, threads):
    model = small_vae()
    x = rows(n, seed=5)
    expected = reference.log_likelihood(model, x, k=30, rng=np.random.default_rng(1))
    got = engine.log_likelihood(model, x, k=30, rng=np.random.default_rng(1), threads=threads)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_log_likelihood_over_threads_reports_the_total_progress():
    model = small_vae()
    x = rows(10, seed=7)
    calls = []
    engine.log_likelihood(model, x, k=8, rng=np.random.default_rng(0), batch_size=2, threads=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert all(total == 10 for _, total in calls)
    done = [d for d, _ in calls]
    # each thread takes 5 examples in batches of 2, 2, 1: six reports, strictly increasing to 10
    assert len(done) == 6 and all(a < b for a, b in zip(done, done[1:])) and done[-1] == 10
    # on one thread the reports are the reference's, batch by batch
    one, ref = [], []
    engine.log_likelihood(model, x, k=8, rng=np.random.default_rng(0), batch_size=3, threads=1,
                          progress=lambda done, total: one.append((done, total)))
    reference.log_likelihood(model, x, k=8, rng=np.random.default_rng(0), batch_size=3,
                             progress=lambda done, total: ref.append((done, total)))
    assert one == ref == [(3, 10), (6, 10), (9, 10), (10, 10)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two"])
def test_log_likelihood_rejects_a_bad_thread_count_naming_threads(bad):
    model, x = small_vae(), rows(3)
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        engine.log_likelihood(model, x, k=5, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        engine.log_likelihood_prior(model, x, k=5, threads=bad)


def test_log_likelihood_checks_its_arguments_as_the_reference():
    model, x = small_vae(), rows(4)
    for kw, error in ((dict(k=0), ValueError), (dict(k=2.5), TypeError), (dict(rng=0), TypeError),
                      (dict(batch_size=0), ValueError), (dict(q=other_q(3)), ValueError)):
        for f in (reference.log_likelihood, engine.log_likelihood):
            with pytest.raises(error):
                f(model, x, **{"k": 5, **kw})


def test_npvae_log_likelihood_is_the_engines():
    assert npvae.log_likelihood is engine.log_likelihood


def test_log_likelihood_reads_x_a_block_at_a_time_and_the_blocks_change_nothing(monkeypatch):
    model, x = small_vae(), rows(23)
    whole = engine.log_likelihood(model, x, k=6, rng=np.random.default_rng(4), threads=2)
    reads = []

    class Stored:   # rows that slice into arrays, as PreparedRows or a memory-mapped file do
        shape = x.shape

        def __getitem__(self, s):
            reads.append(s.stop - s.start)
            return x[s]
    monkeypatch.setattr(engine, "STREAM_ROWS", 5)
    blocks = engine.log_likelihood(model, Stored(), k=6, rng=np.random.default_rng(4), threads=2)
    assert reads == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(blocks, whole, rtol=RTOL[np.float64])   # (a thread's share of a block differs)
    np.testing.assert_allclose(blocks, reference.log_likelihood(model, x, k=6, rng=np.random.default_rng(4)),
                               rtol=RTOL[np.float64])
    done = []
    engine.log_likelihood(model, Stored(), k=2, rng=np.random.default_rng(4), threads=1,
                          progress=lambda d, n: done.append((d, n)))
    assert [d for d, _ in done][-1] == 23 and {n for _, n in done} == {23} and done == sorted(done)


def test_evaluating_a_memory_mapped_set_takes_no_more_memory_for_more_rows(tmp_path, monkeypatch):
    import tracemalloc

    from npvae.engine.binarize import PreparedRows, make_prepare
    monkeypatch.setattr(engine, "STREAM_ROWS", 500)
    model = VAE(100, (9,), 3, dtype=np.float64, seed=2)
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64)
    peaks = {}
    for n in (2000, 4000):   # whole blocks (500) and batches (elbo_stats' 1000), at least two, in both
        np.save(tmp_path / f"{n}.npy", (np.random.default_rng(0).random((n, 100)) * 255).astype(np.uint8))
        x = PreparedRows(np.load(tmp_path / f"{n}.npy", mmap_mode="r"), prepare, 12345)
        tracemalloc.start()
        engine.log_likelihood(model, x, k=2, rng=np.random.default_rng(0), threads=1)
        reference.elbo_stats(model, x, np.random.default_rng(0))
        reference.active_units(model, x)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if n == 2000:   # every figure is the one of the set prepared whole
            xs = np.asarray(x)
            assert reference.elbo_stats(model, x, np.random.default_rng(1)) == reference.elbo_stats(
                model, xs, np.random.default_rng(1))
            assert reference.active_units(model, x)[0] == reference.active_units(model, xs)[0]
    # the 2000 rows more would take 1.6 MB prepared at once; read a block at a time, only log p(x)'s
    # (N,) answer grows (16 kB)
    assert peaks[4000] - peaks[2000] < 2000 * 100 * 8 / 10, peaks
