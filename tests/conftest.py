"""Shared test helpers."""
import numpy as np
import pytest


class _Log(list):
    """The float64 passes seen (a list of descriptions), and .calls: how many ufunc calls were watched."""
    calls = 0


class _Watched(np.ndarray):
    """A float32 array that records every NumPy ufunc call reaching it with a float64 operand.

    A NumPy float64 scalar (e.g. np.sqrt of a Python float) in arithmetic
    with a float32 array makes NumPy run the pass in float64 and cast every
    element there and back: the same result to float32 rounding, twice as
    slow. Results are watched too, so every array computed from a watched
    one is. Reductions that ask for dtype=float64 on purpose (accumulating
    a sum) are allowed.
    """

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        operands = inputs + (out or ())
        self._log.calls += 1
        if not (method == "reduce" and kwargs.get("dtype") == np.float64):
            for a in operands:
                if isinstance(a, (np.ndarray, np.generic)) and a.dtype == np.float64:
                    self._log.append(f"{ufunc.__name__}.{method} with a float64 "
                                     f"{'scalar' if isinstance(a, np.generic) else 'array'}")
        plain = tuple(a.view(np.ndarray) if isinstance(a, _Watched) else a for a in inputs)
        if out is not None:
            kwargs["out"] = tuple(a.view(np.ndarray) if isinstance(a, _Watched) else a for a in out)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        wrap = lambda r: self._watch(r) if isinstance(r, np.ndarray) else r  # noqa: E731
        return tuple(map(wrap, result)) if isinstance(result, tuple) else wrap(result)

    def _watch(self, a):
        w = a.view(_Watched)
        w._log = self._log
        return w

    def __array_finalize__(self, obj):
        self._log = getattr(obj, "_log", None)


@pytest.fixture
def float64_watch():
    """(watch, log): watch(a) is a view of float32 array a that reports float64 passes into log."""
    log = _Log()

    def watch(a):
        assert a.dtype == np.float32
        w = a.view(_Watched)
        w._log = log
        return w
    return watch, log


# --- subprocesses started in the background --------------------------------------------------
# pytest runs one test at a time, on one core. The demos' tests spend their time waiting on
# subprocesses, so a test module may define background_jobs(item) -> {key: job}, the jobs a
# collected test will need (job(workdir) returns what the test asserts on). They start on one
# worker thread as soon as collection ends, those tests run last, and the rest of the suite runs
# meanwhile: on 2 cores the whole suite takes about as long as the larger of the two halves.

def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "background_jobs"))   # stable: order kept otherwise


def pytest_collection_finish(session):
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    jobs = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "background_jobs"):
            jobs.update(module.background_jobs(item))
    session.config._background = {}
    if not jobs:
        return
    root = Path(tempfile.mkdtemp(prefix="npvae-background-"))
    pool = ThreadPoolExecutor(max_workers=1)
    session.config._background_pool = (pool, root)
    for i, (key, job) in enumerate(jobs.items()):
        work = root / f"{i:02d}"
        work.mkdir()
        session.config._background[key] = pool.submit(job, work)


def pytest_sessionfinish(session):
    import shutil
    pool, root = getattr(session.config, "_background_pool", (None, None))
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)   # a cancelled session waits for the running job only
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def background(request):
    """background(key): the result of the job that background_jobs(item) named key (waits for it)."""
    return lambda key: request.config._background[key].result()
