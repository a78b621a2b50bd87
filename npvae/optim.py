"""Optimizers that update a params dict in place: Adam and SGD with momentum.

An optimizer holds references to the parameter arrays and changes them only in
step(). Its state is keyed by parameter name, so state_dict() can go into a
checkpoint next to the parameters and load_state_dict() can bring it back.
"""
import functools
import math

import numpy as np

from .parallel import is_shared, ranges, shared_zeros


def _check_params(params):
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of name -> float ndarray")
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"params[{name!r}] must be a float ndarray, got {type(p).__name__}"
                            f"{'' if not isinstance(p, np.ndarray) else ' of dtype ' + str(p.dtype)}")
    return params


def _check_rate(name, value, low, high, low_open=True, high_open=True):
    ok = np.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def flat_layout(arrays):
    """(span, offsets) if the arrays are views laid out in order in one 1-D buffer, else None.

    span is the 1-D view from the first array's start to the last one's end
    (gaps between arrays, e.g. alignment padding, included), offsets the
    element offset of each array within it. A VAE's params and grads are so laid out.
    """
    arrays = list(arrays)
    base, dtype = arrays[0].base, arrays[0].dtype
    if not isinstance(base, np.ndarray) or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    start = arrays[0].__array_interface__["data"][0]
    offsets, end = [], start
    for a in arrays:
        address = a.__array_interface__["data"][0]
        if a.base is not base or a.dtype != dtype or not a.flags.c_contiguous or address < end \
                or (address - start) % dtype.itemsize:
            return None
        offsets.append((address - start) // dtype.itemsize)
        end = address + a.nbytes
    first = start - base.__array_interface__["data"][0]
    return base.view(np.uint8)[first:first + end - start].view(dtype), offsets


class Optimizer:
    """Shared bookkeeping: the params dict, the step count and per-name state arrays.

    When the parameters are views that tile one flat buffer (as a VAE's are),
    the state is laid out the same way and a step updates whole buffers at
    once: the same arithmetic as per array, in a few large NumPy calls. If
    that buffer is in shared memory (VAE(shared=True)), so is the state, and
    helper processes can each update a range of it (step_range).
    """

    state_names = ()

    def __init__(self, params, lr):
        self.params = _check_params(params)
        self.lr = _check_rate("lr", lr, 0.0, np.inf)
        self.t = 0
        self._layout = flat_layout(params.values())
        # one zero-initialized array per state name and parameter, e.g. self.state["m"]["enc.h0.W"],
        # views into one flat buffer per state name laid out like the parameters where they have one
        self.state, self._flat_state = {}, {}
        for s in self.state_names:
            if self._layout is None:
                self.state[s] = {n: np.zeros_like(p) for n, p in params.items()}
                continue
            span, offsets = self._layout
            buffer = self._flat_state[s] = (shared_zeros(span.size, span.dtype) if is_shared(span)
                                            else np.zeros_like(span))
            self.state[s] = {n: buffer[o:o + p.size].reshape(p.shape)
                             for (n, p), o in zip(params.items(), offsets)}
        self._tmp = {}
        self._seen_grads = ((), None)   # (grads arrays, their flat_layout) of the last step

    @property
    def shares_memory(self):
        """True if the parameters and the state are flat buffers in shared memory (see step_range)."""
        return self._layout is not None and is_shared(self._layout[0]) and all(
            is_shared(a) for a in self._flat_state.values())

    def _check_grads(self, grads):
        if not isinstance(grads, dict) or grads.keys() != self.params.keys():
            raise ValueError("grads must be a dict with exactly the keys of params")
        for n, g in grads.items():
            if np.shape(g) != self.params[n].shape:
                raise ValueError(f"grads[{n!r}] must have shape {self.params[n].shape}, got {np.shape(g)}")

    def _scratch(self, key, like):
        tmp = self._tmp.get(key)
        if tmp is None:
            tmp = self._tmp[key] = np.empty_like(like)
        return tmp

    def step(self, grads, workers=None):
        """Apply one update to every parameter from grads (same keys and shapes as params).

        workers (npvae.parallel.Workers) splits the flat update into that many
        ranges, updated at once; element-wise arithmetic, so the result is the same.
        """
        self._check_grads(grads)
        self.t += 1
        self._begin_step()
        arrays = self._flat_arrays(grads)
        if arrays is not None:
            if workers is None:
                self._update(*arrays)
                return
            workers.run([functools.partial(self._update, *(a[start:stop] for a in arrays))
                         for start, stop in ranges(arrays[0].size, workers.n, align=16)])
            return
        for name, p in self.params.items():
            states = [self.state[s][name] for s in self.state_names]
            g = np.asarray(grads[name], dtype=p.dtype)
            self._update(p, g, *states, self._scratch(name, p))

    def step_range(self, grads, start, stop, t, lr):
        """Step t at learning rate lr, on elements [start, stop) of the flat buffers only.

        One process's share of step(): the processes that share the buffers
        call it with the same t and lr and ranges that tile the buffer, and
        together make exactly the update of step(grads). Sets self.t and self.lr.
        """
        self.t, self.lr = int(t), float(lr)
        self._begin_step()
        arrays = self._flat_arrays(grads)
        if arrays is None:
            raise ValueError("step_range needs parameters and grads that tile one flat buffer each, alike")
        self._update(*(a[start:stop] for a in arrays))

    def _flat_arrays(self, grads):
        """[params, grads, *state, scratch] as flat buffers laid out alike, or None if they are not.

        Gaps hold zeros in params, grads and state alike, and an update keeps them zero.
        """
        grads_layout = None if self._layout is None else self._grads_layout(grads)
        if grads_layout is None or grads_layout[1] != self._layout[1] or \
                grads_layout[0].size != self._layout[0].size:
            return None
        span = self._layout[0]
        return ([span, grads_layout[0]] + [self._flat_state[s] for s in self.state_names]
                + [self._scratch(None, span)])

    def _grads_layout(self, grads):
        """flat_layout(grads.values()), remembered for the same arrays (a model passes the same views every step)."""
        arrays = tuple(grads.values())
        seen = self._seen_grads
        if len(seen[0]) != len(arrays) or any(a is not b for a, b in zip(arrays, seen[0])):
            seen = self._seen_grads = (arrays, flat_layout(arrays))
        return seen[1]

    def _begin_step(self):
        """Per-step scalars (e.g. bias corrections), computed once before the updates."""

    def state_dict(self):
        """{'t': step count, 'lr': ..., '<state>/<param name>': array} as plain arrays (no pickle)."""
        out = {"t": np.int64(self.t), "lr": np.float64(self.lr)}
        for s, arrays in self.state.items():
            for n, a in arrays.items():
                out[f"{s}/{n}"] = a.copy()
        return out

    def load_state_dict(self, state):
        """Restore what state_dict() returned; shapes and names must match."""
        for s, arrays in self.state.items():
            for n, a in arrays.items():
                key = f"{s}/{n}"
                if key not in state:
                    raise ValueError(f"optimizer state is missing {key!r}")
                v = np.asarray(state[key])
                if v.shape != a.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {v.shape}, expected {a.shape}")
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"optimizer state {key!r} holds NaN or infinite values")
        for s, arrays in self.state.items():
            for n, a in arrays.items():
                a[...] = state[f"{s}/{n}"]
        self.t = int(state["t"])
        self.lr = _check_rate("lr", float(state["lr"]), 0.0, np.inf)


class SGD(Optimizer):
    """theta <- theta - lr * v, v <- momentum * v + g (v = g without momentum).

    State: 'velocity', one array per parameter with its shape.
    """

    state_names = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.0):
        self.momentum = _check_rate("momentum", momentum, 0.0, 1.0, low_open=False)
        super().__init__(params, lr)

    def _update(self, p, g, velocity, tmp):
        velocity *= self.momentum
        velocity += g
        np.multiply(velocity, self.lr, out=tmp)
        p -= tmp


class Adam(Optimizer):
    """Adam, exactly as Algorithm 1 of Kingma & Ba (2015).

        m <- beta1 m + (1 - beta1) g          first moment
        v <- beta2 v + (1 - beta2) g^2        second moment
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    State: 'm' and 'v', one array per parameter with its shape, and the step t.
    """

    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.beta1 = _check_rate("beta1", beta1, 0.0, 1.0, low_open=False)
        self.beta2 = _check_rate("beta2", beta2, 0.0, 1.0, low_open=False)
        self.eps = _check_rate("eps", eps, 0.0, np.inf)
        super().__init__(params, lr)

    def _begin_step(self):
        self._c1 = 1.0 - self.beta1 ** self.t   # bias corrections
        self._c2 = 1.0 - self.beta2 ** self.t

    def _update(self, p, g, m, v, tmp):
        # Python floats, not NumPy float64 scalars: a float64 scalar would make
        # NumPy run a float32 array's pass in float64, casting every element
        # there and back (twice as slow; see the dtype test in test_optim.py).
        c2 = math.sqrt(self._c2)
        # m += (1 - beta1)(g - m) is beta1 m + (1 - beta1) g in three passes
        # without a second temporary; likewise for v.
        np.subtract(g, m, out=tmp)
        tmp *= 1.0 - self.beta1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp -= v
        tmp *= 1.0 - self.beta2
        v += tmp
        # sqrt(v_hat) + eps = (sqrt(v) + eps sqrt(c2)) / sqrt(c2), so
        # lr m_hat / (sqrt(v_hat) + eps) = (lr sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2)):
        # the bias corrections become two scalars instead of two passes.
        np.sqrt(v, out=tmp)
        tmp += self.eps * c2
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr * c2 / self._c1
        p -= tmp
