"""The gradient checker itself: it measures what it claims, and it fails on wrong gradients."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npvae import cli, gradcheck
from npvae.gradcheck import (TOLERANCE, check_direction, check_entries, check_model, numerical_gradient,
                             relative_error, small_model)
from npvae.layers import Dense


# --- numerical_gradient -------------------------------------------------------------------

def test_numerical_gradient_of_sum_sin_is_cos():
    x = np.random.default_rng(0).uniform(-3, 3, (3, 4))
    x_before = x.copy()
    g = numerical_gradient(lambda: float(np.sum(np.sin(x))), x)
    assert g.shape == x.shape and g.dtype == np.float64
    np.testing.assert_allclose(g, np.cos(x), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(x, x_before)  # every entry put back exactly


def test_numerical_gradient_of_a_quadratic_form():
    rng = np.random.default_rng(1)
    A, x = rng.standard_normal((4, 4)), rng.standard_normal(4)
    g = numerical_gradient(lambda: float(x @ A @ x), x)
    assert relative_error((A + A.T) @ x, g) < 1e-10


@pytest.mark.parametrize("view", [lambda a: a[:, :2], lambda a: a.T])
def test_numerical_gradient_refuses_arrays_it_cannot_perturb_in_place(view):
    # reshape(-1) of these views is a copy: perturbing it would silently check nothing.
    x = view(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="contiguous"):
        numerical_gradient(lambda: float(np.sum(x)), x)


def test_numerical_gradient_works_on_evenly_strided_views():
    base = np.random.default_rng(7).standard_normal((4, 4))
    x = base[:, ::2]  # flattens to an evenly strided view, so in-place perturbation reaches x
    assert relative_error(3 * x ** 2, numerical_gradient(lambda: float(np.sum(x ** 3)), x)) < 1e-9


# --- relative_error -------------------------------------------------------------------------

def test_relative_error_basics():
    a = np.array([1.0, -2.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(a, np.zeros(3)) == 1.0
    # max |a - n| / max(|a|, |n|): 0.4 / 4.4, not the per-entry 0.4 / 1.4
    assert relative_error(a, np.array([1.4, -2.0, 4.4])) == pytest.approx(0.4 / 4.4, rel=1e-14)
    b = np.array([1.1, -2.0, 3.9])
    assert relative_error(a, b) == relative_error(b, a)
    assert relative_error(1e-6 * a, 1e-6 * b) == pytest.approx(relative_error(a, b), rel=1e-12)
    assert relative_error(2.0, 2.0 + 2e-9) == pytest.approx(1e-9, rel=1e-6)


# --- the checker can fail ---------------------------------------------------------------------

def _square_factor_two():
    rng = np.random.default_rng(2)
    x, R = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    return x, R, (lambda: float(np.sum(R * x ** 2)))


def test_dropped_factor_two_is_detected_per_entry():
    x, R, f = _square_factor_two()
    assert check_entries(f, {"x": x}, {"x": 2 * R * x})["x"] <= TOLERANCE
    assert check_entries(f, {"x": x}, {"x": R * x})["x"] > 0.4


def test_dropped_factor_two_is_detected_along_a_direction():
    x, R, f = _square_factor_two()
    assert check_direction(f, {"x": x}, {"x": 2 * R * x}, np.random.default_rng(3)) <= TOLERANCE
    # the error is |(g_wrong - g) . u| / |g_wrong|: of order one for a random u, far above the tolerance
    assert check_direction(f, {"x": x}, {"x": R * x}, np.random.default_rng(3)) > 1e-2


def test_transposed_weight_gradient_is_detected():
    rng = np.random.default_rng(4)
    W, b = rng.standard_normal((4, 4)), rng.standard_normal(4)   # square, so dW.T has the right shape
    x, R = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    layer = Dense(W, b, np.zeros_like(W), np.zeros_like(b), "tanh")
    f = lambda: float(np.sum(R * layer.forward(x.copy())))  # noqa: E731
    layer.forward(x.copy())
    layer.backward(R)
    good, bad = layer.dW.copy(), layer.dW.T.copy()
    assert check_entries(f, {"W": W}, {"W": good})["W"] <= TOLERANCE
    assert check_entries(f, {"W": W}, {"W": bad})["W"] > 1e-2
    for seed in range(3):
        assert check_direction(f, {"W": W}, {"W": good}, np.random.default_rng(seed)) <= TOLERANCE
        assert check_direction(f, {"W": W}, {"W": bad}, np.random.default_rng(seed)) > 1e-2


def test_check_direction_restores_the_arrays():
    x, R, f = _square_factor_two()
    before = x.copy()
    check_direction(f, {"x": x}, {"x": 2 * R * x}, np.random.default_rng(5))
    np.testing.assert_array_equal(x, before)


def _drop_encoder_branch(model):
    """The early-tinygrad bug: `dh =` where the two heads' gradients must be summed."""
    def backward(dmu, dlog_sigma):
        dh = model.enc_mu.backward(dmu)
        dh = model.enc_log_sigma.backward(dlog_sigma)  # overwrites the mu branch
        model.encoder.backward(dh, need_dx=False)
    model._encode_backward = backward


def test_check_model_passes_a_correct_model():
    model = small_model("bernoulli", "tanh", seed=1)
    errors = check_model(model, np.random.default_rng(6), "elbo")
    assert set(errors) == set(model.params)
    assert max(errors.values()) <= TOLERANCE


@pytest.mark.parametrize("direction", [False, True])
def test_check_model_catches_a_dropped_branch(direction):
    model = small_model("bernoulli", "tanh", seed=1)
    _drop_encoder_branch(model)
    errors = check_model(model, np.random.default_rng(6), "elbo", direction=direction)
    assert max(errors.values()) > 1e-3, errors


# --- run_all and the command line -----------------------------------------------------------

@pytest.fixture(scope="module")
def rows():
    return gradcheck.run_all(seed=0)


def test_run_all_rows_all_pass(rows):
    names = [name for name, *_ in gradcheck.components()]
    assert [r[0] for r in rows] == names and len(set(names)) == len(names)
    for name, worst, err, passed in rows:
        assert passed is True or passed == np.True_, name
        # A zero error would mean nothing was compared.
        assert 0.0 < err <= TOLERANCE, (name, worst, err)
    # Every activation, distribution and likelihood is in the table.
    for expected in ("dense[relu]", "dense[sigmoid]", "dense[softplus]", "dense[identity]", "reparameterize",
                     "kl_standard_normal", "kl_diag_gaussians", "bernoulli_log_prob", "gaussian_log_prob",
                     "gaussian_fixed_log_prob"):
        assert expected in names
    assert any("iwae" in n for n in names) and any("fixed sigma" in n for n in names)


def test_run_all_reports_the_worst_array_and_fails_above_the_tolerance(monkeypatch):
    seen = []

    def fake(name, errors):
        return name, lambda rng: seen.append(rng) or errors
    monkeypatch.setattr(gradcheck, "components", lambda: [
        fake("good", {"W": 3e-11, "b": 2e-9}), fake("bad", {"W": 1e-12, "x": 0.5, "b": 1e-3})])
    rows = gradcheck.run_all(seed=0)
    assert rows == [("good", "b", 2e-9, True), ("bad", "x", 0.5, False)]
    assert all(isinstance(rng, np.random.Generator) for rng in seen)
    assert not gradcheck.run_all(seed=0, tolerance=1e-9)[0][3]


def test_format_table(rows):
    table = gradcheck.format_table(rows).splitlines()
    assert table[0].split() == ["component", "worst", "array", "max", "rel", "error", "result"]
    assert set(table[1]) == {"-"}
    body = table[2:-1]
    assert len(body) == len(rows)
    assert all(line.rstrip().endswith("pass") for line in body)
    assert table[-1].startswith(f"{len(rows)} passed, 0 failed")
    failing = gradcheck.format_table([("x", "W", 1.0, False)]).splitlines()
    assert failing[2].rstrip().endswith("FAIL") and failing[-1].startswith("0 passed, 1 failed")


def test_cli_gradcheck_exits_0_and_prints_the_table(rows):
    result = subprocess.run([sys.executable, "-m", "npvae", "gradcheck"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "component" in lines[0] and "max rel error" in lines[0] and "result" in lines[0]
    body = lines[2:-1]
    assert len(body) == len(rows)
    for line, row in zip(body, rows):
        assert line.startswith(row[0]) and line.split()[-1] == "pass"
    assert "0 failed" in lines[-1]


def _console_script():
    """The `npvae` entry point installed next to this interpreter (setup.cfg console_scripts)."""
    script = shutil.which("npvae", path=str(Path(sys.executable).parent))
    assert script is not None, "the npvae console script is not installed next to sys.executable"
    return script


@pytest.mark.parametrize("command", [[sys.executable, "-m", "npvae"], [None]], ids=["python -m npvae", "npvae"])
def test_cli_gradcheck_help(command):
    command = [_console_script()] if command == [None] else command
    result = subprocess.run(command + ["gradcheck", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout and "gradcheck" in result.stdout and "--seed" in result.stdout


def test_cli_gradcheck_exits_1_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(gradcheck, "run_all", lambda seed=0: [("dense[relu]", "W", 0.3, False)])
    assert cli.main(["gradcheck"]) == 1
    assert "FAIL" in capsys.readouterr().out
