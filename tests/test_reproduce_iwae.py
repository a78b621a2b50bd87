"""demos/reproduce_iwae.py draws its stages: test log p(x) per stage against the paper's figure."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demos" / "reproduce_iwae.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def real_data_dir():
    """NPVAE_DATA if set (CI sets it), else ../shared/data next to the repository, else None."""
    for d in (os.environ.get("NPVAE_DATA"), REPO.parent / "shared" / "data"):
        if d and (Path(d) / "mnist").is_dir():
            return str(Path(d).resolve())
    return None


def assert_png(path):
    """path is a PNG that decodes, of a useful size, and not one flat colour."""
    from PIL import Image
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()                      # the chunks and their CRCs
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200, image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 5, f"{path.name} is nearly blank"


@pytest.mark.slow   # the fast sibling: tests/test_demos.py runs --quick and checks stages.png
def test_quick_run_draws_the_stages_png_and_prints_its_path(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(DEMO), "--quick", "--out", str(out)]
    if real_data_dir() is not None:
        args += ["--data-dir", real_data_dir()]
    t = time.perf_counter()
    result = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True,
                            text=True, timeout=240)
    seconds = time.perf_counter() - t
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    png = out / "stages.png"
    assert_png(png)
    assert f"figure: {png}" in result.stdout
    assert (out / "stages.json").is_file()     # beside the log it is drawn from
    print(f"reproduce_iwae.py --quick: {seconds:.1f} s")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("reproduce_iwae", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a_log(dataset, k, ends, final=True, extended=()):
    """A stages.json as the demo writes it, with made-up numbers rising towards -87 nats."""
    log_px = -87.0 - 10.0 / np.arange(1, len(ends) + 1)
    stages = [dict(stage=i + 1, end_epoch=int(e), lr=1e-3 * 10 ** (-i / 7), valid_elbo=float(v) - 4.0,
                   test_log_px=float(v), test_log_px_sem=0.5, test_n=1000, test_k=1000)
              for i, (e, v) in enumerate(zip(ends, log_px))]
    log = dict(config=dict(dataset=dataset, k=k, batch_size=100, lr_schedule="burda"), stages=stages,
               extended=list(extended))
    if final:
        log["final"] = dict(test_log_px=-87.2, test_log_px_sem=0.2, n=10000, k=5000, epochs=int(ends[-1]))
    return log


@pytest.mark.parametrize("dataset, k, final, extended", [
    ("mnist", 5, True, ()),                                                    # a row of the paper
    ("mnist", 2, True, ()),                                                    # no row for k = 2
    ("shapes", 1, False, [dict(at_epoch=121, epochs_before=200, epochs=400)]),  # fallback, interrupted, resumed
])
def test_plot_stages_draws_every_kind_of_log(demo, tmp_path, dataset, k, final, extended):
    ends = np.cumsum([3 ** i for i in range(8)])          # the burda schedule's stage ends: 1, 4, ..., 3280
    path = demo.plot_stages(a_log(dataset, k, ends, final, extended), tmp_path / "stages.png")
    assert path == tmp_path / "stages.png"
    assert_png(path)


def two_layer_quick(work):
    """Job: the demo's --quick run with --layers 2; returns (CompletedProcess, its --out folder)."""
    out = work / "out"
    args = [sys.executable, str(DEMO), "--quick", "--layers", "2", "--out", str(out)]
    data_dir = real_data_dir()
    if data_dir is not None:
        args += ["--data-dir", data_dir]
    return subprocess.run(args, cwd=work, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True,
                          text=True, timeout=240), out


def background_jobs(item):
    """The subprocess a collected test of this module needs, started in the background (conftest.py)."""
    if item.originalname == "test_two_layer_quick_run_logs_stages_and_matches_eval":
        return {"two-layer quick": two_layer_quick}
    return {}


def test_two_layer_quick_run_logs_stages_and_matches_eval(background, capsys):
    """--layers 2 trains Burda's two-stochastic-layer model; its final log p(x) is `npvae eval`'s."""
    import json

    from npvae.cli import main
    result, out = background("two-layer quick")
    data_dir = real_data_dir()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "784-200-200-[100]-100-100-[50]" in result.stdout
    log = json.loads((out / "stages.json").read_text())
    assert log["config"]["layers"] == [[[200, 200], 100], [[100, 100], 50]]
    assert log["paper"] == -85.33                       # Table 1, two stochastic layers, k = 1
    assert [s["stage"] for s in log["stages"]] == list(range(1, 9))
    assert log["stages"][-1]["valid_elbo"] > log["stages"][0]["valid_elbo"]
    assert_png(out / "stages.png")
    final = log["final"]
    eval_args = ["eval", str(out / "run"), "--k", str(final["k"]), "--n", str(final["n"]), "--json", "--quiet",
                 "--threads", "1"] + (["--data-dir", data_dir] if data_dir else [])
    capsys.readouterr()
    assert main(eval_args) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["log_likelihood"] == pytest.approx(final["test_log_px"], rel=1e-6)
    assert len(evaluated["active_units_per_layer"]) == 2
