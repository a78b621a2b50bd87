"""npvae bench: its floors time the right products, its figures are consistent, runs combine by median,
and the own-loop row times the public API's loop.

No timing is asserted here (timings flake); the speed figures are in the README with their command.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from npvae import VAE
from npvae import data as datasets
from npvae import model as reference_model
from npvae import optim
from npvae.cli import main
from npvae.engine import bench


@pytest.mark.parametrize("hidden, z_dim", [((400,), 20), ((200, 200), 50), ((30, 20, 10), 4)])
def test_floor_layers_are_the_models_layers(hidden, z_dim):
    # a floor that left out a layer (or had one the model lacks) would make every ratio wrong
    model = VAE(784, hidden, z_dim)
    expected = [(fan_in, fan_out) for _, fan_in, fan_out, _ in model._layer_specs()]
    assert bench.floor_layers((784,) + hidden, z_dim) == expected


def test_matmul_floor_runs_every_batch_size():
    fn = bench.matmul_floor_train((20, 8), 3, [5, 5, 2], np.float32)
    assert fn() is None


def _check_timing(r, n):
    assert r["seconds"] > 0 and r["floor_seconds"] > 0
    assert r["ratio"] == pytest.approx(r["seconds"] / r["floor_seconds"])
    assert r["examples_per_s"] == pytest.approx(n / r["seconds"])
    assert r["floor_examples_per_s"] == pytest.approx(n / r["floor_seconds"])


def test_bench_train_small():
    x = (np.random.default_rng(0).random((300, 784)) * 255).astype(np.uint8)
    r = bench.bench_train("tiny", (16,), "relu", 128, x, 1, "random", 4, threads=1)
    _check_timing(r, 300)
    assert r["name"] == "tiny" and r["threads"] == 1 and r["data"] == "random"


def test_bench_own_loop_runs_the_public_loop_once_per_minibatch(monkeypatch):
    # The row stands for the loop a user writes, so it must be that loop: the
    # reference VAE and Adam, and data.binarize of to_float's grey levels, one
    # step per minibatch (a row that ran the engine would report its speed twice).
    calls = {"binarize": [], "loss_and_grads": [], "step": []}
    binarize, loss_and_grads, step = datasets.binarize, reference_model.VAE.loss_and_grads, optim.Adam.step

    def counted_binarize(x, rng=None, threshold=None):
        calls["binarize"].append((x.shape, x.dtype, threshold, float(x.max())))
        return binarize(x, rng, threshold)

    def counted_loss_and_grads(self, x, **kw):
        calls["loss_and_grads"].append((type(self), self.hidden, self.z_dim, self.activation))
        return loss_and_grads(self, x, **kw)

    def counted_step(self, grads):
        before = self.params["enc.h0.W"].copy()
        out = step(self, grads)
        calls["step"].append((type(self), not np.array_equal(self.params["enc.h0.W"], before)))
        return out
    monkeypatch.setattr(datasets, "binarize", counted_binarize)
    monkeypatch.setattr(reference_model.VAE, "loss_and_grads", counted_loss_and_grads)
    monkeypatch.setattr(optim.Adam, "step", counted_step)
    x = np.full((300, 784), 255, np.uint8)   # grey level 255: to_float gives 1.0 exactly
    r = bench.bench_own_loop(128, x, 2, "random")
    _check_timing(r, 300)
    assert r["name"] == "own loop 784-400-20 relu, batch 128" and r["data"] == "random"
    assert set(r) == {"name", "seconds", "floor_seconds", "ratio", "examples_per_s", "floor_examples_per_s", "data"}
    # 2 repeats of an epoch of 300 rows in minibatches of 128, 128, 44
    assert calls["binarize"] == [((128, 784), np.float32, None, 1.0), ((128, 784), np.float32, None, 1.0),
                                 ((44, 784), np.float32, None, 1.0)] * 2
    assert calls["loss_and_grads"] == [(reference_model.VAE, (400,), 20, "relu")] * 6
    assert calls["step"] == [(optim.Adam, True)] * 6       # each step moved the weights


def test_run_once_gives_the_own_loop_row_its_target_and_the_engines_figure(monkeypatch):
    def timing(name, examples_per_s):
        return {"name": name, "seconds": 1.0, "floor_seconds": 1.0, "ratio": 1.0,
                "examples_per_s": examples_per_s, "floor_examples_per_s": 1.0}
    speeds = iter([30000.0, 9000.0])
    monkeypatch.setattr(bench, "bench_train", lambda name, *a, **kw: timing(name, next(speeds)))
    monkeypatch.setattr(bench, "bench_own_loop", lambda *a: timing("own loop", 21000.0))
    monkeypatch.setattr(bench, "bench_log_likelihood", lambda *a: timing("log p(x)", 100.0))
    monkeypatch.setattr(bench, "bench_import", lambda: {"name": "import npvae", "seconds": 0.1})
    monkeypatch.setattr(bench, "bench_handoff", lambda: {"name": "hand-off", "microseconds": 5.0,
                                                         "min_microseconds": 4.0})
    results = bench._run_once(None, "zeros", None, 1, quick=True, memory=False, threads=1)
    own = next(r for r in results if r["name"] == "own loop")
    # the engine's figure is the first training row's (784-400-20 relu, batch 128, the same model and batch)
    assert own["target_examples_per_s"] == 20000 and own["engine_examples_per_s"] == 30000.0
    assert "target_ratio" not in own
    line = next(s for s in bench.format_results(results).splitlines() if s.startswith("own loop"))
    assert "21000 ex/s" in line and "target >= 20000 ex/s" in line and "(the engine's step: 30000 ex/s)" in line
    # over several runs the engine's figure is a median like the others
    both = bench.combine_runs([own, dict(own, engine_examples_per_s=10000.0), dict(own, engine_examples_per_s=20000.0)])
    assert both["engine_examples_per_s"] == 20000.0 and both["per_run"]["engine_examples_per_s"] == [
        30000.0, 10000.0, 20000.0]


def test_bench_log_likelihood_small():
    x = (np.random.default_rng(0).random((10, 784)) * 255).astype(np.uint8)
    r = bench.bench_log_likelihood(20, 6, x, 1, threads=1)
    _check_timing(r, 6)
    assert "K=20, 6 images" in r["name"]


def test_bench_handoff():
    r = bench.bench_handoff(repeats=20)
    assert 0 < r["min_microseconds"] <= r["microseconds"]
    assert "us median" in bench.format_results([r])
    slow = dict(r, microseconds=2 * r["microseconds"], min_microseconds=2 * r["min_microseconds"])
    both = bench.combine_runs([slow, r])
    assert both["min_microseconds"] == r["min_microseconds"]      # the least over runs
    assert both["microseconds"] == pytest.approx(1.5 * r["microseconds"])


def _fake(ratio, megabytes, seconds_import):
    return [{"name": "train", "seconds": 2.0 * ratio, "floor_seconds": 2.0, "ratio": ratio,
             "examples_per_s": 1.0 / ratio, "floor_examples_per_s": 0.5, "target_ratio": 1.4, "threads": 2},
            {"name": "memory", "megabytes": megabytes, "target_megabytes": 400},
            {"name": "import", "seconds": seconds_import, "target_seconds": 0.25}]


def test_combine_runs_takes_medians_and_the_largest_memory():
    runs = [_fake(2.0, 270.0, 0.12), _fake(3.0, 280.0, 0.20), _fake(2.5, 260.0, 0.13)]
    train, mem, imp = (bench.combine_runs(list(rs)) for rs in zip(*runs))
    assert train["ratio"] == 2.5 and train["seconds"] == 5.0 and train["floor_seconds"] == 2.0
    assert train["per_run"]["ratio"] == [2.0, 3.0, 2.5] and train["runs"] == 3
    assert train["target_ratio"] == 1.4 and train["threads"] == 2
    assert mem["megabytes"] == 280.0          # the worst run, not the median
    assert imp["seconds"] == 0.13
    # one run stays as it was; an error is passed on, not averaged away
    assert bench.combine_runs([runs[0][0]]) == runs[0][0]
    err = {"name": "memory", "error": "no data"}
    assert bench.combine_runs([runs[0][1], err]) == err


def test_cli_bench_runs_reports_the_median(monkeypatch, capsys):
    ratios = iter([2.0, 3.0, 2.5])
    calls = []

    def once(*args):
        calls.append(args)
        return _fake(next(ratios), 270.0, 0.12)
    monkeypatch.setattr(bench, "_run_once", once)
    monkeypatch.setattr(bench, "_mnist_or_stand_in", lambda data_dir: (np.zeros((10, 784), np.uint8), "zeros"))
    assert main(["bench", "--runs", "3", "--no-memory", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(calls) == 3 and results[0]["ratio"] == 2.5 and results[0]["per_run"]["ratio"] == [2.0, 3.0, 2.5]
    ratios = iter([2.0, 3.0])
    assert main(["bench", "--runs", "2", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "ratio 2.50" in out and "median of 2 runs: 2.00, 3.00" in out


def test_cli_bench_rejects_bad_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--runs", "0"])
    assert e.value.code == 2 and "--runs" in capsys.readouterr().err


def test_format_results_shows_every_kind_of_result():
    text = bench.format_results(_fake(2.0, 270.0, 0.1) + [{"name": "memory", "error": "boom"}])
    assert "ratio 2.00" in text and "270 MB" in text and "0.100 s" in text and "error: boom" in text


# --- npvae bench --big: a set read from disk ----------------------------------------------------

def test_write_rows_npy_tiles_the_rows_in_order(tmp_path):
    rows = np.arange(12, dtype=np.uint8).reshape(3, 4)
    bench.write_rows_npy(tmp_path / "t.npy", rows, 10, chunk_rows=4)   # chunks that cut the tiling
    x = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert x.dtype == np.uint8 and x.shape == (10, 4)
    np.testing.assert_array_equal(x, rows[np.arange(10) % 3])


@pytest.fixture
def small_rows(monkeypatch):
    rows = (np.random.default_rng(0).random((50, 784)) * 255).astype(np.uint8)
    monkeypatch.setattr(bench, "_mnist_or_stand_in", lambda data_dir: (rows, "random stand-in"))
    return rows


def test_bench_big_compares_disk_with_memory_and_removes_its_file(tmp_path, monkeypatch, small_rows):
    seen = []

    def fake_child(dataset, out, data_dir, threads, backend, extra=()):
        seen.append((Path(dataset), Path(dataset).suffix == ".npy" and np.load(dataset, mmap_mode="r").shape))
        return (30000.0, 250.0, 5.0) if Path(dataset).suffix == ".npy" else (32000.0, None, 5.0)
    monkeypatch.setattr(bench, "_train_child", fake_child)
    memory, disk = bench.bench_big(gigabytes=0.002, directory=tmp_path)
    assert seen[0][1] == (2551, 784) and seen[1][0].suffix == ".npz"   # the stand-in held in memory
    assert list(tmp_path.iterdir()) == []   # the file and its folder are gone
    assert disk["ratio_to_memory"] == pytest.approx(30000 / 32000) and disk["target_ratio_to_memory"] == 0.9
    assert disk["anon_megabytes"] == 250.0 and disk["target_anon_megabytes"] == 400
    text = bench.format_results([memory, disk])
    assert "not available" in text and "2.0 MB uint8 .npy, 2551 rows" in text and "0.94 of in memory" in text


def test_bench_big_removes_its_file_on_ctrl_c_and_reports_a_failed_run(tmp_path, monkeypatch, small_rows):
    def interrupted(dataset, *args, **kwargs):
        assert Path(dataset).stat().st_size > 0
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "_train_child", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.bench_big(gigabytes=0.001, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(bench, "_train_child", lambda dataset, *a, **k: "npvae train: error: no room")
    memory, disk = bench.bench_big(gigabytes=0.001, directory=tmp_path)
    assert disk["error"] == memory["error"] == "npvae train: error: no room" and "ratio_to_memory" not in disk
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_big_trains_a_tiny_file_from_disk_in_a_child(tmp_path):
    # the real thing on a 4 MB file and a 784-8-2 model (about 3 s): the child's figures come back
    memory, disk = bench.bench_big(gigabytes=0.004, directory=tmp_path,
                                   extra=("--hidden", "8", "--z-dim", "2", "--n-valid", "100"),
                                   in_memory_extra=("--n-train", "3000"))
    assert "error" not in memory and "error" not in disk, (memory, disk)
    assert disk["examples_per_s"] > 0 and disk["ratio_to_memory"] > 0
    if Path("/proc/self/status").exists():
        assert 10 < disk["anon_megabytes"] < 400
    assert list(tmp_path.iterdir()) == []


def test_cli_bench_big_passes_its_options(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "bench_big", lambda *args: calls.append(args) or [
        {"name": "disk", "examples_per_s": 1.0, "anon_megabytes": 2.0}])
    assert main(["bench", "--big", "--big-gb", "0.5", "--big-dir", "/somewhere", "--threads", "1", "--json"]) == 0
    assert calls == [(None, 0.5, "/somewhere", 1, "auto")]
    assert json.loads(capsys.readouterr().out)[0]["anon_megabytes"] == 2.0
