"""Adam and SGD: single steps against hand arithmetic, in-place updates, state, validation, training."""
import io
import math
from pathlib import Path

import numpy as np
import pytest

from npvae import SGD, VAE, Adam, checkpoint


def one_param(values):
    return {"w": np.array(values, dtype=np.float64)}


# --- Adam against Algorithm 1 of Kingma & Ba -----------------------------------------------

def test_adam_two_steps_by_hand():
    params = one_param([1.0, -2.0, 0.5])
    w = params["w"]
    opt = Adam(params, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)

    # Step 1, g = [0.5, -0.1, 0.0]:
    #   m = 0.1 g = [0.05, -0.01, 0];  v = 0.001 g^2 = [2.5e-4, 1e-5, 0]
    #   m_hat = m / (1 - 0.9) = g;  v_hat = v / (1 - 0.999) = g^2
    #   step = 0.1 g / (|g| + 1e-8): 0.1 for entry 0, -0.1 for entry 1, 0 for entry 2
    opt.step({"w": np.array([0.5, -0.1, 0.0])})
    expected1 = [1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 + 0.1 * 0.1 / (0.1 + 1e-8), 0.5]  # ~[0.9, -1.9, 0.5]
    np.testing.assert_allclose(w, expected1, rtol=1e-15)
    np.testing.assert_allclose(opt.state["m"]["w"], [0.05, -0.01, 0.0], rtol=1e-15)
    np.testing.assert_allclose(opt.state["v"]["w"], [2.5e-4, 1e-5, 0.0], rtol=1e-14)
    assert opt.t == 1

    # Step 2, g = [0.2, 0.3, 0.4]:
    #   m = 0.9 m + 0.1 g      = [0.045 + 0.02, -0.009 + 0.03, 0 + 0.04]       = [0.065, 0.021, 0.04]
    #   v = 0.999 v + 0.001 g^2 = [2.4975e-4 + 4e-5, 9.99e-6 + 9e-5, 0 + 1.6e-4] = [2.8975e-4, 9.999e-5, 1.6e-4]
    #   1 - 0.9^2 = 0.19,  1 - 0.999^2 = 0.001999
    #   m_hat = m / 0.19     ~ [0.34211, 0.11053, 0.21053]
    #   v_hat = v / 0.001999 ~ [0.14495, 0.05002, 0.08004],  sqrt ~ [0.38072, 0.22365, 0.28291]
    #   step = 0.1 m_hat / (sqrt(v_hat) + 1e-8) ~ [0.089858, 0.049419, 0.074414]
    opt.step({"w": np.array([0.2, 0.3, 0.4])})
    m2 = [0.065, 0.021, 0.04]
    v2 = [2.8975e-4, 9.999e-5, 1.6e-4]
    expected2 = [expected1[i] - 0.1 * (m2[i] / 0.19) / (math.sqrt(v2[i] / 0.001999) + 1e-8) for i in range(3)]
    np.testing.assert_allclose(w, expected2, rtol=1e-12)
    np.testing.assert_allclose(w, [0.810142, -1.949419, 0.425586], atol=1e-6)  # the numbers above
    np.testing.assert_allclose(opt.state["m"]["w"], m2, rtol=1e-14)
    np.testing.assert_allclose(opt.state["v"]["w"], v2, rtol=1e-13)
    assert opt.t == 2


@pytest.mark.parametrize("lr", [1e-3, 0.05])
def test_first_adam_step_moves_each_parameter_by_lr_times_sign(lr):
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    before = {n: p.copy() for n, p in params.items()}
    # Gradients over six orders of magnitude: the first step is bias-corrected to lr * sign(g).
    grads = {n: rng.choice([-1.0, 1.0], p.shape) * 10.0 ** rng.uniform(-3, 3, p.shape)
             for n, p in params.items()}
    Adam(params, lr=lr).step(grads)
    for n in params:
        np.testing.assert_allclose(params[n] - before[n], -lr * np.sign(grads[n]), rtol=1e-4)


# --- SGD --------------------------------------------------------------------------------------

def test_sgd_without_momentum_by_hand():
    params = one_param([1.0, -2.0])
    opt = SGD(params, lr=0.5)
    opt.step({"w": np.array([0.2, -0.4])})
    np.testing.assert_allclose(params["w"], [1.0 - 0.5 * 0.2, -2.0 + 0.5 * 0.4], rtol=1e-15)  # [0.9, -1.8]
    opt.step({"w": np.array([1.0, 0.0])})
    np.testing.assert_allclose(params["w"], [0.9 - 0.5, -1.8], rtol=1e-15)  # no memory of step 1


def test_sgd_with_momentum_by_hand():
    params = one_param([1.0, -2.0])
    opt = SGD(params, lr=0.5, momentum=0.9)
    # Step 1: v = g1 = [0.2, -0.4];                       w = [1 - 0.1, -2 + 0.2]   = [0.9, -1.8]
    opt.step({"w": np.array([0.2, -0.4])})
    np.testing.assert_allclose(params["w"], [0.9, -1.8], rtol=1e-15)
    # Step 2: v = 0.9 v + g2 = [0.18 + 1.0, -0.36 + 0] = [1.18, -0.36]; w = [0.9 - 0.59, -1.8 + 0.18] = [0.31, -1.62]
    opt.step({"w": np.array([1.0, 0.0])})
    np.testing.assert_allclose(opt.state["velocity"]["w"], [1.18, -0.36], rtol=1e-14)
    np.testing.assert_allclose(params["w"], [0.31, -1.62], rtol=1e-14)


# --- updates happen in place ---------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=0.01), lambda p: SGD(p, lr=0.01, momentum=0.5)])
def test_params_are_updated_in_place(make):
    rng = np.random.default_rng(1)
    params = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    objects = dict(params)
    before = {n: p.copy() for n, p in params.items()}
    opt = make(params)
    opt.step({n: rng.standard_normal(p.shape) for n, p in params.items()})
    for n in params:
        assert params[n] is objects[n] and opt.params[n] is objects[n]
        assert not np.array_equal(params[n], before[n])


@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=0.01), lambda p: SGD(p, lr=0.01, momentum=0.5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates_the_model_flat_buffer(make, dtype):
    model = VAE(6, (5,), 3, dtype=dtype, seed=0)
    flat_before = model.flat_params.copy()
    views = dict(model.params)
    opt = make(model.params)
    x = np.random.default_rng(0).random((4, 6))
    _, grads = model.loss_and_grads(x, rng=np.random.default_rng(1))
    opt.step(grads)
    assert not np.array_equal(model.flat_params, flat_before)
    assert model.flat_params.dtype == dtype
    for n, p in model.params.items():
        assert p is views[n] and np.shares_memory(p, model.flat_params)
    # The views tile the buffer exactly, in order, so the update is the one computed on them.
    offset = 0
    for n, p in model.params.items():
        start = (p.ctypes.data - model.flat_params.ctypes.data) // p.itemsize
        assert start == offset
        np.testing.assert_array_equal(model.flat_params[start:start + p.size], p.ravel())
        offset += p.size
    assert offset == model.flat_params.size


def test_step_does_not_change_grads():
    params = one_param([1.0, 2.0])
    grads = {"w": np.array([0.3, -0.7])}
    Adam(params, lr=0.1).step(grads)
    np.testing.assert_array_equal(grads["w"], [0.3, -0.7])


# --- state_dict round trip ----------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda p: Adam(p, lr=0.02, beta1=0.8, beta2=0.99),
    lambda p: SGD(p, lr=0.02, momentum=0.9),
])
def test_state_dict_round_trip(make):
    rng = np.random.default_rng(2)
    params_a = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}
    grads = [{n: rng.standard_normal(p.shape) for n, p in params_a.items()} for _ in range(6)]
    opt_a = make(params_a)
    for g in grads[:3]:
        opt_a.step(g)
    # Restore a second optimizer, on a copy of the parameters, from the first one's state.
    params_b = {n: p.copy() for n, p in params_a.items()}
    opt_b = make(params_b)
    state = opt_a.state_dict()
    opt_b.load_state_dict(state)
    assert opt_b.t == 3
    # A third one without the state shows the restored state matters.
    params_c = {n: p.copy() for n, p in params_a.items()}
    opt_c = make(params_c)
    for g in grads[3:]:
        opt_a.step(g)
        opt_b.step(g)
        opt_c.step(g)
    for n in params_a:
        np.testing.assert_array_equal(params_a[n], params_b[n])
        assert not np.allclose(params_a[n], params_c[n])
    # state_dict is a snapshot: later steps did not change it.
    assert int(state["t"]) == 3
    assert any(not np.array_equal(state[k], opt_a.state_dict()[k]) for k in state if "/" in k)


def test_state_dict_holds_plain_arrays_named_by_parameter():
    params = {"enc.W": np.zeros((2, 2)), "enc.b": np.zeros(2)}
    state = Adam(params, lr=0.1).state_dict()
    assert set(state) == {"t", "lr", "m/enc.W", "m/enc.b", "v/enc.W", "v/enc.b"}
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in state.values())
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:  # storable in a checkpoint without pickle
        assert set(loaded.files) == set(state)


def test_load_state_dict_rejects_missing_or_misshapen_state():
    params = one_param([1.0, 2.0])
    good = Adam(params, lr=0.1).state_dict()
    missing = {k: v for k, v in good.items() if k != "v/w"}
    with pytest.raises(ValueError, match="v/w"):
        Adam(one_param([1.0, 2.0]), lr=0.1).load_state_dict(missing)
    misshapen = dict(good, **{"m/w": np.zeros(3)})
    with pytest.raises(ValueError, match="m/w"):
        Adam(one_param([1.0, 2.0]), lr=0.1).load_state_dict(misshapen)


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda p: Adam(p, lr=0.0), "lr"),
    (lambda p: Adam(p, lr=-1e-3), "lr"),
    (lambda p: Adam(p, lr=float("nan")), "lr"),
    (lambda p: Adam(p, lr=float("inf")), "lr"),
    (lambda p: Adam(p, beta1=1.0), "beta1"),
    (lambda p: Adam(p, beta1=-0.1), "beta1"),
    (lambda p: Adam(p, beta1=float("nan")), "beta1"),
    (lambda p: Adam(p, beta2=1.0), "beta2"),
    (lambda p: Adam(p, beta2=1.5), "beta2"),
    (lambda p: Adam(p, eps=0.0), "eps"),
    (lambda p: Adam(p, eps=-1e-8), "eps"),
    (lambda p: SGD(p, lr=0.0), "lr"),
    (lambda p: SGD(p, lr=-0.1), "lr"),
    (lambda p: SGD(p, lr=float("nan")), "lr"),
    (lambda p: SGD(p, momentum=-0.1), "momentum"),
    (lambda p: SGD(p, momentum=1.0), "momentum"),
    (lambda p: SGD(p, momentum=float("nan")), "momentum"),
])
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        make(one_param([1.0]))


@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=0.1), lambda p: SGD(p, lr=0.1, momentum=0.9)])
@pytest.mark.parametrize("grads", [
    {"a": np.ones(2)},                                          # "b" missing
    {"a": np.ones(2), "b": np.ones((2, 2)), "c": np.ones(1)},   # extra key
    {"a": np.ones(3), "b": np.ones((2, 2))},                    # wrong shape
    {"a": np.ones(2), "b": np.ones(4)},                         # same size, wrong shape
    {"a": np.ones((2, 1)), "b": np.ones((2, 2))},               # would broadcast; still wrong
])
def test_bad_grads_raise_and_change_nothing(make, grads):
    params = {"a": np.zeros(2), "b": np.zeros((2, 2))}
    opt = make(params)
    with pytest.raises(ValueError):
        opt.step(grads)
    assert opt.t == 0
    for p in params.values():
        np.testing.assert_array_equal(p, 0.0)
    for arrays in opt.state.values():
        for a in arrays.values():
            np.testing.assert_array_equal(a, 0.0)


def test_params_must_be_a_dict_of_float_arrays():
    with pytest.raises(TypeError):
        Adam({})
    with pytest.raises(TypeError):
        Adam({"w": np.zeros(2, dtype=int)})
    with pytest.raises(TypeError):
        SGD([np.zeros(2)])


# --- optimizers optimize -----------------------------------------------------------------------

@pytest.mark.parametrize("make, steps", [
    (lambda p: Adam(p, lr=0.05), 1000),
    (lambda p: SGD(p, lr=0.05, momentum=0.9), 300),
])
def test_minimizes_a_quadratic(make, steps):
    # f(w) = 1/2 sum a (w - c)^2, an ill-conditioned bowl with its minimum at c.
    a = np.array([0.5, 1.0, 4.0, 10.0])
    c = np.array([1.0, -2.0, 3.0, 0.5])
    params = one_param(np.zeros(4))
    opt = make(params)
    for _ in range(steps):
        opt.step({"w": a * (params["w"] - c)})
    np.testing.assert_allclose(params["w"], c, atol=1e-3)


def test_adam_trains_a_tiny_vae():
    rng = np.random.default_rng(0)
    # 64 binary examples from 4 prototypes with 5% of pixels flipped.
    prototypes = rng.random((4, 16)) < 0.5
    x = prototypes[rng.integers(0, 4, 64)] ^ (rng.random((64, 16)) < 0.05)
    x = x.astype(np.float64)
    model = VAE(16, (32,), 4, activation="tanh", dtype=np.float64, seed=0)
    eval_eps = np.random.default_rng(1).standard_normal((64, 4))

    def loss():
        return -np.mean(model.elbo(x, eval_eps))

    start = loss()
    opt = Adam(model.params, lr=0.01)
    train_rng = np.random.default_rng(2)
    for _ in range(200):
        _, grads = model.loss_and_grads(x, rng=train_rng, copy=False)
        opt.step(grads)
    end = loss()
    assert np.isfinite(end)
    assert end < 0.5 * start, (start, end)
    # Better than the best model that ignores z (independent pixels at their mean):
    # the latent code has learned which prototype an example comes from.
    p = x.mean(axis=0).clip(1e-3, 1 - 1e-3)
    independent = -np.mean(np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=1))
    assert end < independent - 2.0, (end, independent)


@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=0.01), lambda p: SGD(p, lr=0.01, momentum=0.5)])
def test_float32_steps_make_no_float64_passes(make, float64_watch):
    # Per-step scalars must stay Python floats: a NumPy float64 scalar would
    # turn a float32 pass into a float64 one (twice as slow, same rounding).
    watch, log = float64_watch
    rng = np.random.default_rng(0)
    flat = watch(np.zeros(12, np.float32))   # the views tile one buffer, as a VAE's do
    params = {"a": flat[:5], "b": flat[5:].reshape(7, 1)}
    grads_flat = watch(rng.standard_normal(12).astype(np.float32))
    grads = {"a": grads_flat[:5], "b": grads_flat[5:].reshape(7, 1)}
    opt = make(params)
    for _ in range(3):
        opt.step(grads)
    assert flat.dtype == np.float32 and np.all(np.isfinite(flat)) and np.any(flat != 0)
    assert log.calls > 0 and log == []


# --- Adam over many steps, and its state --------------------------------------------------------------

def reference_adam(w, grads, lr, beta1, beta2, eps):
    """Algorithm 1 of Kingma & Ba, line by line, in float64: -> (w, m, v) after the steps."""
    w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    return w, m, v


@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.999), (0.5, 0.7), (0.0, 0.9), (0.3, 0.0)])
@pytest.mark.parametrize("flat", [True, False])
def test_adam_matches_algorithm_1_over_many_steps(beta1, beta2, flat):
    # 130 steps with gradients over five orders of magnitude, on views of one buffer (as a
    # VAE's params) or separate arrays: the steps and the moments are Algorithm 1's.
    rng = np.random.default_rng(5)
    n = 37
    grads = [rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 2, n) for _ in range(130)]
    w0 = rng.standard_normal(n)
    if flat:   # views that tile one buffer: the flat path (one update for all)
        buffer = w0.copy()
        params = {"a": buffer[:20], "b": buffer[20:].reshape(17, 1)}
    else:
        params = {"a": w0[:20].copy(), "b": w0[20:].reshape(17, 1).copy()}
    opt = Adam(params, lr=0.01, beta1=beta1, beta2=beta2, eps=1e-8)
    for g in grads:
        opt.step({"a": g[:20], "b": g[20:].reshape(17, 1)})
    w, m, v = reference_adam(w0, grads, 0.01, beta1, beta2, 1e-8)
    got = np.concatenate([params["a"], params["b"].ravel()])
    np.testing.assert_allclose(got, w, rtol=1e-11, atol=1e-14)
    state = opt.state
    np.testing.assert_allclose(np.concatenate([state["m"]["a"], state["m"]["b"].ravel()]), m, rtol=1e-11)
    np.testing.assert_allclose(np.concatenate([state["v"]["a"], state["v"]["b"].ravel()]), v, rtol=1e-11)


def test_adam_updates_arrays_that_are_not_contiguous():
    # A strided view is updated in place, as a contiguous array is.
    rng = np.random.default_rng(6)
    base = rng.standard_normal((4, 6))
    strided = {"w": base[:, ::2]}                  # a view with gaps: no flat layout, no BLAS
    plain = {"w": base[:, ::2].copy()}
    grads = [{"w": rng.standard_normal((4, 3))} for _ in range(30)]
    for params in (strided, plain):
        opt = Adam(params, lr=0.05, beta1=0.5)
        for g in grads:
            opt.step(g)
    assert np.shares_memory(strided["w"], base)
    np.testing.assert_allclose(strided["w"], plain["w"], rtol=1e-12)
    np.testing.assert_allclose(base[:, ::2], plain["w"], rtol=1e-12)




def test_adam_betas_are_hyperparameters_like_the_others():
    # beta1 changed between steps: the next step decays m by the new beta1 and corrects by 1 - beta1^t.
    params = one_param([1.0])
    opt = Adam(params, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    opt.step({"w": np.array([1.0])})            # m = 0.1, v = 0.01
    opt.beta1 = 0.5
    opt.step({"w": np.array([3.0])})            # m = 0.5 * 0.1 + 0.5 * 3 = 1.55; v = 0.99 * 0.01 + 0.01 * 9 = 0.0999
    m_hat, v_hat = 1.55 / (1 - 0.5 ** 2), 0.0999 / (1 - 0.99 ** 2)
    assert opt.state["m"]["w"][0] == pytest.approx(1.55, rel=1e-15)
    assert opt.state["v"]["w"][0] == pytest.approx(0.0999, rel=1e-14)
    step1 = 0.1 * 1.0 / (1.0 + 1e-8)          # the first step is lr * g / (|g| + eps)
    assert params["w"][0] == pytest.approx(1.0 - step1 - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8), rel=1e-14)


FIXTURE = Path(__file__).parent / "fixtures" / "run_scaled_adam"


def test_adam_loads_the_scaled_moments_of_checkpoints_written_before_it_kept_true_ones():
    # Written by c0057fe's Adam, which stored M = m / beta^(t mod R) and the factor ('m.scale').
    state = checkpoint.optimizer_state_of(checkpoint.read_state(FIXTURE / "checkpoint.npz"))
    assert 0.0 < float(state["m.scale"]) < 0.2 and float(state["v.scale"]) < 1.0   # really scaled
    with np.load(FIXTURE / "expected_moments.npz") as f:
        expected = {k: f[k] for k in f.files}
    params = {k[2:]: np.zeros_like(v) for k, v in expected.items() if k.startswith("m/")}
    opt = Adam(params)
    opt.load_state_dict(state)
    assert opt.t == int(expected["t"]) == 18
    for s in ("m", "v"):
        for name in params:
            np.testing.assert_allclose(opt.state[s][name], expected[f"{s}/{name}"], rtol=1e-6, atol=1e-30)
    assert set(opt.state_dict()) == {"t", "lr"} | {f"{s}/{n}" for s in ("m", "v") for n in params}   # true ones now
    with pytest.raises(ValueError, match=r"m\.scale"):
        Adam(params).load_state_dict(dict(state, **{"m.scale": np.float64(0.0)}))
