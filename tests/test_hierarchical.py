"""The hierarchical VAE (npvae/hierarchical.py): its gradients, its meaning, training, resume, CLI."""
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

import npvae
from npvae import checkpoint as ckpt
from npvae import gradcheck as gc
from npvae.cli import main
from npvae.engine.hierarchical import FastHierarchicalVAE
from npvae.hierarchical import BURDA_LAYERS, HierarchicalVAE, active_units, log_likelihood
from npvae.model import VAE
from npvae.train import TrainConfig, Trainer

TWO = (((5, 4), 3), ((4, 3), 2))
THREE = (((5,), 3), ((4,), 2), ((3,), 2))


def small(layers=TWO, likelihood="bernoulli", activation="tanh", seed=5):
    return gc.small_hierarchical(likelihood, activation, seed, layers)


# --- gradients ----------------------------------------------------------------------------

CASES = [(TWO, term, k) for term, k in (("recon", 1), ("kl", 1), ("elbo", 1), ("iwae", 1), ("iwae", 4))]
CASES += [(THREE, "elbo", 1), (THREE, "iwae", 4)]   # three layers: the loop over l, not only l = 2


@pytest.mark.parametrize("layers, term, k", CASES, ids=[f"{len(c[0])} layers-{c[1]}-k{c[2]}" for c in CASES])
@pytest.mark.parametrize("likelihood, activation", [("bernoulli", "tanh"), ("gaussian", "softplus")])
def test_every_gradient_entry_matches_central_differences(layers, likelihood, activation, term, k):
    errors = gc.check_model(small(layers, likelihood, activation), np.random.default_rng(1), term, k=k)
    assert max(errors.values()) <= gc.TOLERANCE, errors


@pytest.mark.parametrize("term, k", [("elbo", 1), ("iwae", 5)])
def test_random_direction_check_on_burdas_full_size_model(term, k):
    model = gc.small_hierarchical("bernoulli", "tanh", 7, BURDA_LAYERS, 784)
    assert model.n_params > 500_000       # the real thing, not a stand-in
    error = gc.check_model(model, np.random.default_rng(2), term, k=k, B=8, direction=True)["direction"]
    assert error <= gc.TOLERANCE


def test_a_wrong_backward_is_caught():
    # Drop the branch where z_1 feeds q(z_2|z_1): the check must fail, so it can fail.
    model = small()
    original = model._gaussian_net_backward

    def broken(net, dmu, dlog_sigma):
        du = original(net, dmu, dlog_sigma)
        return du * 0.0 if net is model.q_nets[0] else du
    model._gaussian_net_backward = broken
    errors = gc.check_model(model, np.random.default_rng(1), "elbo")
    assert max(errors.values()) > 1e-3


def test_gradcheck_has_the_hierarchical_rows():
    names = [name for name, _ in gc.components()]
    assert sum(n.startswith("hvae[") for n in names) >= 9
    assert any("Burda" in n and "iwae direction" in n for n in names)


# --- meaning ------------------------------------------------------------------------------

def test_with_one_layer_it_is_the_vae_number_for_number():
    h = HierarchicalVAE(6, [((5, 4), 3)], activation="tanh", dtype=np.float64, seed=1)
    v = VAE(6, (5, 4), 3, activation="tanh", dtype=np.float64, seed=1)
    assert list(h.params) == list(v.params)
    for n in v.params:
        assert np.array_equal(h.params[n], v.params[n]), n
    rng = np.random.default_rng(0)
    x, eps, eps_k = rng.random((4, 6)), rng.standard_normal((4, 3)), rng.standard_normal((4, 5, 3))
    for k, e in ((1, eps), (5, eps_k)):
        lh, gh = h.loss_and_grads(x, e, k=k, copy=True)
        lv, gv = v.loss_and_grads(x, e, k=k, copy=True)
        assert lh == pytest.approx(lv, rel=1e-14)
        for n in gv:
            np.testing.assert_allclose(gh[n], gv[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_log_weights_are_the_densities_written_out():
    """log_w = log p(x|z1) + log N(z1; mu_p(z2), sigma_p^2) + log N(z2; 0, I) - log q(z1|x) - log q(z2|z1)."""
    model = small()
    rng = np.random.default_rng(3)
    x, eps = rng.random((3, 6)), rng.standard_normal((3, 1, 5))
    (mu1, ls1), = [model._encode(x)]
    z1 = mu1 + np.exp(ls1) * eps[:, 0, :3]                   # the std is exp(log_sigma)
    mu2, ls2 = model._gaussian_net(model.q_nets[0], z1)
    z2 = mu2 + np.exp(ls2) * eps[:, 0, 3:]
    mup, lsp = model._gaussian_net(model.p_nets[0], z2)
    p = 0.5 * (1 + np.tanh(0.5 * model._decode(z1)))
    expected = (np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=1)
                + norm.logpdf(z1, mup, np.exp(lsp)).sum(1) + norm.logpdf(z2).sum(1)
                - norm.logpdf(z1, mu1, np.exp(ls1)).sum(1) - norm.logpdf(z2, mu2, np.exp(ls2)).sum(1))
    np.testing.assert_allclose(model.log_weights(x, eps)[:, 0], expected, rtol=1e-12)
    # The ELBO's terms hold the same sample, with the top KL in closed form instead of sampled.
    log_px_z, kl = model.forward(x, eps[:, 0])
    kl_top = 0.5 * np.sum(mu2 ** 2 + np.exp(2 * ls2) - 1 - 2 * ls2, axis=1)
    np.testing.assert_allclose(log_px_z - kl, expected - (norm.logpdf(z2).sum(1)
                               - norm.logpdf(z2, mu2, np.exp(ls2)).sum(1)) - kl_top, rtol=1e-12)


def test_the_analytic_elbo_and_the_sampled_one_have_the_same_mean():
    model = small()
    x = np.random.default_rng(4).random((2, 6))
    n = 20000
    xs = np.repeat(x, n, axis=0)
    rng = np.random.default_rng(5)
    analytic = model.elbo(xs, rng=rng).reshape(2, n)
    sampled = model.iwae_bound(xs, 1, rng=rng).reshape(2, n)   # k = 1: every term by the sample
    se = np.sqrt((analytic.var(1) + sampled.var(1)) / n)
    assert np.all(np.abs(analytic.mean(1) - sampled.mean(1)) < 4 * se)
    assert np.all(analytic.var(1) < sampled.var(1))            # why the closed form is used


def test_log_likelihood_matches_quadrature_over_both_latents():
    # Z_1 = Z_2 = 1: p(x) = integral p(x|z1) p(z1|z2) p(z2) dz1 dz2 on a grid.
    model = small(layers=(((4,), 1), ((3,), 1)), seed=8)
    x = np.random.default_rng(6).random((3, 6))
    g = np.linspace(-7, 7, 561)
    dz = g[1] - g[0]
    z1, z2 = np.meshgrid(g, g, indexing="ij")
    mup, lsp = model._gaussian_net(model.p_nets[0], z2.reshape(-1, 1))
    log_prior = norm.logpdf(z1.reshape(-1), mup[:, 0], np.exp(lsp[:, 0])) + norm.logpdf(z2.reshape(-1))
    log_px_z1 = model.log_px_z(x[:, None, :], model._decode(g[:, None])[None])       # (3, G)
    joint = log_px_z1[:, :, None] + log_prior.reshape(len(g), len(g))[None]
    exact = logsumexp(joint.reshape(3, -1), axis=1) + 2 * np.log(dz)
    estimate = log_likelihood(model, x, k=20000, rng=np.random.default_rng(7))
    np.testing.assert_allclose(estimate, exact, atol=0.01)
    elbo = model.elbo(np.repeat(x, 2000, axis=0), rng=np.random.default_rng(8)).reshape(3, -1).mean(1)
    assert np.all(elbo < exact)


def test_threaded_log_likelihood_equals_the_reference():
    from npvae.engine.evaluate import log_likelihood as engine_log_likelihood
    model = HierarchicalVAE(20, (((8,), 4), ((6,), 3)), seed=2)
    x = np.random.default_rng(0).random((7, 20)).astype(np.float32)
    ref = log_likelihood(model, x, k=300, rng=np.random.default_rng(1), chunk=70)
    for threads in (1, 2):
        out = engine_log_likelihood(model, x, k=300, rng=np.random.default_rng(1), threads=threads)
        np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_encode_sample_and_active_units_per_layer():
    model = HierarchicalVAE(20, (((8,), 4), ((6,), 3)), seed=2)
    x = np.random.default_rng(0).random((50, 20)).astype(np.float32)
    (mu1, ls1), (mu2, ls2) = model.encode(x)
    assert mu1.shape == ls1.shape == (50, 4) and mu2.shape == ls2.shape == (50, 3)
    assert mu1.dtype == np.float32
    s = model.sample(5, rng=np.random.default_rng(0))
    assert s.shape == (5, 20) and np.all((s > 0) & (s < 1))
    (n1, v1), (n2, v2) = active_units(model, x, n_samples=10)
    assert v1.shape == (4,) and v2.shape == (3,) and 0 <= n1 <= 4 and 0 <= n2 <= 3


@pytest.mark.parametrize("layers, match", [
    ([], "non-empty"), ([(5, 3, 1)], "pair"), ([((5, 0), 3)], "hidden width"), ([((5,), 0)], "z_dim"),
    ("200:100", "non-empty")])
def test_bad_layers_say_what_was_expected(layers, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalVAE(6, layers)


# --- training, checkpoints, CLI --------------------------------------------------------------

def tiny(**kw):
    base = dict(dataset="shapes", epochs=2, batch_size=50, layers=[[[16], 4], [[8], 2]], n_train=200,
                n_valid=100, seed=3, activation="tanh")
    base.update(kw)
    return TrainConfig(**base)


def params_of(run):
    state = ckpt.read_state(Path(run) / ckpt.LATEST)
    return {k: v for k, v in state.items() if k.startswith(("params/", "optimizer/"))}


def test_training_resumes_bit_for_bit_and_load_reads_it_back(tmp_path, objective="iwae", k=3):
    # (the IWAE: every term of the chain is sampled, and the generator's state carries all the draws)
    Trainer(tiny(epochs=3, objective=objective, k=k), tmp_path / "full", quiet=True).run()
    Trainer(tiny(epochs=1, objective=objective, k=k), tmp_path / "part", quiet=True).run()
    t = Trainer.resume(tmp_path / "part", epochs=3, quiet=True)      # from an epoch's end
    assert isinstance(t.model, FastHierarchicalVAE) and t.engine == "fast"
    original, calls = t._step, []

    def step_then_interrupt(*args, **kwargs):   # as Ctrl-C does, in the middle of the third epoch
        calls.append(1)
        if len(calls) == 6:
            t._on_sigint(signal.SIGINT, None)
        return original(*args, **kwargs)
    step_then_interrupt.session, step_then_interrupt.close = original.session, original.close
    t._step = step_then_interrupt
    assert t.run() == "interrupted"
    assert int(ckpt.read_state(tmp_path / "part" / ckpt.LATEST)["step"]) == 2
    t = Trainer.resume(tmp_path / "part", quiet=True)                 # from the middle of one
    t.run()
    a, b = params_of(tmp_path / "full"), params_of(tmp_path / "part")
    assert a.keys() == b.keys()
    for n in a:
        assert np.array_equal(a[n], b[n]), n
    model = npvae.load(tmp_path / "full", "latest")
    assert isinstance(model, HierarchicalVAE) and model.z_dims == (4, 2)
    assert t.history["valid_elbo"][-1] > t.history["valid_elbo"][0]      # it learns
    # a one-layer checkpoint refuses a two-layer model, naming the difference
    with pytest.raises(ckpt.CheckpointError, match="was saved with hidden=None"):
        ckpt.restore_params(VAE(model.x_dim, (16,), 4), ckpt.read_state(tmp_path / "full" / ckpt.LATEST))


def test_the_fast_engine_trains_the_reference_run(tmp_path):
    """FastHierarchicalVAE + FlatAdam (engine "fast") and HierarchicalVAE + Adam agree in float64 to rounding."""
    fast = Trainer(tiny(dtype="float64", objective="iwae", k=2), tmp_path / "fast", quiet=True)
    reference = Trainer(tiny(dtype="float64", objective="iwae", k=2), tmp_path / "ref", quiet=True,
                        engine="reference")
    assert type(fast.model) is FastHierarchicalVAE and type(reference.model) is HierarchicalVAE
    assert fast.run() == reference.run() == "done"
    a, b = params_of(tmp_path / "fast"), params_of(tmp_path / "ref")
    for n in a:
        if n.startswith("params/"):
            np.testing.assert_allclose(b[n], a[n], rtol=1e-9, atol=1e-9 * np.abs(a[n]).max(), err_msg=n)
    np.testing.assert_allclose(fast.history["valid_elbo"], reference.history["valid_elbo"], rtol=1e-10)
    # one step's gradients, term by term
    x = fast.valid[:20]
    for k in (1, 4):
        eps = np.random.default_rng(k).standard_normal((20, k, fast.model.z_dim))[:, 0 if k == 1 else slice(None)]
        lf, gf = fast.model.loss_and_grads(x, eps, k=k, copy=True)
        lr, gr = reference.model.loss_and_grads(x, eps, k=k, copy=True)
        assert lf == pytest.approx(lr, rel=1e-12)
        for n in gr:
            np.testing.assert_allclose(gf[n], gr[n], rtol=1e-9, atol=1e-12 * np.abs(gr[n]).max(), err_msg=n)


def test_cli_train_eval_with_layers_and_its_errors(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--dataset", "shapes", "--layers", "16:4", "8,8:2", "--epochs", "1", "--n-train", "300",
                 "--n-valid", "100", "--quiet", "--no-plots", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["layers"] == [[[16], 4], [[8, 8], 2]]
    capsys.readouterr()
    assert main(["eval", str(run), "--k", "50", "--n", "40", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["z_dims"] == [4, 2] and len(result["active_units_per_layer"]) == 2
    assert result["log_likelihood"] > result["elbo"] - 1.0
    assert main(["train", "--layers", "16:4", "--hidden", "8", "--out", str(tmp_path / "x")]) == 2
    assert "drop --hidden/--z-dim" in capsys.readouterr().err
    for bad in ("16", "16:x", "0:4", "16,:4"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--layers", bad])
        assert e.value.code == 2
        assert "expected a layer like 200,200:100" in capsys.readouterr().err


def test_a_hierarchical_config_refuses_the_inner_loop_methods_in_one_line():
    from npvae.train import TrainConfig
    config = TrainConfig(dataset="shapes", layers=[[[16], 4], [[8], 2]], inference="semi-amortized")
    with pytest.raises(ValueError, match="one-layer VAE") as caught:
        config.validate()
    assert "\n" not in str(caught.value)
