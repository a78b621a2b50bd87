"""Element-wise work on every core.

NumPy's element-wise calls release the GIL, so a few threads, each given one
contiguous share of some equal-length 1-D arrays, run them in parallel, while
the matrix products already use every core through BLAS. Each element is
computed exactly as in a single call, so results do not depend on the split.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOL = None
WORKERS = min(os.cpu_count() or 1, 4)
MIN_SIZE = 1 << 16   # below this, handing work to threads costs more than it saves


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="npvae")
    return _POOL


def map_shares(fn, arrays):
    """fn(*shares) for consecutive shares of the equal-length 1-D arrays, one share per core."""
    n = arrays[0].size
    if WORKERS == 1 or n < MIN_SIZE:
        fn(*arrays)
        return
    bounds = np.linspace(0, n, WORKERS + 1).astype(int)
    jobs = [_pool().submit(fn, *(a[lo:hi] for a in arrays)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()
