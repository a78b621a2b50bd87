"""Reproduce Burda, Grosse & Salakhutdinov (2015), Table 1: a VAE and an IWAE on MNIST.

The paper's set-up: MNIST with dynamic binarization (each pass draws new binary
images, x ~ Bernoulli(grey level)), one stochastic layer, 784-200-200-50 with
tanh, Adam, the learning rate falling from 1e-3 to 1e-4 in 8 stages
(10^(-i/7) times 1e-3), the decoder's output bias at logit(mean pixel), and the
test log-likelihood

    log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x),    z_k ~ q(z|x),  K = 5000,

over all 10 000 test images. Their numbers: VAE (k = 1) -86.76 nats, IWAE
(k = 5) -85.54, IWAE (k = 50) -84.78, after 3280 passes with batch 20.

With --layers 2, their two-stochastic-layer model (npvae.HierarchicalVAE):
784-200-200-[100]-100-100-[50] with tanh, z_1 (100) and z_2 (50), proposal
q(z_1|x) q(z_2|z_1); their numbers VAE -85.33, IWAE (k = 5) -83.89, IWAE
(k = 50) -82.90. It trains on the reference path (npvae.train's Trainer
with TrainConfig.layers).

This script trains one model stage by stage and, after each learning-rate
stage, logs the validation ELBO, the test log p(x) on a subset and the
training wall time so far; at the end it estimates log p(x) with K = 5000 on
the whole test set, and draws the stages' log p(x) against the paper's figure
for the row (stages.png, next to the log stages.json). The run directory is an
ordinary npvae run: `npvae eval RUN --k 5000` gives the same final figure.

    python demos/reproduce_iwae.py                       # the VAE, k = 1
    python demos/reproduce_iwae.py --k 5 --out demos/out/iwae5
    python demos/reproduce_iwae.py --quick               # a smoke test, ~15 s
    python demos/reproduce_iwae.py --layers 2 --k 5      # two stochastic layers, into demos/out/iwae5-2layers
    python demos/reproduce_iwae.py --k 5 --out demos/out/iwae5 --resume --epochs 780

The last line continues a finished (or interrupted) run to 780 epochs. The eight
stages are spread over the new length, so the rate goes back up to the one the
longer schedule has at the current epoch (a warm restart), then falls to 1e-4 again.
"""
import os

# One BLAS thread unless told otherwise. Training and the log p(x) estimates split their work
# over threads="auto" (npvae.engine.parallel): two threads where the process may use two cores. To run
# the VAE and the IWAE side by side, give each its own core (e.g. `taskset -c 0 python ...`),
# which makes "auto" one thread, so the two runs do not share cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import time
from pathlib import Path

import numpy as np

from npvae import checkpoint as ckpt
from npvae import data as datasets
from npvae.engine.evaluate import log_likelihood   # evaluate's, with the examples split over threads
from npvae.hierarchical import BURDA_LAYERS
from npvae.train import TrainConfig, Trainer, learning_rate, test_set

PAPER = {1: -86.76, 5: -85.54, 50: -84.78}   # Burda et al. (2015), Table 1, MNIST, one stochastic layer
PAPER_2 = {1: -85.33, 5: -83.89, 50: -82.90}  # the same table, two stochastic layers
ARCHITECTURE = {1: "784-200-200-50 tanh", 2: "784-200-200-[100]-100-100-[50] tanh"}
DATASET, FALLBACK = "mnist", "shapes"
FIGURE = "stages.png"                        # written next to stages.json in --out


def stage_ends(config):
    """The epochs (1-based counts) after which the learning rate changes, and the last epoch."""
    rates = [learning_rate(config, e) for e in range(config.epochs)]
    return [e + 1 for e in range(config.epochs) if e + 1 == config.epochs or rates[e + 1] != rates[e]]


def mean_and_sem(values):
    return float(np.mean(values)), float(np.std(values) / math.sqrt(len(values)))


def row_name(k):
    return "VAE (k = 1)" if k == 1 else f"IWAE (k = {k})"


def plot_stages(log, path):
    """Test log p(x) after each stage, on a log scale of epochs, against the paper's figure; -> path.

    The paper's figure is drawn only for MNIST and a k of its Table 1: it says
    nothing about the built-in fallback set.
    """
    from npvae import plots
    plt = plots.pyplot()
    config, stages, final = log["config"], log["stages"], log.get("final")
    n_layers = len(config["layers"]) if config.get("layers") else 1
    paper = (PAPER if n_layers == 1 else PAPER_2).get(config["k"]) if config["dataset"] == "mnist" else None
    epochs = np.array([s["end_epoch"] for s in stages])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(stages):
        ax.errorbar(epochs, [s["test_log_px"] for s in stages], yerr=[s["test_log_px_sem"] for s in stages],
                    fmt="o-", ms=4, capsize=2,
                    label=f"test log p(x) after each stage (K = {stages[-1]['test_k']}, "
                          f"{stages[-1]['test_n']} images)")
        ax.plot(epochs, [s["valid_elbo"] for s in stages], "s:", ms=3, color="tab:grey",
                label="validation ELBO, a lower bound on log p(x)")
    if final:
        ax.errorbar([final["epochs"]], [final["test_log_px"]], yerr=[final["test_log_px_sem"]], fmt="*",
                    ms=11, color="tab:red", capsize=2,
                    label=f"final: best checkpoint, K = {final['k']}, {final['n']} images: "
                          f"{final['test_log_px']:.2f}")
    if paper is not None:
        ax.axhline(paper, color="black", lw=1.2, label=f"Burda et al. (2015), Table 1: {paper}")
    for change in log.get("extended", []):
        # --resume --epochs re-spaces the stages: the rate goes back up here (a warm restart)
        ax.axvline(change["at_epoch"], color="grey", ls="--", lw=1)
        ax.text(change["at_epoch"], 0.98, f" {change['epochs_before']} -> {change['epochs']} epochs",
                transform=ax.get_xaxis_transform(), color="grey", fontsize=7, va="top")
    # The stages of the burda schedule last 3^i epochs, and even equal ones gain most in the first:
    # on a log scale every stage gets room.
    ax.set_xscale("log")
    if 0 < len(epochs) <= 12:
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
    ax.set_xlabel("epochs (passes over the training set), log scale; a point per learning-rate stage")
    ax.set_ylabel("nats per test image")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)   # below: never on a point
    note = "" if paper is not None else (
        "; no paper figure for this k" if config["dataset"] == "mnist" else "; the paper's figures are for MNIST")
    ax.set_title(f"{config['dataset']}: {row_name(config['k'])}, {ARCHITECTURE.get(n_layers, '')}, batch {config['batch_size']}, "
                 f"schedule {config['lr_schedule']}{note}")
    return plots.save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=1, help="importance samples in training: 1 is the VAE (ELBO), "
                        "more is the IWAE bound (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 640, "
                        "under an hour on one core for k = 1); with --resume, a new length for the schedule")
    parser.add_argument("--batch-size", type=int, default=100, help="default 100 (the paper: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="first learning rate (default 1e-3)")
    parser.add_argument("--schedule", choices=("stages", "burda"), default="stages",
                        help="stages: 8 equal stages; burda: stage i lasts 3^i parts of 3280 (default stages)")
    parser.add_argument("--stage-n", type=int, default=1000, help="test images for the per-stage log p(x)")
    parser.add_argument("--stage-k", type=int, default=1000, help="samples for the per-stage log p(x)")
    parser.add_argument("--final-k", type=int, default=5000, help="samples for the final log p(x) (default 5000)")
    parser.add_argument("--layers", type=int, choices=(1, 2), default=1,
                        help="stochastic layers: 1 (784-200-200-50) or 2 (Burda's 784-200-200-[100]-100-100-[50])")
    parser.add_argument("--quick", action="store_true", help="a small subset, few epochs, small evaluations")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--out", type=Path, default=None, help="default demos/out/vae or demos/out/iwae<k>")
    parser.add_argument("--data-dir", help="folder with the datasets (default $NPVAE_DATA, ~/.npvae/data)")
    args = parser.parse_args()
    epochs_given = args.epochs is not None
    args.epochs = args.epochs if epochs_given else 640
    for name in ("k", "epochs", "batch_size", "stage_n", "stage_k", "final_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is None:
        args.out = Path(__file__).parent / "out" / (("vae" if args.k == 1 else f"iwae{args.k}")
                                                    + ("" if args.layers == 1 else f"-{args.layers}layers"))
    start = time.perf_counter()

    dataset = datasets.name_or_fallback(DATASET, FALLBACK, args.data_dir)
    epochs, n_train, final_n = args.epochs, None, None
    stage_n, stage_k, final_k = args.stage_n, args.stage_k, args.final_k
    if args.quick:
        n_train, final_n, stage_n, stage_k, final_k = 2000, 500, 100, 50, 200
        epochs = args.epochs if epochs_given else 8
    config = TrainConfig(dataset=dataset, data_dir=args.data_dir, epochs=epochs, batch_size=args.batch_size,
                         hidden=(200, 200), z_dim=50, activation="tanh", lr=args.lr, lr_schedule=args.schedule,
                         objective="elbo" if args.k == 1 else "iwae", k=args.k, binarize="dynamic",
                         n_train=n_train, init_bias=True, seed=0,
                         layers=None if args.layers == 1 else [[list(h), z] for h, z in BURDA_LAYERS])
    run, log_path = args.out / "run", args.out / "stages.json"
    if args.resume:
        trainer = Trainer.resume(run, epochs=epochs if epochs_given else None, data_dir=args.data_dir)
        log = ckpt.read_json(log_path) if log_path.is_file() else {"stages": []}
        if epochs_given and epochs <= trainer.epoch:
            parser.error(f"--epochs must be more than the {trainer.epoch} epochs the run has done, got {epochs}")
        if epochs_given and log["stages"] and epochs != log["config"]["epochs"]:
            # A new length re-spaces the stages over the whole run (a warm restart if the
            # rate goes up); stages that would have ended before this epoch are skipped.
            log.setdefault("extended", []).append(dict(at_epoch=trainer.epoch, epochs_before=log["config"]["epochs"],
                                                       epochs=epochs))
    else:
        if (run / ckpt.CONFIG).exists():
            parser.error(f"--out {args.out} already holds a run; add --resume to continue it")
        trainer = Trainer(config, run)
        log = {"stages": []}
    config = trainer.config
    log["config"] = config.to_dict()
    n_layers = len(config.layers) if config.layers else 1
    log["paper"] = (PAPER if n_layers == 1 else PAPER_2).get(config.k)
    model = trainer.model
    x_test = test_set(config, model, args.data_dir)
    if final_n is not None:
        x_test = x_test[:final_n]
    print(f"{dataset}: {row_name(config.k)}, {ARCHITECTURE[n_layers]}, "
          f"batch {config.batch_size}, {config.epochs} epochs, schedule {config.lr_schedule}",
          flush=True)

    train_seconds = sum(s["seconds"] for s in log["stages"])
    header = (f"{'stage':>5} {'epochs':>7} {'lr':>9} {'valid ELBO':>11} "
              f"{f'test log p(x), K={stage_k}, n={min(stage_n, len(x_test))}':>30} {'train time':>11}")
    done = {s["end_epoch"] for s in log["stages"]}
    printed = False
    for i, end in enumerate(stage_ends(config)):
        if end in done or end < trainer.epoch:
            continue
        lr = learning_rate(config, end - 1)
        t = time.perf_counter()
        status = trainer.run(until=end)
        seconds = time.perf_counter() - t
        if status != "done" or trainer.epoch < end:
            print(f"training {status} at epoch {trainer.epoch}; continue with --resume --out {args.out}")
            if log["stages"]:
                print(f"figure of the stages so far: {plot_stages(log, args.out / FIGURE)}")
            return 130 if status == "interrupted" else 0
        train_seconds += seconds
        t = time.perf_counter()
        log_px = log_likelihood(model, x_test[:stage_n], k=stage_k, rng=np.random.default_rng([0, 8]))
        test_mean, test_sem = mean_and_sem(log_px)
        row = dict(stage=i + 1, end_epoch=end, lr=lr, valid_elbo=trainer.history["valid_elbo"][-1],
                   test_log_px=test_mean, test_log_px_sem=test_sem, test_n=len(log_px), test_k=stage_k,
                   seconds=seconds, train_seconds_total=train_seconds, eval_seconds=time.perf_counter() - t,
                   # the epochs' own time from the run's history: unlike the wall time above, this
                   # survives an interruption (it leaves out validation and checkpoint writes)
                   epoch_seconds_total=float(np.sum(trainer.history["seconds"])))
        log["stages"].append(row)
        ckpt.write_json(log_path, log)
        if not printed:
            print(header)
            printed = True
        print(f"{i + 1:5d} {end:7d} {lr:9.2e} {row['valid_elbo']:11.3f} {test_mean:22.3f} +- {test_sem:5.3f} "
              f"{train_seconds / 60:9.1f} min", flush=True)

    # The final figure: the best checkpoint by validation ELBO, as `npvae eval` scores it.
    best = ckpt.load(run, "best")
    t = time.perf_counter()
    log_px = log_likelihood(best, x_test, k=final_k, rng=np.random.default_rng([0, 6]))
    final_mean, final_sem = mean_and_sem(log_px)
    log["final"] = dict(test_log_px=final_mean, test_log_px_sem=final_sem, n=len(log_px), k=final_k,
                        seconds=time.perf_counter() - t, train_seconds=train_seconds,
                        epochs=trainer.epoch, best_valid_elbo=max(trainer.history["valid_elbo"]))
    ckpt.write_json(log_path, log)
    paper = log["paper"]
    print(f"\ntest log p(x), K = {final_k}, {len(log_px)} test images: {final_mean:.3f} +- {final_sem:.3f} nats "
          f"({log['final']['seconds']:.0f} s)" + (f"; paper: {paper}" if paper else ""))
    print(f"training: {trainer.epoch} epochs in {train_seconds / 60:.1f} min; log in {log_path}")
    print(f"figure: {plot_stages(log, args.out / FIGURE)}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
