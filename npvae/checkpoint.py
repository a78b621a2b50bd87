"""Run directories and checkpoints: plain NumPy .npz and JSON, never pickle.

A run directory holds
    config.json      the training configuration and the model's constructor arguments
    checkpoint.npz   the latest state: parameters, optimizer state, RNG state,
                     epoch and step, history (written every epoch, and on Ctrl-C)
    best.npz         the same, at the best validation ELBO so far

Every write goes to a temporary file in the same directory, is flushed and
fsync'ed, then renamed over the old file, so a crash during a write leaves the
previous checkpoint whole. Every read uses allow_pickle=False, so no file can
make npvae run code.
"""
import json
import os
import tempfile
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

CONFIG = "config.json"
LATEST = "checkpoint.npz"
BEST = "best.npz"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used (missing, corrupt or mismatched)."""


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


def atomic_write(path, write):
    """Call write(file object) on a temporary file, then rename it to path once it is on disk."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
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
    for key in ("x_dim", "hidden", "z_dim", "layers", "likelihood", "activation", "dtype", "x_sigma"):
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
