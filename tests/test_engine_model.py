"""The engine's model against the reference: FastVAE (and BoundDense) give VAE's (and Dense's) numbers.

float64: relative error <= 1e-12; float32: a few ulps of the sums (the
Bernoulli kernel groups its logs). The split-batch machinery (replicas, row
bindings, SplitBatch) is held against the whole model's gradient here too.
"""
import numpy as np
import pytest

from npvae.engine.model import BoundDense, FastVAE, SplitBatch, twin
from npvae.layers import ACTIVATIONS, Dense
from npvae.model import VAE

NAMES = sorted(ACTIVATIONS)
MODELS = [("bernoulli", "relu", None), ("bernoulli", "tanh", None), ("gaussian", "elu", None),
          ("gaussian", "sigmoid", None), ("gaussian", "tanh", 1.3)]
MODEL_IDS = [f"{lik}{'' if xs is None else '-fixed'}-{act}" for lik, act, xs in MODELS]


def pair(likelihood="bernoulli", activation="tanh", x_sigma=None, dtype=np.float64, D=9, hidden=(7, 5), Z=3):
    """A reference VAE at a generic point and a FastVAE with the same parameters."""
    model = VAE(D, hidden, Z, likelihood=likelihood, activation=activation, dtype=dtype, seed=4, x_sigma=x_sigma)
    rng = np.random.default_rng(40)
    for p in model.params.values():
        p += (0.2 * rng.standard_normal(p.shape) / np.sqrt(p.shape[0])).astype(dtype)
    return model, FastVAE.like(model)


def batch(model, rng, B=6):
    if model.likelihood == "bernoulli":
        return (rng.random((B, model.x_dim)) < 0.4).astype(model.dtype)
    return rng.standard_normal((B, model.x_dim)).astype(model.dtype)


def assert_close(fast, reference, dtype, what=""):
    """float64: relative <= 1e-12 of the largest entry; float32: a few ulps of it."""
    fast, reference = np.asarray(fast), np.asarray(reference)
    assert fast.dtype == reference.dtype == dtype, what
    tol = (1e-12 if dtype == np.float64 else 8 * np.finfo(np.float32).eps) * max(np.abs(reference).max(), 1e-30)
    np.testing.assert_allclose(fast, reference, rtol=0, atol=tol, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("likelihood, activation, x_sigma", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("k", [1, 3])
def test_fast_vae_loss_and_grads_are_the_references(likelihood, activation, x_sigma, dtype, k):
    model, fast = pair(likelihood, activation, x_sigma, dtype)
    rng = np.random.default_rng(41)
    x = batch(model, rng)
    eps = rng.standard_normal((6, model.z_dim) if k == 1 else (6, k, model.z_dim)).astype(dtype)
    loss, grads, terms = model.loss_and_grads(x, eps, k=k, beta=0.7 if k == 1 else 1.0, terms=True)
    fast_loss, fast_grads, fast_terms = fast.loss_and_grads(x, eps, k=k, beta=0.7 if k == 1 else 1.0, terms=True)
    assert fast_loss == pytest.approx(loss, rel=1e-12 if dtype == np.float64 else 1e-6)
    for name in terms:
        assert_close(fast_terms[name], terms[name], dtype, name)
    for name in grads:
        assert_close(fast_grads[name], grads[name], dtype, name)


@pytest.mark.parametrize("likelihood, x_sigma", [("bernoulli", None), ("gaussian", None)])
def test_fast_vae_log_px_z_with_its_work_buffer_is_the_references(likelihood, x_sigma):
    model, fast = pair(likelihood, x_sigma=x_sigma)
    rng = np.random.default_rng(42)
    x = batch(model, rng, B=4)
    for K in (3, 8, 2):    # the buffer grows, then is reused
        out = model._decode(rng.standard_normal((4 * K, model.z_dim)))
        per_sample = (out.reshape(4, K, -1) if likelihood == "bernoulli" else
                      tuple(o.reshape(4, K, -1) for o in out))
        assert_close(fast.log_px_z(x[:, None, :], per_sample), model.log_px_z(x[:, None, :], per_sample),
                     np.float64)


def test_fast_vae_buffers_are_aligned_and_padded_with_zeros():
    model, fast = pair(D=13, hidden=(5,), Z=3)
    assert fast.n_params == model.n_params and fast.config == model.config
    base = fast.flat_params.ctypes.data
    covered = np.zeros(fast.flat_params.size, dtype=bool)
    for name, p in fast.params.items():
        assert p.ctypes.data % 64 == 0 and fast.grads[name].ctypes.data % 64 == 0, name
        np.testing.assert_array_equal(p, model.params[name])
        start = (p.ctypes.data - base) // p.itemsize
        covered[start:start + p.size] = True
    assert not covered.all()                      # there is padding (13 x 5 floats is no multiple of 8) ...
    assert np.all(fast.flat_params[~covered] == 0)   # ... and it holds zeros


@pytest.mark.parametrize("name", NAMES)
def test_bound_dense_writes_y_and_da_where_told_and_leaves_dW_db_to_weight_grads(name):
    """out and da_out bound: the reference Dense's y and dx, y and da in those arrays, and
    weight_grads over any split of the rows gives its dW and db."""
    rng = np.random.default_rng(7)
    x, dy = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    plain = Dense(W, b, np.full((4, 3), np.nan), np.full(3, np.nan), name)
    y, dx = plain.forward(x).copy(), plain.backward(dy)
    unbound = BoundDense(W, b, np.full((4, 3), np.nan), np.full(3, np.nan), name)
    np.testing.assert_array_equal(unbound.forward(x), y)
    np.testing.assert_array_equal(unbound.backward(dy), dx)
    np.testing.assert_allclose(unbound.dW, plain.dW, rtol=1e-14)
    np.testing.assert_allclose(unbound.db, plain.db, rtol=1e-14)
    bound = BoundDense(W, b, np.full((4, 3), np.nan), np.full(3, np.nan), name)
    out, da_out = np.full((6, 3), np.nan), np.full((6, 3), np.nan)
    bound.out, bound.da_out = out, da_out
    assert bound.forward(x) is out
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(bound.backward(dy), dx)
    assert np.isnan(bound.dW).all() and np.isnan(bound.db).all()   # not written by backward
    for rows, cols in ((slice(0, 1), slice(0, 2)), (slice(1, 4), slice(2, 3))):
        bound.weight_grads(x, da_out, rows, cols)
    np.testing.assert_allclose(bound.dW, plain.dW, rtol=1e-14)
    np.testing.assert_allclose(bound.db, plain.db, rtol=1e-14)


def test_twin_of_a_reference_vae_shares_parameters_not_gradients():
    model, _ = pair()
    other = twin(model)
    assert type(other) is VAE
    for name in model.params:
        assert other.params[name] is model.params[name]
        assert not np.shares_memory(other.grads[name], model.grads[name])
    rng = np.random.default_rng(43)
    x, eps = batch(model, rng), rng.standard_normal((6, model.z_dim))
    _, expected = model.loss_and_grads(x, eps, copy=True)
    model.grads["enc.mu.W"][...] = np.nan
    _, got = other.loss_and_grads(x, eps)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])
    assert np.isnan(model.grads["enc.mu.W"]).all()   # the twin wrote only its own


@pytest.mark.parametrize("bound", [False, True], ids=["model", "split-batch"])
@pytest.mark.parametrize("likelihood, activation, x_sigma", MODELS, ids=MODEL_IDS)
def test_float32_training_passes_stay_in_float32(likelihood, activation, x_sigma, bound, float64_watch):
    # FastVAE's forward and backward (ELBO and IWAE): every ufunc pass that
    # touches data computed from x or eps runs in float32. Bound: the same by a
    # replica bound to a SplitBatch (the split training step), and the weight
    # gradients computed from it afterwards.
    watch, log = float64_watch
    _, model = pair(likelihood, activation, x_sigma, np.float32)
    rng = np.random.default_rng(0)
    x = watch(batch(model, rng, B=5))
    for k in (1, 3):
        net = model
        if bound:
            split = SplitBatch(model, 5, k)
            split.inputs = {name: watch(a) for name, a in split.inputs.items()}
            split.da = {name: watch(a) for name, a in split.da.items()}
            net = model.replica()
            net.bind_rows(split, 0, 5)
        eps = watch(rng.standard_normal((5, model.z_dim) if k == 1 else (5, k, model.z_dim)).astype(np.float32))
        if k == 1:
            net.forward(x, eps)
            net.backward(np.full(5, -0.2), np.full(5, 0.2))
        else:
            net.forward_iwae(x, eps)
            net.backward_iwae(np.full(5, -0.2))
        if bound:
            for start, stop in model.grad_ranges(2):
                split.weight_grads(start, stop, 5)
    assert log.calls > (100 if bound else 50) and log == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [1e4, -1e4, 60.0])   # logits too large for the grouped logs, and just right for pairs
def test_fast_vae_at_extreme_logits_takes_the_references_path_and_stays_finite(dtype, bias):
    import warnings
    model, fast = pair("bernoulli", "relu", dtype=dtype)
    for m in (model, fast):
        m.params["dec.logits.b"][...] = bias
    x = batch(model, np.random.default_rng(44))
    eps = np.random.default_rng(45).standard_normal((6, model.z_dim)).astype(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        loss, grads = model.loss_and_grads(x, eps, copy=True)
        fast_loss, fast_grads = fast.loss_and_grads(x, eps)
    assert np.isfinite(loss) and fast_loss == pytest.approx(loss, rel=1e-12 if dtype == np.float64 else 1e-6)
    for name in grads:
        assert np.all(np.isfinite(fast_grads[name])), name
        assert_close(fast_grads[name], grads[name], dtype, name)
