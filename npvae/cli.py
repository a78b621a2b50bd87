"""The npvae command line: gradcheck, train, eval, sample, plot, bench.

Exit codes: 0 success; 1 a gradient check failed, training stopped on a
non-finite value, a file could not be written (a full disk, no permission, a
read-only file system, a removed run directory: one line names the file and the
run's last whole checkpoint), the run directory is in use by another `npvae
train` (one line names its process), or a finished run's figures could not be
written; 2 bad
usage or bad input (one line on stderr, no traceback); and for `npvae train`
stopped by a signal after finishing its step and saving a checkpoint: 130 for
SIGINT (Ctrl-C), 143 for SIGTERM (128 + 15, as a shell reports it), 75 for
SIGUSR1 (EX_TEMPFAIL, "try again": a fixed number, since SIGUSR1 is 10 on Linux
and 30 on macOS; a batch script requeues on 75 and resumes with --resume).
"""
import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from .engine.parallel import BACKENDS

ENGINES = ("fast", "reference")   # as npvae.train.ENGINES, without importing training here


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage block; one line is easier to read in a log
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- argument types ---------------------------------------------------------------

def _number(convert, ok, expected):
    """An argparse type: convert the text, check it with ok(), or say what was expected."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive finite number")
nonnegative_float = _number(float, lambda v: 0 <= v < math.inf, "a non-negative finite number")


def _threads(text):
    """'auto' or a positive integer."""
    return text if text == "auto" else _number(int, lambda v: v >= 1, "a positive integer or 'auto'")(text)


def widths(text):
    """'400' or '200,200' -> (400,) or (200, 200)."""
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 400 or 200,200, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 400 or 200,200, got {text!r}")
    return values


def stochastic_layer(text):
    """'200,200:100' -> [[200, 200], 100]: one stochastic layer of --layers, hidden widths : latent size."""
    hidden, sep, z = text.partition(":")
    try:
        values = [int(t) for t in hidden.split(",")], int(z)
    except ValueError:
        values = None
    if not sep or values is None or min(values[0]) < 1 or values[1] < 1:
        raise argparse.ArgumentTypeError(f"expected a layer like 200,200:100 (hidden widths:latent size), got {text!r}")
    return [values[0], values[1]]


# --- commands -----------------------------------------------------------------------

def cmd_gradcheck(args):
    from . import gradcheck
    rows = gradcheck.run_all(seed=args.seed)
    print(gradcheck.format_table(rows))
    return 0 if all(r[3] for r in rows) else 1


def _default_out(dataset):
    """runs/<dataset>, or runs/<dataset>-2, -3, ... if that already holds a run."""
    base = Path("runs") / Path(str(dataset)).stem
    out, i = base, 1
    while (out / "config.json").exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


# Defaults that suit one dataset and not the others, applied by `npvae train` to the options the
# user did not give; every other dataset gets TrainConfig's. `--help` names them.
#
# shapes, the set that `npvae train` trains on with no options: with TrainConfig's 784-400-20 and
# 10 epochs its samples are grey blobs (validation ELBO -39.7 nats, KL 23). Four factors make a
# shape (kind, x, y, size), and 20 latents leave most of the prior where no training image's code
# lies, so a z drawn from N(0, I) decodes to a blend. Measured on the 2-core machine, looking at
# samples.png: KL warm-up over 3 epochs changed nothing; Z = 8 and Z = 6 gave some clean shapes
# among broken ones, even after 30 epochs; Z = 4 gave clean discs, squares and triangles, and with
# lr 3e-3 for 20 epochs crosses too, at -36.7 nats (lr 1e-3 takes 30 epochs to that ELBO). At about
# 2 s an epoch, `npvae train` then takes 50 s in all. They stay out of TrainConfig: on MNIST more
# latents do better (Kingma & Welling 2014, figure 2), and 20 is the setting the README's runs use.
DATASET_DEFAULTS = {
    "shapes": {"z_dim": 4, "epochs": 20, "lr": 3e-3},
}


def _default_help(field, general):
    """'default 10; shapes: 20' for an option DATASET_DEFAULTS sets for some dataset."""
    special = "".join(f"; {name}: {d[field]:g}" for name, d in DATASET_DEFAULTS.items() if field in d)
    return f"default {general}{special}"


def _defaults_for(dataset):
    """The options DATASET_DEFAULTS sets for dataset ({} for most), keyed as TrainConfig's fields."""
    return dict(DATASET_DEFAULTS.get(str(dataset).lower().replace("_", "-"), {}))


def cmd_train(args):
    from .data import BUILTIN_SIZES
    from .checkpoint import RunInUse, WriteFailed
    from .train import Trainer, TrainConfig, TrainingDiverged
    if args.resume:
        if args.out:
            raise UsageError("--out and --resume exclude each other (a resumed run stays in its directory)")
        trainer = Trainer.resume(args.resume, epochs=args.epochs, quiet=args.quiet, data_dir=args.data_dir,
                                 threads=args.threads, backend=args.backend, engine=args.engine)
    else:
        fields = {f: getattr(args, f) for f in (
            "dataset", "data_dir", "epochs", "batch_size", "hidden", "z_dim", "activation", "likelihood",
            "x_sigma", "lr", "lr_schedule", "lr_final", "warmup", "beta", "objective", "k", "binarize",
            "threshold", "n_valid", "n_train", "patience", "seed", "dtype", "inference", "inner_steps",
            "inner_lr", "inner_optimizer", "posterior") if getattr(args, f) is not None}
        if args.layers is not None:
            if args.hidden is not None or args.z_dim is not None:
                raise UsageError("--layers sets every layer's hidden widths and latent size; "
                                 "drop --hidden/--z-dim (they describe a one-layer VAE)")
            fields["layers"] = args.layers
        if "k" in fields and fields["k"] > 1 and "objective" not in fields:
            fields["objective"] = "iwae"
        if args.no_init_bias:
            fields["init_bias"] = False
        fields = {**_defaults_for(fields.get("dataset", TrainConfig.dataset)), **fields}
        config = TrainConfig(**fields)
        out = Path(args.out) if args.out else _default_out(config.dataset)
        if (out / "config.json").exists():
            raise UsageError(f"--out {out} already holds a run; continue it with --resume {out} "
                             f"or choose another directory")
        trainer = Trainer(config, out, quiet=args.quiet, threads=args.threads, backend=args.backend,
                          engine=args.engine)   # None: fast for amortized inference, else reference
        trainer.log(f"training on {trainer.data.name}: {trainer.x_train.shape[0]} train, "
                    f"{trainer.x_valid.shape[0]} valid; model {_architecture(trainer.model)} "
                    f"{trainer.model.activation}, {trainer.model.likelihood}; {config.epochs} epochs; "
                    f"run directory {out}")
    try:
        status = trainer.run()
    except (TrainingDiverged, WriteFailed, RunInUse) as e:
        print(f"npvae train: error: {e}", file=sys.stderr)
        return 1
    if status == "interrupted":
        return INTERRUPTED_STATUS.get(signal_name(trainer.signal), 130)

    def say(*lines):
        if not args.quiet:
            print(*lines, sep="\n", flush=True)

    best = max(trainer.history["valid_elbo"]) if trainer.history["valid_elbo"] else float("nan")
    say(f"{status}: best validation ELBO {best:.3f} nats; run directory {trainer.out}")
    run, image_shape, builtin = trainer.out, trainer.data.image_shape, trainer.data.name in BUILTIN_SIZES
    del trainer   # its model, buffers and data: the figures load the run afresh, as `npvae plot` does
    code = 0
    if not args.no_plots:
        from .plots import plot_run
        try:
            paths = plot_run(run, data_dir=args.data_dir)
        except (ImportError, OSError) as e:   # no matplotlib, a full disk: the run itself is saved
            print(f"npvae train: error: the run is saved, but its figures could not be drawn ({e}); "
                  f"draw them later with: npvae plot {shlex.quote(str(run))}", file=sys.stderr)
            code = 1
        else:
            say("figures of best.npz (the best validation ELBO):", *(f"  {p}" for p in paths))
    say(*_next_commands(run, image_shape, builtin, plotted=not args.no_plots))
    return code


INTERRUPTED_STATUS = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 75}   # the module docstring says why


def signal_name(signum):
    """'SIGTERM' for signal.SIGTERM; 'SIGINT' for None (an interrupt not from a signal)."""
    import signal
    return "SIGINT" if signum is None else signal.Signals(signum).name


def _architecture(model):
    """'784-400-20' (with ' q planar:16' for a posterior other than the diagonal), or for a
    HierarchicalVAE '784-200-200-[100]-100-100-[50]' ([Z]: a stochastic layer)."""
    if not hasattr(model, "layers"):
        q = "" if model.posterior == "diagonal" else f" q {model.posterior}"
        return f"{model.x_dim}-{'-'.join(map(str, model.hidden))}-{model.z_dim}{q}"
    return f"{model.x_dim}-" + "-".join("-".join(map(str, h)) + f"-[{z}]" for h, z in model.layers)


def _next_commands(run, image_shape, builtin, plotted):
    """The lines that end `npvae train`: what to try on the run next, as commands to copy."""
    r = shlex.quote(str(run))
    commands = [(f"npvae eval {r} --k 5000", "test ELBO, and log p(x) by importance sampling, K = 5000")]
    if image_shape:
        commands.append((f"npvae sample {r}", f"64 new images into {Path(run) / 'samples.png'}"))
    commands.append((f"npvae plot {r}", "redraw the figures (--which latest: the last epoch's)" if plotted
                     else "draw the figures into " + str(Path(run) / "plots")))
    if builtin:
        commands.append(("npvae train --dataset mnist --data-dir DIR",
                         "a real dataset: DIR holds mnist/ (README: Data)"))
    width = max(len(c) for c, _ in commands)
    return ["next:"] + [f"  {c:<{width}}   # {why}" for c, why in commands]


def _load_run(run, which):
    from .checkpoint import CONFIG, load, read_json
    run = Path(run)
    model = load(run, which)
    return model, read_json(run / CONFIG)


class RateProgress:
    """'what done/total, rate, ETA' on stderr for long evaluations: in place on a terminal."""

    def __init__(self, what, unit="images"):
        import time
        self.what, self.unit, self.clock = what, unit, time.perf_counter
        self.start = self.last = self.clock()
        self.tty = sys.stderr.isatty()

    def __call__(self, done, total):
        now = self.clock()
        if done < total and now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = (f"{self.what}: {done}/{total} {self.unit}, {rate:.1f} {self.unit}/s, "
                f"ETA {(total - done) / max(rate, 1e-9):.0f} s")
        sys.stderr.write(("\r" + line + ("\n" if done >= total else "")) if self.tty else line + "\n")
        sys.stderr.flush()


def cmd_eval(args):
    import time

    import numpy as np

    from . import evaluate
    from .engine.evaluate import log_likelihood
    model, run_config = _load_run(args.run, args.which)
    from .train import TrainConfig, test_rows
    config = TrainConfig.from_dict(run_config["train"])
    # prepared as read, a slice at a time: a test set of any length takes the memory of a slice
    x = test_rows(config, model, args.data_dir, args.seed, args.dataset)
    if args.n is not None:
        x = x.first(args.n)
    if config.inference != "amortized":
        return _eval_inference(args, model, config, np.asarray(x))
    result = evaluate.elbo_stats(model, x, np.random.default_rng([args.seed, 5]))
    if hasattr(model, "layers"):   # a HierarchicalVAE: per layer, bottom first
        from .hierarchical import active_units
        result["active_units_per_layer"] = [n for n, _ in active_units(model, x)]
        result["z_dims"] = list(model.z_dims)
        if args.amortization is not None:
            raise UsageError("--amortization is for a one-layer VAE; this run has several stochastic layers")
        result["active_units"] = result["active_units_per_layer"][0]   # z_1's, as evaluate.active_units counts them
    else:
        result["active_units"], _ = evaluate.active_units(model, x)
    result["z_dim"] = model.z_dim
    if args.k is not None:
        t = time.perf_counter()
        log_px = log_likelihood(model, x, k=args.k, rng=np.random.default_rng([args.seed, 6]),
                                progress=None if args.quiet else RateProgress(f"log p(x), K={args.k}"),
                                threads=args.threads)
        result["log_likelihood"] = float(np.mean(log_px))
        result["log_likelihood_sem"] = float(np.std(log_px) / np.sqrt(len(log_px)))
        result["k"] = args.k
        result["log_likelihood_seconds"] = time.perf_counter() - t
    if args.amortization is not None:
        t = time.perf_counter()
        gaps = evaluate.amortization_gaps(model, x[:args.amortization], k=args.k or 5000,
                                          rng=np.random.default_rng([args.seed, 7]))
        result["amortization"] = dict(gaps["mean"], n=min(args.amortization, len(x)),
                                      seconds=time.perf_counter() - t)
    if args.json:
        print(json.dumps(result))
        return 0
    _print_elbo(result)
    if "active_units_per_layer" in result:
        print("active units per layer: " + " + ".join(f"{n} of {z}" for n, z in zip(
            result["active_units_per_layer"], result["z_dims"])) + " (Var_x E_q[z_j|x] > 0.01)")
    else:
        print(f"active units: {result['active_units']} of {model.z_dim} (Var_x E_q[z_j|x] > 0.01)")
    _print_log_likelihood(result, "importance sampling")
    if "amortization" in result:
        a = result["amortization"]
        print(f"on {a['n']} examples: encoder ELBO {a['elbo_encoder']:.3f}, optimized ELBO "
              f"{a['elbo_optimized']:.3f}, log p(x) {a['log_px']:.3f}; amortization gap "
              f"{a['amortization_gap']:.3f}, approximation gap {a['approximation_gap']:.3f} nats")
    return 0


def _print_elbo(result):
    print(f"test ELBO {result['elbo']:.3f} nats (reconstruction {result['recon']:.3f}, "
          f"KL {result['kl']:.3f}) over {result['n']} examples, one sample each")


def _print_log_likelihood(result, how):
    if "log_likelihood" in result:
        print(f"log p(x) ~ {result['log_likelihood']:.3f} +- {result['log_likelihood_sem']:.3f} nats "
              f"({how}, K = {result['k']}, {result['log_likelihood_seconds']:.1f} s)")


def _eval_inference(args, model, config, x):
    """cmd_eval for a per-datapoint or semi-amortized run: every figure at the run's own q (npvae.inference.fit_q)."""
    import time

    import numpy as np

    from . import checkpoint as ckpt
    from . import inference
    from .engine.evaluate import log_likelihood
    state = ckpt.read_state(Path(args.run) / (ckpt.BEST if args.which == "best" else ckpt.LATEST))
    passes = max(1, int(state["epoch"]))   # per-datapoint: as many visits as a training example had
    t = time.perf_counter()
    q = inference.fit_q(model, x, config.inference, config.inner_steps, config.inner_lr,
                        np.random.default_rng([args.seed, 8]), config.inner_optimizer, passes)
    result = inference.elbo_stats_at(model, x, q, np.random.default_rng([args.seed, 5]))
    result.update(inference=config.inference, inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                  inner_optimizer=config.inner_optimizer, z_dim=model.z_dim, fit_seconds=time.perf_counter() - t)
    if config.inference == "per-datapoint":
        result["passes"] = passes
    if args.k is not None:
        t = time.perf_counter()
        log_px = log_likelihood(model, x, k=args.k, rng=np.random.default_rng([args.seed, 6]), q=q,
                                progress=None if args.quiet else RateProgress(f"log p(x), K={args.k}"),
                                threads=args.threads)
        result.update(log_likelihood=float(np.mean(log_px)), log_likelihood_sem=float(np.std(log_px) / np.sqrt(len(log_px))),
                      k=args.k, log_likelihood_seconds=time.perf_counter() - t)
    if args.amortization is not None:
        t = time.perf_counter()
        n = min(args.amortization, len(x))
        gap = inference.amortization_gap(model, x[:n], (q[0][:n], q[1][:n]), np.random.default_rng([args.seed, 7]),
                                         n_eval=args.k or 5000)
        result["amortization"] = {"elbo_own": float(gap["elbo_own"].mean()), "elbo_optimized": float(
            gap["elbo_optimized"].mean()), "amortization_gap": float(gap["gap"].mean()), "n": n}
        if config.inference == "semi-amortized":   # the encoder's q alone, before the refinement
            enc = inference.amortization_gap(model, x[:n], model.encode(x[:n]), np.random.default_rng([args.seed, 7]),
                                             n_eval=args.k or 5000)
            result["amortization"]["encoder_gap"] = float(enc["gap"].mean())
        result["amortization"]["seconds"] = time.perf_counter() - t
    if args.json:
        print(json.dumps(result))
        return 0
    how = {"per-datapoint": f"q fitted from the prior, {passes} x {config.inner_steps} {config.inner_optimizer} steps",
           "semi-amortized": f"the encoder's q + {config.inner_steps} {config.inner_optimizer} steps"}[config.inference]
    print(f"inference {config.inference} ({how}, lr {config.inner_lr:g}, theta fixed; {result['fit_seconds']:.1f} s)")
    _print_elbo(result)
    _print_log_likelihood(result, "importance sampling from the run's own q")
    if "amortization" in result:
        a = result["amortization"]
        print(f"on {a['n']} examples: own-q ELBO {a['elbo_own']:.3f}, optimized ELBO {a['elbo_optimized']:.3f}; "
              f"amortization gap (optimized - own) {a['amortization_gap']:.3f} nats"
              + (f"; the encoder's alone {a['encoder_gap']:.3f}" if "encoder_gap" in a else ""))
    return 0


def cmd_sample(args):
    import numpy as np
    model, run_config = _load_run(args.run, args.which)
    shape = run_config["data"]["image_shape"]
    if shape is None:
        raise UsageError(f"run {args.run} is not on images; nothing to draw as a grid")
    x = model.sample(args.n, rng=np.random.default_rng(args.seed))
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    from .plots import save_image_grid
    save_image_grid(x, shape, out, title=f"samples from p(x|z), z ~ N(0, I): {args.run}")
    print(out)
    return 0


def cmd_plot(args):
    from .plots import plot_run
    for path in plot_run(args.run, args.out, data_dir=args.data_dir, which=args.which):
        print(path)
    return 0


def cmd_bench(args):
    from .engine import bench
    if args.big:
        results = bench.bench_big(args.data_dir, args.big_gb, args.big_dir, args.threads, args.backend)
        print(bench.main_json(results) if args.json else bench.format_results(results))
        return 0
    results = bench.run(data_dir=args.data_dir, repeats=args.repeats, quick=args.quick,
                        memory=not args.no_memory, threads=args.threads, runs=args.runs,
                        backend=args.backend)
    print(bench.main_json(results) if args.json else bench.format_results(results))
    return 0


# --- parser ---------------------------------------------------------------------------

def build_parser():
    from .layers import ACTIVATIONS
    parser = ArgumentParser(prog="npvae", description="A VAE in NumPy with hand-written gradients.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("gradcheck", help="check every analytic gradient against finite differences",
                       description="Check every analytic gradient against central finite differences "
                                   "in float64 and print a table; exit 1 if any check fails.")
    p.add_argument("--seed", type=int, default=0, help="seed for the test points (default 0)")
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE and write its run directory: checkpoints, config.json "
                                   "and, when training ends (not when interrupted), the figures of `npvae plot` "
                                   "in RUN/plots; then print what to try next. With no arguments: the built-in "
                                   "shapes set, written to runs/shapes, with the defaults it has of its own ("
                                   + ", ".join(f"--{f.replace('_', '-')} {v:g}" for f, v in
                                               DATASET_DEFAULTS["shapes"].items()) + ").")
    p.add_argument("--dataset", help="mnist, fashion-mnist, binarized-mnist, frey, shapes, pinwheel, "
                                     "moons, ring, or a .npy/.npz path (default shapes)")
    p.add_argument("--data-dir", help="folder with the datasets (default: $NPVAE_DATA, else ~/.npvae/data)")
    p.add_argument("--epochs", type=positive_int,
                   help=f"passes over the training set ({_default_help('epochs', 10)})")
    p.add_argument("--batch-size", type=positive_int, help="examples per step (default 128)")
    p.add_argument("--hidden", type=widths, help="hidden widths, e.g. 400 or 200,200 (default 400)")
    p.add_argument("--z-dim", type=positive_int, help=f"latent dimensions ({_default_help('z_dim', 20)})")
    p.add_argument("--layers", type=stochastic_layer, nargs="+", metavar="H,H:Z",
                   help="several stochastic layers, bottom first, each hidden widths:latent size: "
                        "--layers 200,200:100 100,100:50 --activation tanh is Burda et al.'s two-layer model (a HierarchicalVAE, "
                        "trained on one thread; excludes --hidden and --z-dim)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), help="hidden activation (default relu)")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian"), help="p(x|z) (default: the dataset's)")
    p.add_argument("--x-sigma", type=positive_float, help="fixed sigma of a Gaussian p(x|z) (default learned)")
    p.add_argument("--lr", type=positive_float, help=f"Adam learning rate ({_default_help('lr', '1e-3')})")
    p.add_argument("--lr-schedule", choices=("constant", "exponential", "burda", "stages"), help="default constant")
    p.add_argument("--lr-final", type=positive_float, help="last learning rate of the exponential schedule")
    p.add_argument("--warmup", type=nonnegative_float, help="epochs of linear KL warm-up (default 0)")
    p.add_argument("--beta", type=nonnegative_float, help="fixed KL weight (default 1)")
    p.add_argument("--objective", choices=("elbo", "iwae"), help="training objective (default elbo)")
    p.add_argument("--k", type=positive_int, help="importance samples for --objective iwae")
    p.add_argument("--binarize", choices=("dynamic", "threshold", "none"),
                   help="grey images with a Bernoulli likelihood (default dynamic)")
    p.add_argument("--threshold", type=positive_float, help="threshold for --binarize threshold (0.5)")
    p.add_argument("--n-valid", type=positive_int, help="validation examples held out of train")
    p.add_argument("--n-train", type=positive_int, help="use only the first N training examples")
    p.add_argument("--patience", type=positive_int, help="early stopping: epochs without improvement")
    p.add_argument("--no-init-bias", action="store_true", help="do not start the decoder at the data mean")
    p.add_argument("--inference", choices=("amortized", "per-datapoint", "semi-amortized"),
                   help="where q(z|x) comes from (npvae.inference): the encoder (default), a table of q per "
                        "training example refined by an inner loop, or the encoder's q refined by one")
    p.add_argument("--inner-steps", type=nonnegative_int,
                   help="inner-loop steps per minibatch visit (default 5; semi-amortized allows 0)")
    p.add_argument("--inner-lr", type=positive_float, help="the inner loop's learning rate (default 0.2 per-datapoint, 0.05 semi-amortized)")
    p.add_argument("--inner-optimizer", choices=("adam", "sgd"), help="the inner loop's optimizer (default adam)")
    p.add_argument("--posterior", metavar="FAMILY",
                   help="q(z|x): diagonal (default), full (Cholesky covariance), planar:T or iaf:T (T flow "
                        "steps, e.g. planar:16, iaf:4); all but diagonal train on engine reference")
    p.add_argument("--engine", choices=ENGINES,
                   help="fast (the default: npvae.engine, a minibatch shared by threads or processes) or "
                        "reference (npvae.model and npvae.optim in the textbook loop, one Python thread); "
                        "--resume keeps the run's own unless told")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="fast engine: threads that share each minibatch (default auto: 2 where NumPy's OpenBLAS "
                        "allows, else 1); runs agree to float rounding, and a fixed count repeats bit for bit")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fast engine: how a minibatch is shared: threads, or helper processes (Linux; "
                        "no shared interpreter lock); default auto: processes where they work")
    p.add_argument("--seed", type=int, help="seed for everything random (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default float32")
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<dataset>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN (--epochs may extend it)")
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw the run's figures at the end (they take a few seconds and matplotlib; "
                        "`npvae plot RUN` draws them later)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors: no progress, no summary, no figure paths or next commands "
                        "(the figures are still written, unless --no-plots)")
    p.set_defaults(func=cmd_train)

    for name, help_text in (("eval", "test ELBO, reconstruction and KL of a trained run"),
                            ("sample", "draw samples of a trained run as an image grid PNG")):
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("run", metavar="RUN", help="run directory written by npvae train")
        p.add_argument("--which", choices=("best", "latest"), default="best",
                       help="best validation ELBO (default) or latest checkpoint")
        p.add_argument("--seed", type=int, default=0, help="seed for the noise (default 0)")
        if name == "eval":
            p.add_argument("--data-dir", help="folder with the datasets (default: the run's, $NPVAE_DATA)")
            p.add_argument("--dataset", metavar="PATH",
                           help="evaluate on this .npy/.npz instead of the run's test set (a .npz's x_test, "
                                "else every row), read a slice at a time: any length, checked as npvae train checks it")
            p.add_argument("--n", type=positive_int, help="evaluate only the first N test examples")
            p.add_argument("--k", type=positive_int, nargs="?", const=5000,
                           help="also estimate log p(x) by importance sampling with K samples (--k alone: 5000); "
                                "the proposal is the run's own q")
            p.add_argument("--amortization", type=positive_int, metavar="N",
                           help="also the amortization and approximation gaps on the first N examples")
            p.add_argument("--threads", type=_threads, default="auto",
                           help="threads that share the examples of --k (default auto, as in npvae train)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.add_argument("--quiet", action="store_true", help="no progress output")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
            p.add_argument("--out", help="PNG path (default RUN/samples.png)")
            p.set_defaults(func=cmd_sample)
    p = sub.add_parser("plot", help="draw the standard figures of a trained run",
                       description="Draw reconstructions, samples, training curves, the test set in "
                                   "latent space and (for a 2-D latent) the decoded manifold, as PNGs.")
    p.add_argument("run", metavar="RUN", help="run directory written by npvae train")
    p.add_argument("--out", help="folder for the PNGs (default RUN/plots)")
    p.add_argument("--data-dir", help="folder with the datasets (default: the run's, $NPVAE_DATA)")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="which checkpoint")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="time training and evaluation against their matrix-product floor",
                       description="Time one MNIST training epoch (784-400-20 ReLU, batch 128; "
                                   "784-200-200-50 tanh, batch 100), importance-sampled log p(x) with "
                                   "K = 5000 on 1000 images, peak memory of npvae train and import time, "
                                   "each against its floor, the time of its matrix products alone, "
                                   "and the time of one hand-off to a helper thread.")
    p.add_argument("--data-dir", help="folder with MNIST (a random stand-in is timed without it)")
    p.add_argument("--repeats", type=positive_int, default=5, help="repeats within a run; the median is reported")
    p.add_argument("--runs", type=positive_int, default=1,
                   help="run the whole benchmark this many times and report the median of the runs (default 1)")
    p.add_argument("--quick", action="store_true", help="a tenth of the data, for a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--threads", type=_threads, default="auto", help="threads for training and log p(x), as in npvae train")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="threads or helper processes for training, as in npvae train")
    p.add_argument("--big", action="store_true",
                   help="instead: train one epoch (784-400-20) on a uint8 .npy of --big-gb GB written to a temporary "
                        "file and read from disk, and one on MNIST in memory; report images/s and peak anonymous "
                        "memory (RssAnon, where /proc has it) of each; the file is removed afterwards")
    p.add_argument("--big-gb", type=positive_float, default=2.0, metavar="GB",
                   help="size of the --big file (default 2)")
    p.add_argument("--big-dir", metavar="DIR", help="folder for the --big file (default: the temporary folder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        return args.func(args)
    except (UsageError, CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"npvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:   # a file that cannot be read or written: its name and why, not a traceback
        print(f"npvae {args.command}: error: {e}", file=sys.stderr)
        return 1
