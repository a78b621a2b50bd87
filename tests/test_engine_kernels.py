"""The engine's kernels against the reference functions they equal (npvae.engine.kernels).

float64: relative error <= 1e-12 or bit-identical; float32: a few ulps (the
kernels sum in another order and fuse passes).
"""
import numpy as np
import pytest
from scipy.special import expit

from npvae import distributions as dist
from npvae.engine import kernels

B, D, Z = 5, 7, 3
ULPS32 = 8 * np.finfo(np.float32).eps   # "a few ulps" of float32, relative


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigma_and_in_range_given_once_are_bit_for_bit_the_reference(dtype):
    # FastVAE.forward and backward form sigma and the clip's mask once and pass
    # them to the reparameterization, the KL and their gradients.
    rng = np.random.default_rng(3)
    mu, eps, dz = (rng.standard_normal((B, Z)).astype(dtype) for _ in range(3))
    log_sigma = rng.standard_normal((B, Z)).astype(dtype)
    log_sigma[0, :2] = [35.0, -35.0]                        # two entries held by the clip
    dkl = rng.standard_normal(B).astype(dtype)
    sigma, in_range = dist.std(log_sigma), dist._in_range(log_sigma)
    assert not in_range[0, :2].any() and in_range[1:].all()
    pairs = [(dist.reparameterize(mu, log_sigma, eps), kernels.reparameterize(mu, sigma, eps)),
             (dist.kl_standard_normal(mu, log_sigma), kernels.kl_standard_normal(mu, log_sigma, sigma))]
    pairs += zip(dist.reparameterize_grad(dz, log_sigma, eps), kernels.reparameterize_grad(dz, sigma, eps, in_range))
    pairs += zip(dist.kl_standard_normal_grad(dkl, mu, log_sigma),
                 kernels.kl_standard_normal_grad(dkl, mu, sigma, in_range))
    for reference, fast in pairs:
        assert reference.dtype == fast.dtype == dtype
        np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 4e-16, 2.3e-16), (np.float32, 2.5e-7, 1.2e-7)])
def test_softplus_both_paths_equal_the_reference(dtype, rtol, atol):
    """log(1 + e^l) as written (all l below the overflow point) and the stable form (any l above)."""
    l = np.concatenate([np.linspace(-100, 79, 1791), [-1e-3, 0.0, 1e-3]]).astype(dtype)
    exact = np.logaddexp(0.0, l.astype(np.float64))     # float64, correctly rounded to ~1 ulp
    direct = kernels.softplus(l)                             # max(l) = 79 < 80: the three-pass path
    stable = kernels.softplus(np.append(l, dtype(1000.0)))  # 1000 > 80: the overflow-safe path for all
    for got in (direct, stable[:-1]):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, exact, rtol=rtol, atol=atol)
        np.testing.assert_allclose(got, dist.softplus(l), rtol=rtol, atol=atol)
    assert stable[-1] == 1000.0
    out = np.empty_like(l)
    assert kernels.softplus(l, out=out) is out and np.array_equal(out, direct)
    assert np.isnan(kernels.softplus(np.array([np.nan, 1.0], dtype)))[0]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, ULPS32)])
@pytest.mark.parametrize("shape", [(B, 8), (B, 7), (B, 3, 9), (B, 784)])   # even and odd D, (B, K, D)
@pytest.mark.parametrize("group", [8, 4, 2, None])   # logits small enough for groups of 8, 4, 2, or none
def test_bernoulli_with_exp_is_the_reference_log_prob_and_gradient(shape, dtype, rtol, group):
    rng = np.random.default_rng(15)
    x = (rng.random(shape) < 0.4).astype(dtype)
    limit = kernels._EXP_SAFE[np.dtype(dtype)]
    # the largest logit: products of `group` terms t < e^(top + 1) stay below e^limit, and no larger group's would
    top = {8: limit / 8 - 1.5, 4: limit / 5 - 1, 2: limit / 3 - 1, None: limit / 2}[group]
    logits = (np.tanh(rng.standard_normal(shape)) * top).astype(dtype)
    logits.flat[0] = top
    r = rng.standard_normal(shape[:-1])
    reference = dist.bernoulli_log_prob(x, logits)
    logp, e, t = kernels.bernoulli_log_prob_and_exp(x, logits)
    assert logp.dtype == dtype
    # relative to the size of the sum's terms: the sums are grouped differently
    scale = np.sum(np.abs(x * logits) + dist.softplus(logits), axis=-1)
    np.testing.assert_array_less(np.abs(logp - reference), rtol * scale + 1e-300)
    if group is None:    # above the pairs' limit: the reference itself, and no e or t
        assert e is None and t is None
        np.testing.assert_array_equal(logp, reference)
        return
    assert np.array_equal(e, np.exp(logits)) and np.array_equal(t, np.exp(logits) + 1)   # t intact
    expected = dist.bernoulli_log_prob_grad(r, x, logits)
    for kept in ({"exp_logits": e}, {"exp_logits": e, "one_plus_exp": t}, {}):
        np.testing.assert_allclose(kernels.bernoulli_log_prob_grad(r, x, logits, **kept), expected,
                                   rtol=rtol, atol=rtol * np.abs(r).max())
    assert np.array_equal(t, np.exp(logits) + 1)   # the gradient leaves t as it was (backward may run again)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, ULPS32)])
@pytest.mark.parametrize("top", [3.0, 500.0])   # the three-pass softplus, and the stable one
def test_bernoulli_with_a_work_buffer_is_the_reference(dtype, rtol, top):
    rng = np.random.default_rng(16)
    x = rng.random((4, 1, 30)).astype(dtype)                        # (b, 1, D) against (b, K, D), as log p(x)
    logits = (top * np.tanh(rng.standard_normal((4, 6, 30)))).astype(dtype)
    work = np.full(logits.size + 5, np.nan, dtype)
    got = kernels.bernoulli_log_prob(x, logits, work)
    assert got.dtype == dtype and got.shape == (4, 6)
    scale = np.sum(np.abs(x * logits) + dist.softplus(logits), axis=-1)
    np.testing.assert_array_less(np.abs(got - dist.bernoulli_log_prob(x, logits)), rtol * scale)
    np.testing.assert_array_equal(kernels.bernoulli_log_prob(x, logits), got)   # without a buffer


def test_bernoulli_gradient_without_kept_exp_is_x_minus_sigmoid():
    rng = np.random.default_rng(17)
    x, logits, r = rng.random((B, D)), 4 * rng.standard_normal((B, D)), rng.standard_normal(B)
    np.testing.assert_allclose(kernels.bernoulli_log_prob_grad(r, x, logits), r[:, None] * (x - expit(logits)),
                               rtol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_column_sums_are_the_reference_db_for_any_batch_size(dtype, rtol):
    """db = da.sum(axis=0) as a product with a vector of ones kept between calls: also when a
    batch is longer than the vector kept so far, and in da's dtype."""
    rng = np.random.default_rng(3)
    for n in (3, 300, 1000, 5):
        da = rng.standard_normal((n, 3)).astype(dtype)
        out = np.empty(3, dtype)
        assert kernels.column_sums(da, out) is out and out.dtype == dtype
        np.testing.assert_allclose(out, da.sum(axis=0), rtol=rtol, atol=rtol * n)
    assert not kernels.ones(4, np.dtype(dtype)).flags.writeable
