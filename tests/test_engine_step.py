"""The engine's training step against the reference loop (loss_and_grads, then Adam.step), and its parts:
replicas, the split batch's weight gradients, the split step against the serial one, helper processes.

The reference loop (npvae.train.reference_step) and the engine's step
(npvae.engine.step.make_step) prepare the same rows with the same draws, and
draw eps alike, so in float64 the two runs agree to rounding after many
steps (measured: 8e-16 of the largest parameter after 100). In float32 they
differ by rounding: the engine sums the Bernoulli's logs in groups, the bias
gradients by BLAS, the update with fused multiply-adds (axpy) and scaled
moments, and a split step the batch in pieces; training carries each
difference on (measured: 8e-7 of the largest parameter after 100 steps).
"""
import os

import numpy as np
import pytest

from npvae.engine import parallel
from npvae.engine.binarize import make_prepare
from npvae.engine.model import FastVAE, SplitBatch
from npvae.engine.optim import FlatAdam
from npvae.data import Rows
from npvae.engine.step import gather, make_step
from npvae.model import VAE
from npvae.optim import SGD, Adam
from npvae.train import TrainConfig, Trainer, reference_step

BACKENDS = [(1, "threads"), (2, "threads")] + ([(2, "processes")] if parallel.processes_available() else [])
BACKEND_IDS = [f"{n}-{b}" for n, b in BACKENDS]
# (likelihood, stored data, objective, k)
SETTINGS = [("bernoulli", "grey", "elbo", 1), ("bernoulli", "grey", "iwae", 3), ("gaussian", "real", "elbo", 1)]
SETTING_IDS = ["bernoulli-dynamic-elbo", "bernoulli-dynamic-iwae3", "gaussian-elbo"]


def stored_rows(kind, rng, n=400, D=30):
    """A training set as the Trainer sees it: uint8 grey levels, or real numbers."""
    if kind == "grey":
        return (rng.random((n, D)) ** 2 * 255).astype(np.uint8)
    return rng.standard_normal((n, D))


def train(step, x, steps, batch_size, seed, warmup=True):
    """steps minibatch steps over x in a seeded order, as Trainer._train_epoch makes them, with
    beta < 1 for the first 20 if warmup; -> the figures."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(x.shape[0]) for _ in range(steps * batch_size // x.shape[0] + 1)])
    figures = []
    with step.session():
        for s in range(steps):
            index = order[s * batch_size:(s + 1) * batch_size]
            following = order[(s + 1) * batch_size:(s + 2) * batch_size]
            figures.append(step(x, 0.8 if warmup and s < 20 else 1.0, rng, index=index, next_index=following))
    step.close()
    return np.array(figures)


def runs(likelihood, kind, objective, k, dtype, n, backend, steps, lr=3e-3):
    """(reference model, engine model, reference figures, engine figures) after the same steps."""
    x = stored_rows(kind, np.random.default_rng(11))
    args = dict(x_dim=x.shape[1], hidden=(16,), z_dim=3, likelihood=likelihood, activation="tanh",
                dtype=dtype, seed=2)
    prepare = make_prepare("dynamic", 0.5, likelihood, kind, dtype)
    reference = VAE(**args)
    fast = FastVAE(**args, shared=backend == "processes")
    for name in reference.params:   # the same start
        np.testing.assert_array_equal(fast.params[name], reference.params[name])
    objective_k = dict(objective=objective, k=k)
    warmup = objective == "elbo"   # beta weighs the ELBO's KL only
    ref_figures = train(reference_step(reference, Adam(reference.params, lr=lr), prepare, **objective_k),
                        x, steps, 32, seed=5, warmup=warmup)
    fast_step = make_step(fast, FlatAdam(fast.params, lr=lr), prepare, threads=n, backend=backend, **objective_k)
    fast_figures = train(fast_step, x, steps, 32, seed=5, warmup=warmup)
    return reference, fast, ref_figures, fast_figures


@pytest.mark.parametrize("n, backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("likelihood, kind, objective, k", SETTINGS, ids=SETTING_IDS)
def test_100_engine_steps_are_100_reference_steps_in_float64(likelihood, kind, objective, k, n, backend):
    reference, fast, ref_figures, fast_figures = runs(likelihood, kind, objective, k, np.float64, n, backend, 100)
    moved = 0.0
    for name, p in reference.params.items():
        q = fast.params[name]
        scale = np.abs(p).max()
        np.testing.assert_allclose(q, p, rtol=1e-9, atol=1e-9 * scale, err_msg=name)
        moved = max(moved, np.abs(p - VAE(**reference.config).params[name]).max() / max(scale, 1e-12))
    assert moved > 1e-2                      # they really trained, and far from the start
    np.testing.assert_allclose(fast_figures, ref_figures, rtol=1e-9)   # the step's sums, |grad|^2


@pytest.mark.parametrize("n, backend", BACKENDS, ids=BACKEND_IDS)
def test_100_engine_steps_stay_close_to_the_reference_in_float32(n, backend):
    reference, fast, ref_figures, fast_figures = runs("bernoulli", "grey", "elbo", 1, np.float32, n, backend, 100)
    for name, p in reference.params.items():
        np.testing.assert_allclose(fast.params[name], p, rtol=0, atol=1e-5 * np.abs(p).max(), err_msg=name)
    np.testing.assert_allclose(fast_figures[:, :2], ref_figures[:, :2], rtol=1e-6)


# --- the split step and its parts ---------------------------------------------------------------

needs_processes = pytest.mark.skipif(not parallel.processes_available(),
                                     reason="helper processes need Linux with fork")


def small_vae(dtype=np.float64, **kw):
    base = dict(x_dim=12, hidden=(9, 7), z_dim=3, activation="tanh", dtype=dtype, seed=2)
    base.update(kw)
    return FastVAE(**base)


def binary_rows(n, d=12, seed=0):
    return (np.random.default_rng(seed).random((n, d)) > 0.5).astype(np.uint8) * 255


def grey_rows(n, d=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, d)).astype(np.uint8)


# (binarize, rows): stored rows used as they are, and grey levels with dynamic binarization,
# which each thread or process does for its own rows
PREPARED = [("none", binary_rows), ("dynamic", grey_rows)]


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
    step = make_step(m, FlatAdam(m.params), make_prepare("none", 0.5, "bernoulli", "grey", np.float64),
                     threads=2)
    rec, kl, g2 = step(binary_rows(1), 1.0, np.random.default_rng(0))
    assert np.isfinite(rec) and np.isfinite(kl) and g2 > 0


def test_parallel_adam_update_is_bit_identical_to_the_serial_one():
    """The split update is element-wise, so cutting it into ranges changes no bit (float32)."""
    results = []
    for workers in (None, parallel.Workers(2)):
        m = small_vae(np.float32)
        opt = FlatAdam(m.params, lr=0.01)
        rng = np.random.default_rng(3)
        for _ in range(5):
            m.flat_grads[...] = rng.standard_normal(m.flat_grads.size)
            opt.step(m.grads, workers)
        results.append(m.flat_params.copy())
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_step_with_a_nan_weight_is_skipped(threads):
    m = small_vae()
    opt = FlatAdam(m.params, lr=0.01)
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
    opt = FlatAdam(m.params, lr=0.01)
    before = m.flat_params.copy()
    backward = FastVAE.backward

    rows = binary_rows(8)

    def backward_inf_in_the_second_part(self, *args):
        grads = backward(self, *args)
        if np.array_equal(self._cache[0] * 255, rows[4:]):   # the part with the last four rows:
            self.dec_heads[0].da_out[0, 3] = np.inf     # the logits' local gradient, for weight_grads
        return grads
    monkeypatch.setattr(FastVAE, "backward", backward_inf_in_the_second_part)   # helpers are forked after this
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


# --- helper processes -----------------------------------------------------------------------------

def test_shared_model_keeps_parameters_gradients_replicas_and_adam_state_in_shared_memory():
    m = small_vae(shared=True)
    assert parallel.is_shared(m.flat_params) and parallel.is_shared(m.flat_grads)
    assert parallel.is_shared(m.replica().flat_grads)
    assert m.flat_params.ctypes.data % 64 == 0
    assert FlatAdam(m.params).shares_memory
    plain = small_vae()
    assert not parallel.is_shared(plain.flat_params) and not FlatAdam(plain.params).shares_memory
    # the same initial weights either way
    assert np.array_equal(m.flat_params, plain.flat_params)


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
        opt = FlatAdam(m.params, lr=0.05)
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


def test_gather_is_x_index_with_the_rows_read_in_increasing_order(tmp_path, monkeypatch):
    x = grey_rows(40)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    split = Rows(mapped, np.array([0, 2, 3, 5, 8, 13, 21, 34, 39]))
    index = np.array([6, 1, 1, 8, 0, 4])           # shuffled, with a repeat
    reads = []
    take = np.take

    def spy(a, rows, *args, **kwargs):
        reads.append(np.asarray(rows))
        return take(a, rows, *args, **kwargs)
    monkeypatch.setattr(np, "take", spy)
    for stored, expected in ((x, x[index]), (mapped, x[index]), (split, x[split.index[index]])):
        reads.clear()
        rows = gather(stored, index)
        assert type(rows) is np.ndarray and rows.dtype == np.uint8 and np.array_equal(rows, expected)
        assert len(reads) == 1 and (np.diff(reads[0]) >= 0).all()   # forwards through the stored rows
        out = np.zeros_like(expected)
        assert gather(stored, index, out=out) is out and np.array_equal(out, expected)
    with pytest.raises(IndexError):
        gather(split, np.array([9]))   # past the split's end, though not past the file's


@pytest.mark.parametrize("threads, backend", [(1, "threads"), (2, "threads"),
                                              pytest.param(2, "processes", marks=needs_processes)])
def test_a_step_on_a_split_is_the_step_on_its_rows(threads, backend):
    """step(Rows(x, split), ..., index=i), as the Trainer calls it: bit for bit step(x[split[i]], ...)."""
    x = grey_rows(40)
    split = Rows(x, np.arange(1, 40, 2))
    batches = [np.array([5, 17, 3, 0, 9, 11, 2]), np.array([19, 18, 4, 6, 8, 10, 12]), np.array([1, 7, 13, 14])]
    out = []
    for lazy in (False, True):
        m, step = _grey_step(threads, backend)
        rng = np.random.default_rng(7)
        with step.session():
            sums = [step(split, 1.0, rng, index=i, next_index=after) if lazy else step(x[split.index[i]], 1.0, rng)
                    for i, after in zip(batches, batches[1:] + [None])]
        out.append((sums, m.flat_params.copy(), rng.random()))
        step.close()
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert np.array_equal(out[0][1], out[1][1])


def _grey_step(threads, backend):
    """(a shared small model, a step on it with Adam at lr 0.05 and dynamic binarization of grey rows)."""
    m = small_vae(shared=True)
    prepare = make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64)
    return m, make_step(m, FlatAdam(m.params, lr=0.05), prepare, threads=threads, backend=backend)


def _children():
    """The pids of this process's child processes (Linux), less those that run another program.

    The suite runs the demos in subprocesses in the background (conftest.py); a helper forked by the
    engine runs this process's command line, and one that has ended unreaped (a zombie) has none:
    both are kept.
    """
    with open("/proc/self/cmdline", "rb") as f:
        me = f.read()
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:   # a thread that has ended since the listing
            pass
    return {pid for pid in pids if _cmdline(pid) in (me, b"")}


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):   # ended and reaped since the listing
        return None


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
    step = make_step(m, FlatAdam(m.params), make_prepare("dynamic", 0.5, "bernoulli", "grey", np.float64),
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
        opt = FlatAdam(m.params, lr=0.05)
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
    opt = FlatAdam(m.params, lr=0.05)
    step = make_step(m, opt, make_prepare("none", 0.5, "bernoulli", "grey", np.float64), threads=2,
                     backend="processes")
    for n in (4, 9, 3, 1):
        rec, kl, g2 = step(binary_rows(n, seed=n), 1.0, np.random.default_rng(n))
        assert np.isfinite(rec) and np.isfinite(kl) and g2 > 0
    assert opt.t == 4


def test_processes_backend_needs_a_shared_model():
    m = small_vae()
    with pytest.raises(ValueError, match="backend 'processes' needs a FastVAE\\(shared=True\\)"):
        make_step(m, FlatAdam(m.params), make_prepare("none", 0.5, "bernoulli", "grey", np.float64),
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
