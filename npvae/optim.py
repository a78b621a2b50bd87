"""Optimizers that update a params dict in place: Adam and SGD with momentum.

An optimizer holds references to the parameter arrays and changes them only in
step(grads), where grads has the keys and shapes of params. Its state is one
array per state name and parameter (state["m"]["enc.h0.W"]), so state_dict()
can go into a checkpoint next to the parameters and load_state_dict() can
bring it back.
"""
import math

import numpy as np


def _check_params(params):
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of name -> float ndarray")
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"params[{name!r}] must be a float ndarray, got {type(p).__name__}"
                            f"{'' if not isinstance(p, np.ndarray) else ' of dtype ' + str(p.dtype)}")
    return params


def _check_grads(params, grads):
    if not isinstance(grads, dict) or grads.keys() != params.keys():
        raise ValueError("grads must be a dict with exactly the keys of params")
    for n, g in grads.items():
        if np.shape(g) != params[n].shape:
            raise ValueError(f"grads[{n!r}] must have shape {params[n].shape}, got {np.shape(g)}")


def _check_rate(name, value, low, high, low_open=True, high_open=True):
    ok = np.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


class Optimizer:
    """The params dict, the learning rate, the step count t and the state arrays.

    state: {state name: {parameter name: array of the parameter's shape}},
    zero at the start.
    """

    state_names = ()

    def __init__(self, params, lr):
        self.params = _check_params(params)
        self.lr = _check_rate("lr", lr, 0.0, np.inf)
        self.t = 0
        self.state = {s: {n: np.zeros_like(p) for n, p in params.items()} for s in self.state_names}

    def _check_grads(self, grads):
        _check_grads(self.params, grads)

    def step(self, grads):
        """Apply one update to every parameter from grads (same keys and shapes as params)."""
        raise NotImplementedError

    def state_dict(self):
        """{'t': step count, 'lr': ..., '<state>/<param name>': array} as plain arrays (no pickle)."""
        out = {"t": np.int64(self.t), "lr": np.float64(self.lr)}
        for s, arrays in self.state.items():
            for n, a in arrays.items():
                out[f"{s}/{n}"] = a.copy()
        return out

    def load_state_dict(self, state):
        """Restore what state_dict() returned; shapes and names must match, nothing changes otherwise.

        Checkpoints written before npvae's Adam kept its true moments hold the
        stored arrays M and a factor '<state>.scale' with m = scale * M: those
        are converted here.
        """
        loaded = {}
        for s, arrays in self.state.items():
            scale = float(state.get(f"{s}.scale", 1.0))
            if not (math.isfinite(scale) and scale > 0.0):
                raise ValueError(f"optimizer state {s + '.scale'!r} must be a positive number, got {scale!r}")
            for n, a in arrays.items():
                key = f"{s}/{n}"
                if key not in state:
                    raise ValueError(f"optimizer state is missing {key!r}")
                v = np.asarray(state[key])
                if v.shape != a.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {v.shape}, expected {a.shape}")
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"optimizer state {key!r} holds NaN or infinite values")
                loaded[s, n] = v * scale if scale != 1.0 else v
        lr = _check_rate("lr", float(state["lr"]), 0.0, np.inf)
        self.t, self.lr = int(state["t"]), lr
        for (s, n), v in loaded.items():
            self.state[s][n][...] = v


class SGD(Optimizer):
    """theta <- theta - lr * v, v <- momentum * v + g (v = g without momentum).

    State: 'velocity', one array per parameter with its shape.
    """

    state_names = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.0):
        self.momentum = _check_rate("momentum", momentum, 0.0, 1.0, low_open=False)
        super().__init__(params, lr)

    def step(self, grads):
        """One SGD step on every parameter."""
        self._check_grads(grads)
        self.t += 1
        for name, p in self.params.items():
            g = np.asarray(grads[name], dtype=p.dtype)
            velocity = self.state["velocity"][name]
            velocity *= self.momentum
            velocity += g
            p -= self.lr * velocity


class Adam(Optimizer):
    """Adam, Algorithm 1 of Kingma & Ba (2015).

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
        """One Adam step on every parameter."""
        self._check_grads(grads)
        self.t += 1
        beta1, beta2, t = self.beta1, self.beta2, self.t
        for name, p in self.params.items():
            g = np.asarray(grads[name], dtype=p.dtype)
            m, v = self.state["m"][name], self.state["v"][name]
            # Each line below is one line of Algorithm 1, computed in place or into
            # two scratch arrays of p's shape (out=): a new array per line would
            # cost a fresh, page-faulting allocation of p's size each step,
            # several times the arithmetic on large layers.
            tmp, tmp2 = self._scratch(name)
            m *= beta1
            m += np.multiply(1.0 - beta1, g, out=tmp)                      # m = beta1 m + (1 - beta1) g
            v *= beta2
            v += np.multiply(1.0 - beta2, np.square(g, out=tmp), out=tmp)  # v = beta2 v + (1 - beta2) g^2
            m_hat = np.divide(m, 1.0 - beta1 ** t, out=tmp)                # m_hat = m / (1 - beta1^t)
            v_hat = np.divide(v, 1.0 - beta2 ** t, out=tmp2)               # v_hat = v / (1 - beta2^t)
            denominator = np.add(np.sqrt(v_hat, out=tmp2), self.eps, out=tmp2)          # sqrt(v_hat) + eps
            p -= np.multiply(self.lr, np.divide(m_hat, denominator, out=tmp), out=tmp)  # theta -= lr m_hat / (...)

    def _scratch(self, name):
        """Two arrays of the shape and dtype of params[name], kept from step to step."""
        pair = self._tmp.get(name)
        if pair is None:
            p = self.params[name]
            pair = self._tmp[name] = (np.empty_like(p), np.empty_like(p))
        return pair
