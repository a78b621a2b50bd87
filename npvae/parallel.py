"""Data-parallel training steps on several cores, with plain Python threads.

NumPy's element-wise operations (activations, the likelihood, Adam) run on
one core, and the matrix products of a VAE's minibatch are too small for
OpenBLAS's own threads to gain much. So a step splits the minibatch instead:

    thread j:  forward and backward on rows [a_j, b_j) of the batch, with
               upstream gradient -1/B per row (B the whole batch), into its
               own replica's gradient buffer (model.replica())
    thread j:  grads[range j] = sum over replicas of their grads[range j]
    thread j:  the optimizer's update on range j of the flat parameter buffer

The gradient is the same sum as one thread's, added in another order, so a
step agrees with the serial one to float rounding; for a given number of
threads every run is bit for bit reproducible (the split does not depend on
timing). NumPy releases the GIL inside its loops and BLAS calls, which is what
lets the threads overlap. While the threads run, OpenBLAS is asked for one
BLAS thread (openblas_set_num_threads_local, OpenBLAS >= 0.3.27), so the
threads do not also start BLAS's pool; without that control `threads="auto"`
stays on one thread. In NumPy's pthreads build of OpenBLAS that setting is
not per thread but the process's, so Workers.run sets it before handing out
work and puts the old count back only when every thread has finished.
"""
import ctypes
import os
import queue
import threading
import weakref

import numpy as np

_BLAS = []  # [(set_local or None, get or None)], found once
_GET_NAMES = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_")


def _find_blas():
    """(openblas_set_num_threads_local, openblas_get_num_threads) of NumPy's OpenBLAS, each or None.

    Looks for an OpenBLAS library among those the process has loaded (Linux:
    /proc/self/maps), preferring the one NumPy ships.
    """
    if _BLAS:
        return _BLAS[0]
    found = (None, None)
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        paths = set()
    for path in sorted(paths, key=lambda p: "numpy" not in p):
        try:
            lib = ctypes.CDLL(path)
            set_local = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
        get = next((getattr(lib, name) for name in _GET_NAMES if hasattr(lib, name)), None)
        if get is not None:
            get.argtypes, get.restype = [], ctypes.c_int
        found = (set_local, get)
        break
    _BLAS.append(found)
    return found


def blas_local_threads():
    """OpenBLAS's openblas_set_num_threads_local(n) -> previous n, or None if NumPy's BLAS lacks it."""
    return _find_blas()[0]


def blas_threads():
    """The number of threads OpenBLAS would use now (openblas_get_num_threads), or None if unknown."""
    get = _find_blas()[1]
    return None if get is None else int(get())


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


def _worker(tasks, results, blas_local):
    first = True
    while True:
        fn = tasks.get()
        if fn is None:
            return
        if first and blas_local is not None:
            # Where the setting is per thread, this helper's own; where it is the process's,
            # run() has set it already, and this happens while it holds.
            blas_local(1)
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
        self._blas_local = blas_local_threads()
        self._queues = [(queue.SimpleQueue(), queue.SimpleQueue()) for _ in range(n - 1)]
        for tasks, results in self._queues:
            threading.Thread(target=_worker, args=(tasks, results, self._blas_local), daemon=True).start()
        self._finalizer = weakref.finalize(self, _stop, [tasks for tasks, _ in self._queues])

    def run(self, fns):
        """[f_0, ..., f_{n-1}] -> [f_0(), ..., f_{n-1}()], computed concurrently; re-raises the first error."""
        if len(fns) != self.n:
            raise ValueError(f"run needs {self.n} functions, got {len(fns)}")
        previous = None if self._blas_local is None else self._blas_local(1)
        try:
            for (tasks, _), fn in zip(self._queues, fns[1:]):
                tasks.put(fn)
            try:
                first = (True, fns[0]())
            except BaseException as e:
                first = (False, e)
            out = [first] + [results.get() for _, results in self._queues]
        finally:  # only now that every thread is done: the setting may be the whole process's
            if previous is not None:
                self._blas_local(previous)
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
