"""Dynamic binarization keyed by rows: each row of a minibatch draws from its own stretch of one stream.

data.binarize is the reference: pixel d is on when u_d < x_d, with u_d from
rng.random. The functions here draw the same Bernoulli(x_d) pixels (equal in
distribution, not in the numbers: another stream) so that a block of rows
can be binarized on its own, by any process, and give exactly what one pass
over the whole minibatch would: a training step split over processes then
draws the same images whatever the split. binarize_bytes works on the stored
uint8 grey levels, in integers, at about half the cost of to_float and a
float comparison.
"""
import operator
import threading

import numpy as np

from .. import data as datasets
from ..data import _check_probabilities, _describe


def binarize_key(rng):
    """The seed of one minibatch's binarization noise, drawn from rng (an int below 2^63).

    The top 63 bits of one raw 64-bit draw of rng's bit generator: the same
    kind of number as rng.integers(2**63), for a tenth of the call's cost
    (a training step draws one).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"binarize_key: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return int(rng.bit_generator.random_raw()) >> 1


_STREAMS = threading.local()   # _row_words' PCG64, one per thread (threads binarize their rows at once)
_PCG64_INC = 0x5851F42D4C957F2D14057B7EF767814F   # pcg-cpp's default increment (odd, as PCG needs)


def _row_words(key, first_row, b, D, dtype):
    """(b, D) random words of an unsigned dtype (uint16, uint32) for rows first_row, ..., first_row + b - 1.

    Row r's words are its own stretch of the PCG64 stream of key (the one
    whose 128-bit state starts at key * 2^64 + key): ceil(D / w) 64-bit
    draws of w words each, starting r times that many draws in. So a block
    of rows gets exactly the words the whole batch would.
    """
    try:
        key = operator.index(key)
    except TypeError:
        raise TypeError(f"key must be an integer, got {type(key).__name__}") from None
    if not 0 <= key < 2**64:
        raise ValueError(f"key must be an integer in [0, 2^64), got {key}")
    per_draw = 8 // np.dtype(dtype).itemsize
    per_row = -(-D // per_draw)                # 64-bit draws per row
    stream = getattr(_STREAMS, "pcg64", None)
    if stream is None:
        stream = _STREAMS.pcg64 = np.random.PCG64(0)
    # Setting a PCG64's state costs about an eighth of making one (which hashes its seed):
    # one per thread, started afresh for each call.
    stream.state = {"bit_generator": "PCG64", "state": {"state": key << 64 | key, "inc": _PCG64_INC},
                    "has_uint32": 0, "uinteger": 0}
    stream.advance(first_row * per_row)
    return stream.random_raw(b * per_row).view(dtype).reshape(b, per_draw * per_row)[:, :D]


def binarize_rows(x, key, first_row=0):
    """Bernoulli(x) draws for rows first_row, first_row + 1, ... of a minibatch whose noise seed is key.

    A fresh draw every minibatch is dynamic binarization: the model never
    sees the same binary image twice, which stops it overfitting one fixed
    sample (Burda et al. 2015). Pixel d of row r is on when u < x, with u
    uniform on [0, 1) in steps of 2^-24 (as NumPy's float32 Generator.random):
    the top 24 bits of the d-th 32-bit word of row r's own stretch of the
    stream (_row_words), so a process that binarizes only rows [a, b)
    (first_row = a) draws exactly what one pass over the whole batch would,
    with no other process's help.
    """
    _check_probabilities(x)
    words = _row_words(key, first_row, *x.shape, np.uint32)
    u = np.right_shift(words, 8).astype(x.dtype)
    u *= 2.0 ** -24
    return np.less(u, x).astype(x.dtype)


def binarize_bytes(x, key, first_row=0, dtype=np.float32, out=None):
    """binarize_rows for grey levels stored as bytes: x (b, D) uint8 -> (b, D) dtype, Bernoulli(k/255) draws.

    The same scheme in integers, at 16 bits instead of 24: pixel d of row r
    is on when w < 257 k or k = 255, with w the d-th 16-bit word of row r's
    own stretch of the stream (_row_words). So k = 0 is never on, k = 255 always,
    and otherwise P(on) = 257 k / 65536 = (k/255)(1 - 2^-16), within 2^-16
    of k/255. Four pixels a 64-bit draw instead of two, and no pass in
    floats but the last: about half the time of to_float and binarize_rows.
    A block of rows draws what the whole does. out: a (b, D) array of dtype
    to write the draws into (and return), instead of a new one.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2:
        raise TypeError(f"binarize_bytes expects a 2-D uint8 array of grey levels, got {_describe(x)}")
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != dtype):
        raise ValueError(f"out must be a {np.dtype(dtype)} array of shape {x.shape}, got {_describe(out)}")
    words = _row_words(key, first_row, *x.shape, np.uint16)
    on = np.less(words, np.multiply(x, np.uint16(257), dtype=np.uint16))
    on |= np.equal(x, 255)                     # 257 * 255 = 65535: w = 65535 is not below it
    if out is None:
        return on.astype(dtype)
    np.copyto(out, on)
    return out


def prepare_batch(x, config, likelihood, kind, dtype, rng):
    """Stored rows -> model input: floats, binarized when a Bernoulli model meets grey levels."""
    return make_prepare(config.binarize, config.threshold, likelihood, kind, dtype)(x, rng)


class Prepare:
    """Stored rows -> model input (B, D) of the given dtype: prepare(rows, rng).

    Floats (grey levels k/255 from uint8), binarized when a Bernoulli model
    meets grey levels (dynamic: fresh Bernoulli draws, binarize_bytes
    straight from uint8 rows, else binarize_rows; threshold: x > threshold).
    In two parts, so that processes can each prepare their own rows of a
    minibatch: noise(rng) is all the minibatch takes from rng (the
    binarization key, else 0), and rows(x, noise, first_row) prepares the
    block of rows that starts at row first_row; blocks give what the whole does.
    """

    def __init__(self, binarize, threshold, likelihood, kind, dtype):
        binary = likelihood == "bernoulli" and kind == "grey"
        self.dynamic = binary and binarize == "dynamic"
        self.threshold = threshold if binary and binarize == "threshold" else None
        self.dtype = np.dtype(dtype)

    def noise(self, rng):
        return binarize_key(rng) if self.dynamic else 0

    def rows(self, x, noise, first_row=0, out=None):
        """The model input of the stored rows x, which start at row first_row of the minibatch.

        out: a (b, D) array of the dtype where the rows may go (binarize_bytes
        writes there); the result is out or a new array.
        """
        if self.dynamic and isinstance(x, np.ndarray) and x.dtype == np.uint8:
            return binarize_bytes(x, noise, first_row, self.dtype, out)   # no floats on the way
        x = datasets.to_float(x, self.dtype)
        if self.dynamic:
            return binarize_rows(x, noise, first_row)
        if self.threshold is not None:
            return datasets.binarize(x, threshold=self.threshold)
        return x

    def __call__(self, x, rng):
        return self.rows(x, self.noise(rng))


class PreparedRows:
    """Stored rows x (N, D) as the model sees them, prepared a slice at a time: rows[a:b] (b - a, D).

    rows[a:b] is prepare.rows(x[a:b], noise, first_row=a), which is rows a..b-1 of prepare.rows(x, noise)
    (a binarization is keyed by row), so evaluation can walk a set larger than memory in slices and
    score exactly the images it would score whole. np.asarray(rows) prepares them all at once.
    rows.first(n) is the first n rows, still unread.
    """

    def __init__(self, x, prepare, noise):
        self.x, self.prepare, self.noise = x, prepare, noise

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.prepare.dtype

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"PreparedRows are read in slices of rows (rows[a:b]), got {key!r}")
        start, stop, _ = key.indices(self.x.shape[0])
        return self.prepare.rows(self.x[start:stop], self.noise, start)

    def __array__(self, dtype=None, copy=None):
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def first(self, n):
        return PreparedRows(self.x[:n], self.prepare, self.noise)


def make_prepare(binarize, threshold, likelihood, kind, dtype):
    """A Prepare: (stored rows, rng) -> model input (B, D) of the given dtype."""
    return Prepare(binarize, threshold, likelihood, kind, dtype)
