"""Training: minibatch Adam on the ELBO (or the IWAE bound), with checkpoints and exact resume.

One TrainConfig describes a run. Trainer(config, out).run() trains and writes
the run directory (see npvae.checkpoint); Trainer.resume(run).run() continues
it. All randomness (validation split, shuffling, binarization, eps) comes from
generators seeded by config.seed, and the training generator's state is saved
in every checkpoint, so a resumed run ends bit for bit where an uninterrupted
one would.
"""
import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import data as datasets
from . import inference as inference_lib
from .engine import parallel
from .engine.binarize import PreparedRows, make_prepare, prepare_batch
from .engine.model import FastVAE
from .engine.optim import FlatAdam
from .engine.step import make_step
from .evaluate import elbo_stats
from .model import VAE
from .optim import Adam

ENGINES = ("fast", "reference")
OBJECTIVES = ("elbo", "iwae")
SCHEDULES = ("constant", "exponential", "burda", "stages")
BINARIZE = ("dynamic", "threshold", "none")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json)."""

    dataset: str = "shapes"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    hidden: tuple = (400,)
    z_dim: int = 20
    activation: str = "relu"
    likelihood: str | None = None     # None: the dataset's default
    x_sigma: float | None = None      # Gaussian only: None learns log_sigma per dimension
    lr: float = 1e-3
    lr_schedule: str = "constant"     # constant | exponential (to lr_final) | burda (8 stages, 10^(-i/7))
                                      # | stages (the same 8 rates, stages of equal length)
    lr_final: float = 1e-4
    warmup: float = 0.0               # epochs over which beta rises linearly from 0 to `beta`
    beta: float = 1.0                 # weight of the KL term (1 is the ELBO)
    objective: str = "elbo"           # elbo | iwae
    k: int = 1                        # importance samples per example for the IWAE objective
    binarize: str = "dynamic"         # grey images with a Bernoulli likelihood: dynamic | threshold | none
    threshold: float = 0.5
    n_valid: int | None = None        # None: min(5000, 10% of train); a dataset's own split wins
    n_train: int | None = None        # use only the first n_train training examples (quick runs)
    patience: int | None = None       # stop after this many epochs without a better validation ELBO
    init_bias: bool = True            # decoder output bias from the training data's mean
    seed: int = 0
    dtype: str = "float32"
    layers: list | None = None        # [[hidden widths, z_dim], ...]: a HierarchicalVAE (hidden, z_dim unused)
    inference: str = "amortized"      # amortized | per-datapoint | semi-amortized (npvae.inference)
    inner_steps: int | None = None    # the inner loop's steps per visit (None: the method's default;
    inner_lr: float | None = None     # amortized takes none of these three)
    inner_optimizer: str | None = None   # adam | sgd
    posterior: str = "diagonal"       # q(z|x): diagonal | full | planar:T | iaf:T (npvae.posteriors)

    def validate(self):
        """Raise ValueError/TypeError naming the first impossible setting."""
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name in ("epochs", "batch_size", "z_dim", "k"):
            positive_int(name)
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must be one or more positive widths, got {self.hidden}")
        for name in ("lr", "lr_final"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a non-negative number, got {self.beta!r}")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise ValueError(f"warmup must be a non-negative number of epochs, got {self.warmup!r}")
        for name, allowed in (("lr_schedule", SCHEDULES), ("objective", OBJECTIVES), ("binarize", BINARIZE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.objective == "elbo" and self.k != 1:
            raise ValueError(f"k={self.k} needs objective='iwae' (the ELBO uses one sample)")
        if self.objective == "iwae" and (self.warmup or self.beta != 1.0):
            raise ValueError("warmup and beta apply to the ELBO objective only")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        for name in ("n_valid", "n_train"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        from .posteriors import parse
        parse(self.posterior)
        if self.posterior != "diagonal" and (self.layers is not None or self.inference != "amortized"):
            raise ValueError(f"posterior={self.posterior!r} is for a one-layer VAE with inference='amortized'")
        if self.layers is not None:
            from .hierarchical import check_layers
            self.layers = [[list(h), z] for h, z in check_layers(self.layers)]
            if self.inference != "amortized":
                raise ValueError(f"inference={self.inference!r} is for a one-layer VAE; "
                                 "a HierarchicalVAE (layers=...) learns with its encoders (inference='amortized')")
        return inference_lib.validate_config(self)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return cls(**d)


# The signals that make run() finish its step, save the checkpoint and return "interrupted":
# Ctrl-C, what kill/docker stop/systemd/batch schedulers send before SIGKILL, and the one batch
# schedulers are told to send ahead of a time limit (SLURM --signal=USR1@60). Windows has no SIGUSR1.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


def learning_rate(config, epoch):
    """The learning rate during epoch `epoch` (0-based)."""
    if config.lr_schedule == "constant" or config.epochs == 1:
        return config.lr
    if config.lr_schedule == "exponential":
        return config.lr * (config.lr_final / config.lr) ** (epoch / (config.epochs - 1))
    # Burda et al. (2015): stage i = 0..7 lasts 3^i passes at lr 10^(-i/7) times
    # the initial one (3280 passes in all); shorter runs keep the proportions.
    # "stages" keeps the eight rates but gives each stage the same length, which
    # suits a short budget: burda spends 2/3 of any run at the lowest rate.
    lengths = [3 ** i for i in range(8)] if config.lr_schedule == "burda" else [1] * 8
    ends = np.cumsum(lengths) / float(sum(lengths)) * config.epochs
    stage = int(np.searchsorted(ends, epoch, side="right"))
    return config.lr * 10.0 ** (-min(stage, 7) / 7.0)


def kl_weight(config, epoch, step, steps_per_epoch):
    """beta for this step: rises linearly from 0 to config.beta over config.warmup epochs."""
    if config.warmup <= 0:
        return config.beta
    progress = (epoch + step / steps_per_epoch) / config.warmup
    return config.beta * min(1.0, progress)


class Progress:
    """One status line per epoch, rewritten in place on a terminal, every 15 s otherwise."""

    def __init__(self, total, epoch, epochs, stream=sys.stderr, quiet=False):
        self.total, self.epoch, self.epochs, self.stream, self.quiet = total, epoch, epochs, stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n, elbo):
        self.done += n
        now = time.perf_counter()
        if self.quiet or now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        line = (f"epoch {self.epoch + 1}/{self.epochs} {self.done}/{self.total} "
                f"elbo {elbo:9.3f}  {rate:7.0f} ex/s  ETA {eta:5.1f} s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty and not self.quiet and self.last != self.start:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def column_mean_std(x, dtype=np.float64, chunk=10000):
    """Per-dimension mean and standard deviation of stored rows, in chunks (x may be memory-mapped, or data.Rows)."""
    s = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, x.shape[0], chunk):
        c = datasets.to_float(x[i:i + chunk], dtype)
        s[0][...] += c.sum(axis=0)
        c *= c   # in place: a chunk of float64 rows is 63 MB at D = 784
        s[1][...] += c.sum(axis=0)
    mean = s[0] / x.shape[0]
    return mean, np.sqrt(np.maximum(s[1] / x.shape[0] - mean * mean, 0.0))


def value_range(x, chunk=10000):
    """(min, max) of stored rows x (N, D) as floats, in chunks of rows (x may be memory-mapped)."""
    lo, hi = math.inf, -math.inf
    for i in range(0, x.shape[0], chunk):
        c = x[i:i + chunk]
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    return lo, hi


def init_output_bias(model, x):
    """Start the decoder at the data's mean: logit(mean) for Bernoulli (Burda et al. 2015)."""
    mean, std = column_mean_std(x)
    if model.likelihood == "bernoulli":
        p = np.clip(mean, 1e-3, 1 - 1e-3)
        model.params["dec.logits.b"][...] = np.log(p) - np.log1p(-p)
    else:
        model.params["dec.mean.b"][...] = mean
        if "dec.log_sigma.b" in model.params:
            model.params["dec.log_sigma.b"][...] = np.log(np.maximum(std, 1e-2))


HISTORY_KEYS = ("epoch", "lr", "beta", "train_elbo", "train_recon", "train_kl",
                "valid_elbo", "valid_recon", "valid_kl", "seconds", "examples_per_s")


def test_set(config, model, data_dir=None, seed=0):
    """The test images of a run with this TrainConfig, as the model sees them (all in memory: see test_rows)."""
    return np.asarray(test_rows(config, model, data_dir, seed))


def test_rows(config, model, data_dir=None, seed=0, dataset=None):
    """The test images of a run with this TrainConfig as PreparedRows: prepared a slice at a time, as read.

    Grey images under a Bernoulli model that trained on dynamic binarization are
    binarized once, with a generator seeded by seed, so that every evaluation
    of a run scores the same binary images. dataset: a .npy/.npz path (or a
    dataset's name) to evaluate instead of the run's own; its x_test, or all of
    a .npy's rows (which has no test split).
    """
    if dataset is None:
        data = datasets.load(config.dataset, data_dir or config.data_dir, seed=config.seed)
        if data.x_test.shape[0] == 0:
            raise ValueError(f"dataset {config.dataset} has no test split; evaluate the run on "
                             f"other data with --dataset PATH.npy")
        x = data.x_test
    else:
        data = datasets.load(dataset, data_dir or config.data_dir, seed=config.seed)
        x = data.x_test if data.x_test.shape[0] else data.x_train
        if data.dim != model.x_dim:
            raise ValueError(f"{dataset}: rows of D = {data.dim}, but the run's model takes D = {model.x_dim}")
        if model.likelihood == "bernoulli" and data.kind == "real":
            lo, hi = value_range(x)
            raise ValueError(f"{dataset}: values in [{lo:g}, {hi:g}], but the run's model is Bernoulli and "
                             "needs data in [0, 1]")
    prepare = make_prepare(config.binarize, config.threshold, model.likelihood, data.kind, model.dtype)
    return PreparedRows(x, prepare, prepare.noise(np.random.default_rng([seed, 4])))


def reference_step(model, optimizer, prepare, objective="elbo", k=1):
    """make_step's step(x, beta, rng, index=None, next_index=None) by the reference loop,

        loss, grads = model.loss_and_grads(x, rng=rng, ...)
        optimizer.step(grads)

    with x prepared from the stored rows x[index] as the engine prepares them
    (the same binarization draws) and the same draws of eps, so that both
    train the same way (tests/test_engine_step.py). -> (sum of log p(x|z) or
    of the bound, sum of KL, |grad|^2); a step whose loss or gradient is not
    finite changes nothing.
    """
    def step(x, beta, rng, index=None, next_index=None):
        rows = x if index is None else x[np.asarray(index)]
        if rows.shape[0] == 0:
            raise ValueError("a minibatch needs at least one row: x (or x[index]) has none")
        loss, grads, terms = model.loss_and_grads(prepare(rows, rng), rng=rng, k=k, beta=beta,
                                                  objective=objective, terms=True)
        g2 = sum(float(np.vdot(g, g)) for g in grads.values())
        if objective == "elbo":
            sums = float(np.sum(terms["log_px_z"], dtype=np.float64)), float(np.sum(terms["kl"], dtype=np.float64))
        else:
            sums = float(np.sum(terms["bound"], dtype=np.float64)), 0.0
        if math.isfinite(sums[0]) and math.isfinite(sums[1]) and math.isfinite(g2):
            optimizer.step(grads)
        return sums[0], sums[1], g2
    step.session = contextlib.nullcontext   # NumPy's BLAS keeps its threads
    step.close = lambda: None
    return step


class Trainer:
    """Trains a VAE as config says and keeps its run directory up to date.

    engine: "fast" (npvae.engine: FastVAE, FlatAdam and make_step's split
    step) or "reference" (npvae.model.VAE and npvae.optim.Adam in the loop
    of reference_step, on one Python thread). Both write the same kind of
    run directory, and in float64 the same numbers to rounding. None: "fast"
    for config.inference "amortized"; the per-datapoint and semi-amortized
    inner loops (npvae.inference) run on "reference" only (measured fast
    enough for demos/inference.py: an inner step of 784-200-200-50 costs
    half a full reference step).

    threads (the fast engine only): how many threads or processes share each
    minibatch (npvae.engine.parallel); "auto" is 2 where NumPy's OpenBLAS
    lets each thread keep to one BLAS thread, else 1. Runs with different
    counts agree to float rounding; a run resumed with the same count
    continues bit for bit. backend: "threads", or "processes" (helper
    processes, on Linux), or "auto": processes where they work. Both give
    the same numbers.
    """

    def __init__(self, config, out, quiet=False, stream=sys.stdout, threads="auto", backend="auto",
                 engine=None):
        self.config = config.validate()
        amortized = config.inference == "amortized"
        diagonal = config.posterior == "diagonal"   # FastVAE has the diagonal q only
        engine = ("fast" if amortized and diagonal else "reference") if engine is None else engine
        if not amortized and engine != "reference":
            raise ValueError(f"inference {config.inference!r} runs on engine 'reference' only, got engine {engine!r}")
        if not diagonal and engine != "reference":
            raise ValueError(f"posterior {config.posterior!r} runs on engine 'reference' only, got engine {engine!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
        self.engine = engine
        self.threads = parallel.resolve_threads(threads) if engine == "fast" else 1
        self.backend = parallel.resolve_backend(backend, self.threads)
        self.out = Path(out)
        self.quiet, self.stream = quiet, stream
        self.data = datasets.load(config.dataset, config.data_dir, seed=config.seed)
        self.likelihood = config.likelihood or self.data.likelihood
        n = self.data.x_train.shape[0]
        n_valid = config.n_valid if config.n_valid is not None else max(1, min(5000, n // 10))
        self.x_train, self.y_train, self.x_valid, self.y_valid = datasets.split_validation(
            self.data, n_valid, config.seed)
        # x_train and x_valid are data.Rows: indices into the stored rows, which stay where they
        # are (on disk, for a memory-mapped .npy); each minibatch reads its own rows
        if config.n_train is not None:
            self.x_train = self.x_train.subset(slice(None, config.n_train))
            self.y_train = None if self.y_train is None else self.y_train[:config.n_train]
        if config.batch_size > self.x_train.shape[0]:
            raise ValueError(f"batch_size ({config.batch_size}) is larger than the training set "
                             f"({self.x_train.shape[0]} examples)")
        if self.likelihood == "bernoulli" and self.data.kind == "real":
            lo, hi = value_range(self.x_train)
            if lo < 0 or hi > 1:
                raise ValueError(f"likelihood 'bernoulli' needs data in [0, 1]; {config.dataset} "
                                 f"has values in [{lo:g}, {hi:g}] (use --likelihood gaussian)")
        model_args = dict(x_dim=self.data.dim, hidden=config.hidden, z_dim=config.z_dim,
                          likelihood=self.likelihood, activation=config.activation,
                          dtype=np.dtype(config.dtype), seed=config.seed, x_sigma=config.x_sigma)
        if not diagonal:
            model_args["posterior"] = config.posterior
        prepare = make_prepare(config.binarize, config.threshold, self.likelihood, self.data.kind,
                               np.dtype(config.dtype))
        if config.layers is not None:
            # A HierarchicalVAE runs in reference_step's loop on one thread, on either engine: "fast"
            # gives it the engine's layers, Bernoulli kernel and FlatAdam (7% faster at k = 5, the
            # same numbers). One core runs an epoch of MNIST in 2.5 s (k = 1), 6 s (k = 5): enough
            # for the budgets (docs/results.md, "Two stochastic layers: the plan").
            from .engine.hierarchical import FastHierarchicalVAE
            from .hierarchical import HierarchicalVAE
            self.threads, self.backend = 1, "threads"
            model_args = {n: v for n, v in model_args.items() if n not in ("hidden", "z_dim")}
            if engine == "fast":
                self.model = FastHierarchicalVAE(**model_args, layers=config.layers)
                self.optimizer = FlatAdam(self.model.params, lr=config.lr)
            else:
                self.model = HierarchicalVAE(**model_args, layers=config.layers)
                self.optimizer = Adam(self.model.params, lr=config.lr)
            engine = "reference"   # the loop
        elif engine == "fast":
            self.model = FastVAE(**model_args, shared=self.backend == "processes")
            self.optimizer = FlatAdam(self.model.params, lr=config.lr)
        else:
            self.model = VAE(**model_args)
            self.optimizer = Adam(self.model.params, lr=config.lr)
        if config.init_bias:
            init_output_bias(self.model, self.x_train)
        if engine == "fast":
            self._step = make_step(self.model, self.optimizer, prepare, config.objective, config.k,
                                   self.threads, self.backend)
        else:
            self._step = reference_step(self.model, self.optimizer, prepare, config.objective, config.k)
        self.inference = None   # amortized: the encoder is the inference
        if not amortized:
            self.inference = inference_lib.Inference(config, self.model, self.x_train.shape[0],
                                                     self.x_valid.shape[0])
            self.optimizer = Adam(self.inference.trained_params(self.model), lr=config.lr)
            self._step = self.inference.make_step(self.model, self.optimizer, prepare)
        self.rng = np.random.default_rng([config.seed, 1])  # shuffling, binarization, eps
        # The validation set is binarized once, and scored with the same eps
        # every epoch, so that epochs are compared on equal terms.
        self.valid = prepare_batch(np.asarray(self.x_valid), config, self.likelihood, self.data.kind,
                                   self.model.dtype, np.random.default_rng([config.seed, 2]))
        self.epoch, self.step = 0, 0
        self.history = {k: [] for k in HISTORY_KEYS}
        self.perm, self.sums = None, np.zeros(3)  # an interrupted epoch's order and running sums
        self._interrupted = False
        self.signal = None   # the signal that interrupted run(), if one did (SIGINT when _on_sigint is called directly)

    # --- run directory --------------------------------------------------------------

    def run_config(self):
        """What goes into config.json."""
        return {"train": self.config.to_dict(), "model": self.model.config, "engine": self.engine,
                "data": {"name": self.data.name, "kind": self.data.kind, "dim": self.data.dim,
                         "image_shape": list(self.data.image_shape) if self.data.image_shape else None,
                         "n_train": int(self.x_train.shape[0]), "n_valid": int(self.x_valid.shape[0]),
                         "n_test": int(self.data.x_test.shape[0])}}

    def save(self, path):
        """Write the training state to path; a failed write raises checkpoint.WriteFailed."""
        extra = {}
        if self.perm is not None:
            extra = {"perm": self.perm, "sums": self.sums}
        if self.inference is not None:
            extra.update(self.inference.state_dict())   # the phi tables of a per-datapoint run
        try:
            ckpt.save_state(path, self.model, self.optimizer, self.rng, self.epoch, self.step,
                            self.history, extra)
        except OSError as e:   # the previous file at path is still whole (atomic_write)
            raise ckpt.write_failed(path, e, self.out) from None

    @classmethod
    def resume(cls, run, epochs=None, quiet=False, stream=sys.stdout, data_dir=None, threads="auto",
               backend="auto", engine=None):
        """A Trainer in the state of run/checkpoint.npz; epochs may extend the run.

        engine: None takes the run's own (config.json's "engine"; "fast" for runs
        that predate it), so that a resumed run continues bit for bit; another
        engine continues it to rounding.
        """
        run = Path(run)
        if not (run / ckpt.CONFIG).is_file():
            raise FileNotFoundError(f"{run} is not a run directory (no {ckpt.CONFIG})")
        saved = ckpt.read_json(run / ckpt.CONFIG)
        config = TrainConfig.from_dict(saved["train"])
        engine = saved.get("engine", "fast") if engine is None else engine
        if epochs is not None:
            config.epochs = epochs
        if data_dir is not None:
            config.data_dir = str(data_dir)
        state = ckpt.read_run_state(run, ckpt.LATEST, "copy it to {other.parent}/" + ckpt.LATEST
                                    + " to resume from the end of epoch {epoch}")
        trainer = cls(config, run, quiet=quiet, stream=stream, threads=threads, backend=backend, engine=engine)
        path = run / ckpt.LATEST
        ckpt.restore_params(trainer.model, state, path)
        trainer.optimizer.load_state_dict(ckpt.optimizer_state_of(state))
        trainer.rng = ckpt.restore_rng(state, path)
        trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
        history = ckpt.history_of(state)
        trainer.history = {k: history.get(k, []) for k in HISTORY_KEYS}
        if "extra/perm" in state:
            trainer.perm, trainer.sums = state["extra/perm"], state["extra/sums"].astype(np.float64)
        if trainer.inference is not None:
            trainer.inference.load_state_dict(state, path)
        return trainer

    # --- training -----------------------------------------------------------------------

    def log(self, message):
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def _on_sigint(self, signum, frame):
        # Finish the current step, then save: a half-applied Adam step would
        # make the checkpoint match no real point of the run. The handler only
        # sets flags, so a second signal during the save cannot cut it short.
        self._interrupted = True
        self.signal = signum if self.signal is None else self.signal   # the first one decides the status

    def run(self, until=None):
        """Train until config.epochs (or early stopping); returns 'done', 'stopped early' or 'interrupted'.

        until: stop after that many epochs instead (the schedule still spans config.epochs),
        so that a caller can look at the model between stages and then call run() again.
        Raises checkpoint.RunInUse while another process trains the same run directory, and
        checkpoint.WriteFailed when a file cannot be written (the checkpoint before it stays whole).
        """
        c = self.config
        last = c.epochs if until is None else min(int(until), c.epochs)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ckpt.write_failed(self.out, e, self.out) from None
        with ckpt.RunLock(self.out):   # refused (RunInUse) while another process trains this run
            try:
                ckpt.write_json(self.out / ckpt.CONFIG, self.run_config())
            except OSError as e:
                raise ckpt.write_failed(self.out / ckpt.CONFIG, e, self.out) from None
            return self._run(last)

    def _run(self, last):
        c = self.config
        previous = {}
        try:
            for s in STOP_SIGNALS:
                previous[s] = signal.getsignal(s)
                signal.signal(s, self._on_sigint)
        except ValueError:  # not the main thread: signal handling stays as it was
            previous = {}
        try:   # the step's helpers end with the run: a forked helper holds what it shares with us
            while self.epoch < last:
                if self._stop_early():
                    self.log(f"stopping early: no better validation ELBO for {c.patience} epochs")
                    return "stopped early"
                if not self._train_epoch():
                    self.save(self.out / ckpt.LATEST)
                    by = "" if self.signal is None else f" by {signal.Signals(self.signal).name}"
                    self.log(f"interrupted{by} in epoch {self.epoch + 1} at step {self.step}; saved "
                             f"{self.out / ckpt.LATEST}; continue with: npvae train --resume {self.out}")
                    return "interrupted"
            return "done"
        finally:
            self._step.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_early(self):
        v = self.history["valid_elbo"]
        if self.config.patience is None or len(v) <= self.config.patience:
            return False
        return int(np.argmax(v)) < len(v) - self.config.patience

    def _train_epoch(self):
        """One pass over the training set; False if interrupted (state is saved by the caller)."""
        c, opt = self.config, self.optimizer
        n = self.x_train.shape[0]
        steps = math.ceil(n / c.batch_size)
        if self.perm is None:
            self.perm, self.sums, self.step = self.rng.permutation(n), np.zeros(3), 0
        opt.lr = learning_rate(c, self.epoch)
        progress = Progress(n, self.epoch, c.epochs, quiet=self.quiet)
        start = time.perf_counter()
        done_before = min(self.step * c.batch_size, n)
        with self._step.session():
            while self.step < steps:
                if self._interrupted:
                    progress.close()
                    return False
                idx = self.perm[self.step * c.batch_size:(self.step + 1) * c.batch_size]
                beta = kl_weight(c, self.epoch, self.step, steps)
                after = self.perm[(self.step + 1) * c.batch_size:(self.step + 2) * c.batch_size]
                rec, kl, g2 = self._step(self.x_train, beta, self.rng, index=idx,
                                         next_index=after if after.size else None)
                if not (math.isfinite(rec) and math.isfinite(kl) and math.isfinite(g2)):
                    progress.close()
                    raise TrainingDiverged(
                        f"non-finite {'loss' if math.isfinite(g2) else 'gradient'} in epoch {self.epoch + 1}, "
                        f"step {self.step + 1}; the last good checkpoint is {self.out / ckpt.LATEST}")
                self.sums += rec, kl, len(idx)
                self.step += 1
                progress.update(len(idx), (self.sums[0] - self.sums[1]) / self.sums[2])
        progress.close()
        seconds = time.perf_counter() - start
        self._end_epoch(seconds, (n - done_before) / max(seconds, 1e-9), kl_weight(c, self.epoch, steps, steps))
        return True

    def _end_epoch(self, seconds, rate, beta):
        c = self.config
        recon, kl = self.sums[0] / self.sums[2], self.sums[1] / self.sums[2]
        rng = np.random.default_rng([c.seed, 3])
        valid = (elbo_stats(self.model, self.valid, rng) if self.inference is None
                 else self.inference.valid_stats(self.model, self.valid, rng))   # with the run's own inference
        row = dict(epoch=self.epoch + 1, lr=self.optimizer.lr, beta=beta, train_elbo=recon - kl,
                   train_recon=recon, train_kl=kl, valid_elbo=valid["elbo"], valid_recon=valid["recon"],
                   valid_kl=valid["kl"], seconds=seconds, examples_per_s=rate)
        for k in HISTORY_KEYS:
            self.history[k].append(float(row[k]))
        self.epoch, self.step, self.perm = self.epoch + 1, 0, None
        is_best = valid["elbo"] >= max(self.history["valid_elbo"])
        self.save(self.out / ckpt.LATEST)
        if is_best:
            self.save(self.out / ckpt.BEST)
        what = "bound" if c.objective == "iwae" else "elbo"
        self.log(f"epoch {self.epoch:3d}/{c.epochs}  train {what} {row['train_elbo']:9.3f} "
                 f"(recon {recon:9.3f}, kl {kl:7.3f})  valid elbo {valid['elbo']:9.3f}  "
                 f"lr {row['lr']:.2e}  {seconds:6.1f} s  {rate:6.0f} ex/s{'  *' if is_best else ''}")
