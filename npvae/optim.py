"""Optimizers that update a params dict in place: Adam and SGD with momentum.

An optimizer holds references to the parameter arrays and changes them only in
step(). Its state is keyed by parameter name, so state_dict() can go into a
checkpoint next to the parameters and load_state_dict() can bring it back.
"""
import numpy as np


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


class Optimizer:
    """Shared bookkeeping: the params dict, the step count and per-name state arrays."""

    state_names = ()

    def __init__(self, params, lr):
        self.params = _check_params(params)
        self.lr = _check_rate("lr", lr, 0.0, np.inf)
        self.t = 0
        # one zero-initialized array per state name and parameter, e.g. self.state["m"]["enc.h0.W"]
        self.state = {s: {n: np.zeros_like(p) for n, p in params.items()} for s in self.state_names}

    def _check_grads(self, grads):
        if not isinstance(grads, dict) or grads.keys() != self.params.keys():
            raise ValueError("grads must be a dict with exactly the keys of params")
        for n, g in grads.items():
            if np.shape(g) != self.params[n].shape:
                raise ValueError(f"grads[{n!r}] must have shape {self.params[n].shape}, got {np.shape(g)}")

    def step(self, grads):
        """Apply one update to every parameter from grads (same keys and shapes as params)."""
        self._check_grads(grads)
        self.t += 1
        for name, p in self.params.items():
            self._update(name, p, grads[name])

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
                a[...] = v
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

    def _update(self, name, p, g):
        v = self.state["velocity"][name]
        v *= self.momentum
        v += g
        p -= self.lr * v


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
        self._tmp = {}

    def step(self, grads):
        self._check_grads(grads)
        self.t += 1
        # Bias corrections are scalars, so they are applied to the step size
        # and to v_hat once per step rather than to every m and v entry.
        self._c1 = 1.0 - self.beta1 ** self.t
        self._c2 = 1.0 - self.beta2 ** self.t
        for name, p in self.params.items():
            self._update(name, p, grads[name])

    def _update(self, name, p, g):
        m, v = self.state["m"][name], self.state["v"][name]
        tmp = self._tmp.get(name)
        if tmp is None:
            tmp = self._tmp[name] = np.empty_like(p)
        m *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        np.multiply(v, 1.0 / self._c2, out=tmp)     # v_hat
        np.sqrt(tmp, out=tmp)
        tmp += self.eps                              # eps outside the square root
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / self._c1                   # lr * m_hat / (sqrt(v_hat) + eps)
        p -= tmp
