"""Data-parallel training steps on several cores, with plain Python threads.

NumPy's element-wise operations (activations, the likelihood, Adam) run on
one core, and the matrix products of a VAE's minibatch are too small for
OpenBLAS's own threads to gain much. So a step splits the minibatch instead
(npvae.engine.step.make_step):

    thread j:  forward and backward on rows [a_j, b_j) of the batch, with
               upstream gradient -1/B per row (B the whole batch), by its
               own replica (model.replica()), which writes each layer's
               input x and local gradient da into those rows of one
               whole-batch SplitBatch (npvae.engine.model), not weight gradients
    thread j:  the weight gradients dW = x^T da, db = sum of da over the
               whole batch, on range j of the flat gradient buffer
               (model.grad_ranges: whole rows of each weight matrix)
    thread j:  the optimizer's update on range j of the flat parameter buffer

Each weight gradient is the same sum over the batch as one thread's, so a
step agrees with the serial one to float rounding; for a given number of
threads every run is bit for bit reproducible (the split does not depend on
timing). NumPy releases the GIL inside its loops and BLAS calls, which is
what lets the threads overlap. While the threads run, OpenBLAS is asked for one
BLAS thread (openblas_set_num_threads_local, OpenBLAS >= 0.3.27), so the
threads do not also start BLAS's pool; without that control `threads="auto"`
stays on one thread. SciPy's BLAS (scipy.linalg.blas, whose axpy FlatAdam uses)
is an OpenBLAS of its own, with its own pool, and is held to one thread too.
In NumPy's pthreads build of OpenBLAS that setting is not per thread but the
process's, so Workers.run sets it before handing out work and puts the old
count back only when every thread has finished.

Threads share one interpreter lock (the GIL). Each thread takes it back
after every NumPy call, so two threads that each make a few hundred small
calls per step keep waiting for each other, and every wait puts a thread to
sleep. Processes has no such lock to share: it forks helper processes that
see the model's buffers in shared memory (shared_zeros), and hands them
work, and they their results, through POSIX semaphores, which order memory
on every processor (x86-64 and arm64 alike), and which a waiting process
tries without blocking for a while before it sleeps on them (Processes
below). A step on processes is one task, the three phases above with a
barrier between each two (allgather), where the processes swap the figures
the next phase needs: one hand-off a step instead of three. Processes need
Linux (fork); elsewhere "auto" trains on threads (resolve_backend).
"""
import ctypes
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref

import numpy as np

_BLAS = []  # [[(set_local, get or None), ...]]: every OpenBLAS found, NumPy's first; found once
_GET_NAMES = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
              "scipy_openblas_get_num_threads")


def _find_blas():
    """[(openblas_set_num_threads_local, openblas_get_num_threads or None)] of each OpenBLAS loaded.

    Looks among the libraries the process has loaded (Linux: /proc/self/maps),
    NumPy's first. SciPy ships an OpenBLAS of its own, with its own pool of
    threads, for scipy.linalg.blas (whose axpy FlatAdam uses): it is loaded here
    first, so that both are found and held to one thread together.
    """
    if _BLAS:
        return _BLAS[0]
    import scipy.linalg.blas  # noqa: F401  (loads SciPy's OpenBLAS)
    found = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        paths = set()
    for path in sorted(paths, key=lambda p: ("numpy" not in p, p)):
        try:
            lib = ctypes.CDLL(path)
            set_local = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
        get = next((getattr(lib, name) for name in _GET_NAMES if hasattr(lib, name)), None)
        if get is not None:
            get.argtypes, get.restype = [], ctypes.c_int
        found.append((set_local, get))
    _BLAS.append(found)
    return found


def blas_local_threads():
    """openblas_set_num_threads_local(n) -> previous n of NumPy's OpenBLAS (the first found), or None."""
    found = _find_blas()
    return found[0][0] if found else None


def _set_blas_threads(counts):
    """Set each OpenBLAS found to its count (an int for all); -> the previous counts."""
    found = _find_blas()
    counts = [counts] * len(found) if isinstance(counts, int) else counts
    return [set_local(n) for (set_local, _), n in zip(found, counts)]


_held = threading.local()   # .depth: how many one_blas_thread blocks this thread is in


class one_blas_thread:
    """with one_blas_thread(): within the block, OpenBLAS uses one thread (where it can be told);
    the old count comes back after.

    Every OpenBLAS found (NumPy's and SciPy's) is held. In NumPy's build the
    count is the whole process's, so the block must cover everything that
    should run on one BLAS thread. A block inside another costs next to
    nothing: the outer one holds the count already (a training epoch holds
    it once for all its steps, see make_step's step.session). A class, not
    a generator with contextlib: a training step enters one, and this is
    cheaper. Each with statement takes a one_blas_thread() of its own.
    """
    __slots__ = ("_depth", "_previous")

    def __enter__(self):
        self._depth = depth = getattr(_held, "depth", 0)
        self._previous = _set_blas_threads(1) if depth == 0 else None
        _held.depth = depth + 1

    def __exit__(self, *exc_info):
        _held.depth = self._depth
        if self._previous is not None:
            _set_blas_threads(self._previous)


def blas_threads():
    """The number of threads NumPy's OpenBLAS would use now (openblas_get_num_threads), or None if unknown."""
    counts = blas_thread_counts()
    return counts[0] if counts else None


def blas_thread_counts():
    """The thread count of every OpenBLAS found (NumPy's first), None where it cannot be read."""
    return [None if get is None else int(get()) for _, get in _find_blas()]


def usable_cpus():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_threads(threads):
    """'auto' -> min(2, usable CPUs) where OpenBLAS's per-thread control exists, else 1; an int >= 1 as is."""
    if threads == "auto" or threads is None:
        return min(2, usable_cpus()) if blas_local_threads() is not None else 1
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
    return int(threads)


def _worker(tasks, results):
    first = True
    while True:
        fn = tasks.get()
        if fn is None:
            return
        if first:
            # Where the setting is per thread, this helper's own; where it is the process's,
            # run() has set it already, and this happens while it holds.
            _set_blas_threads(1)
            first = False
        try:
            results.put((True, fn()))
        except BaseException as e:  # handed to the caller, who re-raises it
            results.put((False, e))


class Workers:
    """n - 1 helper threads; run(fns) calls fns[0] here and fns[j] on helper j, all at once.

    The helpers stop when the Workers object is garbage collected or close() is called.
    """

    def __init__(self, n):
        self.n = n
        _find_blas()  # before any helper thread looks
        self._queues = [(queue.SimpleQueue(), queue.SimpleQueue()) for _ in range(n - 1)]
        for tasks, results in self._queues:
            threading.Thread(target=_worker, args=(tasks, results), daemon=True).start()
        self._finalizer = weakref.finalize(self, _stop, [tasks for tasks, _ in self._queues])

    def run(self, fns):
        """[f_0, ..., f_{n-1}] -> [f_0(), ..., f_{n-1}()], computed concurrently; re-raises the first error."""
        if len(fns) != self.n:
            raise ValueError(f"run needs {self.n} functions, got {len(fns)}")
        # the old count comes back only once every thread is done: the setting may be the whole process's
        with one_blas_thread():
            for (tasks, _), fn in zip(self._queues, fns[1:]):
                tasks.put(fn)
            try:
                first = (True, fns[0]())
            except BaseException as e:
                first = (False, e)
            out = [first] + [results.get() for _, results in self._queues]
        for ok, value in out:
            if not ok:
                raise value
        return [value for _, value in out]

    def close(self):
        self._finalizer()


def _stop(task_queues):
    for tasks in task_queues:
        tasks.put(None)


def split(n, parts, align=1):
    """Boundaries 0 = c_0 <= c_1 <= ... <= c_parts = n of nearly equal pieces, inner ones multiples of align."""
    cuts = [0]
    for j in range(1, parts):
        cuts.append(min(n, (n * j // parts) // align * align))
    return cuts + [n]


def ranges(n, parts, align=1):
    """[(start, stop), ...]: the pieces of range(n) that split(n, parts, align) cuts, in order."""
    cuts = split(n, parts, align)
    return list(zip(cuts, cuts[1:]))


# --- helper processes -------------------------------------------------------------------

def aligned_zeros(n, dtype, shared=False, alignment=64):
    """A zeroed 1-D array of n elements whose data starts on an `alignment`-byte boundary.

    shared: in anonymous shared memory, which a process forked after it is
    made (Processes) reads and writes too, where an ordinary array would be
    copied on write.
    """
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize + alignment
    raw = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8) if shared else np.zeros(size, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + n * dtype.itemsize].view(dtype)


def shared_zeros(n, dtype, alignment=64):
    """aligned_zeros in shared memory."""
    return aligned_zeros(n, dtype, shared=True, alignment=alignment)


def is_shared(a):
    """True if array a lives in memory from shared_zeros (or another shared mapping)."""
    while isinstance(a, np.ndarray):
        a = a.base
    if isinstance(a, memoryview):   # np.frombuffer's base
        a = a.obj
    return isinstance(a, mmap.mmap)


def _why_no_processes():
    """Why Processes cannot work here (a phrase), or None where it can."""
    if sys.platform == "darwin":
        return ("on macOS processes start by spawn, and a fork of a process that has used "
                "Accelerate (NumPy's BLAS there) is not safe")
    if sys.platform == "win32":
        return "Windows has no fork"
    if not sys.platform.startswith("linux"):
        return f"{sys.platform} is not Linux"
    if not hasattr(os, "fork"):
        return "this Python has no os.fork"
    return _semaphore_problem()


_SEMAPHORE_PROBE = []   # [None, or why a semaphore could not be made]: probed once a process


def _semaphore_problem():
    """None if this process can make a POSIX semaphore, else why not (a container without a
    writable /dev/shm cannot)."""
    if not _SEMAPHORE_PROBE:
        try:
            multiprocessing.get_context("fork").Semaphore(0)
            _SEMAPHORE_PROBE.append(None)
        except OSError as e:
            _SEMAPHORE_PROBE.append(f"no POSIX semaphore can be made here ({e})")
    return _SEMAPHORE_PROBE[0]


def processes_available():
    """True where Processes works: Linux with os.fork, on any processor.

    Every hand-off between the processes goes through a POSIX semaphore,
    whose post and wait order memory on every processor (see Processes).
    macOS (spawn by default, and fork unsafe after Accelerate) and Windows
    (no fork) train on threads instead.
    """
    return _why_no_processes() is None


BACKENDS = ("auto", "threads", "processes")
_fallback_said = [False]   # whether resolve_backend has said (once a process) that 'auto' means threads here


def resolve_backend(backend, threads=None):
    """'auto' -> 'processes' where processes_available(), else 'threads' (saying why, once); the others as they are.

    threads: the resolved count (resolve_threads); with 1 there is nothing
    to split, and the answer is 'threads' whatever was asked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if threads == 1:
        return "threads"
    if processes_available():
        return "processes" if backend == "auto" else backend
    why = _why_no_processes() or "helper processes are not available here"
    if backend == "processes":
        raise ValueError(f"backend 'processes' needs Linux with os.fork: {why} (use backend='threads')")
    if backend == "auto" and not _fallback_said[0]:
        _fallback_said[0] = True
        warnings.warn(f"backend 'auto' trains on threads, not helper processes: {why}", RuntimeWarning,
                      stacklevel=2)
    return "threads"


# The words of a control row (int64). Data, published by a semaphore:
# SEQ, TASK, NARGS are the main process's, written before it posts start[j],
# so helper j reads them after taking it; STATUS (1: failed, the exception
# follows on the error pipe) and NOUT are helper j's, written before it posts
# done[j]. Flags, which publish no data and only make a waiting process stop
# waiting, so that plain stores do (each is a single aligned word, and a stale
# read only waits a little longer): FAILED (row 0), the SEQ of a task in which
# some process failed; FINISHED (row j), the SEQ of the last task helper j has
# finished; CLOSED (row 0), 1 once close() has stopped the helpers. The two
# writers' words sit on different cache lines.
SEQ, TASK, NARGS, FAILED, CLOSED, STATUS, NOUT, FINISHED = 0, 1, 2, 3, 4, 8, 9, 10
_ROW = 16
STOP = -1
_SPINS = 64      # non-blocking tries between two looks at the flags (a try costs about 0.05 us)
_SLOW = 32       # looks at the flags between two system calls that check on the other processes
_SLICE = 0.05    # seconds a blocked wait sleeps before it looks at the flags again


class HelperError(RuntimeError):
    """A helper process ended or failed in a way that cannot be handed back as its own exception."""


class _Abandoned(HelperError):
    """Raised in a process waiting for another that, having failed or gone, will not come."""


class Processes:
    """n - 1 forked helper processes; run(task, args) calls tasks[task](j, *args[j]) in each of
    the n processes (j = 0 here), all at once, and returns their results.

    A task returns a tuple of at most 8 floats; its arguments are at most 8
    numbers (passed as float64, so integers below 2^53 are exact). Tasks
    work on arrays from shared_zeros that existed when the helpers were
    forked: everything else a helper sees is its own copy, as of the fork.

    Within a task, the processes can meet at a barrier and swap a few
    numbers (allgather), so that one task may hold several phases that each
    need the others' results (a training step's loss, then its gradient's
    norm), without handing work back and forth in between.

    Every hand-off that publishes data goes through a POSIX semaphore made
    before the fork: a post orders the poster's earlier writes before it
    (release), and a wait that takes the post orders the taker's later reads
    after it (acquire), on every processor. Per helper j: start[j] (the task
    and its arguments), done[j] (its results and status), released[j] (the
    main process's `before`, wait_released), and for a barrier arrive[j],
    which the main process takes from every helper before it posts go[j] to
    each: happens-before is transitive, so every process then sees every
    other's numbers. A process waits by trying its semaphore without
    blocking for spin_seconds (a running task pays no wake-up), then by
    blocking on it a slice at a time (an idle pool costs no CPU), and
    between tries looks whether the process it waits for has failed or
    gone. An exception in a helper is re-raised here; a helper that dies is
    reported, not waited for; the helpers stop when the object is garbage
    collected or close() is called, and on their own when the main process
    has gone.
    """

    def __init__(self, n, tasks, spin_seconds=0.05):
        if not processes_available():
            resolve_backend("processes")  # raises, naming what is missing
        self.n, self.tasks, self.spin_seconds = n, tuple(tasks), float(spin_seconds)
        # More processes than cores: a spinner would hold the core that the process it
        # waits for needs, so it yields between looks. Not otherwise: a yield costs
        # 0.6 us, and with yields some runs of 2 processes on 2 cores took 15 to 40 us
        # a hand-off instead of 5 (two processes taking turns on one core, it seems,
        # where without yields the scheduler moves one to the free core).
        self._crowded = n > usable_cpus()
        self._ctl = shared_zeros(n * _ROW, np.int64).reshape(n, _ROW)
        self._args = shared_zeros(n * 8, np.float64).reshape(n, 8)
        self._out = shared_zeros(n * 8, np.float64).reshape(n, 8)
        # allgather's numbers, two slots (by the barrier's parity): a helper through one
        # barrier may write the next one's while the main process still reads this one's
        self._shared = shared_zeros(2 * n * 8, np.float64).reshape(2, n, 8)
        fork = multiprocessing.get_context("fork")

        def per_helper():   # [None, semaphore of helper 1, ..., of helper n - 1], all at 0
            return [None] + [fork.Semaphore(0) for _ in range(1, n)]
        self._start, self._done, self._released = per_helper(), per_helper(), per_helper()
        self._arrive, self._go = per_helper(), per_helper()
        # each process its own copy: the task it runs, the barriers it has passed in it, and
        # whether it has given (main) or taken (helper) the task's release
        self._seq, self._barriers, self._release_seen = 0, 0, True
        self._pids, self._errors = [], []
        # A helper keeps to one BLAS thread, as the count stands at the fork:
        # OpenBLAS's thread controls can hang in a forked child, whose copy of
        # the library believes in a pool of threads the fork did not copy.
        self._parent = parent = os.getpid()
        try:
            with one_blas_thread():
                for j in range(1, n):
                    read_end, write_end = os.pipe()
                    with warnings.catch_warnings():
                        # Python 3.12+ warns when a process with threads forks (OpenBLAS
                        # keeps a pool); the helper runs only NumPy code, and OpenBLAS
                        # restarts its pool after a fork.
                        warnings.simplefilter("ignore", DeprecationWarning)
                        pid = os.fork()
                    if pid == 0:  # the helper; it never returns from here
                        os.close(read_end)
                        _serve(j, self, write_end, parent)
                    os.close(write_end)   # now: a later helper must not inherit it (EOF when helper j dies)
                    self._pids.append(pid)
                    self._errors.append(read_end)
        except BaseException:   # a fork or a pipe failed part-way: end the helpers forked so far
            _reap(parent, self._ctl, list(self._pids), list(self._errors), self._start[1:len(self._pids) + 1])
            raise
        self._finalizer = weakref.finalize(self, _reap, parent, self._ctl, list(self._pids),
                                           list(self._errors), self._start[1:])

    def run(self, task, args, before=None):
        """[tasks[task](j, *args[j]) for j in range(n)], computed at once; re-raises the first error.

        before: called here once the helpers have their tasks and before
        this process's own, so that work this process's task needs, or that
        the helpers' need only later, overlaps with theirs. A helper's task
        waits for it at wait_released(j): until before has returned, or
        has called release().
        """
        if len(args) != self.n:
            raise ValueError(f"run needs {self.n} argument tuples, got {len(args)}")
        if not self._finalizer.alive:
            raise HelperError("the helper processes have been closed")
        ctl, seq = self._ctl, self._seq + 1
        for j in range(1, self.n):   # every helper's words first: a bad argument raises before any starts
            a = args[j]
            self._args[j, :len(a)] = a
            ctl[j, SEQ], ctl[j, TASK], ctl[j, NARGS] = seq, task, len(a)
        self._begin(seq)
        for j in range(1, self.n):
            self._start[j].release()   # publishes the words above
        _running[0] = self
        try:
            if before is not None:
                before()
            self.release()
            first = (True, self.tasks[task](0, *args[0]))
        except BaseException as e:
            ctl[0, FAILED] = seq   # helpers waiting for this process stop
            first = (False, e)
        finally:
            _running[0] = None
        if not self._finalizer.alive:   # closed during the task (a helper died while this one waited)
            raise first[1] if not first[0] else HelperError("the helper processes were closed during a task")
        try:
            out = [first] + [self._result(j) for j in range(1, self.n)]
        except HelperError:   # a helper died; close() has run
            raise
        except BaseException:   # interrupted (Ctrl-C): which helper is where is unknown now
            self.close()
            raise
        # Every process has finished the task: no one posts or waits until the next one, so
        # what is left on a semaphore can go. A release no helper waited for is left after
        # any task; after a failed one, arrivals and go-aheads that no one took too.
        failed = [value for ok, value in out if not ok]
        _drain(self._released[1:] + (self._arrive[1:] + self._go[1:] if failed else []))
        if failed:   # the first error that is not only a consequence of another process's
            raise next((e for e in failed if not isinstance(e, _Abandoned)), failed[0])
        return [value for _, value in out]

    def _begin(self, seq):
        """This process starts task seq: no barriers passed, no release given or taken."""
        self._seq, self._barriers, self._release_seen = seq, 0, False

    def allgather(self, j, values):
        """Process j, inside a task: give at most 8 numbers and wait for every process's;
        -> [values of process 0, ..., of process n - 1], the same list in every process.

        Each of the n processes must make the same allgather calls, in the
        same order, in every task that makes any (a task reaches this method
        as npvae.engine.parallel.allgather). If a process fails before its
        call, the others raise instead of waiting for ever.
        """
        self._barriers += 1
        slot = self._shared[self._barriers % 2]
        slot[j, :len(values)] = values
        if j == 0:
            for i in range(1, self.n):   # every helper's numbers are here once its arrival is taken
                self._wait(self._arrive[i], self._check_arrival, i)
            for i in range(1, self.n):   # ... and helper i's go-ahead comes after all of them
                self._go[i].release()
        else:
            self._arrive[j].release()
            self._wait(self._go[j], self._check_main, j)
        return [tuple(row) for row in slot[:, :len(values)].tolist()]

    def release(self):
        """In the main process's `before` (run): the helpers waiting at wait_released go on now."""
        if not self._release_seen:   # once a task: run calls it again when `before` returns
            self._release_seen = True
            for j in range(1, self.n):
                self._released[j].release()   # publishes what `before` has written so far

    def wait_released(self, j):
        """Process j, inside a task: wait until the main process has run `before` or called release().

        The main process (j = 0) never waits: its task starts after before.
        If the main process fails first, this raises instead of waiting for ever.
        """
        if j > 0 and not self._release_seen:
            self._wait(self._released[j], self._check_main, j)
            self._release_seen = True

    def _wait(self, semaphore, check, j, since=None):
        """Take semaphore: try without blocking until spin_seconds after `since` (default now), then block.

        check(j, slow) runs between tries and raises to give up; slow: it
        may make a system call (they come every _SLOW looks, and at every
        slice of a blocked wait).
        """
        acquire = semaphore.acquire
        if acquire(False):
            return
        spin_until = (time.monotonic() if since is None else since) + self.spin_seconds
        looks = 0
        while True:
            for _ in range(_SPINS):
                if acquire(False):
                    return
            looks += 1
            check(j, looks % _SLOW == 0)
            if self._crowded:
                os.sched_yield()
            if time.monotonic() > spin_until:
                break
        while not acquire(True, _SLICE):
            check(j, True)

    def _check_arrival(self, i, slow):
        """The main process, waiting at a barrier for helper i: raise if i will not come.

        A helper that has arrived waits for the main process's go-ahead, so
        it finishes its task in the meantime only if it did not arrive.
        """
        ctl, seq = self._ctl, self._seq
        if ctl[0, FAILED] == seq or ctl[i, FINISHED] == seq:
            raise _Abandoned(f"a process failed in this task, or process {i} finished it "
                             f"without reaching the barrier")
        if slow:
            self._check_alive(i)

    def _check_main(self, j, slow):
        """Helper j, waiting inside a task for the main process: raise if it will not come."""
        ctl = self._ctl
        if ctl[0, FAILED] == self._seq:
            raise _Abandoned("a process failed in this task: the main process will not come")
        if ctl[0, CLOSED] or (slow and os.getppid() != self._parent):
            raise _Abandoned("the main process has gone, or stopped the helpers")

    def _check_idle(self, j, slow):
        """Helper j, waiting for a task: raise if the main process has gone (close() posts STOP)."""
        if slow and os.getppid() != self._parent:
            raise _Abandoned("the main process has gone")

    def _check_finish(self, j, slow):
        """The main process, waiting for helper j's result: raise if j has died.

        An arrival at a barrier now is one this process, done with its
        task, will never answer: the task has failed, and j stops waiting.
        """
        if self._arrive[j].acquire(False):
            self._ctl[0, FAILED] = self._seq
        if slow:
            self._check_alive(j)

    def _result(self, j):
        """Wait for helper j's task: (True, result tuple) or (False, its exception)."""
        self._wait(self._done[j], self._check_finish, j)
        ctl = self._ctl
        if ctl[j, STATUS]:
            return False, _read_error(self._errors[j - 1])
        return True, tuple(self._out[j, :ctl[j, NOUT]].tolist())

    def _check_alive(self, j):
        pid = self._pids[j - 1]
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            self.close()
            raise HelperError(f"helper process {j} (pid {pid}) ended during a task "
                              f"with wait status {status}")

    def close(self):
        """Stop the helpers and wait for them (at most a second each, then they are killed)."""
        self._finalizer()


def _drain(semaphores):
    """Take every post left on each semaphore."""
    for semaphore in semaphores:
        while semaphore.acquire(False):
            pass


_running = [None]   # the Processes whose task this process is running now


def allgather(j, values):
    """Inside a task of Processes: its allgather(j, values), which see. Outside one: [values]."""
    pool = _running[0]
    return [tuple(float(v) for v in values)] if pool is None else pool.allgather(j, values)


def wait_released(j):
    """Inside a task of Processes: its wait_released(j), which see. Outside one: return at once."""
    pool = _running[0]
    if pool is not None:
        pool.wait_released(j)


def _serve(j, pool, error_fd, parent):
    """Helper j's loop: wait for a task, run it, hand back its result; exit on STOP or orphaning."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops us
        ctl, args, out, tasks = pool._ctl, pool._args, pool._out, pool.tasks
        start, done = pool._start[j], pool._done[j]
        idle_since = time.monotonic()
        while True:
            pool._wait(start, pool._check_idle, j, since=idle_since)
            seq, task = int(ctl[j, SEQ]), int(ctl[j, TASK])
            if task == STOP:
                break
            pool._begin(seq)
            _running[0], error = pool, None
            try:
                result = tuple(tasks[task](j, *args[j, :ctl[j, NARGS]]))
                out[j, :len(result)] = result
                ctl[j, NOUT] = len(result)
            except BaseException as e:
                ctl[0, FAILED] = seq   # the others stop waiting for this process
                error = e
            _running[0] = None
            ctl[j, STATUS] = error is not None
            ctl[j, FINISHED] = seq
            done.release()   # publishes the results and STATUS
            if error is not None:
                # after done: the main process reads it then, so a report larger than the
                # pipe holds cannot leave both waiting
                _write_error(error_fd, error)
            idle_since = time.monotonic()
    except BaseException:
        code = 1
    finally:
        os._exit(code)   # never run the parent's cleanup handlers


def _write_error(fd, e):
    try:
        payload = pickle.dumps(e)
        pickle.loads(payload)
    except Exception:
        payload = pickle.dumps(HelperError("".join(traceback.format_exception(e))))
    data = len(payload).to_bytes(8, "little") + payload
    while data:
        data = data[os.write(fd, data):]


def _read_error(fd):
    def read(n):
        chunks = b""
        while len(chunks) < n:
            chunk = os.read(fd, n - len(chunks))
            if not chunk:
                return None
            chunks += chunk
        return chunks
    size = read(8)
    payload = None if size is None else read(int.from_bytes(size, "little"))
    return HelperError("a helper failed without a report") if payload is None else pickle.loads(payload)


def _reap(owner, ctl, pids, error_fds, starts):
    if os.getpid() != owner:   # a forked copy of the owner: the helpers are not its own
        return
    ctl[0, CLOSED] = 1   # a helper waiting inside a task gives up
    for j, start in enumerate(starts, 1):
        ctl[j, TASK] = STOP
        start.release()   # an idle helper wakes, and reads STOP
    for pid in pids:
        deadline = time.monotonic() + 1.0
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.001)
    for fd in error_fds:
        os.close(fd)
