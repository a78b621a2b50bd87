"""Data-parallel steps: replicas, the worker threads, and a split step against the serial one."""
import os
import threading
import time

import numpy as np
import pytest

from npvae import parallel
from npvae.model import VAE, SplitBatch
from npvae.optim import SGD, Adam
from npvae.train import TrainConfig, Trainer, make_prepare, make_step


needs_processes = pytest.mark.skipif(not parallel.processes_available(),
                                     reason="helper processes need Linux on x86-64")


def small_vae(dtype=np.float64, **kw):
    base = dict(x_dim=12, hidden=(9, 7), z_dim=3, activation="tanh", dtype=dtype, seed=2)
    base.update(kw)
    return VAE(**base)


def binary_rows(n, d=12, seed=0):
    return (np.random.default_rng(seed).random((n, d)) > 0.5).astype(np.uint8) * 255


def grey_rows(n, d=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, d)).astype(np.uint8)


# (binarize, rows): stored rows used as they are, and grey levels with dynamic binarization,
# which each thread or process does for its own rows
PREPARED = [("none", binary_rows), ("dynamic", grey_rows)]


# --- split and resolve_threads -----------------------------------------------------------

@pytest.mark.parametrize("n, parts, align", [(10, 2, 1), (11, 3, 1), (1000, 2, 16), (5, 4, 1), (7, 2, 16)])
def test_split_covers_the_range_in_order(n, parts, align):
    cuts = parallel.split(n, parts, align)
    assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == parts + 1
    assert all(a <= b for a, b in zip(cuts, cuts[1:]))
    assert all(c % align == 0 for c in cuts[1:-1])
    if align == 1:
        assert max(np.diff(cuts)) - min(np.diff(cuts)) <= 1


@pytest.mark.parametrize("n, parts, align", [(11, 3, 1), (1000, 2, 16), (5, 4, 1)])
def test_ranges_are_the_pieces_between_the_cuts(n, parts, align):
    cuts = parallel.split(n, parts, align)
    assert parallel.ranges(n, parts, align) == [(cuts[j], cuts[j + 1]) for j in range(parts)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_resolve_threads_rejects_bad_values_naming_the_argument(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        parallel.resolve_threads(bad)


def test_resolve_threads_auto_is_at_most_two_and_at_most_the_usable_cpus():
    n = parallel.resolve_threads("auto")
    assert 1 <= n <= min(2, parallel.usable_cpus())
    if parallel.blas_local_threads() is None:
        assert n == 1
    assert parallel.resolve_threads(3) == 3


# --- Workers ----------------------------------------------------------------------------------

def test_workers_run_every_function_and_return_results_in_order():
    w = parallel.Workers(3)
    assert w.run([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    assert w.run([lambda: "a", lambda: None, lambda: np.float64(2.5)]) == ["a", None, 2.5]
    w.close()


def test_workers_reraise_an_error_from_a_helper_and_stay_usable():
    w = parallel.Workers(2)

    def boom():
        raise ArithmeticError("from the helper")
    with pytest.raises(ArithmeticError, match="from the helper"):
        w.run([lambda: 1, boom])
    with pytest.raises(ValueError, match="run needs 2 functions, got 1"):
        w.run([lambda: 1])
    assert w.run([lambda: 4, lambda: 5]) == [4, 5]


def test_workers_really_run_at_the_same_time():
    # Each function waits for the other at a barrier: run() can only return if both run at once.
    import threading
    barrier = threading.Barrier(2, timeout=10)
    w = parallel.Workers(2)
    assert w.run([barrier.wait, barrier.wait]) is not None


def test_scipys_blas_is_held_to_one_thread_with_numpys():
    # Adam's axpy runs in SciPy's own OpenBLAS, with its own pool: a step on two cores must
    # hold it to one thread as well, or each process's axpy would take both cores.
    counts = parallel.blas_thread_counts()
    if len(counts) < 2 or None in counts:
        pytest.skip("SciPy's BLAS is not a second OpenBLAS whose threads can be read here")
    with parallel.one_blas_thread():
        assert parallel.blas_thread_counts() == [1] * len(counts)
    assert parallel.blas_thread_counts() == counts


def test_blas_runs_on_one_thread_inside_run_and_on_its_old_count_after():
    # In NumPy's pthreads OpenBLAS the "local" setting is the process's: a helper thread that
    # sets it, or a restore that comes before the helpers finish, changes the other threads'
    # BLAS too. This checks the count BLAS reports, in each thread and afterwards.
    if parallel.blas_local_threads() is None or parallel.blas_threads() is None:
        pytest.skip("NumPy's BLAS has no thread-count control")
    before = parallel.blas_threads()
    w = parallel.Workers(2)
    time.sleep(0.05)                      # the helper has started: that alone must not change it
    assert parallel.blas_threads() == before

    def late():                           # still running after the main thread's part is done
        time.sleep(0.05)
        return parallel.blas_threads()

    for _ in range(3):                    # the first run wakes the helper; later ones reuse it
        assert w.run([parallel.blas_threads, late]) == [1, 1]
        time.sleep(0.05)
        assert parallel.blas_threads() == before
    w.close()


# --- replicas ----------------------------------------------------------------------------------

def test_replica_shares_parameters_but_not_gradients_or_caches():
    m = small_vae()
    r = m.replica()
    assert r.flat_params is m.flat_params
    assert all(r.params[n] is m.params[n] for n in m.params)
    assert not np.shares_memory(r.flat_grads, m.flat_grads)
    rng = np.random.default_rng(1)
    x = (rng.random((5, 12)) > 0.5).astype(np.float64)
    eps = rng.standard_normal((5, 3))
    m.params["dec.logits.b"][...] += 0.3  # an update to the model is an update to the replica
    loss_m, g_m = m.loss_and_grads(x, eps)
    g_before = m.flat_grads.copy()
    loss_r, g_r = r.loss_and_grads(x[:2], eps[:2])   # writes only r's gradients
    assert np.array_equal(m.flat_grads, g_before)
    fresh = small_vae()
    fresh.flat_params[...] = m.flat_params
    assert loss_r == fresh.loss_and_grads(x[:2], eps[:2])[0]
    for n in g_r:
        assert np.array_equal(g_r[n], fresh.grads[n]), n


# --- a split batch: weight gradients after the backward passes ------------------------------------

SPLIT_KINDS = [dict(), dict(activation="elu"), dict(likelihood="gaussian", activation="relu"),
               dict(likelihood="gaussian", x_sigma=0.3, activation="softplus"), dict(hidden=(6,))]


@pytest.mark.parametrize("kind", SPLIT_KINDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cuts", [(4,), (1, 6), (3, 4, 5)])
def test_split_batch_weight_grads_are_the_models_gradient(kind, k, cuts):
    """float64: replicas bound to blocks of rows, then weight_grads range by range, give
    loss_and_grads' gradient; the replicas' own gradients are never written."""
    B = 7
    m = small_vae(**kind)
    rng = np.random.default_rng(4)
    x = rng.random((B, 12)) if m.likelihood == "gaussian" else (rng.random((B, 12)) > 0.5) * 1.0
    eps = rng.standard_normal((B, 3) if k == 1 else (B, k, 3))
    _, expected = m.loss_and_grads(x, eps, k=k, beta=0.6 if k == 1 else 1.0)
    expected = np.concatenate([g.ravel() for g in expected.values()])
    m.flat_grads[...] = np.nan          # every entry must be written again (padding aside)
    batch = SplitBatch(m, B + 2, k)     # room for more rows than this batch has
    replicas = []
    for a, b in zip((0,) + cuts, cuts + (B,)):
        r = m.replica()
        r.bind_rows(batch, a, b)
        if k == 1:
            r.forward(x[a:b], eps[a:b])
            r.backward(np.full(b - a, -1.0 / B), np.full(b - a, 0.6 / B))
        else:
            r.forward_iwae(x[a:b], eps[a:b])
            r.backward_iwae(np.full(b - a, -1.0 / B))
        replicas.append(r)
    for start, stop in m.grad_ranges(len(cuts) + 2):
        batch.weight_grads(start, stop, B)
    got = np.concatenate([g.ravel() for g in m.grads.values()])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert all(not r.flat_grads.any() for r in replicas)


@pytest.mark.parametrize("kind", SPLIT_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_grad_ranges_tile_the_buffer_in_near_equal_pieces_cut_between_weight_rows(kind, n):
    m = small_vae(**kind)
    ranges = m.grad_ranges(n)
    assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == m.flat_grads.size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # allowed cuts are at most a row (a bias is one row) plus alignment padding apart
    widest = max(p.shape[-1] for p in m.params.values())
    for j, (start, _) in enumerate(ranges[1:], 1):
        assert abs(start - m.flat_grads.size * j / n) <= widest + 16
    batch = SplitBatch(m, 4)
    for start, stop in ranges:
        batch.weight_grads(start, stop, 4)   # raises if a range cuts a row


def test_weight_grads_refuses_a_range_that_cuts_a_row_and_a_batch_larger_than_its_room():
    m = small_vae()
    batch = SplitBatch(m, 4)
    with pytest.raises(ValueError, match="cuts a row of a weight matrix"):
        batch.weight_grads(0, 5, 4)      # enc.h0.W is (12, 9): 5 is inside its first row
    with pytest.raises(ValueError, match="B must be in \\[1, 4\\], got 5"):
        batch.weight_grads(0, 9, 5)


def test_unbound_replica_computes_its_own_gradients_again():
    m = small_vae()
    x = (np.random.default_rng(1).random((5, 12)) > 0.5) * 1.0
    eps = np.random.default_rng(2).standard_normal((5, 3))
    r = m.replica()
    r.bind_rows(SplitBatch(m, 5), 0, 5)
    r.loss_and_grads(x, eps)
    assert not r.flat_grads.any()
    r.bind_rows(None, 0, 0)
    assert all(layer.out is None and layer.da_out is None for layer in r._layers.values())
    _, g = r.loss_and_grads(x, eps)
    _, expected = m.loss_and_grads(x, eps)
    for name in g:
        assert np.array_equal(g[name], expected[name]), name


def test_a_replica_bound_again_writes_into_the_rows_of_its_latest_binding():
    """bind_rows keeps a binding to the same rows as it is, and moves to other rows or batches."""
    m = small_vae()
    rng = np.random.default_rng(5)
    x, eps = (rng.random((6, 12)) > 0.5) * 1.0, rng.standard_normal((6, 3))
    batches = SplitBatch(m, 6), SplitBatch(m, 6)
    r = m.replica()
    for target, a, b in [(0, 0, 2), (0, 0, 2), (0, 2, 6), (1, 2, 6), (0, 0, 2), (1, 0, 2)]:
        for batch in batches:
            batch.inputs["x"][...] = batch.inputs["z"][...] = np.nan
        r.bind_rows(batches[target], a, b)
        r.forward(x[a:b], eps[a:b])
        for i, batch in enumerate(batches):
            rows = np.zeros(6, bool)
            rows[a:b] = i == target
            assert np.array_equal(~np.isnan(batch.inputs["x"]).all(axis=1), rows)
            assert np.array_equal(~np.isnan(batch.inputs["z"]).all(axis=1), rows)
        np.testing.assert_array_equal(batches[target].inputs["x"][a:b], x[a:b])


# --- the parallel step against the serial one ---------------------------------------------------------

@pytest.mark.parametrize("binarize, make_rows", PREPARED)
@pytest.mark.parametrize("objective, k", [("elbo", 1), ("iwae", 4)])
@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_step_computes_the_serial_gradient_and_update(objective, k, threads, binarize, make_rows):
    """float64: split over threads, the gradient and the update agree with one thread's to rounding."""
    rows = make_rows(11)
    prepare = make_prepare(binarize, 0.5, "bernoulli", "grey", np.float64)
    out = {}
    for n in (1, threads):
        m = small_vae()
        opt = SGD(m.params, lr=0.1)
        step = make_step(m, opt, prepare, objective, k, threads=n)
        before = m.flat_params.copy()
        sums = step(rows, 0.7 if objective == "elbo" else 1.0, np.random.default_rng(5))
        out[n] = sums, m.flat_grads.copy(), m.flat_params - before
    (s1, g1, d1), (sn, gn, dn) = out[1], out[threads]
    np.testing.assert_allclose(sn, s1, rtol=1e-12)
    assert np.abs(g1).max() > 0
    np.testing.assert_allclose(gn, g1, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dn, d1, rtol=1e-10, atol=1e-15)


def test_parallel_step_with_fewer_rows_than_threads_runs_serially():
    m = small_vae()
    step = make_step(m, Adam(m.params), make_prepare("none", 0.5, "bernoulli", "grey", np.float64),
                     threads=2)
    rec, kl, g2 = step(binary_rows(1), 1.0, np.random.default_rng(0))
    assert np.isfinite(rec) and np.isfinite(kl) and g2 > 0


def test_parallel_adam_update_is_bit_identical_to_the_serial_one():
    """The split update is element-wise, so cutting it into ranges changes no bit (float32)."""
    results = []
    for workers in (None, parallel.Workers(2)):
        m = small_vae(np.float32)
        opt = Adam(m.params, lr=0.01)
        rng = np.random.default_rng(3)
        for _ in range(5):
            m.flat_grads[...] = rng.standard_normal(m.flat_grads.size)
            opt.step(m.grads, workers)
        results.append(m.flat_params.copy())
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_step_with_a_nan_weight_is_skipped(threads):
    m = small_vae()
    opt = Adam(m.params, lr=0.01)
    m.params["dec.h0.W"][0, 0] = np.nan
    before = m.flat_params.copy()
    step = make_step(m, opt, make_prepare("none", 0.5, "bernoulli", "grey", np.float64), threads=threads)
    rec, kl, g2 = step(binary_rows(8), 1.0, np.random.default_rng(0))
    assert not np.isfinite(rec) and opt.t == 0
    np.testing.assert_array_equal(m.flat_params, before)   # NaN where it was, nothing else moved


@pytest.mark.parametrize("backend", ["threads", pytest.param("processes", marks=needs_processes)])
def test_split_step_is_skipped_when_one_part_has_an_infinite_gradient(monkeypatch, backend):
    """A finite loss with an infinite gradient in one part: no update, and |grad|^2 says so."""
    m = small_vae(shared=True)
    opt = Adam(m.params, lr=0.01)
    before = m.flat_params.copy()
    backward = VAE.backward

    rows = binary_rows(8)

    def backward_inf_in_the_second_part(self, *args):
        grads = backward(self, *args)
        if np.array_equal(self._cache[0] * 255, rows[4:]):   # the part with the last four rows:
            self.dec_heads[0].da_out[0, 3] = np.inf     # the logits' local gradient, for weight_grads
        return grads
    monkeypatch.setattr(VAE, "backward", backward_inf_in_the_second_part)   # helpers are forked after this
    step = make_step(m, opt, make_prepare("none", 0.5, "bernoulli", "grey", np.float64), threads=2,
                     backend=backend)
    rec, kl, g2 = step(rows, 1.0, np.random.default_rng(0))
    assert np.isfinite(rec) and np.isfinite(kl) and not np.isfinite(g2)
    assert opt.t == 0
    np.testing.assert_array_equal(m.flat_params, before)


def test_training_with_two_threads_is_reproducible_and_close_to_one_thread(tmp_path):
    config = dict(dataset="shapes", epochs=2, batch_size=50, hidden=(32,), z_dim=4, n_train=600,
                  n_valid=200, seed=3)
    finals = {}
    for name, threads in (("a", 2), ("b", 2), ("one", 1)):
        t = Trainer(TrainConfig(**config), tmp_path / name, quiet=True, threads=threads)
        t.run()
        finals[name] = t.model.flat_params.copy(), t.history["valid_elbo"][-1]
    assert np.array_equal(finals["a"][0], finals["b"][0])
    assert finals["a"][1] == pytest.approx(finals["one"][1], abs=0.05)


def test_trainer_rejects_a_bad_thread_count(tmp_path):
    with pytest.raises(ValueError, match="threads must be"):
        Trainer(TrainConfig(dataset="shapes", n_train=600, n_valid=200), tmp_path / "r", threads=0)
    assert not (tmp_path / "r").exists()


# --- log p(x) split over threads -----------------------------------------------------------------

@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("given_q", [False, True])
def test_log_likelihood_over_threads_equals_one_thread(threads, given_q):
    from npvae import evaluate
    model = small_vae()
    x = binary_rows(11, seed=4) / 255.0
    q = None
    if given_q:  # a q that is not the encoder's, so that splitting it by rows is checked
        rng = np.random.default_rng(9)
        q = (rng.standard_normal((11, 3)), rng.uniform(-1.0, 0.0, (11, 3)))
    kw = dict(k=40, batch_size=2, chunk=16, q=q)  # several batches and chunks per thread
    serial = evaluate.log_likelihood(model, x, rng=np.random.default_rng(3), threads=1, **kw)
    split = evaluate.log_likelihood(model, x, rng=np.random.default_rng(3), threads=threads, **kw)
    assert split.shape == (11,) and np.all(np.isfinite(split))
    np.testing.assert_allclose(split, serial, rtol=1e-12)
    # and the noise is each example's own: a different seed moves every estimate
    other = evaluate.log_likelihood(model, x, rng=np.random.default_rng(4), threads=threads, **kw)
    assert np.all(other != split)


def test_log_likelihood_with_more_threads_than_examples_and_the_prior_version():
    from npvae import evaluate
    model = small_vae()
    x = binary_rows(2, seed=5) / 255.0
    a = evaluate.log_likelihood(model, x, k=30, rng=np.random.default_rng(1), threads=4)
    b = evaluate.log_likelihood(model, x, k=30, rng=np.random.default_rng(1), threads=1)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    x = binary_rows(6, seed=6) / 255.0
    a = evaluate.log_likelihood_prior(model, x, k=30, rng=np.random.default_rng(2), threads=2)
    b = evaluate.log_likelihood_prior(model, x, k=30, rng=np.random.default_rng(2), threads=1)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_log_likelihood_over_threads_reports_the_total_progress():
    from npvae import evaluate
    model = small_vae()
    x = binary_rows(10, seed=7) / 255.0
    calls = []
    evaluate.log_likelihood(model, x, k=8, rng=np.random.default_rng(0), batch_size=2, threads=2,
                            progress=lambda done, total: calls.append((done, total)))
    assert all(total == 10 for _, total in calls)
    done = [d for d, _ in calls]
    # each thread takes 5 examples in batches of 2, 2, 1: six reports, strictly increasing to 10
    assert len(done) == 6 and all(a < b for a, b in zip(done, done[1:])) and done[-1] == 10


def test_log_likelihood_rejects_a_bad_thread_count():
    from npvae import evaluate
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        evaluate.log_likelihood(small_vae(), binary_rows(3) / 255.0, k=5, threads=0)


# --- helper processes -----------------------------------------------------------------------------

def test_resolve_backend_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        parallel.resolve_backend("gpu")
    assert parallel.resolve_backend("threads") == "threads"
    assert parallel.resolve_backend("auto") == ("processes" if parallel.processes_available() else "threads")


def test_shared_model_keeps_parameters_gradients_replicas_and_adam_state_in_shared_memory():
    m = small_vae(shared=True)
    assert parallel.is_shared(m.flat_params) and parallel.is_shared(m.flat_grads)
    assert parallel.is_shared(m.replica().flat_grads)
    assert m.flat_params.ctypes.data % 64 == 0
    assert Adam(m.params).shares_memory
    plain = small_vae()
    assert not parallel.is_shared(plain.flat_params) and not Adam(plain.params).shares_memory
    # the same initial weights either way
    assert np.array_equal(m.flat_params, plain.flat_params)


@needs_processes
def test_processes_run_each_task_in_its_own_process_on_shared_memory():
    out = parallel.shared_zeros(3, np.int64)

    def write_pid(j, value):
        out[j] = os.getpid()
        return (value * 2, float(j))
    pool = parallel.Processes(3, [write_pid])
    results = pool.run(0, [(1.0,), (2.0,), (3.0,)])
    assert results == [(2.0, 0.0), (4.0, 1.0), (6.0, 2.0)]
    assert out[0] == os.getpid() and len(set(out)) == 3   # three processes wrote
    assert pool.run(0, [(0.5,)] * 3)[2] == (1.0, 2.0)      # and again
    pool.close()
    with pytest.raises(parallel.HelperError, match="closed"):
        pool.run(0, [(1.0,)] * 3)


@needs_processes
def test_an_exception_in_a_helper_process_is_raised_in_the_main_one():
    def fail_in_helper(j, fail):
        if j == 1 and fail:
            raise KeyError("from helper 1")
        return (float(j),)
    pool = parallel.Processes(2, [fail_in_helper])
    with pytest.raises(KeyError, match="from helper 1"):
        pool.run(0, [(1,), (1,)])
    assert pool.run(0, [(0,), (0,)]) == [(0.0,), (1.0,)]   # the helper lives on
    pool.close()


@needs_processes
@pytest.mark.parametrize("barrier", [False, True])
def test_a_helper_process_that_dies_is_reported_not_waited_for(barrier):
    # with a barrier, the main process is waiting there for the helper that died
    def die_in_helper(j):
        if j == 1:
            os._exit(3)
        if barrier:
            parallel.allgather(j, (j,))
        return ()
    pool = parallel.Processes(2, [die_in_helper])
    with pytest.raises(parallel.HelperError, match="ended during a task"):
        pool.run(0, [(), ()])


@needs_processes
def test_closing_the_pool_ends_the_helper_processes():
    pool = parallel.Processes(3, [lambda j: ()])
    pids = list(pool._pids)
    pool.run(0, [()] * 3)
    pool.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)   # reaped: no longer our child


def test_nested_one_blas_thread_blocks_hold_one_thread_until_the_outer_one_ends():
    if parallel.blas_local_threads() is None or parallel.blas_threads() is None:
        pytest.skip("OpenBLAS's per-thread control is not available")
    before = parallel.blas_thread_counts()
    with parallel.one_blas_thread():
        with parallel.one_blas_thread():
            assert parallel.blas_thread_counts() == [1] * len(before)
        assert parallel.blas_thread_counts() == [1] * len(before)   # the inner block gives nothing back
    assert parallel.blas_thread_counts() == before


@needs_processes
def test_allgather_swaps_every_processes_numbers_at_each_barrier_in_every_task():
    def swap_twice(j, x):
        first = parallel.allgather(j, (x, 10 * j))
        second = parallel.allgather(j, (sum(v[0] for v in first) + j,))
        return tuple(v[0] for v in first) + (sum(v[1] for v in first),) + tuple(v[0] for v in second)
    pool = parallel.Processes(3, [swap_twice])
    for x in (1.0, 2.5, -4.0):   # again and again: the barriers' counts start afresh in each task
        xs = (x, x + 1, x + 2)
        total = sum(xs)
        expected = xs + (30.0,) + (total, total + 1, total + 2)
        assert pool.run(0, [(v,) for v in xs]) == [expected] * 3   # the same in every process
    pool.close()
    assert parallel.allgather(0, (3, 4)) == [(3.0, 4.0)]   # outside a task: a world of one


@needs_processes
@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_process_that_fails_before_a_barrier_does_not_leave_the_others_waiting(failing):
    def fail_before_the_barrier(j, fail):
        if fail and j == failing:
            raise KeyError(f"from process {j}")
        parallel.allgather(j, (j,))
        return (float(j),)
    pool = parallel.Processes(3, [fail_before_the_barrier])
    with pytest.raises(KeyError, match=f"from process {failing}"):   # its own error, not a waiter's
        pool.run(0, [(1,)] * 3)
    assert pool.run(0, [(0,)] * 3) == [(0.0,), (1.0,), (2.0,)]   # and the pool works on
    pool.close()


@needs_processes
def test_run_calls_before_here_once_the_helpers_have_started():
    seen = parallel.shared_zeros(2, np.float64)

    def mark_or_report(j):
        if j == 1:
            seen[0] = 1.0          # the helper has started
            return ()
        return (float(seen[1]),)   # this process's task runs after `before`

    def before():   # waits (at most 10 s) for the helper, which must have started without it
        deadline = time.monotonic() + 10.0
        while seen[0] == 0 and time.monotonic() < deadline:
            pass
        seen[1] = 2.0 if seen[0] == 1.0 else -1.0
    pool = parallel.Processes(2, [mark_or_report])
    assert pool.run(0, [(), ()], before) == [(2.0,), ()]
    with pytest.raises(ZeroDivisionError):
        pool.run(0, [(), ()], lambda: 1 / 0)
    assert pool.run(0, [(), ()]) == [(2.0,), ()]   # and the pool works on
    pool.close()


@needs_processes
@pytest.mark.parametrize("release_early", [False, True])
def test_helpers_that_wait_to_be_released_go_on_once_before_releases_them_or_returns(release_early):
    seen = parallel.shared_zeros(4, np.float64)

    def read_after_release(j):
        if j > 0:
            seen[j] = 1.0                  # started, before the main process's `before` is through
            parallel.wait_released(j)
        return (float(seen[3]),)           # what `before` had written by then

    def before():   # lets the helpers start waiting (at most 10 s), then writes what they must see
        deadline = time.monotonic() + 10.0
        while not (seen[1] and seen[2]) and time.monotonic() < deadline:
            pass
        seen[3] = 5.0
        if release_early:
            pool.release()
            seen[3] = 6.0                  # after the release: a helper may or may not see this
    pool = parallel.Processes(3, [read_after_release])
    results = pool.run(0, [()] * 3, before)
    assert seen[1] == seen[2] == 1.0
    assert results[0] == (6.0 if release_early else 5.0,)
    assert all(r[0] >= 5.0 for r in results[1:])   # no helper went on before it was released
    seen[3] = 7.0
    assert pool.run(0, [()] * 3) == [(7.0,)] * 3   # without `before`, nothing to wait for
    assert parallel.wait_released(0) is None      # outside a task: nothing to wait for
    pool.close()


@needs_processes
def test_a_main_process_that_fails_in_before_does_not_leave_the_helpers_waiting():
    def wait(j):
        parallel.wait_released(j)
        return (float(j),)

    def fail():
        raise KeyError("in before")
    pool = parallel.Processes(2, [wait])
    with pytest.raises(KeyError, match="in before"):   # its own error, not the helper's _Abandoned
        pool.run(0, [(), ()], fail)
    assert pool.run(0, [(), ()]) == [(0.0,), (1.0,)]   # and the pool works on
    pool.close()


@pytest.mark.parametrize("threads, backend", [(1, "threads"), (2, "threads"),
                                              pytest.param(2, "processes", marks=needs_processes),
                                              pytest.param(3, "processes", marks=needs_processes)])
def test_a_step_given_an_index_is_the_step_on_those_rows(threads, backend):
    """step(x, ..., index=i) gathers x[i] itself (each process its own share): bit for bit step(x[i], ...)."""
    x, index = grey_rows(40), np.array([5, 17, 3, 3, 39, 0, 22, 8, 11, 30, 2])
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64)
    out = []
    for given_index in (False, True):
        m = small_vae(shared=True)
        opt = Adam(m.params, lr=0.05)
        step = make_step(m, opt, prepare, threads=threads, backend=backend)
        rng = np.random.default_rng(7)
        with step.session():
            sums = [step(x, 1.0, rng, index=index) if given_index else step(x[index], 1.0, rng)
                    for _ in range(3)]
        out.append((sums, m.flat_params.copy(), rng.random()))
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert np.array_equal(out[0][1], out[1][1])
    with pytest.raises(TypeError, match="index must be a 1-D array of integers"):
        step(x, 1.0, rng, index=np.array([0.5, 1.5]))


def _grey_step(threads, backend):
    """(a shared small model, a step on it with Adam at lr 0.05 and dynamic binarization of grey rows)."""
    m = small_vae(shared=True)
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64)
    return m, make_step(m, Adam(m.params, lr=0.05), prepare, threads=threads, backend=backend)


def _children():
    """The pids of this process's child processes (Linux)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:   # a thread that has ended since the listing
            pass
    return pids


@pytest.mark.parametrize("threads, backend", [(1, "threads"), (2, "threads"),
                                              pytest.param(2, "processes", marks=needs_processes)])
def test_closing_a_step_ends_its_helpers_and_the_next_step_starts_new_ones(threads, backend):
    """step.close() between steps: the helper processes are gone, and the steps are bit for bit
    those of a step never closed."""
    x, index = grey_rows(40), np.arange(3, 14)
    out = []
    for closing in (False, True):
        m, step = _grey_step(threads, backend)
        rng = np.random.default_rng(3)
        sums, before = [], _children()
        for _ in range(3):
            with step.session():
                sums.append(step(x, 1.0, rng, index=index, next_index=index))
            helpers = _children() - before
            assert len(helpers) == (threads - 1 if backend == "processes" else 0)
            if closing:
                step.close()
                assert not helpers & _children()   # ended and reaped
                step.close()                       # a second close does nothing
        out.append((sums, m.flat_params.copy()))
    assert out[0][0] == out[1][0] and np.array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("threads, backend", [(1, "threads"), (2, "threads"),
                                              pytest.param(2, "processes", marks=needs_processes)])
def test_a_step_on_no_rows_is_refused_and_changes_nothing(threads, backend):
    x = grey_rows(10)
    m = small_vae(shared=True)
    step = make_step(m, Adam(m.params), make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64),
                     threads=threads, backend=backend)
    before = m.flat_params.copy()
    rng = np.random.default_rng(0)
    for rows, index in ((x[:0], None), (x, np.array([], np.int64))):
        with pytest.raises(ValueError, match="a minibatch needs at least one row"):
            step(rows, 1.0, rng, index=index)
    np.testing.assert_array_equal(m.flat_params, before)


@pytest.mark.parametrize("threads, backend", [(1, "threads"), (2, "threads"),
                                              pytest.param(2, "processes", marks=needs_processes),
                                              pytest.param(3, "processes", marks=needs_processes)])
def test_next_index_is_a_hint_that_changes_nothing(threads, backend):
    """Steps told the next index (right, wrong, out of range, for another x, or a larger batch than
    any before) are bit for bit the steps not told it."""
    x = grey_rows(40)
    other = x.copy()
    other[:, :6] = 255 - other[:, :6]            # same shape and dtype, other rows
    i = [np.array(v) for v in ([5, 17, 3, 3, 39, 0, 22, 8, 11], [1, 2, 30, 31, 4, 6, 9, 12, 13],
                               [7, 7, 8, 9, 10, 20, 21, 22, 23], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                               [39, 38, 37, 36, 35, 34, 33, 32, 31])]
    # (x, index, next_index) of each call: the hint right; then wrong; out of range; right for the
    # index but given with another x; right but larger than the buffers; right again after new buffers
    calls = [(x, i[0], i[1]), (x, i[1], i[2]), (x, i[0], np.array([3, 40])), (x, i[2], i[3]),
             (other, i[3], i[4]), (x, i[4], i[3]), (x, i[3], i[0]), (x, i[0], None)]
    out = []
    for hinted in (False, True):
        m, step = _grey_step(threads, backend)
        rng = np.random.default_rng(7)
        with step.session():
            sums = [step(xs, 1.0, rng, index=index, next_index=after if hinted else None)
                    for xs, index, after in calls]
        out.append((sums, m.flat_params.copy(), rng.random()))
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert np.array_equal(out[0][1], out[1][1])
    with pytest.raises(TypeError, match="next_index must be a 1-D array of integers"):
        step(x, 1.0, rng, index=i[0], next_index=np.array([[1, 2]]))


@needs_processes
@pytest.mark.parametrize("binarize, make_rows", PREPARED)
@pytest.mark.parametrize("objective, k", [("elbo", 1), ("iwae", 4)])
@pytest.mark.parametrize("n", [2, 3])
def test_process_step_is_bit_identical_to_the_threaded_one(objective, k, n, binarize, make_rows):
    """float64, three Adam steps: processes do the same arithmetic as threads, in the same order."""
    rows = make_rows(11)
    prepare = make_prepare(binarize, 0.5, "bernoulli", "grey", np.float64)
    out = {}
    for backend in ("threads", "processes"):
        m = small_vae(shared=True)
        opt = Adam(m.params, lr=0.05)
        step = make_step(m, opt, prepare, objective, k, threads=n, backend=backend)
        rng = np.random.default_rng(5)
        sums = [step(rows, 1.0, rng) for _ in range(3)]
        out[backend] = sums, m.flat_params.copy(), opt.state_dict(), rng.random()
    (s_t, p_t, st_t, r_t), (s_p, p_p, st_p, r_p) = out["threads"], out["processes"]
    assert s_t == s_p and r_t == r_p
    assert np.array_equal(p_t, p_p)
    for key in st_t:
        assert np.array_equal(st_t[key], st_p[key]), key


@needs_processes
def test_process_step_grows_its_buffers_for_a_larger_batch():
    m = small_vae(shared=True)
    opt = Adam(m.params, lr=0.05)
    step = make_step(m, opt, make_prepare("none", 0.5, "bernoulli", "grey", np.float64), threads=2,
                     backend="processes")
    for n in (4, 9, 3, 1):
        rec, kl, g2 = step(binary_rows(n, seed=n), 1.0, np.random.default_rng(n))
        assert np.isfinite(rec) and np.isfinite(kl) and g2 > 0
    assert opt.t == 4


def test_processes_backend_needs_a_shared_model():
    m = small_vae()
    with pytest.raises(ValueError, match="backend 'processes' needs a VAE\\(shared=True\\)"):
        make_step(m, Adam(m.params), make_prepare("none", 0.5, "bernoulli", "grey", np.float64),
                  threads=2, backend="processes")


@needs_processes
def test_training_with_processes_repeats_training_with_threads_bit_for_bit(tmp_path):
    config = dict(dataset="shapes", epochs=2, batch_size=50, hidden=(32,), z_dim=4, n_train=600,
                  n_valid=200, seed=3)
    finals = {}
    for backend in ("threads", "processes"):
        t = Trainer(TrainConfig(**config), tmp_path / backend, quiet=True, threads=2, backend=backend)
        assert t.model.shared == (backend == "processes")
        before = _children()
        t.run()
        assert _children() <= before   # the run's helper processes ended with it
        finals[backend] = t.model.flat_params.copy(), t.history["valid_elbo"]
    assert np.array_equal(finals["threads"][0], finals["processes"][0])
    assert finals["threads"][1] == finals["processes"][1]
