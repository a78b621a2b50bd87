"""npvae.engine.parallel's primitives: split, Workers, BLAS's thread count, and helper processes."""
import gc
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from npvae.engine import parallel


needs_processes = pytest.mark.skipif(not parallel.processes_available(),
                                     reason="helper processes need Linux with fork")


# --- split and resolve_threads ---------------------------------------------------------------

@pytest.mark.parametrize("n, parts, align", [(10, 2, 1), (11, 3, 1), (1000, 2, 16), (5, 4, 1), (7, 2, 16)])
def test_split_covers_the_range_in_order(n, parts, align):
    cuts = parallel.split(n, parts, align)
    assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == parts + 1
    assert all(a <= b for a, b in zip(cuts, cuts[1:]))
    assert all(c % align == 0 for c in cuts[1:-1])
    if align == 1:
        assert max(np.diff(cuts)) - min(np.diff(cuts)) <= 1


@pytest.mark.parametrize("n, parts, align", [(11, 3, 1), (1000, 2, 16), (5, 4, 1)])
def test_ranges_are_the_pieces_between_the_cuts(n, parts, align):
    cuts = parallel.split(n, parts, align)
    assert parallel.ranges(n, parts, align) == [(cuts[j], cuts[j + 1]) for j in range(parts)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_resolve_threads_rejects_bad_values_naming_the_argument(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        parallel.resolve_threads(bad)


def test_resolve_threads_auto_is_at_most_two_and_at_most_the_usable_cpus():
    n = parallel.resolve_threads("auto")
    assert 1 <= n <= min(2, parallel.usable_cpus())
    if parallel.blas_local_threads() is None:
        assert n == 1
    assert parallel.resolve_threads(3) == 3


# --- Workers and BLAS's threads --------------------------------------------------------------

def test_workers_run_every_function_and_return_results_in_order():
    w = parallel.Workers(3)
    assert w.run([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    assert w.run([lambda: "a", lambda: None, lambda: np.float64(2.5)]) == ["a", None, 2.5]
    w.close()


def test_workers_reraise_an_error_from_a_helper_and_stay_usable():
    w = parallel.Workers(2)

    def boom():
        raise ArithmeticError("from the helper")
    with pytest.raises(ArithmeticError, match="from the helper"):
        w.run([lambda: 1, boom])
    with pytest.raises(ValueError, match="run needs 2 functions, got 1"):
        w.run([lambda: 1])
    assert w.run([lambda: 4, lambda: 5]) == [4, 5]


def test_workers_really_run_at_the_same_time():
    # Each function waits for the other at a barrier: run() can only return if both run at once.
    import threading
    barrier = threading.Barrier(2, timeout=10)
    w = parallel.Workers(2)
    assert w.run([barrier.wait, barrier.wait]) is not None


def test_scipys_blas_is_held_to_one_thread_with_numpys():
    # Adam's axpy runs in SciPy's own OpenBLAS, with its own pool: a step on two cores must
    # hold it to one thread as well, or each process's axpy would take both cores.
    counts = parallel.blas_thread_counts()
    if len(counts) < 2 or None in counts:
        pytest.skip("SciPy's BLAS is not a second OpenBLAS whose threads can be read here")
    with parallel.one_blas_thread():
        assert parallel.blas_thread_counts() == [1] * len(counts)
    assert parallel.blas_thread_counts() == counts


def test_blas_runs_on_one_thread_inside_run_and_on_its_old_count_after():
    # In NumPy's pthreads OpenBLAS the "local" setting is the process's: a helper thread that
    # sets it, or a restore that comes before the helpers finish, changes the other threads'
    # BLAS too. This checks the count BLAS reports, in each thread and afterwards.
    if parallel.blas_local_threads() is None or parallel.blas_threads() is None:
        pytest.skip("NumPy's BLAS has no thread-count control")
    before = parallel.blas_threads()
    w = parallel.Workers(2)
    time.sleep(0.05)                      # the helper has started: that alone must not change it
    assert parallel.blas_threads() == before

    def late():                           # still running after the main thread's part is done
        time.sleep(0.05)
        return parallel.blas_threads()

    for _ in range(3):                    # the first run wakes the helper; later ones reuse it
        assert w.run([parallel.blas_threads, late]) == [1, 1]
        time.sleep(0.05)
        assert parallel.blas_threads() == before
    w.close()


def test_nested_one_blas_thread_blocks_hold_one_thread_until_the_outer_one_ends():
    if parallel.blas_local_threads() is None or parallel.blas_threads() is None:
        pytest.skip("OpenBLAS's per-thread control is not available")
    before = parallel.blas_thread_counts()
    with parallel.one_blas_thread():
        with parallel.one_blas_thread():
            assert parallel.blas_thread_counts() == [1] * len(before)
        assert parallel.blas_thread_counts() == [1] * len(before)   # the inner block gives nothing back
    assert parallel.blas_thread_counts() == before


# --- helper processes ------------------------------------------------------------------------

def test_resolve_backend_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        parallel.resolve_backend("gpu")
    assert parallel.resolve_backend("threads") == "threads"
    assert parallel.resolve_backend("auto") == ("processes" if parallel.processes_available() else "threads")


@needs_processes
def test_processes_run_each_task_in_its_own_process_on_shared_memory():
    out = parallel.shared_zeros(3, np.int64)

    def write_pid(j, value):
        out[j] = os.getpid()
        return (value * 2, float(j))
    pool = parallel.Processes(3, [write_pid])
    results = pool.run(0, [(1.0,), (2.0,), (3.0,)])
    assert results == [(2.0, 0.0), (4.0, 1.0), (6.0, 2.0)]
    assert out[0] == os.getpid() and len(set(out)) == 3   # three processes wrote
    assert pool.run(0, [(0.5,)] * 3)[2] == (1.0, 2.0)      # and again
    pool.close()
    with pytest.raises(parallel.HelperError, match="closed"):
        pool.run(0, [(1.0,)] * 3)


@needs_processes
def test_an_exception_in_a_helper_process_is_raised_in_the_main_one():
    def fail_in_helper(j, fail):
        if j == 1 and fail:
            raise KeyError("from helper 1")
        return (float(j),)
    pool = parallel.Processes(2, [fail_in_helper])
    with pytest.raises(KeyError, match="from helper 1"):
        pool.run(0, [(1,), (1,)])
    assert pool.run(0, [(0,), (0,)]) == [(0.0,), (1.0,)]   # the helper lives on
    pool.close()


@needs_processes
@pytest.mark.parametrize("barrier", [False, True])
def test_a_helper_process_that_dies_is_reported_not_waited_for(barrier):
    # with a barrier, the main process is waiting there for the helper that died
    def die_in_helper(j):
        if j == 1:
            os._exit(3)
        if barrier:
            parallel.allgather(j, (j,))
        return ()
    pool = parallel.Processes(2, [die_in_helper])
    with pytest.raises(parallel.HelperError, match="ended during a task"):
        pool.run(0, [(), ()])


@needs_processes
def test_closing_the_pool_ends_the_helper_processes():
    pool = parallel.Processes(3, [lambda j: ()])
    pids = list(pool._pids)
    pool.run(0, [()] * 3)
    pool.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)   # reaped: no longer our child


@needs_processes
def test_allgather_swaps_every_processes_numbers_at_each_barrier_in_every_task():
    def swap_twice(j, x):
        first = parallel.allgather(j, (x, 10 * j))
        second = parallel.allgather(j, (sum(v[0] for v in first) + j,))
        return tuple(v[0] for v in first) + (sum(v[1] for v in first),) + tuple(v[0] for v in second)
    pool = parallel.Processes(3, [swap_twice])
    for x in (1.0, 2.5, -4.0):   # again and again: the barriers' counts start afresh in each task
        xs = (x, x + 1, x + 2)
        total = sum(xs)
        expected = xs + (30.0,) + (total, total + 1, total + 2)
        assert pool.run(0, [(v,) for v in xs]) == [expected] * 3   # the same in every process
    pool.close()
    assert parallel.allgather(0, (3, 4)) == [(3.0, 4.0)]   # outside a task: a world of one


@needs_processes
@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_process_that_fails_before_a_barrier_does_not_leave_the_others_waiting(failing):
    def fail_before_the_barrier(j, fail):
        if fail and j == failing:
            raise KeyError(f"from process {j}")
        parallel.allgather(j, (j,))
        return (float(j),)
    pool = parallel.Processes(3, [fail_before_the_barrier])
    with pytest.raises(KeyError, match=f"from process {failing}"):   # its own error, not a waiter's
        pool.run(0, [(1,)] * 3)
    assert pool.run(0, [(0,)] * 3) == [(0.0,), (1.0,), (2.0,)]   # and the pool works on
    pool.close()


@needs_processes
def test_run_calls_before_here_once_the_helpers_have_started():
    seen = parallel.shared_zeros(2, np.float64)

    def mark_or_report(j):
        if j == 1:
            seen[0] = 1.0          # the helper has started
            return ()
        return (float(seen[1]),)   # this process's task runs after `before`

    def before():   # waits (at most 10 s) for the helper, which must have started without it
        deadline = time.monotonic() + 10.0
        while seen[0] == 0 and time.monotonic() < deadline:
            pass
        seen[1] = 2.0 if seen[0] == 1.0 else -1.0
    pool = parallel.Processes(2, [mark_or_report])
    assert pool.run(0, [(), ()], before) == [(2.0,), ()]
    with pytest.raises(ZeroDivisionError):
        pool.run(0, [(), ()], lambda: 1 / 0)
    assert pool.run(0, [(), ()]) == [(2.0,), ()]   # and the pool works on
    pool.close()


@needs_processes
@pytest.mark.parametrize("release_early", [False, True])
def test_helpers_that_wait_to_be_released_go_on_once_before_releases_them_or_returns(release_early):
    seen = parallel.shared_zeros(4, np.float64)

    def read_after_release(j):
        if j > 0:
            seen[j] = 1.0                  # started, before the main process's `before` is through
            parallel.wait_released(j)
        return (float(seen[3]),)           # what `before` had written by then

    def before():   # lets the helpers start waiting (at most 10 s), then writes what they must see
        deadline = time.monotonic() + 10.0
        while not (seen[1] and seen[2]) and time.monotonic() < deadline:
            pass
        seen[3] = 5.0
        if release_early:
            pool.release()
            seen[3] = 6.0                  # after the release: a helper may or may not see this
    pool = parallel.Processes(3, [read_after_release])
    results = pool.run(0, [()] * 3, before)
    assert seen[1] == seen[2] == 1.0
    assert results[0] == (6.0 if release_early else 5.0,)
    assert all(r[0] >= 5.0 for r in results[1:])   # no helper went on before it was released
    seen[3] = 7.0
    assert pool.run(0, [()] * 3) == [(7.0,)] * 3   # without `before`, nothing to wait for
    assert parallel.wait_released(0) is None      # outside a task: nothing to wait for
    pool.close()


@needs_processes
def test_a_main_process_that_fails_in_before_does_not_leave_the_helpers_waiting():
    def wait(j):
        parallel.wait_released(j)
        return (float(j),)

    def fail():
        raise KeyError("in before")
    pool = parallel.Processes(2, [wait])
    with pytest.raises(KeyError, match="in before"):   # its own error, not the helper's _Abandoned
        pool.run(0, [(), ()], fail)
    assert pool.run(0, [(), ()]) == [(0.0,), (1.0,)]   # and the pool works on
    pool.close()


# --- the hand-offs, under load and after failures -------------------------------------------------

ROW = 2048   # floats each process writes per phase: enough that a write takes a while


def _exchange(a, b, c, n):
    """A task that writes its row of a, b, c in three phases with a barrier between each two,
    and checks after every barrier every other process's row and numbers; -> (t, j, mismatches).

    In task t, process t % n is slow to write, so the others reach each barrier
    first and really wait there (on a semaphore, or spinning on one).
    """
    ramp = np.arange(ROW, dtype=np.float64)

    def a_row(t, i):
        return ramp + (t * n + i)

    def exchange(j, t):
        t = int(t)
        if j == t % n:
            for _ in range(30):   # a few dozen microseconds of NumPy work before the write
                np.sqrt(ramp + 1.0)
        np.add(ramp, t * n + j, out=a[j])
        wrong = 0
        first = parallel.allgather(j, (t, j, float(a[j, -1])))
        for i in range(n):   # what process i wrote before its arrival, row and numbers
            wrong += not np.array_equal(a[i], a_row(t, i))
            wrong += first[i] != (t, i, float(a_row(t, i)[-1]))
        np.multiply(a[(j + 1) % n], 2.0, out=b[j])   # another's row, read after the barrier
        second = parallel.allgather(j, (float(b[j, 0]),))
        for i in range(n):
            wrong += not np.array_equal(b[i], 2.0 * a_row(t, (i + 1) % n))
            wrong += second[i] != (2.0 * (t * n + (i + 1) % n),)
        np.add(b[j], 1.0, out=c[j])   # read by the main process once run has the results
        return float(t), float(j), float(wrong)
    return exchange, a_row


def _run_exchanges(pool, exchange_task, a_row, c, n, tasks):
    """Run the exchange task `tasks` times; check each run's results and every row of c after it."""
    for t in tasks:
        assert pool.run(exchange_task, [(t,)] * n) == [(t, j, 0.0) for j in range(n)]
        for i in range(n):
            np.testing.assert_array_equal(c[i], 2.0 * a_row(t, (i + 1) % n) + 1.0)


@needs_processes
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("spin_seconds", [0.05, 0.0])   # 0: every wait that cannot take at once blocks
def test_every_process_sees_what_the_others_wrote_before_each_hand_off(n, spin_seconds):
    """Hundreds of tasks in a row, each writing shared rows before two barriers and after the last:
    every value each process reads after a barrier, and the main process after run, is the new one."""
    a, b, c = (parallel.shared_zeros(n * ROW, np.float64).reshape(n, ROW) for _ in range(3))
    exchange, a_row = _exchange(a, b, c, n)
    pool = parallel.Processes(n, [exchange], spin_seconds=spin_seconds)
    _run_exchanges(pool, 0, a_row, c, n, range(300 if spin_seconds else 100))
    pool.close()


# (what goes wrong, the error run raises): in the task of _faulty, or in the main process's `before`
FAULTS = [("helper 1 raises before the first barrier", KeyError),
          ("helper 2 raises between the barriers", KeyError),
          ("the main process raises between the barriers", KeyError),
          ("helper 1 finishes without the barriers", parallel._Abandoned),
          ("the main process finishes after the first barrier", parallel._Abandoned),
          ("a helper raises after wait_released", KeyError),
          ("the main process raises in before", KeyError)]


def _faulty(j, fault):
    """A task of wait_released and two barriers, with FAULTS[fault] in it."""
    what = FAULTS[int(fault)][0]
    if j > 0:
        parallel.wait_released(j)
    if what == "a helper raises after wait_released" and j == 2:
        raise KeyError(what)
    if what == "helper 1 raises before the first barrier" and j == 1:
        raise KeyError(what)
    if what == "helper 1 finishes without the barriers" and j == 1:
        return ()
    parallel.allgather(j, (j,))
    if what == "helper 2 raises between the barriers" and j == 2:
        raise KeyError(what)
    if what == "the main process raises between the barriers" and j == 0:
        raise KeyError(what)
    if what == "the main process finishes after the first barrier" and j == 0:
        return ()
    parallel.allgather(j, (j,))
    return ()


@needs_processes
def test_the_pool_works_on_after_every_kind_of_failure():
    """After each fault, once every process has finished, what is left on a semaphore is taken:
    the next tasks' barriers, releases and results count from zero and see the new values."""
    n = 3
    a, b, c = (parallel.shared_zeros(n * ROW, np.float64).reshape(n, ROW) for _ in range(3))
    exchange, a_row = _exchange(a, b, c, n)

    def fail():
        raise KeyError("the main process raises in before")
    pool = parallel.Processes(n, [exchange, _faulty])
    t = 0
    for fault, (what, error) in enumerate(FAULTS):
        for _ in range(3):   # each fault a few times: where the others are when it happens varies
            before = fail if what == "the main process raises in before" else pool.release
            with pytest.raises(error) as raised:
                pool.run(1, [(fault,)] * n, before)
            if error is KeyError:   # the failing process's own error, not a waiter's _Abandoned
                assert raised.value.args == (what,)
            _run_exchanges(pool, 0, a_row, c, n, range(t, t + 5))
            t += 5
            assert pool.run(1, [(-1,)] * n, pool.release) == [()] * n   # FAULTS[-1] is only in before
    pool.close()


@needs_processes
def test_at_most_eight_numbers_go_into_a_task_or_a_barrier_and_the_pool_works_on():
    def gather(j, count):
        return parallel.allgather(j, range(int(count)))[0][-1:]
    pool = parallel.Processes(2, [gather])
    with pytest.raises(ValueError):   # before any helper has started
        pool.run(0, [(8,), tuple(range(9))])
    with pytest.raises(ValueError):
        pool.run(0, [(9,), (9,)])
    assert pool.run(0, [(8,), (8,)]) == [(7.0,), (7.0,)]
    pool.close()


@needs_processes
def test_an_exception_larger_than_a_pipe_holds_is_handed_back():
    """The helper posts done before it writes its report, so the main process is reading by then."""
    def fail_at_length(j):
        if j == 1:
            raise ValueError("x" * 300_000)
        return ()
    pool = parallel.Processes(2, [fail_at_length])
    raised = []
    waiter = threading.Thread(target=lambda: raised.append(pytest.raises(ValueError, pool.run, 0, [(), ()])),
                              daemon=True)
    waiter.start()
    waiter.join(10.0)
    assert raised and len(str(raised[0].value)) == 300_000
    pool.close()


def _cpu_ticks(pid):
    """User and system time of process pid so far, in clock ticks (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@needs_processes
def test_an_idle_pool_costs_no_cpu():
    """After spin_seconds without work a helper blocks on its semaphore instead of spinning."""
    pool = parallel.Processes(2, [lambda j: ()], spin_seconds=0.02)
    pool.run(0, [(), ()])
    time.sleep(0.1)
    before = _cpu_ticks(pool._pids[0])
    time.sleep(0.5)
    assert _cpu_ticks(pool._pids[0]) - before <= 1   # at most 1 tick of 0.5 s (a spinning helper: ~50)
    assert pool.run(0, [(), ()]) == [(), ()]          # and it wakes for the next task
    pool.close()


@needs_processes
def test_a_pool_that_is_garbage_collected_ends_its_helpers():
    pool = parallel.Processes(2, [lambda j: ()])
    pids = list(pool._pids)
    pool.run(0, [(), ()])
    del pool
    gc.collect()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)   # reaped: no longer our child


_ORPHAN = """
import sys, time
from npvae.engine import parallel

def wait(j):
    parallel.wait_released(j)
    return ()
pool = parallel.Processes(3, [wait], spin_seconds=0.01)
print(*pool._pids, flush=True)
if sys.argv[1] == "in a task":   # the helpers wait at wait_released for a `before` that never ends
    pool.run(0, [()] * 3, before=lambda: time.sleep(1000))
time.sleep(1000)
"""


def _ended(pid):
    """True if process pid has exited (gone, or a zombie its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@needs_processes
@pytest.mark.parametrize("where", ["idle", "in a task"])
def test_helpers_end_when_the_main_process_is_killed(where):
    main = subprocess.Popen([sys.executable, "-c", _ORPHAN, where], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        helpers = [int(p) for p in main.stdout.readline().split()]
        assert len(helpers) == 2
        time.sleep(0.1)   # past spin_seconds: the helpers are blocked on a semaphore
    finally:
        main.kill()       # SIGKILL: no cleanup of any kind in the main process
        main.wait()
    deadline = time.monotonic() + 5.0
    while not all(map(_ended, helpers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(map(_ended, helpers))


# --- where there are no helper processes ----------------------------------------------------------

@pytest.mark.parametrize("platform, why", [("darwin", "macOS"), ("win32", "Windows has no fork")])
def test_auto_falls_back_to_threads_where_processes_cannot_fork_and_says_so_once(monkeypatch, platform, why):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(parallel, "_fallback_said", [False])   # as in a fresh process
    assert not parallel.processes_available()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")   # "once" is the module's doing, not the warnings filter's
        assert parallel.resolve_backend("auto", 2) == "threads"
        assert parallel.resolve_backend("auto", 2) == "threads"
        assert parallel.resolve_backend("auto", 1) == "threads"
        assert parallel.resolve_backend("threads", 2) == "threads"
    assert len(said) == 1 and why in str(said[0].message) and "threads" in str(said[0].message)
    with pytest.raises(ValueError, match=f"backend 'processes' needs Linux with os.fork: .*{why}"):
        parallel.resolve_backend("processes", 2)
    with pytest.raises(ValueError, match="backend 'processes' needs Linux"):
        parallel.Processes(2, [lambda j: ()])


def test_shared_zeros_are_aligned_zeroed_and_seen_by_a_forked_process():
    a = parallel.shared_zeros(10, np.float32, alignment=128)
    plain = parallel.aligned_zeros(10, np.float64)
    assert a.ctypes.data % 128 == 0 and plain.ctypes.data % 64 == 0
    assert a.shape == (10,) and a.dtype == np.float32 and not a.any() and not plain.any()
    assert parallel.is_shared(a) and parallel.is_shared(a[2:5].reshape(3, 1))
    assert not parallel.is_shared(plain) and not parallel.is_shared(np.zeros(3))
    if not hasattr(os, "fork"):
        return
    with warnings.catch_warnings():   # Python 3.12+ warns of a fork with threads (OpenBLAS's)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:   # the child writes both; only the shared array's write comes back
        a[3], plain[3] = 7.0, 7.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert a[3] == 7.0 and plain[3] == 0.0


@needs_processes
def test_a_fork_that_fails_part_way_ends_the_helpers_forked_before_it(monkeypatch):
    forked, real_fork = [], os.fork

    def fork_once():
        if forked:
            raise OSError(11, "Resource temporarily unavailable")
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid
    monkeypatch.setattr(os, "fork", fork_once)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        parallel.Processes(3, [lambda j: ()])
    assert len(forked) == 1
    with pytest.raises(ChildProcessError):   # reaped: no such child any more
        os.waitpid(forked[0], os.WNOHANG)
