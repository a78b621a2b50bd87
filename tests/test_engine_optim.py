"""The engine's Adam (FlatAdam: scaled moments on one flat buffer) against the reference Adam."""
import numpy as np
import pytest

from npvae.engine.model import FastVAE
from npvae.engine.optim import FlatAdam, _scale_period
from npvae.engine.parallel import Workers
from npvae.optim import Adam


def flat_params(n=37, seed=5):
    """Two views that tile one buffer, as a VAE's params do, and a separate copy of the same values."""
    w0 = np.random.default_rng(seed).standard_normal(n)
    buffer = w0.copy()
    return {"a": buffer[:20], "b": buffer[20:].reshape(n - 20, 1)}, {"a": w0[:20].copy(), "b": w0[20:].reshape(n - 20, 1).copy()}


def flat_grads(g):
    return {"a": g[:20], "b": g[20:].reshape(-1, 1)}


@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.999), (0.5, 0.7), (0.0, 0.9), (0.3, 0.0)])
def test_flat_adam_is_the_reference_adam_over_many_rescalings(beta1, beta2):
    # The moments are stored as m / beta1^(t mod R1) and v / beta2^(t mod R2) and
    # rescaled every R steps (R1 = 21 for beta1 = 0.5, 39 for beta2 = 0.7, 1 for 0):
    # 130 steps cross several rescalings; float64, so the two agree to rounding.
    assert _scale_period(0.5) == 21 and _scale_period(0.7) == 39 and _scale_period(0.0) == 1
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(37) * 10.0 ** rng.uniform(-3, 2, 37) for _ in range(130)]
    params, reference_params = flat_params()
    fast = FlatAdam(params, lr=0.01, beta1=beta1, beta2=beta2, eps=1e-8)
    reference = Adam(reference_params, lr=0.01, beta1=beta1, beta2=beta2, eps=1e-8)
    for g in grads:
        fast.step(flat_grads(g.copy()))
        reference.step(flat_grads(g))
    for name in params:
        np.testing.assert_allclose(params[name], reference_params[name], rtol=1e-11, atol=1e-14)
        for s in ("m", "v"):
            np.testing.assert_allclose(fast.state[s][name], reference.state[s][name], rtol=1e-11, atol=1e-300)


def model_grads(model, rng):
    """A gradient laid out in the model's own flat gradient buffer."""
    model.flat_grads[...] = 0.0
    for g in model.grads.values():
        g[...] = rng.standard_normal(g.shape)
    return model.grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_adam_on_a_vae_is_the_reference_and_split_over_threads_the_same(dtype):
    models = [FastVAE(6, (5,), 3, dtype=dtype, seed=0) for _ in range(3)]
    reference = Adam(models[0].params, lr=0.01)
    fast, split = FlatAdam(models[1].params, lr=0.01), FlatAdam(models[2].params, lr=0.01)
    workers = Workers(2)
    try:
        for i in range(30):
            for m in models:
                model_grads(m, np.random.default_rng(i))
            reference.step(models[0].grads)
            fast.step(models[1].grads)
            split.step(models[2].grads, workers)
    finally:
        workers.close()
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(models[1].flat_params, models[0].flat_params, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_array_equal(models[2].flat_params, models[1].flat_params)   # the same arithmetic, by pieces


def test_step_range_pieces_make_the_whole_step():
    a, b = (FastVAE(6, (5,), 3, dtype=np.float32, seed=0) for _ in range(2))
    whole, pieces = FlatAdam(a.params, lr=0.02), FlatAdam(b.params, lr=0.02)
    for i in range(5):
        model_grads(a, np.random.default_rng(i))
        model_grads(b, np.random.default_rng(i))
        whole.step(a.grads)
        for start, stop in pieces.update_ranges(3):
            pieces.step_range(b.grads, start, stop, i + 1, 0.02)
        assert [s % 64 for s, _ in pieces.update_ranges(3)] == [0, 0, 0]
    np.testing.assert_array_equal(b.flat_params, a.flat_params)
    assert pieces.t == whole.t == 5


def test_state_dict_resumes_bit_for_bit_and_the_reference_reads_it():
    rng = np.random.default_rng(7)
    grads = [rng.standard_normal(37) for _ in range(30)]
    params, _ = flat_params()
    a = FlatAdam(params, lr=0.01, beta1=0.5)
    for g in grads[:25]:   # t = 25: past one rescaling (R1 = 21), mid-period
        a.step(flat_grads(g))
    saved = a.state_dict()
    assert saved["m.scale"] == 0.5 ** 4 and saved["v.scale"] == 0.999 ** 25
    resumed_params, _ = flat_params()
    resumed = FlatAdam(resumed_params, lr=0.01, beta1=0.5)
    resumed.load_state_dict(saved)
    reference = Adam({n: p.copy() for n, p in params.items()}, lr=0.01, beta1=0.5)
    reference.load_state_dict(saved)   # converts the scaled moments
    for s in ("m", "v"):
        for name in params:
            np.testing.assert_allclose(reference.state[s][name], a.state[s][name], rtol=1e-15)
    resumed_params["a"][...], resumed_params["b"][...] = params["a"], params["b"]
    for g in grads[25:]:
        a.step(flat_grads(g))
        resumed.step(flat_grads(g))
    for name in params:
        np.testing.assert_array_equal(resumed_params[name], params[name])   # bit for bit


def test_flat_adam_reads_the_reference_adams_true_moments():
    rng = np.random.default_rng(8)
    grads = [rng.standard_normal(37) for _ in range(12)]
    params, reference_params = flat_params()
    reference = Adam(reference_params, lr=0.01, beta1=0.5)
    for g in grads[:7]:
        reference.step(flat_grads(g))
    params["a"][...], params["b"][...] = reference_params["a"], reference_params["b"]
    fast = FlatAdam(params, lr=0.01, beta1=0.5)
    fast.load_state_dict(reference.state_dict())
    assert fast.t == 7
    for g in grads[7:]:
        fast.step(flat_grads(g.copy()))
        reference.step(flat_grads(g))
    for name in params:
        np.testing.assert_allclose(params[name], reference_params[name], rtol=1e-13)


def test_flat_adam_needs_one_flat_buffer_and_fixed_betas():
    with pytest.raises(ValueError, match="one flat buffer"):
        FlatAdam({"a": np.zeros(3), "b": np.zeros(2)})
    params, _ = flat_params()
    opt = FlatAdam(params, beta1=0.8)
    with pytest.raises(ValueError, match="grads laid out"):
        opt.step({"a": np.ones(20), "b": np.ones((17, 1))})   # arrays of their own, not one buffer
    assert opt.beta1 == 0.8 and opt.beta2 == 0.999
    with pytest.raises(AttributeError):
        opt.beta1 = 0.5    # the stored moments are scaled by powers of beta1


def test_float32_steps_make_no_float64_passes(float64_watch):
    # Per-step scalars must stay Python floats: a NumPy float64 scalar would
    # turn a float32 pass into a float64 one (twice as slow, same rounding).
    watch, log = float64_watch
    rng = np.random.default_rng(0)
    flat = watch(np.zeros(12, np.float32))
    params = {"a": flat[:5], "b": flat[5:].reshape(7, 1)}
    grads_flat = watch(rng.standard_normal(12).astype(np.float32))
    grads = {"a": grads_flat[:5], "b": grads_flat[5:].reshape(7, 1)}
    opt = FlatAdam(params)
    for _ in range(3):
        opt.step(grads)
    assert flat.dtype == np.float32 and np.all(np.isfinite(flat)) and np.any(flat != 0)
    assert log.calls > 0 and log == []
