"""npvae bench: how close training and evaluation come to the time of their matrix products.

The rows: one MNIST epoch by the Trainer's step (the engine) for two
models; the same epoch by the reference loop a user writes with the public
API (own_loop); log p(x) with K = 5000; peak memory of npvae train; the
import time; one hand-off to a helper thread. With --big (bench_big),
instead: one epoch of npvae train on a 2 GB uint8 .npy read from disk,
against one on MNIST in memory, each with its peak anonymous memory.

The floor of a configuration is the time NumPy takes for exactly the matrix
products one pass needs (forward, plus the weight and input gradients for
training), on arrays of the same shapes and dtype, timed in the same run on
the same machine. Each figure is the median of several repeats; with
runs > 1 the whole set runs that many times and each figure is the median of
the runs' figures (a ratio: of the runs' own ratios).
"""
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .. import data as datasets
from . import parallel
from .model import FastVAE
from .optim import FlatAdam


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def floor_layers(widths, z_dim):
    """(fan_in, fan_out) of every Dense layer of a VAE with these widths, in the model's order.

    widths: (D, H1, ..., Hn). Encoder D -> H1 -> ... -> Hn -> (mu, log_sigma);
    decoder Z -> Hn -> ... -> H1 -> D (a Bernoulli decoder: one output head).
    """
    D, hidden = widths[0], tuple(widths[1:])
    enc = (D,) + hidden
    dec = (z_dim,) + hidden[::-1]
    return (list(zip(enc[:-1], enc[1:])) + [(hidden[-1], z_dim)] * 2
            + list(zip(dec[:-1], dec[1:])) + [(hidden[0], D)])


def matmul_floor_train(widths, z_dim, batch_sizes, dtype):
    """A function that runs the matrix products of one training step per batch size.

    Per layer (floor_layers): forward x W, backward x^T dy, and dy W^T except
    for the encoder's first layer (no gradient for the data).
    """
    rng = np.random.default_rng(0)
    layers = floor_layers(widths, z_dim)
    Ws = [rng.standard_normal((i, o)).astype(dtype) for i, o in layers]
    plans = {}
    for B in set(batch_sizes):
        plans[B] = [(rng.standard_normal((B, i)).astype(dtype), rng.standard_normal((B, o)).astype(dtype),
                     np.empty((i, o), dtype), k > 0) for k, (i, o) in enumerate(layers)]

    def run():
        for B in batch_sizes:
            for (x, dy, dW, need_dx), W in zip(plans[B], Ws):
                x @ W                        # forward
                np.matmul(x.T, dy, out=dW)   # weight gradient
                if need_dx:
                    dy @ W.T                 # input gradient
    return run


def _mnist_or_stand_in(data_dir, n=60000):
    """MNIST's training images if present, else uint8 grey images of the same shape (timing only)."""
    try:
        return datasets.load("mnist", data_dir).x_train, "mnist"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        return (rng.random((n, 784)) ** 4 * 255).astype(np.uint8), "random uint8 stand-in for mnist"


def bench_train(name, hidden, activation, batch_size, x_train, repeats, source, z_dim, threads="auto",
                backend="auto"):
    """One training epoch over x_train as npvae.train does it (threads and backend as there), against its matmul floor."""
    from .binarize import make_prepare
    from .step import make_step
    n_threads = parallel.resolve_threads(threads)
    backend = parallel.resolve_backend(backend, n_threads)
    model = FastVAE(784, hidden, z_dim, activation=activation, dtype=np.float32, seed=0,
                    shared=backend == "processes")
    optimizer = FlatAdam(model.params)
    n = x_train.shape[0]
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    rng = np.random.default_rng(0)
    step = make_step(model, optimizer, make_prepare("dynamic", 0.5, "bernoulli", "grey", model.dtype),
                     threads=n_threads, backend=backend)

    def epoch():   # as Trainer._train_epoch: one session, each step gathering its rows (or the next's) from x_train
        perm = rng.permutation(n)
        with step.session():
            for s in range(0, n, batch_size):
                after = perm[s + batch_size:s + 2 * batch_size]
                step(x_train, 1.0, rng, index=perm[s:s + batch_size], next_index=after if after.size else None)

    result = _epoch_against_floor(name, epoch, matmul_floor_train((784,) + tuple(hidden), z_dim, sizes, np.float32),
                                  n, repeats, source)
    step.close()   # no idle helpers while the next benchmark runs
    return dict(result, threads=n_threads, backend=backend)


def _epoch_against_floor(name, epoch, floor_fn, n, repeats, source):
    """Time epoch() (n examples) and floor_fn() in turn, repeats times; -> the row's result dict (medians)."""
    floor_fn()  # warm up BLAS threads and caches
    epoch_t, floor_t = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        epoch_t.append(_median_time(epoch, 1)[0])
        floor_t.append(_median_time(floor_fn, 1)[0])
    t, f = statistics.median(epoch_t), statistics.median(floor_t)
    return {"name": name, "seconds": t, "floor_seconds": f, "ratio": t / f,
            "examples_per_s": n / t, "floor_examples_per_s": n / f, "data": source}


def bench_own_loop(batch_size, x_train, repeats, source):
    """One MNIST epoch of 784-400-20 ReLU by the loop a user writes with the public API and default
    settings (npvae.VAE, npvae.Adam, data.to_float and data.binarize), against its matmul floor:

        x = binarize(to_float(x_train[index]), rng)
        loss, grads = model.loss_and_grads(x, rng=rng)
        opt.step(grads)
    """
    from ..model import VAE
    from ..optim import Adam
    model = VAE(784, (400,), 20)
    opt = Adam(model.params)
    n = x_train.shape[0]
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    rng = np.random.default_rng(0)

    def epoch():
        perm = rng.permutation(n)
        for s in range(0, n, batch_size):
            x = datasets.binarize(datasets.to_float(x_train[perm[s:s + batch_size]]), rng)
            loss, grads = model.loss_and_grads(x, rng=rng)
            opt.step(grads)

    return _epoch_against_floor(f"own loop 784-400-20 relu, batch {batch_size}", epoch,
                                matmul_floor_train((784, 400), 20, sizes, np.float32), n, repeats, source)


def bench_log_likelihood(k, n_images, x, repeats, threads="auto"):
    """Importance-sampled log p(x) with K samples for a 784-400-20 model (threads as there), against its floor."""
    from .evaluate import log_likelihood
    model = FastVAE(784, (400,), 20, dtype=np.float32, seed=0)
    x = datasets.to_float(x[:n_images])
    x = (x > 0.5).astype(np.float32)
    rng = np.random.default_rng(0)
    # floor: the encoder once per image, the decoder once per sample
    W_enc, W_mu = [np.ones(s, np.float32) for s in ((784, 400), (400, 20))]
    W_dec, W_out = [np.ones(s, np.float32) for s in ((20, 400), (400, 784))]
    chunk = 50000  # samples per decoder pass
    z = np.ones((chunk, 20), np.float32)
    h = np.ones((chunk, 400), np.float32)

    def floor():
        hx = x @ W_enc
        hx @ W_mu
        hx @ W_mu
        for _ in range(math.ceil(k * n_images / chunk)):
            z @ W_dec
            h @ W_out

    floor()
    ll_t, floor_t = [], []
    for _ in range(repeats):
        ll_t.append(_median_time(lambda: log_likelihood(model, x, k=k, rng=rng, threads=threads), 1)[0])
        floor_t.append(_median_time(floor, 1)[0])
    t, f = statistics.median(ll_t), statistics.median(floor_t)
    return {"name": f"log p(x), K={k}, {n_images} images, 784-400-20", "seconds": t, "floor_seconds": f,
            "ratio": t / f, "examples_per_s": n_images / t, "floor_examples_per_s": n_images / f,
            "threads": parallel.resolve_threads(threads)}


def bench_handoff(repeats=2000):
    """Microseconds for parallel.Workers(2).run of two no-ops: what one hand-off to a thread costs here.

    A threaded training step makes three such hand-offs (forward and backward,
    the gradient sum, Adam), so where waking a sleeping thread is slow (e.g. a
    virtual machine whose idle cores halt) threads gain less.
    """
    workers = parallel.Workers(2)
    noops = [lambda: None, lambda: None]
    _, times = _median_time(lambda: workers.run(noops), repeats)
    workers.close()
    return {"name": "thread hand-off (Workers.run, 2 no-ops)", "microseconds": 1e6 * statistics.median(times),
            "min_microseconds": 1e6 * min(times)}


def bench_import(repeats=7):
    """Seconds for `import npvae` in a fresh interpreter (median)."""
    code = "import time; t = time.perf_counter(); import npvae; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout) for _ in range(repeats)]
    return {"name": "import npvae", "seconds": statistics.median(times)}


_PEAK_CHILD = """
import glob, resource, sys, threading, time
from npvae.cli import main

def private_kb(pid):  # memory a helper process holds for itself (what it shares with us is counted once)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(l.split()[1]) for l in f if l.startswith(("Private_Clean:", "Private_Dirty:")))
    except (OSError, ValueError):
        return 0

def anon_kb():  # RssAnon: memory of this process's own, not the page cache of the files it maps
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration, ValueError):  # no /proc (macOS), or a kernel without the line
        return None

helpers_kb, anon_peak_kb, done = [0], [anon_kb()], threading.Event()
def watch():  # the helpers' private memory and our RssAnon with theirs, sampled every 20 ms
    while not done.wait(0.02):
        pids = set()
        for path in glob.glob("/proc/self/task/*/children"):
            with open(path) as f:
                pids.update(f.read().split())
        helpers = sum(private_kb(p) for p in pids)
        helpers_kb[0] = max(helpers_kb[0], helpers)
        anon = anon_kb()
        if anon is not None and anon_peak_kb[0] is not None:
            anon_peak_kb[0] = max(anon_peak_kb[0], anon + helpers)
threading.Thread(target=watch, daemon=True).start()
status = main(sys.argv[1:])
done.set()
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # VmHWM is this program's own peak; ru_maxrss can include the parent's pages at fork
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print("PEAK_KB", peak_kb + helpers_kb[0], helpers_kb[0], "ANON_KB", anon_peak_kb[0])
sys.exit(status)
"""


def bench_memory(data_dir, epochs=1, backend="auto"):
    """Peak resident memory of `npvae train --dataset mnist` (one epoch) in a child process, in MB."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", _PEAK_CHILD, "train", "--dataset", "mnist", "--epochs", str(epochs),
               "--out", os.path.join(out, "run"), "--quiet", "--no-plots", "--backend", backend]
        if data_dir:
            cmd += ["--data-dir", str(data_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    name = "peak memory of npvae train (mnist)"
    lines = [line for line in r.stdout.splitlines() if line.startswith("PEAK_KB")]
    if r.returncode != 0 or not lines:
        return {"name": name, "error": (r.stderr.strip() or r.stdout.strip())[-300:]}
    total_kb, helpers_kb = (int(v) for v in lines[-1].split()[1:3])
    # the main process's peak plus the most its helper processes held of their own at once
    return {"name": name, "megabytes": total_kb / 1024.0, "helpers_megabytes": helpers_kb / 1024.0}


def write_rows_npy(path, rows, n, chunk_rows=65536):
    """Write a (n, D) .npy of rows tiled over and over (rows (M, D)), chunk by chunk: memory stays flat."""
    header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
              "shape": (n, rows.shape[1])}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, chunk_rows):
            f.write(np.take(rows, np.arange(start, min(start + chunk_rows, n)) % rows.shape[0], axis=0).tobytes())


def _train_child(dataset, out, data_dir, threads, backend, extra=()):
    """`npvae train --dataset ... --epochs 1` in a child process, its memory watched (_PEAK_CHILD)
    -> (examples/s of the epoch, peak RssAnon in MB or None, helpers' MB) or an error message."""
    from .. import checkpoint as ckpt
    cmd = [sys.executable, "-c", _PEAK_CHILD, "train", "--dataset", str(dataset), "--epochs", "1",
           "--out", str(out), "--quiet", "--no-plots", "--threads", str(threads), "--backend", backend, *extra]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line.split() for line in r.stdout.splitlines() if line.startswith("PEAK_KB")]
    if r.returncode != 0 or not lines:
        return (r.stderr.strip() or r.stdout.strip())[-300:]
    rate = float(ckpt.read_state(Path(out) / ckpt.LATEST)["history/examples_per_s"][-1])
    anon = None if lines[-1][4] == "None" else int(lines[-1][4]) / 1024.0
    return rate, anon, int(lines[-1][2]) / 1024.0


def bench_big(data_dir=None, gigabytes=2.0, directory=None, threads="auto", backend="auto", extra=(),
              in_memory_extra=()):
    """One epoch of npvae train on a uint8 .npy of about `gigabytes` GB, read from disk, against the
    same on MNIST held in memory: -> two result dicts, images/s and peak anonymous memory.

    The file (MNIST's training images tiled, or the random stand-in without them) is written to a
    temporary file in directory (default: the system's temporary folder) and removed afterwards,
    also on Ctrl-C or a failure. Each run is `npvae train --epochs 1` in a child process, which
    samples its RssAnon (plus its helper processes' private memory) every 20 ms: memory of its
    own, not the page cache of the file it maps, which the kernel can drop at any time. Its page
    cache is warm for the epoch: it was just written, and npvae train scans the file before
    training. extra: more options for both runs, in_memory_extra for the in-memory one (tests
    make the runs tiny with them).
    """
    import tempfile
    rows, source = _mnist_or_stand_in(data_dir)
    rows = np.asarray(rows)
    n = max(1000, int(gigabytes * 1e9) // rows.shape[1])
    results = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "big.npy"
        try:
            write_rows_npy(path, rows, n)
            size = path.stat().st_size
            disk = _train_child(path, Path(tmp) / "disk", None, threads, backend, extra)
        finally:
            path.unlink(missing_ok=True)   # 2 GB is not left behind; the directory goes with the with
        if source == "mnist":
            memory_set, memory_dir = "mnist", data_dir
        else:   # the stand-in in memory: an .npz is read whole
            memory_set, memory_dir = Path(tmp) / "stand-in.npz", None
            np.savez(memory_set, x_train=rows)
        memory = _train_child(memory_set, Path(tmp) / "memory", memory_dir, threads, backend,
                              tuple(extra) + tuple(in_memory_extra))
    name_memory = f"train 1 epoch in memory ({'mnist' if source == 'mnist' else 'stand-in .npz'})"
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    name_disk = f"train 1 epoch from disk ({shown} uint8 .npy, {n} rows)"
    for name, r in ((name_memory, memory), (name_disk, disk)):
        if isinstance(r, str):
            results.append({"name": name, "error": r})
        else:
            results.append({"name": name, "examples_per_s": r[0], "anon_megabytes": r[1],
                            "helpers_megabytes": r[2], "data": source})
    big = results[1]
    big["target_anon_megabytes"] = 400
    if "error" not in results[0] and "error" not in big:
        big["ratio_to_memory"] = big["examples_per_s"] / results[0]["examples_per_s"]
        big["target_ratio_to_memory"] = 0.9
    return results


def _run_once(x_train, source, data_dir, repeats, quick, memory, threads, backend="auto"):
    """Every benchmark once; -> a list of result dicts, each with its target."""
    results = [
        bench_train("train 784-400-20 relu, batch 128", (400,), "relu", 128, x_train, repeats, source, 20,
                    threads, backend),
        bench_train("train 784-200-200-50 tanh, batch 100", (200, 200), "tanh", 100, x_train, repeats,
                    source, 50, threads, backend),
    ]
    results[0]["target_ratio"], results[1]["target_ratio"] = 1.4, 1.6
    own = bench_own_loop(128, x_train, repeats, source)
    own["target_examples_per_s"] = 20000
    own["engine_examples_per_s"] = results[0]["examples_per_s"]   # the Trainer's step, in this same run
    results.append(own)
    ll = bench_log_likelihood(5000, 100 if quick else 1000, x_train, 1 if quick else 3, threads)
    ll["target_ratio"] = 1.7
    results.append(ll)
    if memory and not quick:
        mem = bench_memory(data_dir, backend=backend)
        mem["target_megabytes"] = 400
        results.append(mem)
    imp = bench_import()
    imp["target_seconds"] = 0.25
    results.append(imp)
    results.append(bench_handoff())
    return results


# How one benchmark's figures from several runs combine: the median, except
# peak memory, whose worst run is what a user must have, and the least hand-off time.
_COMBINE = {"seconds": statistics.median, "floor_seconds": statistics.median, "ratio": statistics.median,
            "examples_per_s": statistics.median, "floor_examples_per_s": statistics.median, "megabytes": max,
            "engine_examples_per_s": statistics.median,
            "microseconds": statistics.median, "min_microseconds": min, "helpers_megabytes": max}


def combine_runs(results):
    """One benchmark's result dicts from several runs -> one dict: the median of each figure
    (the largest peak memory, the least hand-off), with every run's figures under 'per_run'.

    A ratio is the median of the runs' own ratios, each against the floor of its own run.
    """
    if len(results) == 1 or any("error" in r for r in results):
        return next((r for r in results if "error" in r), results[0])
    out = dict(results[0])
    keys = [k for k in _COMBINE if k in out]
    for k in keys:
        out[k] = _COMBINE[k]([r[k] for r in results])
    out["runs"] = len(results)
    out["per_run"] = {k: [r[k] for r in results] for k in keys}
    return out


def run(data_dir=None, repeats=5, quick=False, memory=True, threads="auto", runs=1, backend="auto"):
    """All benchmarks, the whole set `runs` times over; returns one result dict per benchmark (combine_runs)."""
    x_train, source = _mnist_or_stand_in(data_dir)
    if quick:
        x_train, repeats = x_train[:6000], 3
    per_run = [_run_once(x_train, source, data_dir, repeats, quick, memory, threads, backend)
               for _ in range(runs)]
    return [combine_runs(list(results)) for results in zip(*per_run)]


def format_results(results):
    lines = []
    for r in results:
        if "ratio" in r:
            lines.append(f"{r['name']:<44} {r['examples_per_s']:9.0f} ex/s  floor {r['floor_examples_per_s']:9.0f} ex/s"
                         f"  ({r['seconds']:.2f} s vs {r['floor_seconds']:.2f} s)  ratio {r['ratio']:.2f}"
                         + (f"  target <= {r['target_ratio']}" if "target_ratio" in r else "")
                         + (f"  target >= {r['target_examples_per_s']} ex/s" if "target_examples_per_s" in r else "")
                         + (f" (the engine's step: {r['engine_examples_per_s']:.0f} ex/s)"
                            if "engine_examples_per_s" in r else "")
                         + (f"  ({r['threads']} {r.get('backend', 'threads')})" if "threads" in r else "")
                         + (f"  median of {r['runs']} runs: " + ", ".join(f"{x:.2f}" for x in r["per_run"]["ratio"])
                            if "runs" in r else ""))
        elif "anon_megabytes" in r:
            anon = ("not available (no RssAnon in /proc/self/status)" if r["anon_megabytes"] is None
                    else f"{r['anon_megabytes']:.0f} MB")
            lines.append(f"{r['name']:<44} {r['examples_per_s']:9.0f} ex/s  peak anonymous memory {anon}"
                         + (f"  target <= {r['target_anon_megabytes']} MB" if "target_anon_megabytes" in r else "")
                         + (f"  (helper processes {r['helpers_megabytes']:.0f} MB of it)"
                            if r.get("helpers_megabytes") else "")
                         + (f"; {r['ratio_to_memory']:.2f} of in memory, target >= {r['target_ratio_to_memory']}"
                            if "ratio_to_memory" in r else ""))
        elif "megabytes" in r:
            lines.append(f"{r['name']:<44} {r['megabytes']:9.0f} MB  target <= {r['target_megabytes']} MB"
                         + (f"  (helper processes {r['helpers_megabytes']:.0f} MB of it)"
                            if r.get("helpers_megabytes") else "")
                         + (f"  (largest of {r['runs']} runs)" if "runs" in r else ""))
        elif "microseconds" in r:
            lines.append(f"{r['name']:<44} {r['microseconds']:9.0f} us median, {r['min_microseconds']:.0f} us at least"
                         + (f"  (median of {r['runs']} runs)" if "runs" in r else ""))
        elif "seconds" in r:
            lines.append(f"{r['name']:<44} {r['seconds']:9.3f} s   target <= {r['target_seconds']} s"
                         + (f"  (median of {r['runs']} runs)" if "runs" in r else ""))
        else:
            lines.append(f"{r['name']:<44} error: {r.get('error')}")
    return "\n".join(lines)


def main_json(results):
    return json.dumps(results, indent=2)
