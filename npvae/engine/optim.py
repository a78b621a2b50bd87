"""The engine's Adam: Kingma & Ba's Algorithm 1 (npvae.optim.Adam) in seven passes over one flat buffer.

FlatAdam takes the parameters of a VAE, views that tile one flat buffer,
and updates the whole buffer at once, or one range of it per thread or
process (step_range), with the moments stored scaled:

    M = m / s1,  V = v / s2,   s1 = beta1^(t mod R1),  s2 = beta2^(t mod R2)

Then m <- beta1 m + (1 - beta1) g is M <- M + ((1 - beta1) / s1) g, one BLAS
axpy instead of a scaling pass and an addition; every R steps the scale
comes back to 1 (one extra pass). The bias corrections and scales fold
into two scalars:

    m_hat / (sqrt(v_hat) + eps) = (s1 / (c1 q)) M / (sqrt(V) + eps / q),   q = sqrt(s2 / c2),
    c1 = 1 - beta1^t,  c2 = 1 - beta2^t.

`state` gives m and v themselves. state_dict() saves the stored arrays and
their scales ('m.scale', 'v.scale'), so that a resumed run repeats bit for
bit; npvae.optim.Adam.load_state_dict reads them, and FlatAdam reads the
reference's true moments. FlatAdam.step equals Adam.step
(tests/test_engine_optim.py).
"""
import functools
import math
import operator

import numpy as np

from ..optim import _check_grads, _check_params, _check_rate
from .parallel import is_shared, ranges, shared_zeros


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
    """y += a x in place: one BLAS pass (axpy) where y and x are contiguous and not empty, else two NumPy passes."""
    axpy = _AXPY.get(y.dtype) or _axpy_of(y.dtype)
    if axpy is not None and y.size and x.dtype == y.dtype and y.flags.c_contiguous and x.flags.c_contiguous:
        # reshape(-1) of a contiguous array is a view, so axpy writes y itself
        axpy(x.reshape(-1), y.reshape(-1), a=a)
    else:
        y += a * x


def _scale_period(beta):
    """How many steps a moment may go unrescaled: R with beta^(R - 1) >= 2^-20 (at most 1024; 1 for beta = 0)."""
    if beta == 0.0:
        return 1
    return min(1024, 1 + math.floor(math.log(2.0 ** -20) / math.log(beta)))


class FlatAdam:
    """npvae.optim.Adam over one flat buffer, with scaled moments (see the module's docstring).

    params: a VAE's params dict (views laid out in order in one 1-D buffer;
    the gaps between them stay zero). If that buffer is in shared memory
    (FastVAE(shared=True)), so is the state, and helper processes can each
    update a range of it (step_range). beta1 and beta2 are fixed at
    construction: the stored moments are scaled by their powers.
    """

    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = _check_params(params)
        self.lr = _check_rate("lr", lr, 0.0, np.inf)
        self._beta1 = _check_rate("beta1", beta1, 0.0, 1.0, low_open=False)
        self._beta2 = _check_rate("beta2", beta2, 0.0, 1.0, low_open=False)
        self.eps = _check_rate("eps", eps, 0.0, np.inf)
        self._periods = (_scale_period(self._beta1), _scale_period(self._beta2))
        self.t = 0
        self._layout = flat_layout(params.values())
        if self._layout is None:
            raise ValueError("FlatAdam needs params that tile one flat buffer, as a VAE's do "
                             "(npvae.optim.Adam takes any dict of arrays)")
        span, offsets = self._layout
        # one flat buffer per moment, laid out like the parameters, and a scratch one
        self._flat_state = {s: shared_zeros(span.size, span.dtype) if is_shared(span) else np.zeros_like(span)
                            for s in self.state_names}
        self._stored = {s: {n: buffer[o:o + p.size].reshape(p.shape) for (n, p), o in zip(params.items(), offsets)}
                        for s, buffer in self._flat_state.items()}
        self._tmp = np.empty_like(span)
        self._seen_grads = ((), None)   # (grads arrays, their flat_layout) of the last step

    beta1 = property(lambda self: self._beta1, doc="beta1 (fixed at construction)")
    beta2 = property(lambda self: self._beta2, doc="beta2 (fixed at construction)")

    @property
    def state(self):
        """{'m': {name: m}, 'v': {name: v}}: the moments themselves, as copies (load_state_dict sets them)."""
        return {s: {n: a * self._state_scale(s) for n, a in arrays.items()} for s, arrays in self._stored.items()}

    @property
    def shares_memory(self):
        """True if the parameters and the state are flat buffers in shared memory (see step_range)."""
        return is_shared(self._layout[0]) and all(is_shared(a) for a in self._flat_state.values())

    def _state_scale(self, name):
        """s with (true moment) = s * (stored array), at the current step t."""
        beta, period = (self._beta1, self._periods[0]) if name == "m" else (self._beta2, self._periods[1])
        return beta ** (self.t % period)

    def step(self, grads, workers=None):
        """Adam.step: one update of every parameter from grads (same keys and shapes as params,
        laid out in one flat buffer as params are: a VAE's own grads, not copies).

        workers (npvae.engine.parallel.Workers) splits the flat update into
        that many ranges, updated at once; element-wise arithmetic, so the
        result is the same.
        """
        _check_grads(self.params, grads)
        arrays = self._flat_arrays(grads)   # checked before anything changes
        self.t += 1
        self._begin_step()
        if workers is None:
            self._update(*arrays)
            return
        workers.run([functools.partial(self._update, *(a[start:stop] for a in arrays))
                     for start, stop in self.update_ranges(workers.n)])

    def update_ranges(self, n):
        """The n ranges of the flat buffers that n threads or processes update (step, step_range).

        Cut at multiples of 64 entries: BLAS's axpy rounds an entry by a fused
        multiply-add or not depending on where it falls in the piece it is
        given (its vector loop or its tail), and 64 entries are whole turns of
        its vector loop, so each entry is rounded as in one call on the whole
        buffer. Threads and processes take these same ranges.
        """
        return ranges(self._layout[0].size, n, align=64)

    def step_range(self, grads, start, stop, t, lr):
        """Step t at learning rate lr, on elements [start, stop) of the flat buffers only.

        One process's share of step(): the processes that share the buffers
        call it with the same t and lr and ranges that tile the buffer, and
        together make exactly the update of step(grads). Sets self.t and self.lr.
        """
        arrays = self._flat_arrays(grads)   # checked before anything changes
        self.t, self.lr = int(t), float(lr)
        self._begin_step()
        self._update(*(a[start:stop] for a in arrays))

    def _flat_arrays(self, grads):
        """[params, grads, m, v, scratch] as flat buffers laid out alike (grads must be laid out as params)."""
        grads_layout = self._grads_layout(grads)
        if grads_layout is None or grads_layout[1] != self._layout[1] or \
                grads_layout[0].size != self._layout[0].size:
            raise ValueError("FlatAdam needs grads laid out in one flat buffer like params (a VAE's grads)")
        return [self._layout[0], grads_layout[0], self._flat_state["m"], self._flat_state["v"], self._tmp]

    def _grads_layout(self, grads):
        """flat_layout(grads.values()), remembered for the same arrays (a model passes the same views every step)."""
        arrays = tuple(grads.values())
        seen = self._seen_grads
        if len(seen[0]) != len(arrays) or not all(map(operator.is_, arrays, seen[0])):
            seen = self._seen_grads = (arrays, flat_layout(arrays))
        return seen[1]

    def _begin_step(self):
        t, (b1, b2), (r1, r2) = self.t, (self._beta1, self._beta2), self._periods
        c1 = 1.0 - b1 ** t   # bias corrections
        c2 = 1.0 - b2 ** t
        s1, s2 = self._state_scale("m"), self._state_scale("v")
        # Going from step t - 1 to t: M <- (decay) M + (1 - beta1)/s1 g, where
        # decay = beta1 s1(t-1) / s1(t) is 1 but when t mod R1 = 0 (s1 back to 1).
        self._decay = (b1 ** r1 if t % r1 == 0 else 1.0, b2 ** r2 if t % r2 == 0 else 1.0)
        self._rates = ((1.0 - b1) / s1, (1.0 - b2) / s2)
        q = math.sqrt(s2 / c2)
        self._eps_q = self.eps / q
        self._lr_q = self.lr * s1 / (c1 * q)

    def _update(self, p, g, m, v, tmp):
        # Python floats, not NumPy float64 scalars: a float64 scalar would make
        # NumPy run a float32 array's pass in float64, casting every element
        # there and back (twice as slow).
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

    def state_dict(self):
        """{'t', 'lr', 'm.scale', 'v.scale', '<state>/<param name>': stored array}: the true moment is scale * array."""
        out = {"t": np.int64(self.t), "lr": np.float64(self.lr)}
        for s, arrays in self._stored.items():
            out[f"{s}.scale"] = np.float64(self._state_scale(s))
            for n, a in arrays.items():
                out[f"{s}/{n}"] = a.copy()
        return out

    def load_state_dict(self, state):
        """Restore a state_dict() of FlatAdam's or of npvae.optim.Adam's (the moments themselves)."""
        from ..optim import Adam
        # the reference checks everything and converts '<state>.scale', into arrays of its own
        reference = Adam({n: np.zeros_like(p) for n, p in self.params.items()}, lr=self.lr,
                         beta1=self._beta1, beta2=self._beta2, eps=self.eps)
        reference.load_state_dict(state)
        self.t, self.lr = reference.t, reference.lr
        scales = {s: float(state.get(f"{s}.scale", 1.0)) for s in self.state_names}
        for s, arrays in self._stored.items():
            # stored here = (the moment itself) / (this optimizer's scale at the loaded t); where the
            # checkpoint's scale is this one's, its stored arrays are taken as they are (bit for bit)
            ours = self._state_scale(s)
            for n, a in arrays.items():
                if scales[s] == ours:
                    a[...] = state[f"{s}/{n}"]
                else:
                    a[...] = reference.state[s][n] / ours
