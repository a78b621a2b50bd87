"""The engine's VAE: npvae.model.VAE with the same parameters and numbers, made for a split training step.

FastVAE adds to the reference model:
- buffers on 64-byte boundaries (BLAS is ~10% slower on misaligned
  matrices), in shared memory when helper processes train it (shared=True);
- replicas: models that share its parameters but keep their own gradients
  and caches, so that several threads or processes each run one block of a
  minibatch (replica());
- row bindings: a replica bound to rows [a, b) of a SplitBatch writes every
  layer's input and local gradient da into those rows, and leaves the weight
  gradients dW = x^T da, db = sum of da to SplitBatch.weight_grads, which any
  process can compute for any range of the flat gradient buffer;
- a forward and backward of the ELBO that form sigma and the clip's mask
  once, and take the Bernoulli log-likelihood from kernels.bernoulli_log_prob_and_exp.

FastVAE.forward / backward equal VAE.forward / backward (tests/test_engine_model.py).

Shapes: B batch, D data, H hidden, Z latent, K importance samples.
"""
import math

import numpy as np

from .. import distributions as dist
from ..layers import Dense
from ..model import VAE
from . import kernels
from .parallel import aligned_zeros


class BoundDense(Dense):
    """layers.Dense that writes y and da where a row binding tells it (out, da_out), and sums the
    bias gradient with BLAS (kernels.column_sums).

    With da_out bound, backward leaves dW and db alone: the caller computes
    them later (weight_grads) from the whole minibatch's inputs and da.
    """

    def __init__(self, W, b, dW, db, activation="identity"):
        super().__init__(W, b, dW, db, activation)
        self.out = self.da_out = None

    def forward(self, x):
        """Dense.forward, with y written into out when bound."""
        a = np.matmul(x, self.W, out=self.out)  # (B, O)
        a += self.b
        y = self._act(a)
        if self.out is not None and y is not self.out:   # an activation that is not in place (elu)
            np.copyto(self.out, y)
            y = self.out
        self.x, self.y = x, y
        return y

    def backward(self, dy, need_dx=True):
        """Dense.backward; bound, da goes into da_out and dW, db are left to weight_grads."""
        g = self._act_grad(self.y)
        if self.da_out is None:
            da = dy if g is None else dy * g  # (B, O)
            self.weight_grads(self.x, da)
        else:
            da = self.da_out
            if g is None:
                np.copyto(da, dy)
            else:
                np.multiply(dy, g, out=da)
        return da @ self.W.T if need_dx else None

    def weight_grads(self, x, da, rows=slice(None), cols=slice(None)):
        """dW[rows] = x[:, rows]^T da and db[cols] = sum_B da[:, cols], from x (B, I) and da (B, O).

        The rows of dW and the entries of db are independent sums over the
        batch, so pieces of them can be computed apart (by several processes).
        """
        np.matmul(x[:, rows].T, da, out=self.dW[rows])
        kernels.column_sums(da[:, cols], out=self.db[cols])


class KernelLogPxZ:
    """log_px_z of the model class it is mixed into (VAE's, HierarchicalVAE's); a Bernoulli's by
    kernels.bernoulli_log_prob, into a buffer (_work) kept from call to call."""

    _work = None   # log_px_z's buffer for softplus(logits)

    def log_px_z(self, x, out):
        if self.likelihood != "bernoulli":
            return super().log_px_z(x, out)
        if self._work is None or self._work.size < out.size:
            self._work = np.empty(out.size, dtype=self.dtype)
        return kernels.bernoulli_log_prob(x, out, self._work)


class FastVAE(KernelLogPxZ, VAE):
    """npvae.model.VAE for the engine (see the module's docstring); the same constructor, plus
    shared: keep the parameter and gradient buffers (and those of replicas) in memory that
    processes forked later also see (npvae.engine.parallel.Processes)."""

    dense_layer = BoundDense

    def __init__(self, *args, shared=False, **kwargs):
        self.shared = bool(shared)
        self._rows = None   # (x rows, z rows) of a SplitBatch this model is bound to (bind_rows)
        self._bound = None  # (batch, first, stop) of that binding
        super().__init__(*args, **kwargs)
        if self.posterior != "diagonal":
            raise ValueError(f"FastVAE has the diagonal posterior only, got posterior={self.posterior!r} "
                             "(npvae.model.VAE has every family)")

    @classmethod
    def like(cls, model, shared=False):
        """A FastVAE with model's configuration and a copy of its parameters."""
        fast = cls(**model.config, shared=shared)
        for name, p in model.params.items():
            fast.params[name][...] = p
        return fast

    def _allocate(self, shapes):
        """VAE._allocate with each view on a 64-byte boundary (zero padding between), in shared memory if asked."""
        align = max(1, 64 // self.dtype.itemsize)
        offsets, size = {}, 0
        for name, shape in shapes.items():
            offsets[name] = size
            size += -(-math.prod(shape) // align) * align
        self._views = {name: (offsets[name], shape) for name, shape in shapes.items()}
        flat = aligned_zeros(size, self.dtype, shared=self.shared)
        return flat, {name: flat[o:o + math.prod(shape)].reshape(shape) for name, (o, shape) in self._views.items()}

    def replica(self):
        """A FastVAE that shares this one's parameters (the same arrays) but has its own gradients.

        Its forward and backward keep their own caches and write its own
        gradient buffer, so several replicas can work on parts of one batch at
        once; an update to the parameters is seen by all.
        """
        return twin(self)

    # --- the networks, writing into bound rows --------------------------------------

    def _encode(self, x):
        if self._rows is not None and x is not self._rows[0]:   # bound: x goes into the batch's rows too
            np.copyto(self._rows[0], x)
            x = self._rows[0]
        return super()._encode(x)

    def _decode(self, z):
        if self._rows is not None:
            np.copyto(self._rows[1], z)
            z = self._rows[1]
        return super()._decode(z)

    # --- the ELBO ----------------------------------------------------------------------

    def forward(self, x, eps):
        """VAE.forward: x (B, D), eps (B, Z) -> (log_px_z, kl), each (B,)."""
        mu, log_sigma = self._encode(x)                         # (B, Z), (B, Z)
        sigma = dist.std(log_sigma)                             # once for z, the KL and backward
        z = kernels.reparameterize(mu, sigma, eps)              # (B, Z)
        out = self._decode(z)
        if self.likelihood == "bernoulli":
            log_px_z, e, t = kernels.bernoulli_log_prob_and_exp(x, out)
            reuse = (e, t)
        else:
            log_px_z, reuse = self.log_px_z(x, out), None
        kl = kernels.kl_standard_normal(mu, log_sigma, sigma)   # (B,)
        self._cache = (x, eps, mu, log_sigma, sigma, out, reuse)
        return log_px_z, kl

    def backward(self, dlog_px_z, dkl):
        """VAE.backward: upstream gradients (B,), (B,) -> grads dict."""
        x, eps, mu, log_sigma, sigma, out, reuse = self._cache
        if self.likelihood == "bernoulli":
            dout = kernels.bernoulli_log_prob_grad(dlog_px_z, x, out, *reuse)
        else:
            dout = self._log_px_z_grad(dlog_px_z, x, out)
        dz = self._decode_backward(dout)
        in_range = dist._in_range(log_sigma)   # where the clip in std() lets the gradient through
        dmu, dlog_sigma = kernels.reparameterize_grad(dz, sigma, eps, in_range)
        dmu_kl, dlog_sigma_kl = kernels.kl_standard_normal_grad(dkl, mu, sigma, in_range)
        self._encode_backward(dmu + dmu_kl, dlog_sigma + dlog_sigma_kl)
        return self.grads

    # --- a minibatch split over replicas ------------------------------------------------

    def layer_inputs(self):
        """{layer name: what the layer reads}: 'x', 'z', or the hidden layer before it, encoder first."""
        inputs = {}
        for side, first, heads in (("enc", "x", ("mu", "log_sigma")),
                                   ("dec", "z", ("logits", "mean", "log_sigma"))):
            before = first
            for i in range(len(self.hidden)):
                inputs[f"{side}.h{i}"], before = before, f"{side}.h{i}"
            for head in heads:
                inputs[f"{side}.{head}"] = before
        return {name: inputs[name] for name, *_ in self._layer_specs()}

    def grad_ranges(self, n):
        """n ranges [(start, stop), ...] that tile the flat gradient buffer in nearly equal pieces,
        each cut between two rows of a weight matrix or at the start of a bias (SplitBatch.weight_grads)."""
        allowed = {0, self.flat_grads.size}
        for offset, shape in self._views.values():
            width = shape[1] if len(shape) == 2 else shape[0]   # a bias is one row
            allowed.update(range(offset, offset + math.prod(shape) + 1, width))
        allowed = np.array(sorted(allowed))
        cuts = [0]
        for j in range(1, n):
            ideal = self.flat_grads.size * j / n
            cuts.append(max(cuts[-1], int(allowed[np.argmin(np.abs(allowed - ideal))])))
        cuts.append(self.flat_grads.size)
        return list(zip(cuts, cuts[1:]))

    def input_rows(self):
        """Bound to a SplitBatch: the (b, D) rows of it where forward puts x (x may be written
        there in advance; forward then copies nothing). Else None."""
        return None if self._rows is None else self._rows[0]

    def bind_rows(self, batch, first, stop):
        """Work on rows [first, stop) of the SplitBatch batch (None: unbind).

        Bound, forward writes the inputs of every layer (x, z, the hidden
        layers' outputs) into those rows of batch, and backward writes each
        layer's local gradient da there instead of its own weight gradients;
        batch.weight_grads computes those afterwards, over the whole batch.
        """
        if batch is None:
            self._rows = self._bound = None
            for layer in self._layers.values():
                layer.out = layer.da_out = None
            return
        bound = self._bound
        if bound is not None and bound[0] is batch and bound[1:] == (first, stop):
            return   # bound there already (a training step binds the same rows every time)
        k = batch.k
        for name, layer in self._layers.items():
            r = _rows_per_example(name, k)
            rows = slice(first * r, stop * r)
            layer.out = batch.inputs[name][rows] if name in batch.inputs else None
            layer.da_out = batch.da[name][rows]
        self._rows = batch.inputs["x"][first:stop], batch.inputs["z"][first * k:stop * k]
        self._bound = batch, first, stop


def twin(model):
    """A model of model's class that shares its parameters (the same arrays) but has its own
    gradient buffer, caches and no row binding: FastVAE.replica, and the same for a reference
    VAE (threads that evaluate one model at once)."""
    other = object.__new__(type(model))
    other.__dict__.update(model.__dict__)
    other._cache = other._cache_iwae = None
    if isinstance(model, FastVAE):
        other._rows = other._bound = other._work = None
    other.flat_grads, other.grads = other._allocate({n: g.shape for n, g in model.grads.items()})
    other._make_layers(model._layer_specs())
    return other


class SplitBatch:
    """A minibatch split over replicas: its layers' inputs and local gradients, whole.

    Each replica, bound to its block of rows (FastVAE.bind_rows), runs forward
    and backward on them and writes every layer's input (x, z, the hidden
    layers' outputs) and local gradient da = dloss/da into its rows here.
    Once all have finished, the weight gradients are sums over the whole batch,

        dW = x^T da        db = sum over rows of da

    so any range of the model's flat gradient buffer can be computed on its
    own (weight_grads), by any process: no replica keeps gradients of its
    own, and none have to be added up.

    capacity: the most examples a minibatch may have; k: samples per example
    (the decoder sees k rows per example: the IWAE bound); shared: in memory
    that processes forked later also see (npvae.engine.parallel.Processes).
    """

    def __init__(self, model, capacity, k=1, shared=False):
        self.model, self.capacity, self.k = model, int(capacity), int(k)
        self.reads = model.layer_inputs()

        def rows(name):
            return self.capacity * _rows_per_example(name, self.k)

        def zeros(name, width):
            return aligned_zeros(rows(name) * width, model.dtype, shared=shared).reshape(rows(name), width)
        widths = {"x": model.x_dim, "z": model.z_dim}
        widths.update((name, fan_out) for name, _, fan_out, _ in model._layer_specs())
        # inputs[name]: the array that name's output is; layers read it (x and z are the model's)
        self.inputs = {name: zeros(name, widths[name]) for name in ["x", "z"] + sorted(
            set(self.reads.values()) - {"x", "z"})}
        self.da = {name: zeros(name, fan_out) for name, _, fan_out, _ in model._layer_specs()}
        self._plans = {}   # (start, stop) -> what weight_grads does for that range

    def weight_grads(self, start, stop, B):
        """The model's gradient on [start, stop) of its flat buffer (model.grad_ranges' pieces),
        from the first B examples, which the bound replicas have written."""
        if not 0 < B <= self.capacity:
            raise ValueError(f"B must be in [1, {self.capacity}], got {B}")
        plan = self._plans.get((start, stop))
        if plan is None:   # a training step asks for the same ranges every time: worked out once
            plan = self._plans[start, stop] = self._plan(start, stop)
        for layer, x, da, r, rows, cols in plan:
            layer.weight_grads(x[:B * r], da[:B * r], rows, cols)

    def _plan(self, start, stop):
        """[(layer, its input, its da, rows per example, rows of W, entries of b)] of every layer
        with a piece in [start, stop) of the flat buffer."""
        model, plan = self.model, []
        for name, layer in model._layers.items():
            rows = _piece(model._views[name + ".W"], start, stop)
            cols = _piece(model._views[name + ".b"], start, stop)
            if rows.stop > rows.start or cols.stop > cols.start:
                plan.append((layer, self.inputs[self.reads[name]], self.da[name],
                             _rows_per_example(name, self.k), rows, cols))
        return plan


def _rows_per_example(name, k):
    """How many rows an example has in layer (or input) `name` of a SplitBatch: k in z and the
    decoder, which see k samples per example (the IWAE bound), 1 in x and the encoder."""
    return k if name == "z" or name.startswith("dec.") else 1


def _piece(view, start, stop):
    """The rows of a (rows, width) view (entries of a 1-D one) at (offset, shape) that [start, stop) covers."""
    offset, shape = view
    width = shape[1] if len(shape) == 2 else 1
    first = min(max(start - offset, 0), shape[0] * width)
    last = min(max(stop - offset, 0), shape[0] * width)
    if first % width or last % width:
        raise ValueError(f"range [{start}, {stop}) cuts a row of a weight matrix (see FastVAE.grad_ranges)")
    return slice(first // width, last // width)
