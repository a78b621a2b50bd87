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
