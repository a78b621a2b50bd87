"""Dense layers and activations: forward values, hand-written backward passes, initialization."""
import numpy as np
import pytest
from scipy.special import expit

from npvae import VAE
from npvae.gradcheck import TOLERANCE, check_entries
from npvae.layers import ACTIVATIONS, LEAKY_SLOPE, MLP, Dense, check_activation, init_std

# Each activation written directly from its textbook definition, independent of layers.py.
FORMULAS = {
    "relu": lambda a: np.where(a > 0, a, 0.0),
    "leaky_relu": lambda a: np.where(a > 0, a, 0.01 * a),
    "elu": lambda a: np.where(a > 0, a, np.exp(a) - 1.0),
    "tanh": lambda a: (np.exp(a) - np.exp(-a)) / (np.exp(a) + np.exp(-a)),
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "softplus": lambda a: np.log(1.0 + np.exp(a)),
    "identity": lambda a: a,
}

# dy/da as a function of a, also from the definition.
DERIVATIVES = {
    "relu": lambda a: (a > 0).astype(float),
    "leaky_relu": lambda a: np.where(a > 0, 1.0, 0.01),
    "elu": lambda a: np.where(a > 0, 1.0, np.exp(a)),
    "tanh": lambda a: 1.0 - np.tanh(a) ** 2,
    "sigmoid": lambda a: np.exp(-a) / (1.0 + np.exp(-a)) ** 2,
    "softplus": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "identity": lambda a: np.ones_like(a),
}

NAMES = sorted(ACTIVATIONS)


def test_activation_table_is_the_documented_one():
    assert set(ACTIVATIONS) == set(FORMULAS) == {
        "relu", "leaky_relu", "elu", "tanh", "sigmoid", "softplus", "identity"}
    assert LEAKY_SLOPE == 0.01


@pytest.mark.parametrize("name", NAMES)
def test_activation_forward_matches_formula(name):
    a = np.linspace(-6.0, 6.0, 49) + 0.013  # stays off 0, where the rectifiers kink
    forward, _ = ACTIVATIONS[name]
    np.testing.assert_allclose(forward(a.copy()), FORMULAS[name](a), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_activation_derivative_from_output_matches_formula(name):
    a = np.linspace(-6.0, 6.0, 49) + 0.013
    forward, grad_from_y = ACTIVATIONS[name]
    g = grad_from_y(forward(a.copy()))
    g = np.ones_like(a) if g is None else g  # identity: multiplying by one is skipped
    np.testing.assert_allclose(g, DERIVATIVES[name](a), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_dense_forward_matches_formula(name):
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), name)
    x_before = x.copy()
    y = layer.forward(x)
    assert y.shape == (5, 3)
    np.testing.assert_allclose(y, FORMULAS[name](x @ W + b), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(x, x_before)  # an in-place activation must not touch the input


def _dense_point(name, seed, B=4, I=5, O=3):
    """float64 test point whose pre-activations are all at least 0.05 away from 0."""
    for s in range(seed, seed + 100):
        rng = np.random.default_rng(s)
        W = rng.standard_normal((I, O)) * init_std(name, I, O)
        b = 0.1 * rng.standard_normal(O)
        x, R = rng.standard_normal((B, I)), rng.standard_normal((B, O))
        if np.min(np.abs(x @ W + b)) > 0.05:
            return W, b, x, R
    raise AssertionError("no test point away from the kink")


@pytest.mark.parametrize("name", NAMES)
def test_dense_backward_per_entry(name):
    W, b, x, R = _dense_point(name, seed=10)
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), name)

    def f():
        return float(np.sum(R * layer.forward(x.copy())))  # R random: a transposed dW cannot hide

    layer.forward(x.copy())
    dx = layer.backward(R)
    assert dx.shape == x.shape and layer.dW.shape == W.shape and layer.db.shape == b.shape
    errors = check_entries(f, {"W": W, "b": b, "x": x}, {"W": layer.dW, "b": layer.db, "x": dx})
    assert max(errors.values()) <= TOLERANCE, errors
    # The check is not vacuous: every gradient has entries of a sensible size.
    for g in (layer.dW, layer.db, dx):
        assert np.max(np.abs(g)) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_dense_backward_without_dx(name):
    W, b, x, R = _dense_point(name, seed=20)
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), name)
    layer.forward(x.copy())
    assert layer.backward(R, need_dx=False) is None
    dW = layer.dW.copy()
    layer.forward(x.copy())
    layer.backward(R)
    np.testing.assert_array_equal(layer.dW, dW)  # same dW whether or not dx is wanted


@pytest.mark.parametrize("name", NAMES)
def test_mlp_backward_per_entry(name):
    widths = (5, 4, 6, 3)
    for seed in range(100):  # first seed whose pre-activations keep away from 0
        rng = np.random.default_rng(seed)
        Ws = [rng.standard_normal((i, o)) * init_std(name, i, o) for i, o in zip(widths, widths[1:])]
        bs = [0.1 * rng.standard_normal(o) for o in widths[1:]]
        x, R = rng.standard_normal((4, widths[0])), rng.standard_normal((4, widths[-1]))
        mlp = MLP(Dense(W, b, np.zeros_like(W), np.zeros_like(b), name) for W, b in zip(Ws, bs))
        mlp.forward(x.copy())
        pre = [layer.x @ layer.W + layer.b for layer in mlp.layers]
        if min(np.min(np.abs(a)) for a in pre) > 0.02:
            break
    else:
        raise AssertionError("no test point away from the kink")

    def f():
        return float(np.sum(R * mlp.forward(x.copy())))

    mlp.forward(x.copy())
    dx = mlp.backward(R)
    arrays, grads = {"x": x}, {"x": dx}
    for i, layer in enumerate(mlp.layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = layer.W, layer.b
        grads[f"W{i}"], grads[f"b{i}"] = layer.dW, layer.db
    errors = check_entries(f, arrays, grads)
    assert max(errors.values()) <= TOLERANCE, errors


def test_mlp_backward_need_dx_false_returns_none_but_fills_every_layer():
    rng = np.random.default_rng(3)
    layers = [Dense(rng.standard_normal((4, 4)), rng.standard_normal(4),
                    np.zeros((4, 4)), np.zeros(4), "tanh") for _ in range(3)]
    mlp = MLP(layers)
    mlp.forward(rng.standard_normal((2, 4)))
    assert mlp.backward(rng.standard_normal((2, 4)), need_dx=False) is None
    for layer in layers:
        assert np.all(layer.dW != 0) and np.all(layer.db != 0)


@pytest.mark.parametrize("name", NAMES)
def test_backward_does_not_change_weights(name):
    W, b, x, R = _dense_point(name, seed=30)
    W0, b0 = W.copy(), b.copy()
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), name)
    layer.forward(x)
    layer.backward(R)
    layer.backward(R)
    assert layer.W is W and layer.b is b
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(b, b0)


def test_model_backward_does_not_change_weights():
    model = VAE(6, (5,), 3, dtype=np.float64, seed=0)
    before = model.flat_params.copy()
    x = np.random.default_rng(0).random((4, 6))
    model.loss_and_grads(x, rng=np.random.default_rng(1))
    model.loss_and_grads(x, rng=np.random.default_rng(2), k=3)
    assert np.any(model.flat_grads != 0)
    np.testing.assert_array_equal(model.flat_params, before)


def test_softplus_is_finite_and_exact_at_extremes():
    forward, grad_from_y = ACTIVATIONS["softplus"]
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = forward(np.array([-1000.0, 1000.0]))
    # softplus(1000) = 1000 + log1p(e^-1000) = 1000 in float64; softplus(-1000) = e^-1000 = 0.
    np.testing.assert_array_equal(y, [0.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        g = grad_from_y(y)
    np.testing.assert_array_equal(g, [0.0, 1.0])


def test_softplus_derivative_from_output_is_accurate_for_very_negative_inputs():
    # There softplus(a) ~ e^a is tiny, and 1 - e^(-y) would cancel to 0 without expm1.
    a = np.array([-20.0, -35.0, -50.0, -100.0, -300.0, -700.0])
    forward, grad_from_y = ACTIVATIONS["softplus"]
    y = forward(a.copy())
    np.testing.assert_allclose(y, np.log1p(np.exp(a)), rtol=1e-14)
    np.testing.assert_allclose(grad_from_y(y), expit(a), rtol=1e-12)


def test_softplus_dense_backward_for_very_negative_inputs():
    W, b = np.eye(2), np.array([-40.0, -60.0])
    x, R = np.array([[0.5, -0.25]]), np.array([[0.7, -1.3]])
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), "softplus")
    layer.forward(x)
    dx = layer.backward(R)
    np.testing.assert_allclose(dx, R * expit(x + b), rtol=1e-12)


@pytest.mark.parametrize("name, expected", [
    ("relu", np.sqrt(2.0 / 300)),
    ("leaky_relu", np.sqrt(2.0 / 300)),
    ("elu", np.sqrt(2.0 / 300)),
    ("tanh", np.sqrt(2.0 / 500)),
    ("softplus", np.sqrt(2.0 / 500)),
    ("identity", np.sqrt(2.0 / 500)),
    ("sigmoid", 4.0 * np.sqrt(2.0 / 500)),
])
def test_init_std_formula(name, expected):
    assert init_std(name, 300, 200) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_model_weights_have_init_std(name):
    model = VAE(300, (200,), 10, activation=name, dtype=np.float64, seed=5)
    for layer, fan_in, fan_out in (("enc.h0", 300, 200), ("dec.logits", 200, 300)):
        W = model.params[layer + ".W"]
        # 60000 draws: the sample std is within 0.3% of the true one (one standard error).
        assert np.std(W) == pytest.approx(init_std(name, fan_in, fan_out), rel=0.02)
        assert abs(np.mean(W)) < 5 * init_std(name, fan_in, fan_out) / np.sqrt(W.size)
        np.testing.assert_array_equal(model.params[layer + ".b"], 0.0)


def test_relu_and_sigmoid_inits_differ_as_documented():
    relu = np.std(VAE(300, (200,), 10, activation="relu", seed=1).params["enc.h0.W"])
    tanh = np.std(VAE(300, (200,), 10, activation="tanh", seed=1).params["enc.h0.W"])
    sigm = np.std(VAE(300, (200,), 10, activation="sigmoid", seed=1).params["enc.h0.W"])
    assert relu / tanh == pytest.approx(np.sqrt(500 / 300), rel=0.02)
    assert sigm / tanh == pytest.approx(4.0, rel=0.02)


@pytest.mark.parametrize("make", [
    lambda: check_activation("swish"),
    lambda: check_activation(None),
    lambda: Dense(np.zeros((2, 2)), np.zeros(2), np.zeros((2, 2)), np.zeros(2), "gelu"),
    lambda: VAE(4, (3,), 2, activation="Relu"),
])
def test_unknown_activation_raises_listing_valid_names(make):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    for name in ACTIVATIONS:
        assert repr(name) in message


def test_check_activation_returns_known_names():
    for name in ACTIVATIONS:
        assert check_activation(name) == name


