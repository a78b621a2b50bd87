"""npvae bench: its floors time the right products, its figures are consistent, runs combine by median.

No timing is asserted here (timings flake); the speed figures are in the README with their command.
"""
import json

import numpy as np
import pytest

from npvae import VAE, bench
from npvae.cli import main


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
