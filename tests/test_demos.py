"""The demos run with --quick and draw every figure they promise; plot_run draws a run's standard figures."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from npvae import checkpoint as ckpt
from npvae import plots
from npvae.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]

# demo -> the PNGs it promises to write into --out
DEMOS = {
    "mnist": ["reconstructions.png", "samples.png", "curves.png", "latent.png", "latent_z2.png", "manifold.png"],
    "frey": ["manifold.png", "curves.png"],
    "traversals": ["traversals.png"],
    "posterior": ["posterior.png"],
    "kl_directions": ["kl_directions.png"],
    "estimators": ["estimators.png"],
    "amortization": ["amortization.png"],
    "flows": ["flows.png"],
    "inference": ["inference.png", "inference_posterior.png"],
    "shallow_vs_deep": ["shallow_vs_deep.png"],
    "reproduce_iwae": ["stages.png"],   # and its numbers: see test_reproduce_iwae_logs_stages_and_matches_eval
    "tutorial": ["1_data.png", "2_density.png", "3_estimators.png", "6_loss.png", "6_samples.png",
                 "6_reconstructions.png", "7_posterior.png"],
}
# --quick aims at ~15 s alone on 2 cores; the limit leaves room for a machine busy with other work.
TIMEOUT = 240


def real_data_dir():
    """NPVAE_DATA if set (CI sets it), else ../shared/data next to the repository, else None."""
    for d in (os.environ.get("NPVAE_DATA"), REPO.parent / "shared" / "data"):
        if d and (Path(d) / "mnist").is_dir():
            return str(Path(d).resolve())
    return None


def run(args, cwd):
    """Run a Python command line in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def run_demo(name, out, data_dir):
    args = [str(REPO / "demos" / f"{name}.py"), "--quick", "--out", str(out)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    result = run(args, cwd=out.parent)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_drawn(path):
    """path is a PNG with something on it: not one flat colour, not nearly uniform."""
    import matplotlib.image as mpimg
    assert path.is_file(), f"{path} was not written"
    image = mpimg.imread(path)
    rgb = image[..., :3] if image.ndim == 3 else image[..., None]       # grey PNGs load as (H, W)
    assert rgb.shape[0] > 50 and rgb.shape[1] > 50, f"{path.name} is only {rgb.shape[:2]} pixels"
    assert rgb.std() > 0.03, f"{path.name} is nearly blank (pixel std {rgb.std():.4f})"
    assert len(np.unique(rgb.reshape(-1, rgb.shape[-1]), axis=0)) > 8, f"{path.name} has almost no colours"
    assert path.stat().st_size < 400_000, f"{path.name} is {path.stat().st_size} bytes"


# --- the demos ---------------------------------------------------------------------------------
# Each demo runs in a subprocess started in the background when collection ends (conftest.py):
# a job below returns what its test asserts on.

def quick_demo(name, data_dir):
    """Job: run demo name with --quick on data_dir; returns (CompletedProcess, its --out folder)."""
    def job(work):
        out = work / "out"
        return run_demo(name, out, data_dir), out
    return job


def reproduce_iwae_stages(work):
    """Job: a --quick IWAE (k = 2) run, `npvae eval` of it, then --resume with 8 and 12 epochs."""
    out = work / "out"
    args = [str(REPO / "demos" / "reproduce_iwae.py"), "--quick", "--k", "2", "--out", str(out)]
    data_dir = real_data_dir()
    if data_dir is not None:
        args += ["--data-dir", data_dir]
    first = run(args, cwd=work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert_drawn(out / "stages.png")
    log = json.loads((out / "stages.json").read_text())
    final = log["final"]
    eval_args = [str(out / "run"), "--k", str(final["k"]), "--n", str(final["n"]), "--json", "--quiet"]
    if data_dir is not None:
        eval_args += ["--data-dir", data_dir]
    evaluated = run(["-m", "npvae", "eval"] + eval_args, cwd=work)
    resume = args + ["--resume", "--epochs"]
    too_few = run(resume + ["8"], cwd=work)
    longer = run(resume + ["12"], cwd=work)
    return dict(first=first, log=log, eval=evaluated, too_few=too_few, longer=longer,
                log_after=json.loads((out / "stages.json").read_text()) if longer.returncode == 0 else None)


QUICK = [name for name in DEMOS if name != "reproduce_iwae"]   # its --quick run is reproduce_iwae_stages
FALLBACK = ["mnist", "frey", pytest.param("tutorial", marks=pytest.mark.slow)]   # tutorial: its --quick run is the fast sibling


def background_jobs(item):
    """The subprocess runs a collected test of this module needs, by key (see conftest.py)."""
    name = getattr(item, "callspec", None) and item.callspec.params.get("name")
    if item.originalname == "test_demo_quick_draws_its_figures":
        return {f"quick {name}": quick_demo(name, real_data_dir())}
    if item.originalname == "test_demo_falls_back_to_a_builtin_set_without_data" and real_data_dir():
        return {f"fallback {name}": fallback_demo(name)}
    if item.originalname == "test_reproduce_iwae_logs_stages_and_matches_eval":
        return {"reproduce_iwae": reproduce_iwae_stages}
    return {}


def fallback_demo(name):
    """Job: run demo name with --quick on an empty data folder."""
    def job(work):
        (work / "no-data").mkdir()
        return run_demo(name, work / "out", work / "no-data"), work / "out"
    return job


@pytest.mark.parametrize("name", QUICK)
def test_demo_quick_draws_its_figures(name, background):
    result, out = background(f"quick {name}")
    for png in DEMOS[name]:
        assert_drawn(out / png)
    assert "done in" in result.stdout


@pytest.mark.parametrize("name", FALLBACK)
def test_demo_falls_back_to_a_builtin_set_without_data(name, background):
    if real_data_dir() is None:
        pytest.skip("no real data here, so the test above already ran the fallback")
    result, out = background(f"fallback {name}")
    assert "using the built-in 'shapes' set" in result.stdout
    for png in DEMOS[name]:
        assert_drawn(out / png)


def test_reproduce_iwae_logs_stages_and_matches_eval(background):
    """Each stage is logged, and the final log p(x) is what `npvae eval` says about the run."""
    runs = background("reproduce_iwae")
    assert "done in" in runs["first"].stdout
    log = runs["log"]
    stages, final = log["stages"], log["final"]
    assert [s["stage"] for s in stages] == list(range(1, 9))
    assert [s["lr"] for s in stages] == pytest.approx(1e-3 * 10 ** (-np.arange(8) / 7))
    assert log["config"]["objective"] == "iwae" and log["config"]["k"] == 2
    assert np.diff([s["train_seconds_total"] for s in stages]).min() > 0
    assert np.diff([s["epoch_seconds_total"] for s in stages]).min() > 0
    assert all(np.isfinite(s["valid_elbo"]) and s["test_log_px"] < 0 for s in stages)
    assert stages[-1]["valid_elbo"] > stages[0]["valid_elbo"]
    assert runs["eval"].returncode == 0, runs["eval"].stderr[-3000:]
    # The same images, noise and model; only the float32 matrix products may sum in another order
    # (the demo runs on one BLAS thread, `npvae eval` on as many as it is given).
    assert json.loads(runs["eval"].stdout)["log_likelihood"] == pytest.approx(final["test_log_px"], rel=1e-6)

    # A longer --epochs on resume re-spaces the stages over 12 epochs: the ones that would have
    # ended by epoch 8 are skipped, the rest are logged after the old ones, and the change is recorded.
    too_few, longer = runs["too_few"], runs["longer"]
    assert too_few.returncode == 2 and "--epochs must be more than the 8 epochs" in too_few.stderr
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    log = runs["log_after"]
    assert log["extended"] == [dict(at_epoch=8, epochs_before=8, epochs=12)]
    assert [s["end_epoch"] for s in log["stages"]] == list(range(1, 9)) + [9, 11, 12]
    assert [s["stage"] for s in log["stages"][8:]] == [6, 7, 8]
    assert log["config"]["epochs"] == 12 and log["final"]["epochs"] == 12
    assert np.diff([s["epoch_seconds_total"] for s in log["stages"]]).min() > 0


def test_every_demo_is_tested():
    assert sorted(p.stem for p in (REPO / "demos").glob("*.py")) == sorted(DEMOS)


# --- plot_run ---------------------------------------------------------------------------------

def train_tiny(run, **kw):
    config = dict(dataset="shapes", epochs=1, batch_size=50, hidden=(32,), z_dim=2, n_train=600,
                  n_valid=200, seed=3)
    config.update(kw)
    Trainer(TrainConfig(**config), run, quiet=True).run()
    return run


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "shapes")


def test_plot_run_draws_the_standard_figures(shapes_run, tmp_path):
    paths = plots.plot_run(shapes_run, tmp_path / "plots")
    names = {"samples.png", "manifold.png", "curves.png", "reconstructions.png", "latent.png"}
    assert {p.name for p in paths} == names
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert_drawn(p)


def test_plot_run_defaults_to_run_plots_and_pca_above_two_latents(tmp_path):
    run = train_tiny(tmp_path / "z4", z_dim=4)
    paths = plots.plot_run(run)
    # no manifold for Z = 4; the latent plot is a PCA of mu
    assert {p.name for p in paths} == {"samples.png", "curves.png", "reconstructions.png", "latent.png"}
    assert all(p.parent == run / "plots" for p in paths)
    for p in paths:
        assert_drawn(p)


def test_plot_run_on_2d_data_draws_the_density(tmp_path):
    run = train_tiny(tmp_path / "pinwheel", dataset="pinwheel", n_train=1000, n_valid=200, batch_size=100)
    paths = plots.plot_run(run, tmp_path / "plots")
    assert {p.name for p in paths} == {"curves.png", "latent.png", "density.png"}
    for p in paths:
        assert_drawn(p)


def test_plot_run_without_the_data_skips_only_what_needs_it(shapes_run, tmp_path):
    # a copy of the run that says it was trained on MNIST, with MNIST nowhere to be found
    run = tmp_path / "run"
    run.mkdir()
    for f in (ckpt.CONFIG, ckpt.LATEST, ckpt.BEST):
        (run / f).write_bytes((shapes_run / f).read_bytes())
    config = ckpt.read_json(run / ckpt.CONFIG)
    config["train"]["dataset"], config["data"]["name"] = "mnist", "mnist"
    ckpt.write_json(run / ckpt.CONFIG, config)
    (tmp_path / "empty").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plots.plot_run(run, tmp_path / "plots", data_dir=tmp_path / "empty")
    assert {p.name for p in paths} == {"samples.png", "manifold.png", "curves.png"}
    assert any("no data" in str(w.message) for w in caught)


def test_cli_plot_writes_and_prints_the_figures(shapes_run, tmp_path):
    out = tmp_path / "figures"
    result = run(["-m", "npvae", "plot", str(shapes_run), "--out", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.split()]
    assert {p.name for p in printed} == {"samples.png", "manifold.png", "curves.png", "reconstructions.png",
                                         "latent.png"}
    for p in printed:
        assert_drawn(p)


def test_tile_and_save_image_grid_still_work(tmp_path):
    images = np.random.default_rng(0).random((6, 12))
    grid = plots.tile(images, (3, 4), n_cols=3)
    assert grid.shape == (2 * 4 - 1, 3 * 5 - 1)
    assert np.array_equal(grid[4:7, 5:9], images[4].reshape(3, 4))
    path = plots.save_image_grid(images, (3, 4), tmp_path / "grid.png", title="grid")
    assert path.is_file()


def test_importing_npvae_does_not_import_matplotlib():
    result = run(["-c", "import sys, npvae, npvae.plots; print('matplotlib' in sys.modules)"], cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
