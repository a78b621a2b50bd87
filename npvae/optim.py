"""Optimizers that update a params dict in place: Adam and SGD with momentum.

An optimizer holds references to the parameter arrays and changes them only in
step(). Its state is keyed by parameter name, so state_dict() can go into a
checkpoint next to the parameters and load_state_dict() can bring it back.
"""
import functools
import math
import operator

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
        # one zero-initialized array per state name and parameter, e.g. self._state["m"]["enc.h0.W"],
        # views into one flat buffer per state name laid out like the parameters where they have one
        self._state, self._flat_state = {}, {}
        for s in self.state_names:
            if self._layout is None:
                self._state[s] = {n: np.zeros_like(p) for n, p in params.items()}
                continue
            span, offsets = self._layout
            buffer = self._flat_state[s] = (shared_zeros(span.size, span.dtype) if is_shared(span)
                                            else np.zeros_like(span))
            self._state[s] = {n: buffer[o:o + p.size].reshape(p.shape)
                              for (n, p), o in zip(params.items(), offsets)}
        self._tmp = {}
        self._seen_grads = ((), None)   # (grads arrays, their flat_layout) of the last step

    def _state_scale(self, name):
        """s with (the state itself) = s * (the stored array) at the current step: 1 unless an optimizer stores it scaled."""
        return 1.0

    @property
    def state(self):
        """{state name: {parameter name: array}}, e.g. state["m"]["enc.h0.W"], to read.

        Where an optimizer stores a state scaled (Adam), these are scaled-back
        copies; load_state_dict() is the way to set the state.
        """
        out = {}
        for s, arrays in self._state.items():
            scale = self._state_scale(s)
            out[s] = arrays if scale == 1.0 else {n: a * scale for n, a in arrays.items()}
        return out

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
                         for start, stop in self.update_ranges(workers.n)])
            return
        for name, p in self.params.items():
            states = [self._state[s][name] for s in self.state_names]
            g = np.asarray(grads[name], dtype=p.dtype)
            self._update(p, g, *states, self._scratch(name, p))

    def update_ranges(self, n):
        """The n ranges of the flat buffers that n threads or processes update (step, step_range).

        Cut at multiples of 64 entries: BLAS's axpy (Adam) rounds an entry by a
        fused multiply-add or not depending on where it falls in the piece it
        is given (its vector loop or its tail), and 64 entries are whole turns
        of its vector loop, so each entry is rounded as in one call on the
        whole buffer. Threads and processes take these same ranges.
        """
        if self._layout is None:
            raise ValueError("update_ranges needs parameters that tile one flat buffer")
        return ranges(self._layout[0].size, n, align=64)

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
        if len(seen[0]) != len(arrays) or not all(map(operator.is_, arrays, seen[0])):
            seen = self._seen_grads = (arrays, flat_layout(arrays))
        return seen[1]

    def _begin_step(self):
        """Per-step scalars (e.g. bias corrections), computed once before the updates."""

    # an optimizer that stores a state scaled (Adam) sets this: state_dict() then saves the
    # stored arrays as they are, and '<state>.scale', so that a resumed run repeats bit for bit
    scaled_state = False

    def state_dict(self):
        """{'t': step count, 'lr': ..., '<state>/<param name>': array} as plain arrays (no pickle).

        With scaled_state, each '<state>/<param name>' is the stored array and
        '<state>.scale' the factor that makes it the state itself.
        """
        out = {"t": np.int64(self.t), "lr": np.float64(self.lr)}
        for s, arrays in self._state.items():
            if self.scaled_state:
                out[f"{s}.scale"] = np.float64(self._state_scale(s))
            for n, a in arrays.items():
                out[f"{s}/{n}"] = a.copy()
        return out

    def load_state_dict(self, state):
        """Restore what state_dict() returned; shapes and names must match.

        Without '<state>.scale', the arrays are taken as the state itself (as
        an optimizer that does not scale its state saves them).
        """
        scales = {}
        for s, arrays in self._state.items():
            scale = float(state.get(f"{s}.scale", 1.0))
            if not (math.isfinite(scale) and scale > 0.0):
                raise ValueError(f"optimizer state {s + '.scale'!r} must be a positive number, got {scale!r}")
            scales[s] = scale
            for n, a in arrays.items():
                key = f"{s}/{n}"
                if key not in state:
                    raise ValueError(f"optimizer state is missing {key!r}")
                v = np.asarray(state[key])
                if v.shape != a.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {v.shape}, expected {a.shape}")
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"optimizer state {key!r} holds NaN or infinite values")
        lr = _check_rate("lr", float(state["lr"]), 0.0, np.inf)
        self.t, self.lr = int(state["t"]), lr
        for s, arrays in self._state.items():
            # stored here = (the state itself) / (this optimizer's scale at the loaded t)
            ratio = scales[s] / self._state_scale(s)
            for n, a in arrays.items():
                a[...] = state[f"{s}/{n}"]
                if ratio != 1.0:
                    a *= ratio


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


def _axpy_of(dtype):
    """BLAS's y <- a x + y for float32 or float64 (scipy.linalg.blas), else None."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        return None
    if dtype not in _AXPY:
        from scipy.linalg import blas   # ~0.3 s to import: only at a first step (parallel._find_blas
        # loads it too, before helpers fork, to hold its threads)
        _AXPY[dtype] = blas.get_blas_funcs("axpy", dtype=dtype)
    return _AXPY[dtype]


_AXPY = {}


def _add_scaled(y, a, x):
    """y += a x in place: one BLAS pass (axpy) where y and x are contiguous, else two NumPy passes."""
    axpy = _AXPY.get(y.dtype) or _axpy_of(y.dtype)
    if axpy is not None and x.dtype == y.dtype and y.flags.c_contiguous and x.flags.c_contiguous:
        # reshape(-1) of a contiguous array is a view, so axpy writes y itself
        axpy(x.reshape(-1), y.reshape(-1), a=a)
    else:
        y += a * x


def _scale_period(beta):
    """How many steps a moment may go unrescaled: R with beta^(R - 1) >= 2^-20 (at most 1024; 1 for beta = 0)."""
    if beta == 0.0:
        return 1
    return min(1024, 1 + math.floor(math.log(2.0 ** -20) / math.log(beta)))


class Adam(Optimizer):
    """Adam, exactly as Algorithm 1 of Kingma & Ba (2015).

        m <- beta1 m + (1 - beta1) g          first moment
        v <- beta2 v + (1 - beta2) g^2        second moment
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    State: 'm' and 'v', one array per parameter with its shape, and the step t.

    How it is stored (to save passes over memory): the arrays hold
    M = m / s1 and V = v / s2 with s1 = beta1^(t mod R1), s2 = beta2^(t mod R2)
    (_scale_period). Then beta1 m + (1 - beta1) g is M + ((1 - beta1) / s1) g,
    one BLAS axpy instead of a scaling pass and an addition; every R steps the
    scale comes back to 1 (one extra pass). `state` gives m and v themselves;
    state_dict() the stored arrays and their scales ('m.scale', 'v.scale'),
    so that a resumed run repeats bit for bit.
    """

    state_names = ("m", "v")
    scaled_state = True

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self._beta1 = _check_rate("beta1", beta1, 0.0, 1.0, low_open=False)
        self._beta2 = _check_rate("beta2", beta2, 0.0, 1.0, low_open=False)
        self.eps = _check_rate("eps", eps, 0.0, np.inf)
        self._periods = (_scale_period(self._beta1), _scale_period(self._beta2))
        super().__init__(params, lr)

    # the stored moments are scaled by powers of the betas, so the betas cannot change
    beta1 = property(lambda self: self._beta1, doc="beta1 (fixed at construction)")
    beta2 = property(lambda self: self._beta2, doc="beta2 (fixed at construction)")

    def _state_scale(self, name):
        """s with (true state) = s * (stored array), at the current step t."""
        beta, period = (self._beta1, self._periods[0]) if name == "m" else (self._beta2, self._periods[1])
        return beta ** (self.t % period)

    def _begin_step(self):
        t, (b1, b2), (r1, r2) = self.t, (self._beta1, self._beta2), self._periods
        c1 = 1.0 - b1 ** t   # bias corrections
        c2 = 1.0 - b2 ** t
        s1, s2 = self._state_scale("m"), self._state_scale("v")
        # Going from step t - 1 to t: M <- (decay) M + (1 - beta1)/s1 g, where
        # decay = beta1 s1(t-1) / s1(t) is 1 but when t mod R1 = 0 (s1 back to 1).
        self._decay = (b1 ** r1 if t % r1 == 0 else 1.0, b2 ** r2 if t % r2 == 0 else 1.0)
        self._rates = ((1.0 - b1) / s1, (1.0 - b2) / s2)
        # m_hat / (sqrt(v_hat) + eps) = (s1 / (c1 q)) M / (sqrt(V) + eps / q), q = sqrt(s2 / c2):
        # the bias corrections and scales become two scalars instead of passes.
        q = math.sqrt(s2 / c2)
        self._eps_q = self.eps / q
        self._lr_q = self.lr * s1 / (c1 * q)

    def _update(self, p, g, m, v, tmp):
        # Python floats, not NumPy float64 scalars: a float64 scalar would make
        # NumPy run a float32 array's pass in float64, casting every element
        # there and back (twice as slow; see the dtype test in test_optim.py).
        # Seven passes, and one more for a moment whose decay is not 1 (once every R steps).
        if self._decay[0] != 1.0:
            m *= self._decay[0]
        _add_scaled(m, self._rates[0], g)
        np.multiply(g, g, out=tmp)
        if self._decay[1] != 1.0:
            v *= self._decay[1]
        _add_scaled(v, self._rates[1], tmp)
        np.sqrt(v, out=tmp)
        tmp += self._eps_q
        np.divide(m, tmp, out=tmp)
        _add_scaled(p, -self._lr_q, tmp)
