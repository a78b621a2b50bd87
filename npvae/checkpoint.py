"""Run directories and checkpoints: plain NumPy .npz and JSON, never pickle.

A run directory holds
    config.json      the training configuration and the model's constructor arguments
    checkpoint.npz   the latest state: parameters, optimizer state, RNG state,
                     epoch and step, history (written every epoch, and on Ctrl-C)
    best.npz         the same, at the best validation ELBO so far
    lock             who is training the run (see RunLock): one writer per run directory

Every write goes to a temporary file in the same directory, is flushed and
fsync'ed, then renamed over the old file, so a crash during a write leaves the
previous checkpoint whole. Every read uses allow_pickle=False, so no file can
make npvae run code. A write that fails (a full disk, no permission, a
read-only file system, the directory removed) raises WriteFailed, whose one
line names the file and the run's last whole checkpoint.
"""
import contextlib
import errno
import json
import os
import socket
import tempfile
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

CONFIG = "config.json"
LATEST = "checkpoint.npz"
BEST = "best.npz"
LOCK = "lock"
FORMAT_VERSION = 1

try:
    import fcntl   # POSIX: Linux and macOS
except ImportError:   # Windows: no lock (RunLock says so)
    fcntl = None


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used (missing, corrupt or mismatched)."""


class WriteFailed(Exception):
    """A file of a run could not be written; the message names it and the run's last whole checkpoint."""


class RunInUse(Exception):
    """Another process holds the run directory's lock."""


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode():
    """The mode open() gives a new file: 0o666 less the umask (mkstemp's own 0o600 would hide runs from others)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    """Call write(file object) on a temporary file, then rename it to path once it is on disk."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):   # the directory may be gone: then so is tmp
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_json(path):
    """Read a JSON file, with an error that names it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None


def save_state(path, model, optimizer=None, rng=None, epoch=0, step=0, history=None, extra=None):
    """Write a checkpoint .npz atomically.

    history: dict name -> list of per-epoch numbers. extra: dict name -> array
    (e.g. the permutation of an interrupted epoch).
    """
    arrays = {"format_version": np.int64(FORMAT_VERSION),
              "model_config": np.array(json.dumps(model.config)),
              "epoch": np.int64(epoch), "step": np.int64(step)}
    for name, p in model.params.items():
        arrays["params/" + name] = p
    if optimizer is not None:
        arrays["optimizer_type"] = np.array(type(optimizer).__name__)
        for key, value in optimizer.state_dict().items():
            arrays["optimizer/" + key] = value
    if rng is not None:
        arrays["rng_state"] = np.array(json.dumps(rng.bit_generator.state))
    for name, values in (history or {}).items():
        arrays["history/" + name] = np.asarray(values, dtype=np.float64)
    for name, value in (extra or {}).items():
        arrays["extra/" + name] = np.asarray(value)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def read_state(path):
    """Read a checkpoint into a dict of arrays, refusing anything truncated, corrupt or pickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            state = {k: f[k] for k in f.files}
    # a flipped byte can reach zipfile as a bad offset (BadZipFile, EOFError, struct.error), an
    # unknown compression method (NotImplementedError) or the encryption flag (RuntimeError)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, NotImplementedError, RuntimeError,
            struct.error, zlib.error) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    for key in ("format_version", "model_config", "epoch", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} is not an npvae checkpoint (no {key!r})")
    if int(state["format_version"]) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {int(state['format_version'])}, "
                              f"expected {FORMAT_VERSION}")
    return state


def read_run_state(run, name, hint):
    """read_state(run/name); when that file is damaged and the run's other checkpoint is whole, the
    one-line error says so, with hint ("... {other} ... {epoch} ...") telling how to use the other."""
    run = Path(run)
    try:
        return read_state(run / name)
    except CheckpointError as e:
        other = run / (BEST if name == LATEST else LATEST)
        try:
            epoch = int(read_state(other)["epoch"])
        except (CheckpointError, FileNotFoundError):
            raise e from None
        raise CheckpointError(f"{e}; {other} is whole (epoch {epoch}): "
                              + hint.format(other=other, epoch=epoch)) from None


def last_whole_checkpoint(run):
    """(path, epoch, step) of the run's newest checkpoint that reads back whole, or None."""
    whole = []
    for name in (LATEST, BEST):
        try:
            state = read_state(Path(run) / name)
        except (CheckpointError, OSError):
            continue
        whole.append((int(state["epoch"]), int(state["step"]), Path(run) / name))
    if not whole:
        return None
    epoch, step, path = max(whole, key=lambda w: w[:2])
    return path, epoch, step


def write_failed(path, error, run):
    """The WriteFailed for an OSError met while writing path, a file of the run directory run."""
    code = errno.errorcode.get(error.errno, "")
    why = f"{error.strerror or error}" + (f" [{code}]" if code else "")
    whole = last_whole_checkpoint(run)
    if whole is not None:
        where = (f"the last whole checkpoint is {whole[0]} (epoch {whole[1]}, step {whole[2]}); "
                 f"continue with: npvae train --resume {run}")
    elif Path(path) == Path(run):
        where = "nothing was written"
    elif not Path(run).is_dir():
        where = f"no checkpoint is left: the run directory {run} is gone"
    else:
        where = f"no whole checkpoint of {run} has been written"
    return WriteFailed(f"could not write {path}: {why}; {where}")


_HELD_LOCKS = set()   # descriptors of the RunLocks this process holds


def _close_held_locks():
    # A forked helper gets copies of the descriptors. Closing the copy leaves the parent's lock as it
    # is (an flock belongs to the open file, and the parent still has it open), and means a helper
    # that outlives a killed parent for a moment cannot keep the run locked.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


class RunLock:
    """One writer per run directory: an exclusive flock on run/lock while a Trainer runs.

    The lock belongs to the process: the OS drops it when the process ends, however
    it ends (SIGKILL included), so a lock left by a dead process never blocks a
    resume, and there is no stale file to delete. The file holds the holder's pid
    and host, for the message that refuses a second trainer. Where fcntl does not
    exist (Windows), or the file system has no locks, runs are not locked.
    """

    def __init__(self, run):
        self.run = Path(run)
        self.path = self.run / LOCK
        self.fd = None

    def acquire(self):
        if self.fd is not None or fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_failed(self.path, e, self.run) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return self   # ENOLCK, EOPNOTSUPP: a file system without locks
            pid, host = (holder + ["?", "?"])[:2]
            raise RunInUse(f"{self.run} is in use by process {pid} on {host}; "
                           f"wait for it to end, or stop it with kill -TERM {pid}, which saves its "
                           f"checkpoint, then continue with --resume {self.run}") from None
        with contextlib.suppress(OSError):   # a full disk: the lock holds, the message lacks the pid
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def release(self):
        if self.fd is not None:
            _HELD_LOCKS.discard(self.fd)
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)   # no pid in the file while nobody holds it
            os.close(self.fd)   # closing the last descriptor of the open file drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def model_config_of(state, path=""):
    """The model constructor's arguments stored in a checkpoint."""
    try:
        return json.loads(str(state["model_config"]))
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: unreadable model_config") from None


def restore_params(model, state, path=""):
    """Copy a checkpoint's parameters into model, after checking they match exactly."""
    saved = model_config_of(state, path)
    ours = model.config
    # a checkpoint from before posterior families was written by a diagonal q
    saved, ours = {"posterior": "diagonal", **saved}, {"posterior": "diagonal", **ours}
    for key in ("x_dim", "hidden", "z_dim", "layers", "likelihood", "activation", "dtype", "x_sigma", "posterior"):
        if saved.get(key) != ours.get(key):   # "layers": a HierarchicalVAE's; "hidden", "z_dim": a VAE's
            raise CheckpointError(f"checkpoint {path} was saved with {key}={saved.get(key)!r}, "
                                  f"but the model has {key}={ours.get(key)!r}")
    arrays = {}
    for name, p in model.params.items():
        a = state.get("params/" + name)
        if a is None:
            raise CheckpointError(f"checkpoint {path} has no parameter {name!r}")
        if a.shape != p.shape or a.dtype != p.dtype:
            raise CheckpointError(f"checkpoint {path}: parameter {name!r} is {a.dtype}{a.shape}, "
                                  f"expected {p.dtype}{p.shape}")
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"checkpoint {path}: parameter {name!r} holds NaN or infinite values")
        arrays[name] = a
    # Copy only once everything has been checked, so a refused checkpoint changes nothing.
    for name, a in arrays.items():
        model.params[name][...] = a


def restore_rng(state, path=""):
    """A numpy Generator in the state stored in the checkpoint."""
    try:
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(state["rng_state"]))
        return rng
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unusable RNG state ({e})") from None


def history_of(state):
    """dict name -> list of per-epoch values."""
    return {k[len("history/"):]: v.tolist() for k, v in state.items() if k.startswith("history/")}


def optimizer_state_of(state):
    """The optimizer's state_dict as stored."""
    return {k[len("optimizer/"):]: v for k, v in state.items() if k.startswith("optimizer/")}


def load(run, which="best"):
    """The trained VAE (or HierarchicalVAE) of a run directory; which = "best" (by validation ELBO) or "latest"."""
    from .model import VAE
    run = Path(run)
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    path = run / (BEST if which == "best" else LATEST)
    state = read_run_state(run, path.name, "load it with which='" + ("latest" if which == "best" else "best")
                           + "' (npvae eval --which " + ("latest" if which == "best" else "best") + ")")
    config = model_config_of(state, path)
    if "layers" in config:   # written by npvae.hierarchical.HierarchicalVAE.config
        from .hierarchical import HierarchicalVAE
        model = HierarchicalVAE(**config)
    else:
        model = VAE(**config)
    restore_params(model, state, path)
    return model
