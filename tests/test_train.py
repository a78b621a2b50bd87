"""Training, checkpoints, resume and the command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npvae
from npvae import checkpoint as ckpt
from npvae.cli import main
from npvae.train import TrainConfig, Trainer, kl_weight, learning_rate

REPO = Path(__file__).resolve().parents[1]


def real_data_dir():
    """NPVAE_DATA if set (CI sets it), else ../shared/data next to the repository, else None."""
    for d in (os.environ.get("NPVAE_DATA"), REPO.parent / "shared" / "data"):
        if d and (Path(d) / "mnist").is_dir():
            return str(Path(d).resolve())
    return None


def tiny(**kw):
    """A configuration that trains in well under a second."""
    base = dict(dataset="shapes", epochs=2, batch_size=50, hidden=(32,), z_dim=4, n_train=600,
                n_valid=200, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def params_of(run, which="latest"):
    state = ckpt.read_state(Path(run) / (ckpt.LATEST if which == "latest" else ckpt.BEST))
    return {k: v for k, v in state.items() if k.startswith("params/")}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# --- schedules -------------------------------------------------------------------------

def test_burda_schedule_matches_the_paper_at_3280_epochs():
    c = TrainConfig(epochs=3280, lr_schedule="burda", lr=1e-3)
    # stage i covers epochs [sum_{j<i} 3^j, sum_{j<=i} 3^j) at 1e-3 * 10^(-i/7)
    starts = np.concatenate([[0], np.cumsum([3 ** i for i in range(8)])])
    for i in range(8):
        for e in (starts[i], starts[i + 1] - 1):
            assert learning_rate(c, e) == pytest.approx(1e-3 * 10 ** (-i / 7))
    assert learning_rate(c, 3279) == pytest.approx(1e-4)


def test_stages_schedule_has_the_burda_rates_in_equal_stages():
    c = TrainConfig(epochs=16, lr_schedule="stages", lr=1e-3)
    rates = [learning_rate(c, e) for e in range(16)]
    assert rates == pytest.approx(np.repeat(1e-3 * 10 ** (-np.arange(8) / 7), 2))
    # a budget that 8 does not divide still falls through all 8 rates, in order
    c = TrainConfig(epochs=21, lr_schedule="stages", lr=2e-3)
    rates = [learning_rate(c, e) for e in range(21)]
    assert sorted(set(rates), reverse=True) == pytest.approx(2e-3 * 10 ** (-np.arange(8) / 7))
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(2e-4)


def test_exponential_schedule_and_warmup():
    c = TrainConfig(epochs=5, lr_schedule="exponential", lr=1e-2, lr_final=1e-4)
    assert [learning_rate(c, e) for e in range(5)] == pytest.approx([1e-2, 10 ** -2.5, 1e-3, 10 ** -3.5, 1e-4])
    w = TrainConfig(warmup=2.0, beta=0.5)
    assert kl_weight(w, 0, 0, 10) == 0.0
    assert kl_weight(w, 1, 0, 10) == pytest.approx(0.25)   # halfway through the warm-up
    assert kl_weight(w, 1, 5, 10) == pytest.approx(0.375)
    assert kl_weight(w, 3, 0, 10) == 0.5                   # then the fixed beta
    assert kl_weight(TrainConfig(beta=0.7), 0, 0, 10) == 0.7


# --- training -------------------------------------------------------------------------

def test_training_improves_the_validation_elbo_and_writes_the_run(tmp_path):
    t = Trainer(tiny(epochs=4), tmp_path / "run", quiet=True)
    assert t.run() == "done"
    v = t.history["valid_elbo"]
    assert len(v) == 4 and v[-1] > v[0] + 5.0
    for name in ("config.json", "checkpoint.npz", "best.npz"):
        assert (tmp_path / "run" / name).is_file()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["z_dim"] == 4 and cfg["model"]["hidden"] == [32]
    model = npvae.load(tmp_path / "run")
    assert isinstance(model, npvae.VAE) and model.z_dim == 4
    # best.npz is the epoch with the best validation ELBO
    best = int(np.argmax(v))
    assert int(ckpt.read_state(tmp_path / "run" / "best.npz")["epoch"]) == best + 1


def test_training_is_deterministic_from_the_seed(tmp_path):
    for name in ("a", "b"):
        Trainer(tiny(), tmp_path / name, quiet=True).run()
    assert_identical(params_of(tmp_path / "a"), params_of(tmp_path / "b"))
    Trainer(tiny(seed=4), tmp_path / "c", quiet=True).run()
    assert not np.array_equal(params_of(tmp_path / "a")["params/dec.h0.W"],
                              params_of(tmp_path / "c")["params/dec.h0.W"])


def test_run_until_stops_between_stages_without_changing_the_run(tmp_path):
    Trainer(tiny(epochs=4, lr_schedule="stages"), tmp_path / "full", quiet=True).run()
    t = Trainer(tiny(epochs=4, lr_schedule="stages"), tmp_path / "staged", quiet=True)
    assert t.run(until=1) == "done" and t.epoch == 1
    assert t.run(until=3) == "done" and t.epoch == 3
    assert t.run(until=99) == "done" and t.epoch == 4    # never past config.epochs
    assert_identical(params_of(tmp_path / "full"), params_of(tmp_path / "staged"))


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_resume_continues_from_the_saved_epoch_bit_for_bit(tmp_path, engine):
    Trainer(tiny(epochs=4), tmp_path / "full", quiet=True, engine=engine).run()
    Trainer(tiny(epochs=2), tmp_path / "part", quiet=True, engine=engine).run()
    t = Trainer.resume(tmp_path / "part", epochs=4, quiet=True)   # on the run's own engine
    assert t.engine == engine and ckpt.read_json(tmp_path / "part" / ckpt.CONFIG)["engine"] == engine
    assert t.epoch == 2 and len(t.history["valid_elbo"]) == 2
    t.run()
    assert t.history["epoch"] == [1.0, 2.0, 3.0, 4.0]
    assert_identical(params_of(tmp_path / "full"), params_of(tmp_path / "part"))
    full = ckpt.read_state(tmp_path / "full" / "checkpoint.npz")
    part = ckpt.read_state(tmp_path / "part" / "checkpoint.npz")
    for k in full:
        if k.startswith(("optimizer/", "history/valid")):
            assert np.array_equal(full[k], part[k]), k


def interrupt_after(t, n_steps):
    """Make Trainer t act on a Ctrl-C that arrives during its step number n_steps (counted from 1)."""
    original, calls = t._step, []   # (on threads or helper processes, whichever the machine takes)

    def step_then_interrupt(*args, **kwargs):
        sums = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == n_steps:
            t._on_sigint(signal.SIGINT, None)
        return sums
    step_then_interrupt.session, step_then_interrupt.close = original.session, original.close
    t._step = step_then_interrupt


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_interrupt_mid_epoch_saves_and_resumes_exactly(tmp_path, engine):
    Trainer(tiny(epochs=3), tmp_path / "full", quiet=True, engine=engine).run()
    t = Trainer(tiny(epochs=3), tmp_path / "cut", quiet=True, engine=engine)
    interrupt_after(t, 17)   # in the middle of the second epoch (12 steps per epoch)
    assert t.run() == "interrupted"
    state = ckpt.read_state(tmp_path / "cut" / "checkpoint.npz")
    assert int(state["epoch"]) == 1 and int(state["step"]) == 5 and "extra/perm" in state
    Trainer.resume(tmp_path / "cut", quiet=True).run()
    assert_identical(params_of(tmp_path / "full"), params_of(tmp_path / "cut"))


# --- a stored set trained from disk (issue 31) ---------------------------------------------

def grey_npy(path, n=800, d=196, seed=0):
    """A uint8 .npy of n grey images (mostly dark, like MNIST): -> its path, opened memory-mapped by npvae."""
    x = (np.random.default_rng(seed).random((n, d)) ** 4 * 255).astype(np.uint8)
    np.save(path, x)
    return str(path)


def copying_split(dataset, n_valid, seed):
    """data.split_validation as it was before issue 31: the rows copied out by fancy indexing."""
    n = dataset.x_train.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    valid, train = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    return dataset.x_train[train], None, dataset.x_train[valid], None


def test_trainer_split_of_a_memory_mapped_set_is_an_index_not_a_copy(tmp_path, monkeypatch):
    x = np.tile((np.random.default_rng(0).random((1000, 784)) ** 4 * 255).astype(np.uint8), (40, 1))   # 31 MB
    np.save(tmp_path / "big.npy", x)
    import tracemalloc

    from npvae import data
    load = data.load

    def load_then_reset(*args, **kwargs):   # count what the Trainer does with the set, not the file scan's chunks
        loaded = load(*args, **kwargs)
        tracemalloc.reset_peak()
        return loaded
    monkeypatch.setattr(data, "load", load_then_reset)
    tracemalloc.start()
    t = Trainer(tiny(dataset=str(tmp_path / "big.npy"), n_train=None, init_bias=False), tmp_path / "run",
                quiet=True, threads=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    from npvae.data import Rows
    assert isinstance(t.data.x_train, np.memmap)
    assert isinstance(t.x_train, Rows) and t.x_train.x is t.data.x_train and t.x_train.shape == (39800, 784)
    assert isinstance(t.x_valid, Rows) and t.x_valid.x is t.data.x_train
    # the indices (8 bytes a row), the model and the validation set, not a copy of the rows
    assert peak < x.nbytes / 4, peak


@pytest.mark.parametrize("threads", [1, 2])
def test_a_memory_mapped_set_trains_bit_for_bit_as_the_copied_split_did(tmp_path, monkeypatch, threads):
    path = grey_npy(tmp_path / "grey.npy")
    config = dict(dataset=path, n_train=None, n_valid=200, batch_size=64, epochs=2)   # 10 steps an epoch, the last short
    Trainer(tiny(**config), tmp_path / "disk", quiet=True, threads=threads).run()
    from npvae import data
    monkeypatch.setattr(data, "split_validation", copying_split)
    old = Trainer(tiny(**config), tmp_path / "copied", quiet=True, threads=threads)
    assert isinstance(old.x_train, np.ndarray) and not isinstance(old.x_train, np.memmap)
    old.run()
    assert_identical(params_of(tmp_path / "disk"), params_of(tmp_path / "copied"))
    disk, copied = (ckpt.read_state(tmp_path / r / "checkpoint.npz") for r in ("disk", "copied"))
    assert np.array_equal(disk["history/valid_elbo"], copied["history/valid_elbo"])


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_interrupt_and_resume_on_a_memory_mapped_set_is_exact(tmp_path, engine):
    config = dict(dataset=grey_npy(tmp_path / "grey.npy"), n_train=None, n_valid=200, batch_size=100, epochs=2)
    Trainer(tiny(**config), tmp_path / "full", quiet=True, engine=engine).run()
    t = Trainer(tiny(**config), tmp_path / "cut", quiet=True, engine=engine)
    interrupt_after(t, 9)   # in the middle of the second epoch (6 steps per epoch)
    assert t.run() == "interrupted"
    assert int(ckpt.read_state(tmp_path / "cut" / "checkpoint.npz")["step"]) == 3
    Trainer.resume(tmp_path / "cut", quiet=True).run()
    assert_identical(params_of(tmp_path / "full"), params_of(tmp_path / "cut"))


def test_a_real_valued_memory_mapped_set_out_of_range_for_bernoulli_is_one_line(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 5)).astype(np.float32)
    np.save(tmp_path / "real.npy", x)
    with pytest.raises(ValueError, match=r"real.npy has values in \[-[0-9.]+, [0-9.]+\] \(use --likelihood gaussian\)"):
        Trainer(tiny(dataset=str(tmp_path / "real.npy"), likelihood="bernoulli", n_train=None), tmp_path / "r")
    lo, hi = Trainer(tiny(dataset=str(tmp_path / "real.npy"), n_train=None), tmp_path / "g").x_train[:].min(), x.max()
    assert lo >= x.min() and hi == x.max()


@pytest.mark.parametrize("dataset, binarize", [("shapes", "dynamic"), ("pinwheel", "none")])
def test_the_reference_engine_trains_the_same_run_as_the_fast_one(tmp_path, dataset, binarize):
    # In float64 the two engines' runs agree to rounding, and write the same kind of run directory.
    config = dict(dataset=dataset, binarize=binarize, dtype="float64", epochs=2)
    fast = Trainer(tiny(**config), tmp_path / "fast", quiet=True)
    reference = Trainer(tiny(**config), tmp_path / "reference", quiet=True, engine="reference")
    assert type(reference.model).__name__ == "VAE" and type(reference.optimizer).__name__ == "Adam"
    assert fast.run() == reference.run() == "done"
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == \
        sorted(p.name for p in (tmp_path / "reference").iterdir())
    a, b = params_of(tmp_path / "fast"), params_of(tmp_path / "reference")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-9 * np.abs(a[k]).max(), err_msg=k)
    np.testing.assert_allclose(reference.history["train_elbo"], fast.history["train_elbo"], rtol=1e-10)
    # each resumes the other's run
    Trainer.resume(tmp_path / "fast", epochs=3, quiet=True, engine="reference").run()
    Trainer.resume(tmp_path / "reference", epochs=3, quiet=True).run()
    a, b = params_of(tmp_path / "fast"), params_of(tmp_path / "reference")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-9 * np.abs(a[k]).max(), err_msg=k)


def test_cli_engine_reference_and_a_bad_engine(tmp_path, capsys):
    assert main(["train", "--dataset", "shapes", "--epochs", "1", "--n-train", "300", "--n-valid", "100",
                 "--hidden", "16", "--z-dim", "2", "--engine", "reference", "--quiet", "--no-plots",
                 "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "checkpoint.npz").is_file()
    with pytest.raises(ValueError, match="engine must be one of"):
        Trainer(tiny(), tmp_path / "x", quiet=True, engine="turbo")


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_run_written_by_the_scaled_moment_adam_resumes(tmp_path, engine):
    # tests/fixtures/run_scaled_adam: written by c0057fe, whose Adam saved m / beta1^(t mod R) and the factor.
    import shutil
    run = tmp_path / "old"
    shutil.copytree(REPO / "tests" / "fixtures" / "run_scaled_adam", run)
    with np.load(run / "expected_moments.npz") as f:
        expected = {k: f[k] for k in f.files}
    t = Trainer.resume(run, epochs=4, quiet=True, data_dir=None, engine=engine)
    for s in ("m", "v"):
        for name in t.model.params:
            np.testing.assert_allclose(t.optimizer.state[s][name], expected[f"{s}/{name}"], rtol=1e-6, atol=1e-30)
    assert t.optimizer.t == 18 and t.run() == "done" and t.optimizer.t == 24
    assert np.all(np.isfinite(t.history["train_elbo"]))


def test_early_stopping(tmp_path):
    t = Trainer(tiny(epochs=50, patience=1, lr=0.05), tmp_path / "r", quiet=True)
    t.history["valid_elbo"] = [-10.0, -11.0]
    assert t._stop_early()
    t.history["valid_elbo"] = [-10.0, -9.0]
    assert not t._stop_early()


def test_iwae_objective_trains(tmp_path):
    t = Trainer(tiny(objective="iwae", k=3, epochs=3), tmp_path / "r", quiet=True)
    t.run()
    assert t.history["valid_elbo"][-1] > t.history["valid_elbo"][0]


def test_gaussian_toy_training(tmp_path):
    t = Trainer(TrainConfig(dataset="ring", epochs=3, batch_size=100, hidden=(32,), z_dim=2, n_train=2000,
                            n_valid=500, activation="tanh"), tmp_path / "r", quiet=True)
    t.run()
    assert t.model.likelihood == "gaussian"
    assert t.history["valid_elbo"][-1] > t.history["valid_elbo"][0]


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    from npvae.train import TrainingDiverged
    t = Trainer(tiny(epochs=3), tmp_path / "r", quiet=True)
    t.config.epochs = 1
    t.run()
    before = params_of(tmp_path / "r")
    t.config.epochs = 3
    t.model.params["dec.h0.W"][0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1"):
        t.run()
    assert_identical(before, params_of(tmp_path / "r"))


# --- checkpoints ------------------------------------------------------------------------

def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    t = Trainer(tiny(epochs=1), tmp_path / "r", quiet=True)
    t.run()
    path = tmp_path / "r" / "checkpoint.npz"
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(ckpt.WriteFailed, match=r"could not write .*checkpoint\.npz: disk full"):
        t.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_corrupt_checkpoints_are_refused(tmp_path, damage):
    t = Trainer(tiny(epochs=1), tmp_path / "r", quiet=True)
    t.run()
    path = tmp_path / "r" / "best.npz"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        np.savez(path, format_version=np.int64(1), model_config=np.array([{"x": 1}], dtype=object),
                 epoch=np.int64(0), step=np.int64(0))
    with pytest.raises(ValueError, match=str(path.name)):
        npvae.load(tmp_path / "r")


def test_mismatched_checkpoint_is_refused_and_changes_nothing(tmp_path):
    Trainer(tiny(epochs=1), tmp_path / "r", quiet=True).run()
    state = ckpt.read_state(tmp_path / "r" / "best.npz")
    other = npvae.VAE(784, (33,), 4)
    before = other.flat_params.copy()
    with pytest.raises(ckpt.CheckpointError, match="hidden"):
        ckpt.restore_params(other, state)
    assert np.array_equal(before, other.flat_params)
    other64 = npvae.VAE(784, (32,), 4, dtype=np.float64)
    with pytest.raises(ckpt.CheckpointError, match="dtype"):
        ckpt.restore_params(other64, state)


# --- command line ----------------------------------------------------------------------------

def run_cli(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "npvae", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, **kw)


@pytest.mark.parametrize("command", ["train", "eval", "sample", "gradcheck"])
def test_help(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage: npvae " + command in r.stdout


def test_cli_train_eval_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "shapes", "--epochs", "1", "--hidden", "32", "--z-dim", "3",
                 "--batch-size", "50", "--n-train", "500", "--n-valid", "100", "--out", str(run),
                 "--quiet", "--no-plots"]) == 0
    assert main(["eval", str(run), "--json", "--n", "300"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"elbo", "recon", "kl", "n"} <= result.keys() and result["n"] == 300
    assert result["elbo"] == pytest.approx(result["recon"] - result["kl"])
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    # the same --out again would overwrite a run: refused, exit 2, one line
    assert main(["train", "--out", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]
    # --resume extends it
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--no-plots"]) == 0
    assert int(ckpt.read_state(run / "checkpoint.npz")["epoch"]) == 2


def test_cli_eval_on_a_users_array_is_eval_on_the_same_rows_and_checks_the_file(tmp_path, capsys):
    Trainer(tiny(epochs=1), tmp_path / "run", quiet=True).run()
    from npvae import data
    rows = data.load("shapes", seed=3).x_test[:300]
    np.save(tmp_path / "test.npy", rows)   # the run's own test rows, bool
    figures = []
    for extra in ((), ("--dataset", str(tmp_path / "test.npy"))):
        assert main(["eval", str(tmp_path / "run"), "--n", "300", "--k", "4", "--json", "--quiet", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        figures.append({key: v for key, v in result.items() if not key.endswith("seconds")})
    assert figures[0] == figures[1] and figures[0]["n"] == 300
    # 3-D images are flattened; a .npz's x_test is what is evaluated
    np.savez(tmp_path / "test.npz", x_train=rows[:10].reshape(10, 28, 28), x_test=rows[:50].reshape(50, 28, 28))
    assert main(["eval", str(tmp_path / "run"), "--json", "--dataset", str(tmp_path / "test.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 50
    np.save(tmp_path / "narrow.npy", np.zeros((5, 30), np.float32))
    np.save(tmp_path / "real.npy", np.full((5, 784), 2.5, np.float32))
    for name, problem in (("narrow.npy", "D = 30, but the run's model takes D = 784"),
                          ("real.npy", "values in [2.5, 2.5], but the run's model is Bernoulli")):
        assert main(["eval", str(tmp_path / "run"), "--dataset", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and name in err and problem in err, err


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    r = run_cli("train", "--dataset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    r = run_cli("train", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size" in r.stderr
    r = run_cli("eval", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


STOPS = [("SIGINT", 130), ("SIGTERM", 143)] + ([("SIGUSR1", 75)] if hasattr(signal, "SIGUSR1") else [])


@pytest.mark.parametrize("name, status", STOPS)
def test_a_stop_signal_saves_a_checkpoint_and_exits_with_its_status(tmp_path, name, status):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "npvae", "train", "--epochs", "1000", "--hidden", "32",
                          "--z-dim", "3", "--n-train", "2000", "--n-valid", "100", "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)   # into an epoch, past the first checkpoint's write
    p.send_signal(getattr(signal, name))
    p.send_signal(getattr(signal, name))   # a second one, while the first is being handled, changes nothing
    out, err = p.communicate(timeout=60)
    assert p.returncode == status, err
    assert "Traceback" not in err and "Traceback" not in out
    said = [line for line in out.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and f"by {name}" in said[0] and str(run / "checkpoint.npz") in said[0]
    state = ckpt.read_state(run / "checkpoint.npz")   # whole: read_state refuses a damaged file
    assert int(state["epoch"]) >= 1
    resumed = subprocess.run([sys.executable, "-m", "npvae", "train", "--resume", str(run), "--epochs",
                              str(int(state["epoch"]) + 1), "--quiet", "--no-plots"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr


def test_the_stop_signals_are_what_the_cli_documents():
    from npvae import cli
    from npvae.train import STOP_SIGNALS
    assert {cli.signal_name(s) for s in STOP_SIGNALS} <= set(cli.INTERRUPTED_STATUS)
    assert cli.signal_name(None) == "SIGINT"
    for name, status in cli.INTERRUPTED_STATUS.items():
        assert f"{status} for {name}" in cli.__doc__.replace("\n", " ")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--epochs", "6", "--hidden", "32", "--z-dim", "3", "--n-train", "3000", "--n-valid", "200",
            "--batch-size", "50", "--quiet", "--no-plots"]
    assert run_cli("train", *args, "--out", str(tmp_path / "full")).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "npvae", "train", *args, "--out", str(tmp_path / "cut")])
    deadline = time.time() + 60
    while not (tmp_path / "cut" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later epoch, possibly mid-write
    p.kill()
    p.wait()
    r = run_cli("train", "--resume", str(tmp_path / "cut"), "--no-plots")
    assert r.returncode == 0, r.stderr
    assert_identical(params_of(tmp_path / "full"), params_of(tmp_path / "cut"))
    assert_identical(params_of(tmp_path / "full", "best"), params_of(tmp_path / "cut", "best"))


# The figures at the end of `npvae train`: a tiny shapes run, Z = 2, so that every image figure is drawn.
TINY_CLI = ["train", "--dataset", "shapes", "--epochs", "2", "--n-train", "300", "--n-valid", "100",
            "--hidden", "16", "--z-dim", "2", "--batch-size", "50"]
FIGURES = {"samples.png", "manifold.png", "curves.png", "reconstructions.png", "latent.png"}


def test_cli_train_ends_with_the_figures_and_the_next_commands(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY_CLI + ["--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in (run / "plots").iterdir()} == FIGURES
    # every figure written is named on its own line, by a path that exists
    printed = [Path(line.strip()) for line in out.splitlines() if line.strip().endswith(".png")
               and not line.lstrip().startswith("npvae")]
    assert sorted(printed) == sorted(run / "plots" / name for name in FIGURES)
    assert out.index("figures") < out.index("next:")
    for command in (f"npvae eval {run} --k 5000", f"npvae sample {run}", f"npvae plot {run}",
                    "npvae train --dataset mnist --data-dir DIR"):
        assert command in out, command
    # and they are what `npvae plot` draws: the run's best checkpoint, PNGs with something on them
    from PIL import Image
    for name in FIGURES:
        with Image.open(run / "plots" / name) as image:
            assert image.format == "PNG" and min(image.size) > 50, name


def test_cli_train_no_plots_writes_no_figures_and_quiet_prints_nothing(tmp_path, capsys):
    assert main(TINY_CLI + ["--out", str(tmp_path / "a"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "a" / "plots").exists() and ".png" not in out.replace("samples.png", "")
    assert f"npvae plot {tmp_path / 'a'}" in out          # which draws them later
    assert main(TINY_CLI + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert {p.name for p in (tmp_path / "b" / "plots").iterdir()} == FIGURES   # written all the same


def test_cli_train_interrupted_or_diverged_writes_no_figures(tmp_path, monkeypatch):
    from npvae.train import TrainingDiverged
    original = Trainer._train_epoch

    def interrupted_in_the_second_epoch(self):
        if self.epoch == 1:
            self._on_sigint(signal.SIGINT, None)   # as Ctrl-C: run() saves the state, returns "interrupted"
        return original(self)
    monkeypatch.setattr(Trainer, "_train_epoch", interrupted_in_the_second_epoch)
    assert main(TINY_CLI + ["--out", str(tmp_path / "cut")]) == 130
    assert int(ckpt.read_state(tmp_path / "cut" / "checkpoint.npz")["epoch"]) == 1
    assert not (tmp_path / "cut" / "plots").exists()

    def diverge(self):
        raise TrainingDiverged("non-finite loss in epoch 1, step 1")
    monkeypatch.setattr(Trainer, "_train_epoch", diverge)
    assert main(TINY_CLI + ["--out", str(tmp_path / "nan")]) == 1
    assert not (tmp_path / "nan" / "plots").exists()


def test_cli_train_applies_the_shapes_defaults_only_where_not_given(monkeypatch):
    from npvae.cli import DATASET_DEFAULTS
    configs = []

    def record(self, until=None):   # no training: only the configuration the command line built
        configs.append(self.config)
        return "interrupted"
    monkeypatch.setattr(Trainer, "run", record)
    shapes = DATASET_DEFAULTS["shapes"]
    assert shapes, "the built-in set has its own defaults"
    for argv in (["train"], ["train", "--dataset", "shapes"]):
        assert main(argv + ["--n-train", "300", "--n-valid", "100", "--out", "/tmp/npvae-never"]) == 130
        assert {f: getattr(configs[-1], f) for f in shapes} == shapes
    # an option given on the command line wins; another dataset gets TrainConfig's defaults
    given = {"epochs": 3, "z_dim": 7}
    assert main(["train", "--epochs", "3", "--z-dim", "7", "--n-train", "300", "--n-valid", "100",
                 "--out", "/tmp/npvae-never"]) == 130
    assert {f: getattr(configs[-1], f) for f in shapes} == {**shapes, **given}
    assert main(["train", "--dataset", "ring", "--n-train", "300", "--n-valid", "100", "--out",
                 "/tmp/npvae-never"]) == 130
    assert {f: getattr(configs[-1], f) for f in shapes} == {f: getattr(TrainConfig(), f) for f in shapes}


# --- real data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir():
    d = real_data_dir()
    if d is None:
        pytest.skip("real datasets not found: set NPVAE_DATA to a folder holding mnist/ (see README)")
    return d


def test_short_mnist_run_improves(tmp_path, data_dir):
    t = Trainer(TrainConfig(dataset="mnist", data_dir=data_dir, epochs=2, n_train=6000, n_valid=1000,
                            hidden=(100,), z_dim=10), tmp_path / "m", quiet=True)
    assert t.data.kind == "grey" and t.likelihood == "bernoulli"
    t.run()
    v = t.history["valid_elbo"]
    assert v[1] > v[0] and -250 < v[1] < -100


def test_frey_gaussian_run_improves(tmp_path, data_dir):
    t = Trainer(TrainConfig(dataset="frey", data_dir=data_dir, epochs=3, batch_size=100, hidden=(64,),
                            z_dim=2, n_valid=200), tmp_path / "f", quiet=True)
    assert t.likelihood == "gaussian"
    t.run()
    v = t.history["valid_elbo"]
    assert v[-1] > v[0]
