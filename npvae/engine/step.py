"""The engine's training step: one optimizer step on one minibatch, split over threads or processes.

make_step(model, optimizer, prepare, ...) returns step(x, beta, rng, index=...),
the whole hot path of npvae train. On one core it is the reference loop,

    loss, grads = model.loss_and_grads(x)      (npvae.model.VAE)
    optimizer.step(grads)                      (npvae.optim.Adam)

with the engine's model and optimizer (FastVAE, FlatAdam). On several it
splits the minibatch instead (npvae.engine.parallel):

    part j:  forward and backward on rows [a_j, b_j) of the batch, with
             upstream gradient -1/B per row (B the whole batch), by its own
             replica (FastVAE.replica), which writes each layer's input x and
             local gradient da into those rows of one whole-batch SplitBatch
    part j:  the weight gradients dW = x^T da, db = sum of da over the whole
             batch, on range j of the flat gradient buffer (FastVAE.grad_ranges)
    part j:  the optimizer's update on range j of the flat parameter buffer

Each weight gradient is the same sum over the batch as one part's, so a step
agrees with the serial one to float rounding; for a given number of parts
every run is bit for bit reproducible (the split does not depend on timing).
tests/test_engine_step.py holds it against the reference loop.
"""
import contextlib
import functools
import math

import numpy as np

from ..data import Rows
from . import parallel
from .model import SplitBatch


def _as_index(index, name="index"):
    index = np.asarray(index)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D array of integers, got {index.dtype} of shape {index.shape}")
    return index


def gather(x, index, out=None):
    """x[index], read in increasing row order: stored rows x (N, D), index (B,) -> (B, D) of x's dtype.

    x: an array (memory-mapped too) or a data.Rows (a split: its index is composed with this one).
    Equals x[index] exactly, as train.reference_step reads a minibatch: the rows are read sorted,
    so that a memory-mapped file is read forwards (each page once, in the order read-ahead
    expects), then put back in index's order, the shuffle's, at the cost of one copy of B rows.
    out: a (B, D) array of x's dtype to write the rows into (and return).
    """
    index = _as_index(index)
    stored, rows = (x.x, x.index[index]) if isinstance(x, Rows) else (x, index)
    order = np.argsort(rows)
    if out is None:
        out = np.empty((index.shape[0],) + stored.shape[1:], stored.dtype)
    out[order] = np.take(stored, rows[order], axis=0)
    return out


def _minibatch(x, index, next_index=None):
    """The stored rows of a minibatch: x itself, or x[index] (index checked, and next_index if given)."""
    if next_index is not None:
        _as_index(next_index, "next_index")
    if index is None:
        return np.asarray(x)   # a data.Rows reads its rows here
    return gather(x, index)


def make_step(model, optimizer, prepare, objective="elbo", k=1, threads=1, backend="auto"):
    """A function step(x, beta, rng, index=None, next_index=None) -> (sum of log p(x|z) or bound,
    sum of KL, |grad|^2).

    One optimizer step on one minibatch: the whole hot path of training.
    The minibatch is the stored rows x, or with index the rows x[index] of
    the whole set x (so that each process can gather its own share), read
    by gather: x may be a memory-mapped array, or a data.Rows (a split of one).
    next_index, the index the next call will give with the same x, is a
    hint: on processes the step gathers those rows while it waits for its
    helpers, and the next call uses them if its x and index are the same
    (they are read from x during this call). It changes no result.
    prepare (a Prepare) makes the model's input from the stored rows.
    threads > 1 (or "auto") splits the minibatch over that many threads
    (npvae.engine.parallel): the same step to float rounding, on several cores.
    backend "processes" splits it over helper processes instead, which
    needs a FastVAE(shared=True) and a FlatAdam over its params; "auto" takes
    processes where that holds and npvae.engine.parallel.processes_available(),
    threads otherwise.

    step.session() is a context for many steps in a row (a training epoch):
    a split step keeps OpenBLAS to one thread per core, and the session
    sets that once instead of at every step. step.close() stops the helper
    threads or processes (a later step starts new ones): forked helpers
    hold the memory they share with this process until they end.
    """
    Z = model.z_dim
    n = parallel.resolve_threads(threads)
    use = parallel.resolve_backend(backend, n)
    if use == "processes" and not (getattr(model, "shared", False) and optimizer.params is model.params
                                    and getattr(optimizer, "shares_memory", False)):
        if backend == "processes":
            raise ValueError("backend 'processes' needs a FastVAE(shared=True) and a FlatAdam made "
                             "with its params dict (the state then lives in shared memory too)")
        use = "threads"
    if n > 1 and not hasattr(model, "replica"):
        raise TypeError(f"a step split over {n} threads or processes needs an npvae.engine.model.FastVAE "
                        f"(replicas and row bindings), got {type(model).__name__}")
    if n > 1:
        # bound to a SplitBatch, a replica leaves its own gradient buffer alone;
        # the model itself stays unbound, for serial steps and evaluation
        replicas = [model.replica() for _ in range(n)]
        grad_ranges = model.grad_ranges(n)

    def forward_backward(replica, rows, noise, first_row, eps, B, beta, batch=None, wait=None):
        """Prepare rows [first_row, first_row + b) of the batch, then the backward pass of their
        share of the loss -mean over all B rows; -> their sums of the terms.

        batch (a SplitBatch): replica works on those rows of it, and leaves
        the weight gradients to batch.weight_grads; None: replica (the model)
        computes them. wait: called once the rows are prepared, before eps
        is read (a helper process waits there for the main one to draw it).
        """
        b = rows.shape[0]
        if batch is not None:
            replica.bind_rows(batch, first_row, first_row + b)
        # bound, straight into the batch's rows of x, where forward would copy x to
        x = prepare.rows(rows, noise, first_row, replica.input_rows())
        if wait is not None:
            wait()
        if objective == "elbo":
            log_px_z, kl = replica.forward(x, eps)
            # loss = -mean(log_px_z - beta * kl)
            replica.backward(np.full(b, -1.0 / B), np.full(b, beta / B))
            # np.sum(., dtype=np.float64), without its Python wrapper's cost
            return float(np.add.reduce(log_px_z, dtype=np.float64)), float(np.add.reduce(kl, dtype=np.float64))
        bound = replica.forward_iwae(x, eps)
        replica.backward_iwae(np.full(b, -1.0 / B))
        return float(np.add.reduce(bound, dtype=np.float64)), 0.0

    def weight_grads(batch, start, stop, B):
        """The gradient on [start, stop) of the flat buffer, over the whole batch; -> its squared norm."""
        batch.weight_grads(start, stop, B)
        g = model.flat_grads[start:stop]
        return float(np.dot(g, g))

    def split_batch(B, shared=False):
        return SplitBatch(model, B, k if objective == "iwae" else 1, shared=shared)

    def eps_shape(B):
        return (B, Z) if objective == "elbo" else (B, k, Z)

    def finish(sums, g2, update):
        """Update (if the loss and gradient are finite: else skip the step); -> the step's figures."""
        if math.isfinite(sums[0]) and math.isfinite(sums[1]) and math.isfinite(g2):
            update()
        return sums[0], sums[1], g2

    def serial_step(rows, beta, rng):
        B = rows.shape[0]
        if B == 0:   # every split step with fewer rows than parts comes here
            raise ValueError("a minibatch needs at least one row: x (or x[index]) has none")
        noise = prepare.noise(rng)
        eps = rng.standard_normal(eps_shape(B), dtype=model.dtype)
        sums = forward_backward(model, rows, noise, 0, eps, B, beta)
        g2 = float(np.dot(model.flat_grads, model.flat_grads))
        return finish(sums, g2, lambda: optimizer.step(model.grads))

    if n == 1:
        def step(x, beta, rng, index=None, next_index=None):   # no helpers: nothing to gather ahead
            return serial_step(_minibatch(x, index, next_index), beta, rng)
        step.session = contextlib.nullcontext   # BLAS keeps its own threads
        step.close = lambda: None
        return step
    if use == "processes":
        step = _process_step(model, optimizer, prepare, n, replicas, grad_ranges, eps_shape,
                             forward_backward, weight_grads, split_batch, serial_step, finish)
        step.session = parallel.one_blas_thread
        return step

    held = {"batch": None, "workers": None}

    def step(x, beta, rng, index=None, next_index=None):   # threads gather their rows at once
        rows = _minibatch(x, index, next_index)
        B = rows.shape[0]
        if B < n:
            return serial_step(rows, beta, rng)
        if held["batch"] is None or B > held["batch"].capacity:
            held["batch"] = split_batch(B)
        if held["workers"] is None:
            held["workers"] = parallel.Workers(n)
        batch, workers = held["batch"], held["workers"]
        noise = prepare.noise(rng)
        eps = rng.standard_normal(eps_shape(B), dtype=model.dtype)
        parts = workers.run([functools.partial(forward_backward, r, rows[a:b], noise, a, eps[a:b], B, beta, batch)
                             for r, (a, b) in zip(replicas, parallel.ranges(B, n))])
        sums = sum(p[0] for p in parts), sum(p[1] for p in parts)
        g2 = sum(workers.run([functools.partial(weight_grads, batch, a, b, B) for a, b in grad_ranges]))
        # a FlatAdam splits its update over the threads too; any other optimizer steps here
        split = hasattr(optimizer, "update_ranges")
        return finish(sums, g2, lambda: optimizer.step(model.grads, workers) if split else optimizer.step(model.grads))

    def close():
        workers, held["workers"] = held["workers"], None
        if workers is not None:
            workers.close()
    step.session, step.close = parallel.one_blas_thread, close
    return step


def _process_step(model, optimizer, prepare, n, replicas, grad_ranges, eps_shape,
                  forward_backward, weight_grads, split_batch, serial_step, finish):
    """make_step's step on n processes (npvae.engine.parallel.Processes): the threads' three phases in one task.

    Each process prepares its rows and runs their forward and backward,
    computes its range of the weight gradients, and updates its range of the
    parameters, in one task. Between the phases the processes meet at a
    barrier (parallel.allgather) and swap the figures the next phase needs:
    the parts' loss sums, then the ranges' squared gradient norms, which
    every process adds up in the threads' order, so that all make the same
    decision to update or skip the step.

    Helper j takes the j-th block of rows and this process the last. This
    process gathers the helpers' rows and draws the binarization key, starts
    them, and then draws their noise, which each helper waits for only once
    it has prepared its rows (parallel.wait_released), then gathers its own
    rows and draws its own noise (rng's draws keep the order of a serial
    step). Given next_index, it gathers the next step's rows at the end of
    its task, while the helpers finish theirs. The rows, the noise and the
    SplitBatch live in shared memory, made with the helpers on the first
    step; a larger batch than any before (or rows of another kind) makes
    new buffers and new helpers.
    """
    # "gathered": (x, index's dtype, its bytes) whose rows the rows buffer holds; "next": what gathers them
    pool = {"capacity": 0, "rows kind": None, "gathered": None, "next": None}
    update_ranges = optimizer.update_ranges(n)   # as the threads' (optimizer.step)

    def task(rows_buffer, eps_buffer, batch):
        def whole_step(j, a, b, B, beta, key_high, key_low, t, lr):
            a, b, B = int(a), int(b), int(B)
            part = forward_backward(replicas[j], rows_buffer[a:b], int(key_high) << 32 | int(key_low), a,
                                    eps_buffer[a:b], B, beta, batch, lambda: parallel.wait_released(j))
            parts = parallel.allgather(j, part)
            parts = parts[1:] + parts[:1]   # in the order of the rows: process 0 has the last block
            sums = sum(p[0] for p in parts), sum(p[1] for p in parts)
            g2 = sum(p[0] for p in parallel.allgather(j, (weight_grads(batch, *grad_ranges[j], B),)))
            out = finish(sums, g2, lambda: optimizer.step_range(model.grads, *update_ranges[j], t, lr))
            if j == 0 and pool["next"] is not None:
                # every process is past its rows now (the second barrier): this one's spare time
                pool["next"]()
            return out
        return whole_step

    def gather_ahead(x, index):
        """Gather x[index] into the rows buffer for the next step, if it fits and index is in range
        (else that step gathers its rows itself, and reports a bad index)."""
        B = index.shape[0]
        if n <= B <= pool["capacity"] and 0 <= index.min() and index.max() < x.shape[0]:
            gather(x, index, out=pool["rows"][:B])
            pool["gathered"] = (x, index.dtype, index.tobytes())

    def helpers(B, kind):
        if B > pool["capacity"] or kind != pool["rows kind"]:
            if "processes" in pool:
                pool["processes"].close()
            pool["rows"] = parallel.shared_zeros(B * math.prod(kind[1]), kind[0]).reshape((B,) + kind[1])
            pool["eps"] = parallel.shared_zeros(math.prod(eps_shape(B)), model.dtype).reshape(eps_shape(B))
            pool["batch"] = split_batch(B, shared=True)
            pool["processes"] = parallel.Processes(n, [task(pool["rows"], pool["eps"], pool["batch"])])
            pool["capacity"], pool["rows kind"] = B, kind
        return pool["processes"]

    def step(x, beta, rng, index=None, next_index=None):
        index = None if index is None else _as_index(index)
        next_index = None if next_index is None else _as_index(next_index, "next_index")
        B = x.shape[0] if index is None else index.shape[0]
        pool["next"] = None
        if B < n:
            pool["gathered"] = None
            return serial_step(_minibatch(x, index), beta, rng)
        processes = helpers(B, (x.dtype, x.shape[1:]))
        # rows gathered for this x and index fit the buffers they went to, which are kept then
        gathered, pool["gathered"] = pool["gathered"], None
        rows, eps = pool["rows"], pool["eps"]
        cuts = parallel.split(B, n)
        own = cuts[-2]   # this process's rows are [own, B)
        ready = (gathered is not None and index is not None and gathered[0] is x
                 and gathered[1] == index.dtype and gathered[2] == index.tobytes())

        def fill(a, b):  # the stored rows [a, b) of the minibatch, unless the last step gathered them
            if not ready:
                if index is None:
                    rows[a:b] = x[a:b]
                else:
                    gather(x, index[a:b], out=rows[a:b])
        fill(0, own)
        noise = prepare.noise(rng)

        def before():  # once the helpers have started: their noise, then this process's rows and noise
            rng.standard_normal(out=eps[:own], dtype=model.dtype)
            processes.release()
            fill(own, B)
            rng.standard_normal(out=eps[own:B], dtype=model.dtype)
        if next_index is not None:
            pool["next"] = functools.partial(gather_ahead, x, next_index)
        t, lr = optimizer.t + 1, optimizer.lr
        with parallel.one_blas_thread():   # each process keeps to one core
            return processes.run(0, [(a, b, B, beta, noise >> 32, noise & 0xFFFFFFFF, t, lr)
                                     for a, b in [(own, B)] + list(zip(cuts, cuts[1:-1]))], before)[0]

    def close():   # the next step makes new buffers and helpers
        processes = pool.pop("processes", None)
        pool["capacity"], pool["gathered"] = 0, None
        if processes is not None:
            processes.close()
    step.close = close
    return step
