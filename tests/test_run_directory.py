"""What full disks, missing permissions, removed directories and two trainers at once do to a run.

A write that fails ends `npvae train` with one line naming the file and the last whole
checkpoint, exit status 1, and no temporary file; a run directory has one writer at a time
(checkpoint.RunLock), and a lock left by a dead process never blocks a resume.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from npvae import checkpoint as ckpt
from npvae.cli import main
from npvae.train import TrainConfig, Trainer

ARGS = ["train", "--dataset", "shapes", "--epochs", "3", "--n-train", "300", "--n-valid", "100",
        "--hidden", "16", "--z-dim", "2", "--batch-size", "50", "--no-plots", "--quiet"]
LONG = [sys.executable, "-m", "npvae", "train", "--epochs", "1000", "--hidden", "32", "--z-dim", "3",
        "--n-train", "2000", "--n-valid", "100", "--no-plots"]
needs_flock = pytest.mark.skipif(ckpt.fcntl is None, reason="no fcntl here: runs are not locked")


def leftovers(run):
    return sorted(p.name for p in Path(run).iterdir() if p.name.endswith(".tmp"))


def wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def fail_from_call(n, error):
    """A replacement for a function: calls 1 .. n-1 go through, every later one raises error."""
    def patch(real):
        calls = []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) >= n:
                raise error
            return real(*args, **kwargs)
        return wrapper
    return patch


# Each fault at the write of epoch 2's checkpoint: config.json, checkpoint.npz and best.npz of
# epoch 1 went through (three files made by mkstemp, fsync'ed with their directory and renamed;
# two of them written by np.savez).
FAULTS = {
    "ENOSPC in the data": (np, "savez", 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    "EACCES creating the file": (tempfile, "mkstemp", 4, PermissionError(errno.EACCES, os.strerror(errno.EACCES))),
    "EROFS at the rename": (os, "replace", 4, OSError(errno.EROFS, os.strerror(errno.EROFS))),
    "EIO at fsync": (os, "fsync", 7, OSError(errno.EIO, os.strerror(errno.EIO))),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_write_is_one_line_exit_1_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, fault):
    module, name, n, error = FAULTS[fault]
    monkeypatch.setattr(module, name, fail_from_call(n, error)(getattr(module, name)))
    run = tmp_path / "run"
    assert main([*ARGS, "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    code = errno.errorcode[error.errno]
    assert err.startswith(f"npvae train: error: could not write {run / 'checkpoint.npz'}: ") and f"[{code}]" in err
    assert f"the last whole checkpoint is {run / 'checkpoint.npz'} (epoch 1, step 0)" in err
    monkeypatch.undo()
    assert leftovers(run) == []
    assert int(ckpt.read_state(run / "checkpoint.npz")["epoch"]) == 1
    assert main(["train", "--resume", str(run), "--no-plots", "--quiet"]) == 0   # and it goes on


def test_a_failed_best_checkpoint_names_the_latest_as_the_last_whole_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt.save_state

    def save_state(path, *args, **kwargs):
        if Path(path).name == ckpt.BEST and (Path(path).parent / ckpt.BEST).exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(ckpt, "save_state", save_state)
    assert main([*ARGS, "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"could not write {run / 'best.npz'}" in err
    assert f"the last whole checkpoint is {run / 'checkpoint.npz'} (epoch 2, step 0)" in err


def test_a_run_directory_removed_under_a_running_job(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([*LONG, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoint.npz")
    while run.exists():   # a file being written as we remove the others can stop rmtree once
        shutil.rmtree(run, ignore_errors=True)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    lines = [line for line in err.splitlines() if "Traceback" in line or "error" in line]
    assert len(lines) == 1, err
    written = lines[0].split("could not write ")[1].split(":")[0]
    assert written in (str(run / "checkpoint.npz"), str(run / "best.npz"))   # best.npz: removed between the two
    assert lines[0] == (f"npvae train: error: could not write {written}: No such file or directory [ENOENT]; "
                        f"no checkpoint is left: the run directory {run} is gone"), err
    assert not run.exists()


def test_an_unwritable_run_directory_at_the_start(tmp_path, monkeypatch, capsys):
    # as root, a read-only directory is still writable, so the refusal is made where the OS would make it
    monkeypatch.setattr(Path, "mkdir", fail_from_call(1, PermissionError(errno.EACCES, "Permission denied"))(Path.mkdir))
    assert main([*ARGS, "--out", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert err == f"npvae train: error: could not write {tmp_path / 'new'}: Permission denied [EACCES]; nothing was written\n"


def test_checkpoints_get_the_mode_of_any_new_file(tmp_path):
    Trainer(TrainConfig(dataset="shapes", epochs=1, batch_size=50, hidden=(8,), z_dim=2, n_train=100,
                        n_valid=50), tmp_path / "r", quiet=True).run()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "checkpoint.npz", "best.npz"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --- one writer per run directory ------------------------------------------------------------

@needs_flock
def test_a_held_lock_refuses_a_second_trainer_and_it_writes_nothing(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    config = TrainConfig(dataset="shapes", epochs=1, batch_size=50, hidden=(8,), z_dim=2, n_train=100, n_valid=50)
    with ckpt.RunLock(run):
        with pytest.raises(ckpt.RunInUse, match=rf"{run} is in use by process {os.getpid()} on "):
            Trainer(config, run, quiet=True).run()
        assert sorted(p.name for p in run.iterdir()) == ["lock"]
    assert (run / "lock").read_bytes() == b""        # released: no holder named
    assert Trainer(config, run, quiet=True).run() == "done"


@needs_flock
def test_two_trainers_racing_for_one_run(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([*LONG, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoint.npz")
    second = subprocess.run([sys.executable, "-m", "npvae", "train", "--resume", str(run), "--no-plots"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr == (f"npvae train: error: {run} is in use by process {first.pid} on {os.uname().nodename}; "
                             f"wait for it to end, or stop it with kill -TERM {first.pid}, which saves its "
                             f"checkpoint, then continue with --resume {run}\n")
    first.send_signal(signal.SIGTERM)   # the first is untouched: it stops, saves and exits as it would
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143, err
    assert (run / "lock").read_bytes() == b""   # and the lock is free (a resume after it: test_train's signal test)


HOLD = textwrap.dedent("""
    import os, sys, time
    from npvae import checkpoint as ckpt
    lock = ckpt.RunLock(sys.argv[1]).acquire()
    if os.fork() == 0:          # a helper, as the engine forks them: it must not keep the run locked
        os.write(1, b"helper\\n")   # fork() has returned here, so the at-fork hooks have run
        time.sleep(60)
        os._exit(0)
    os.write(1, b"held\\n")      # one write each: the two lines do not interleave
    time.sleep(60)
""")


@needs_flock
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_lock_left_by_a_killed_process_and_its_live_helper_does_not_block(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert sorted([p.stdout.readline(), p.stdout.readline()]) == ["held\n", "helper\n"]
        with pytest.raises(ckpt.RunInUse, match=f"process {p.pid} "):
            ckpt.RunLock(run).acquire()
        p.kill()    # SIGKILL: no cleanup; the forked child lives on
        p.wait()
        with ckpt.RunLock(run) as lock:
            assert lock.fd is not None
            assert (run / "lock").read_text().split()[0] == str(os.getpid())
    finally:
        p.kill()
        subprocess.run(["pkill", "-f", str(run)], check=False)   # the orphaned child
