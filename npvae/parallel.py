"""Data-parallel training steps on several cores, with plain Python threads.

NumPy's element-wise operations (activations, the likelihood, Adam) run on
one core, and the matrix products of a VAE's minibatch are too small for
OpenBLAS's own threads to gain much. So a step splits the minibatch instead
(npvae.train.make_step):

    thread j:  forward and backward on rows [a_j, b_j) of the batch, with
               upstream gradient -1/B per row (B the whole batch), by its
               own replica (model.replica()), which writes each layer's
               input x and local gradient da into those rows of one
               whole-batch SplitBatch (npvae.model), not weight gradients
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
stays on one thread. SciPy's BLAS (scipy.linalg.blas, whose axpy Adam uses)
is an OpenBLAS of its own, with its own pool, and is held to one thread too.
In NumPy's pthreads build of OpenBLAS that setting is not per thread but the
process's, so Workers.run sets it before handing out work and puts the old
count back only when every thread has finished.

Threads share one interpreter lock (the GIL). Each thread takes it back
after every NumPy call, so two threads that each make a few hundred small
calls per step keep waiting for each other, and every wait puts a thread to
sleep. Processes has no such lock to share: it forks helper processes that
see the model's buffers in shared memory (shared_zeros) and hands them work
through a few words of that memory, which they poll (Processes below). A
step on processes is one task, the three phases above with a barrier
between each two (allgather), where the processes swap the figures the next
phase needs: one hand-off a step instead of three.
"""
import ctypes
import mmap
import os
import pickle
import platform
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
    threads, for scipy.linalg.blas (whose axpy Adam uses): it is loaded here
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


def processes_available():
    """True where Processes works: Linux on x86-64, with fork.

    The helpers hand work back and forth through plain stores to shared
    memory, relying on x86's ordering of stores (a helper that sees a new
    task number also sees the arguments written before it); other
    processors need fences that Python cannot issue.
    """
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and platform.machine().lower() in ("x86_64", "amd64"))


BACKENDS = ("auto", "threads", "processes")


def resolve_backend(backend, threads=None):
    """'auto' -> 'processes' where processes_available(), else 'threads'; the others as they are.

    threads: the resolved count (resolve_threads); with 1 there is nothing
    to split, and the answer is 'threads' whatever was asked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if threads == 1:
        return "threads"
    if backend == "auto":
        return "processes" if processes_available() else "threads"
    if backend == "processes" and not processes_available():
        raise ValueError(f"backend 'processes' needs Linux on x86-64 with fork; this is "
                         f"{sys.platform} on {platform.machine()} (use backend='threads')")
    return backend


# The words of a helper's control row: the main process writes SEQ (after TASK,
# NARGS and the arguments); the helper writes DONE = SEQ when it has finished
# (after STATUS and the results). The two halves sit on different cache lines.
# ARRIVED (in every row, row 0 the main process's) counts the barriers a
# process has reached (Processes.allgather); FAILED (row 0 only) is the SEQ of
# a task in which some process failed, so that the others stop waiting;
# RELEASED (row 0 only) is the SEQ of the task whose `before` the main process
# has finished, or has released the helpers from (Processes.release).
SEQ, TASK, NARGS, FAILED, RELEASED, DONE, STATUS, NOUT, ARRIVED = 0, 1, 2, 3, 4, 8, 9, 10, 11
_ROW = 16
STOP = -1
_BARRIERS = 64   # one more than the allgather calls a task may make (the counts of task s start at 64 s)


class HelperError(RuntimeError):
    """A helper process ended or failed in a way that cannot be handed back as its own exception."""


class _Abandoned(HelperError):
    """Raised in a process waiting at a barrier that another process, having failed, will not reach."""


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

    A helper polls its control row for work (no system call, so no sleep and
    no wake-up on the way in); after spin_seconds without work it polls once
    a millisecond instead, so that an idle pool costs no CPU. The main
    process spins on the helpers' DONE words for the results (it never
    sleeps), and checks now and then that the helpers are alive. An
    exception in a helper is re-raised here; the helpers stop when the
    object is garbage collected or close() is called, and on their own when
    the main process has gone.
    """

    def __init__(self, n, tasks, spin_seconds=0.05):
        if not processes_available():
            resolve_backend("processes")  # raises, naming what is missing
        self.n, self.tasks, self.spin_seconds = n, tuple(tasks), float(spin_seconds)
        self._ctl = shared_zeros(n * _ROW, np.int64).reshape(n, _ROW)
        self._args = shared_zeros(n * 8, np.float64).reshape(n, 8)
        self._out = shared_zeros(n * 8, np.float64).reshape(n, 8)
        # allgather's numbers, two slots (by the barrier's parity): a process that has
        # passed one barrier may write the next one's before the others have read this one's
        self._shared = shared_zeros(2 * n * 8, np.float64).reshape(2, n, 8)
        self._seq = 0   # the task this process is running (each process its own copy)
        self._pids, self._errors = [], []
        # A helper keeps to one BLAS thread, as the count stands at the fork:
        # OpenBLAS's thread controls can hang in a forked child, whose copy of
        # the library believes in a pool of threads the fork did not copy.
        self._parent = parent = os.getpid()
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
                os.close(write_end)
                self._pids.append(pid)
                self._errors.append(read_end)
        self._finalizer = weakref.finalize(self, _reap, parent, self._ctl, list(self._pids), list(self._errors))

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
        ctl = self._ctl
        self._seq = seq = int(ctl[0, SEQ]) + 1
        ctl[0, SEQ], ctl[0, ARRIVED] = seq, seq * _BARRIERS
        if before is None:
            ctl[0, RELEASED] = seq
        for j in range(1, self.n):
            a = args[j]
            self._args[j, :len(a)] = a
            ctl[j, TASK], ctl[j, NARGS] = task, len(a)
            ctl[j, SEQ] = seq    # last: the helper starts when it sees this
        _running[0] = self
        try:
            if before is not None:
                before()
                ctl[0, RELEASED] = seq
            first = (True, self.tasks[task](0, *args[0]))
        except BaseException as e:
            ctl[0, FAILED] = seq   # helpers waiting at a barrier for this process stop
            first = (False, e)
        finally:
            _running[0] = None
        if not self._finalizer.alive:   # closed during the task (a helper died while this one waited)
            raise first[1] if not first[0] else HelperError("the helper processes were closed during a task")
        out = [first] + [self._result(j) for j in range(1, self.n)]
        failed = [value for ok, value in out if not ok]
        if failed:   # the first error that is not only a consequence of another process's
            raise next((e for e in failed if not isinstance(e, _Abandoned)), failed[0])
        return [value for _, value in out]

    def allgather(self, j, values):
        """Process j, inside a task: give at most 8 numbers and wait for every process's;
        -> [values of process 0, ..., of process n - 1], the same list in every process.

        Each of the n processes must make the same allgather calls, in the
        same order, in every task that makes any (a task reaches this method
        as npvae.parallel.allgather). If a process fails before its call,
        the others raise instead of waiting for ever.
        """
        ctl, seq = self._ctl, self._seq
        arrived = int(ctl[j, ARRIVED]) + 1
        if arrived >= (seq + 1) * _BARRIERS:
            raise RuntimeError(f"a task may call allgather at most {_BARRIERS - 1} times")
        slot = self._shared[arrived % 2]
        slot[j, :len(values)] = values
        ctl[j, ARRIVED] = arrived   # last: the others read this process's numbers when they see it
        spins = 0
        for i in range(self.n):
            while ctl[i, ARRIVED] < arrived:
                spins += 1
                if spins % 1000 == 0:
                    self._check_waiting(j, i, arrived, spins)
        return [tuple(row) for row in slot[:, :len(values)].tolist()]

    def release(self):
        """In the main process's `before` (run): the helpers waiting at wait_released go on now."""
        self._ctl[0, RELEASED] = self._seq

    def wait_released(self, j):
        """Process j, inside a task: wait until the main process has run `before` or called release().

        The main process (j = 0) never waits: its task starts after before.
        If the main process fails first, this raises instead of waiting for ever.
        """
        ctl, seq, spins = self._ctl, self._seq, 0
        while j > 0 and ctl[0, RELEASED] != seq:
            spins += 1
            if spins % 1000 == 0:
                if ctl[0, FAILED] == seq:
                    raise _Abandoned("the main process failed before it released the helpers")
                if spins % 20000 == 0:
                    self._check_main(j)

    def _check_waiting(self, j, i, arrived, spins):
        """Process j, waiting at a barrier for process i: raise if i will not come."""
        ctl, seq = self._ctl, self._seq
        # i failed, or finished its task without this barrier (it writes ARRIVED before DONE)
        gone = ctl[0, FAILED] == seq or (i > 0 and ctl[i, DONE] == seq)
        if gone and ctl[i, ARRIVED] < arrived:
            raise _Abandoned(f"process {i} failed or finished its task without reaching the barrier")
        if spins % 20000 == 0:
            if j == 0 and i > 0:
                self._check_alive(i)
            elif j > 0:
                self._check_main(j)

    def _check_main(self, j):
        """Helper j, waiting inside a task: raise if the main process has gone or stopped the helpers."""
        if os.getppid() != self._parent or self._ctl[j, SEQ] != self._seq:
            raise _Abandoned("the main process has gone, or stopped the helpers")

    def _result(self, j):
        """Wait for helper j's task: (True, result tuple) or (False, its exception)."""
        ctl, seq, spins = self._ctl, self._ctl[j, SEQ], 0
        while ctl[j, DONE] != seq:
            spins += 1
            if spins % 20000 == 0:
                self._check_alive(j)
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
    """A helper's loop: poll row j for a task, run it, write its result; exit on STOP or orphaning."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops us
        ctl, args, out, tasks = pool._ctl, pool._args, pool._out, pool.tasks
        # 0, not ctl[j, SEQ]: the first task may be posted before this line runs
        last, idle_since, spins, sleeping = 0, time.monotonic(), 0, False
        while True:
            seq = ctl[j, SEQ]
            if seq == last:
                spins += 1
                if spins % 1000 == 0:
                    if os.getppid() != parent:
                        break
                    sleeping = time.monotonic() - idle_since > pool.spin_seconds
                if sleeping:
                    time.sleep(0.001)
                continue
            last, task = seq, int(ctl[j, TASK])
            if task == STOP:
                break
            pool._seq, ctl[j, ARRIVED], _running[0] = seq, seq * _BARRIERS, pool
            try:
                result = tuple(tasks[task](j, *args[j, :ctl[j, NARGS]]))
                out[j, :len(result)] = result
                ctl[j, NOUT], ctl[j, STATUS] = len(result), 0
            except BaseException as e:
                ctl[0, FAILED] = seq   # the others stop waiting for this process at a barrier
                _write_error(error_fd, e)
                ctl[j, STATUS] = 1
            ctl[j, DONE] = seq   # last: the main process reads the result when it sees this
            idle_since, spins, sleeping = time.monotonic(), 0, False
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


def _reap(owner, ctl, pids, error_fds):
    if os.getpid() != owner:   # a forked copy of the owner: the helpers are not its own
        return
    for j in range(1, ctl.shape[0]):
        ctl[j, TASK] = STOP
        ctl[j, SEQ] += 1
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
