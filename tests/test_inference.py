"""npvae.inference: per-datapoint and semi-amortized learning, checked for meaning as well as gradients."""
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from npvae import checkpoint as ckpt
from npvae import evaluate, inference
from npvae.cli import main
from npvae.gradcheck import TOLERANCE, numerical_gradient, relative_error, small_model
from npvae.train import TrainConfig, Trainer


def tiny(**kw):
    """A run that trains in a fraction of a second on the built-in shapes."""
    base = dict(dataset="shapes", epochs=2, batch_size=50, hidden=(16,), z_dim=3, n_train=300,
                n_valid=100, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def state_of(run, which=ckpt.LATEST):
    return ckpt.read_state(Path(run) / which)


def binary_data(model, rng, B):
    return (rng.random((B, model.x_dim)) < 0.4).astype(np.float64)


# --- the inner loop: gradients and meaning ------------------------------------------------------

@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_q_gradient_matches_finite_differences(beta):
    model = small_model("bernoulli", "tanh", seed=1)
    rng = np.random.default_rng(0)
    x = binary_data(model, rng, 3)
    mu, log_sigma = 0.5 * rng.standard_normal((3, 3)), 0.3 * rng.standard_normal((3, 3))
    eps = rng.standard_normal((3, 4, 3))
    _, dmu, dlog_sigma = inference.q_elbo_and_grads(model, x, mu, log_sigma, eps, beta)

    def loss():   # the sum over rows of -elbo_i: row i's gradient is its own
        return -float(np.sum(inference.q_elbo_and_grads(model, x, mu, log_sigma, eps, beta)[0]))
    assert relative_error(dmu, numerical_gradient(loss, mu)) <= TOLERANCE
    assert relative_error(dlog_sigma, numerical_gradient(loss, log_sigma)) <= TOLERANCE


def test_inner_loop_increases_every_rows_elbo_and_leaves_the_model_alone():
    model = small_model("bernoulli", "tanh", seed=2, D=12, Z=2)
    params = model.flat_params.copy()
    rng = np.random.default_rng(1)
    x = binary_data(model, rng, 8)
    mu0, log_sigma0 = inference.prior_q(8, 2, model.dtype)
    mu, log_sigma = inference.refine(model, x, mu0, log_sigma0, 40, 0.05, rng)
    before = evaluate.elbo_estimate(model, x, (mu0, log_sigma0), 4000, np.random.default_rng(5))
    after = evaluate.elbo_estimate(model, x, (mu, log_sigma), 4000, np.random.default_rng(5))
    assert np.all(after > before + 1e-3), after - before
    assert np.array_equal(model.flat_params, params) and np.all(mu0 == 0) and np.all(log_sigma0 == 0)


@pytest.mark.parametrize("optimizer, lr, steps, tol", [("sgd", 0.05, 3000, 1e-6), ("adam", 0.002, 6000, 1e-3)])
def test_many_inner_steps_reach_what_a_direct_optimizer_finds(optimizer, lr, steps, tol):
    """On one point with a fixed eps the ELBO is a fixed function of phi: the inner loop's limit
    is scipy's BFGS optimum of the same function (its gradient by scipy's own differences)."""
    model = small_model("bernoulli", "tanh", seed=4, D=10, Z=2)
    rng = np.random.default_rng(3)
    x = binary_data(model, rng, 1)
    eps = rng.standard_normal((1, 6, 2))
    mu, log_sigma = inference.refine(model, x, *inference.prior_q(1, 2, np.float64), steps, lr, rng,
                                     optimizer=optimizer, eps=eps)

    def loss(phi):
        return -float(inference.q_elbo_and_grads(model, x, phi[None, :2], phi[None, 2:], eps)[0][0])
    direct = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    assert np.max(np.abs(np.concatenate([mu[0], log_sigma[0]]) - direct)) <= tol
    assert loss(np.concatenate([mu[0], log_sigma[0]])) <= loss(np.zeros(4)) - 0.01   # it did move


def test_theta_gradient_at_the_refined_q_matches_finite_differences():
    model = small_model("bernoulli", "tanh", seed=5)
    rng = np.random.default_rng(2)
    x = binary_data(model, rng, 4)
    mu, log_sigma = inference.refine(model, x, *model._encode(x), 50, 0.05, rng)
    eps = rng.standard_normal((4, 3))
    for n in model.grads:
        if n.startswith("enc."):
            model.grads[n][...] = 7.0
    inference.decoder_loss_and_grads(model, x, mu, log_sigma, eps, beta=0.5)
    assert all(np.all(model.grads[n] == 7.0) for n in model.grads if n.startswith("enc.")), \
        "the decoder's gradient wrote into the encoder's"
    analytic = {n: model.grads[n].copy() for n in inference.decoder_names(model)}   # before any f() overwrites them
    for name, g in analytic.items():
        numeric = numerical_gradient(lambda: inference.decoder_loss_and_grads(model, x, mu, log_sigma, eps, 0.5)[0],
                                     model.params[name])
        assert relative_error(g, numeric) <= TOLERANCE, name


def test_fit_q_scores_new_data_with_the_runs_own_inference():
    model = small_model("bernoulli", "tanh", seed=6, D=12, Z=2)
    rng = np.random.default_rng(4)
    x = binary_data(model, rng, 6)
    enc = model._encode(x)
    q = inference.fit_q(model, x, "amortized", 5, 0.05, rng)
    assert np.array_equal(q[0], enc[0]) and np.array_equal(q[1], enc[1])
    semi = inference.fit_q(model, x, "semi-amortized", 30, 0.05, rng)
    one = inference.fit_q(model, x, "per-datapoint", 20, 0.05, rng, passes=1)
    three = inference.fit_q(model, x, "per-datapoint", 20, 0.05, rng, passes=3)
    elbo = {name: evaluate.elbo_estimate(model, x, v, 4000, np.random.default_rng(9))
            for name, v in (("enc", enc), ("semi", semi), ("one", one), ("three", three))}
    assert np.mean(elbo["semi"]) > np.mean(elbo["enc"]) and np.mean(elbo["three"]) > np.mean(elbo["one"])
    gap = inference.amortization_gap(model, x, enc, np.random.default_rng(1), steps=200, n_eval=2000)
    old = evaluate.amortization_gaps(model, x, k=2000, rng=np.random.default_rng(1), steps=200, log_px=np.zeros(6))
    # with the encoder's q, the gap is Cremer et al.'s amortization gap, the same numbers
    assert np.allclose(gap["gap"], old["amortization_gap"], rtol=1e-10, atol=1e-10)


# --- training ----------------------------------------------------------------------------------------

def test_semi_amortized_with_zero_steps_is_the_amortized_run_bit_for_bit(tmp_path):
    Trainer(tiny(), tmp_path / "a", quiet=True, engine="reference").run()
    t = Trainer(tiny(inference="semi-amortized", inner_steps=0), tmp_path / "s", quiet=True)
    assert t.engine == "reference"
    t.run()
    a, s = state_of(tmp_path / "a"), state_of(tmp_path / "s")
    for k in a:
        if k.startswith(("params/", "optimizer/", "history/valid", "history/train")):
            assert np.array_equal(a[k], s[k]), k
    # and with steps, it is another run, whose refined q beats its encoder's on training ELBO
    t = Trainer(tiny(inference="semi-amortized", inner_steps=3, inner_lr=0.05), tmp_path / "s3", quiet=True)
    t.run()
    assert not np.array_equal(state_of(tmp_path / "s3")["params/dec.h0.W"], a["params/dec.h0.W"])


def test_per_datapoint_trains_the_decoder_alone_and_resumes_exactly_with_its_table(tmp_path):
    full = Trainer(tiny(epochs=3, inference="per-datapoint"), tmp_path / "full", quiet=True)
    encoder0 = {n: p.copy() for n, p in full.model.params.items() if n.startswith("enc.")}
    full.run()
    assert all(np.array_equal(full.model.params[n], p) for n, p in encoder0.items()), "the encoder moved"
    assert set(full.optimizer.params) == set(inference.decoder_names(full.model))
    st = state_of(tmp_path / "full")
    phi = st["extra/phi"]
    assert phi.shape == (300, 6) and np.all(np.abs(phi).sum(axis=1) > 0)   # every row was refined
    assert full.history["valid_elbo"][-1] > full.history["valid_elbo"][0]
    cfg = ckpt.read_json(tmp_path / "full" / ckpt.CONFIG)
    assert cfg["train"]["inference"] == "per-datapoint" and cfg["train"]["inner_steps"] == 5
    assert cfg["train"]["inner_lr"] == 0.2 and cfg["train"]["inner_optimizer"] == "adam"
    assert cfg["engine"] == "reference"

    # interrupted mid-epoch, then resumed: the same parameters, table and history
    t = Trainer(tiny(epochs=3, inference="per-datapoint"), tmp_path / "cut", quiet=True)
    original, calls = t._step, []

    def step_then_interrupt(*args, **kwargs):
        sums = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 8:   # in the middle of the second epoch (6 steps per epoch)
            t._on_sigint(signal.SIGINT, None)
        return sums
    step_then_interrupt.session, step_then_interrupt.close = original.session, original.close
    t._step = step_then_interrupt
    assert t.run() == "interrupted"
    Trainer.resume(tmp_path / "cut", quiet=True).run()
    cut = state_of(tmp_path / "cut")
    for k in st:
        if k.startswith(("params/", "optimizer/", "extra/", "history/valid", "history/train")):
            assert np.array_equal(st[k], cut[k]), k


def test_a_damaged_phi_table_is_refused(tmp_path):
    Trainer(tiny(epochs=1, inference="per-datapoint"), tmp_path / "r", quiet=True).run()
    path = tmp_path / "r" / ckpt.LATEST
    arrays = dict(np.load(path))
    arrays["extra/phi"] = arrays["extra/phi"][:10]
    np.savez(path, **arrays)
    with pytest.raises(ckpt.CheckpointError, match="phi"):
        Trainer.resume(tmp_path / "r", epochs=2, quiet=True)


@pytest.mark.parametrize("settings, message", [
    (dict(inference="bayes"), "inference must be one of"),
    (dict(inner_steps=3), "inner_steps applies to inference"),
    (dict(inner_lr=0.1), "inner_lr applies to inference"),
    (dict(inference="per-datapoint", inner_steps=0), "inner_steps must be >= 1"),
    (dict(inference="semi-amortized", inner_steps=-1), "inner_steps must be >= 0"),
    (dict(inference="semi-amortized", inner_lr=-1.0), "inner_lr must be a positive number"),
    (dict(inference="semi-amortized", inner_optimizer="lbfgs"), "inner_optimizer must be one of"),
    (dict(inference="per-datapoint", objective="iwae", k=2), "trains on the ELBO only"),
])
def test_bad_inference_settings_are_named(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny(**settings).validate()


def test_the_fast_engine_is_refused_for_an_inner_loop(tmp_path):
    with pytest.raises(ValueError, match="runs on engine 'reference' only"):
        Trainer(tiny(inference="semi-amortized"), tmp_path / "r", quiet=True, engine="fast")


def test_cli_train_and_eval_with_each_inference(tmp_path, capsys):
    base = ["train", "--dataset", "shapes", "--epochs", "1", "--batch-size", "50", "--hidden", "16", "--z-dim", "3",
            "--n-train", "300", "--n-valid", "100", "--no-plots", "--quiet"]
    assert main(base + ["--inference", "per-datapoint", "--inner-steps", "2", "--inner-lr", "0.1",
                        "--out", str(tmp_path / "pd")]) == 0
    assert main(base + ["--inference", "semi-amortized", "--inner-steps", "2", "--out", str(tmp_path / "sa")]) == 0
    capsys.readouterr()
    for run in ("pd", "sa"):
        assert main(["eval", str(tmp_path / run), "--n", "30", "--k", "20", "--amortization", "5", "--json",
                     "--quiet"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["inference"] == {"pd": "per-datapoint", "sa": "semi-amortized"}[run]
        assert np.isfinite(r["elbo"]) and r["log_likelihood"] > r["elbo"] - 5 and r["n"] == 30
        assert r["amortization"]["elbo_optimized"] >= r["amortization"]["elbo_own"] - 0.5
    assert r["inner_steps"] == 2 and "encoder_gap" in r["amortization"]
    assert main(["eval", str(tmp_path / "pd"), "--n", "30"]) == 0
    assert "inference per-datapoint" in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(base + ["--inner-steps", "2", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "inner_steps applies to inference" in err
    with pytest.raises(SystemExit) as e:
        main(base + ["--inference", "semi-amortized", "--inner-steps", "-2"])
    assert e.value.code == 2
