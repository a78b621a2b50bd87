"""Dense layers, activations and MLP stacks, with hand-written backward passes.

    a = x W + b            x (B, I), W (I, O), b (O,)
    y = act(a)             (B, O)

    da = dy * act'(a)      dW = x^T da      db = sum_B da      dx = da W^T

A layer's forward keeps what its backward needs (its input x and output y);
its backward returns dx and writes dW and db. Nothing here changes a weight:
only an optimizer does that.

Shapes: B batch, I layer input width, O layer output width.
"""
import numpy as np

# scipy.special is imported inside the functions that use it: importing it
# costs about 0.2 s, more than all of npvae, and many uses never need it.

# Every activation's derivative is written in terms of its *output* y, so a
# layer keeps one array per layer and can apply the activation in place.


def _relu(a):
    return np.maximum(a, 0, out=a)


def _relu_grad(y):
    return y > 0


LEAKY_SLOPE = 0.01


def _leaky_relu(a):
    # max(a, s*a) equals a for a > 0 and s*a otherwise because 0 < s < 1.
    return np.maximum(a, LEAKY_SLOPE * a, out=a)


def _leaky_relu_grad(y):
    # y > 0 exactly when a > 0, because the negative branch only scales a.
    return np.where(y > 0, 1.0, LEAKY_SLOPE).astype(y.dtype, copy=False)


def _elu(a):
    return np.where(a > 0, a, np.expm1(np.minimum(a, 0)))


def _elu_grad(y):
    # For a <= 0: y = exp(a) - 1, so dy/da = exp(a) = y + 1.
    return np.where(y > 0, 1.0, y + 1.0).astype(y.dtype, copy=False)


def _tanh(a):
    return np.tanh(a, out=a)


def _tanh_grad(y):
    return 1.0 - y * y


def _sigmoid(a):
    from scipy.special import expit
    return expit(a, out=a)


def _sigmoid_grad(y):
    return y * (1.0 - y)


def _softplus(a):
    return np.logaddexp(0.0, a, out=a)


def _softplus_grad(y):
    # y = log(1 + e^a)  =>  sigmoid(a) = 1 - e^(-y); -expm1 keeps precision when y is tiny.
    return -np.expm1(-y)


def _identity(a):
    return a


def _identity_grad(y):
    return None  # Multiplying by one is skipped.


# name -> (forward(a) -> y, which may overwrite a; derivative dy/da from y)
ACTIVATIONS = {
    "relu": (_relu, _relu_grad),
    "leaky_relu": (_leaky_relu, _leaky_relu_grad),
    "elu": (_elu, _elu_grad),
    "tanh": (_tanh, _tanh_grad),
    "sigmoid": (_sigmoid, _sigmoid_grad),
    "softplus": (_softplus, _softplus_grad),
    "identity": (_identity, _identity_grad),
}


def check_activation(name):
    """Return name if it is a known activation, else raise ValueError listing them."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name


def init_std(activation, fan_in, fan_out):
    """Standard deviation of the initial weights for this activation.

    He et al. (2015) for the rectifier family, whose outputs are zero (or
    nearly) for half the inputs; Glorot & Bengio (2010) for the rest, times 4
    for the logistic sigmoid, whose slope at 0 is 1/4 rather than tanh's 1.
    """
    if activation in ("relu", "leaky_relu", "elu"):
        return np.sqrt(2.0 / fan_in)
    glorot = np.sqrt(2.0 / (fan_in + fan_out))
    return 4.0 * glorot if activation == "sigmoid" else glorot


class Dense:
    """y = activation(x @ W + b): x (B, I) -> y (B, O); W (I, O), b (O,).

    W, b, dW, db are arrays owned by the caller (usually views into a model's
    flat parameter and gradient buffers); the layer reads W and b and writes dW
    and db in backward.
    """

    def __init__(self, W, b, dW, db, activation="identity"):
        self.W, self.b, self.dW, self.db = W, b, dW, db
        self.activation = check_activation(activation)
        self._act, self._act_grad = ACTIVATIONS[activation]
        self.x = self.y = None

    def forward(self, x):
        """x (B, I) -> y (B, O); keeps x and y for backward."""
        a = x @ self.W                 # (B, O)
        a += self.b                    # in place: no second (B, O) array
        y = self._act(a)               # in place where the activation can be
        self.x, self.y = x, y
        return y

    def backward(self, dy, need_dx=True):
        """dy (B, O) -> dx (B, I) (None if not need_dx); writes dW = x^T da and db = sum_B da.

        Local derivative: da = dy * act'(a), dx = da W^T.
        """
        g = self._act_grad(self.y)
        da = dy if g is None else dy * g     # (B, O)
        np.matmul(self.x.T, da, out=self.dW)
        self.db[...] = da.sum(axis=0)
        return da @ self.W.T if need_dx else None


class MLP:
    """A stack of Dense layers with one activation: x (B, I) -> h (B, H_last)."""

    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x):
        """x (B, I) -> output of the last layer."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, need_dx=True):
        """Gradient at the output -> gradient at the input (None if not needed)."""
        for i in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[i].backward(dy, need_dx=need_dx or i > 0)
        return dy
