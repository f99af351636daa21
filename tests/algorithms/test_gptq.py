import pytest
import torch

from lpq.formats import grid
from lpq.algorithms.gptq import GPTQSettings, Hessian, _inverse_cholesky, gptq_quantize


def _problem(seed=0, rows=96, cols=256, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix
    W = torch.randn(rows, cols, generator=g) * 0.05
    h = Hessian(cols)
    h.add(X[:1000])
    h.add(X[1000:])
    return X, W, h.mean()


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4"])
@pytest.mark.parametrize("act_order,search", [(False, False), (False, True), (True, True)])
def test_gptq_beats_rtn_on_output_error(fmt, act_order, search):
    X, W, H = _problem()
    err = lambda Q: float(((X @ (W - Q).T) ** 2).mean())
    Q, loss = gptq_quantize(W, H, fmt, GPTQSettings(act_order=act_order, scale_search=search))
    assert err(Q) < 0.75 * err(grid.fake_quant(W, fmt))
    assert loss > 0 and Q.shape == W.shape


def test_gptq_output_is_on_the_mx_grid():
    X, W, H = _problem(1)
    Q, _ = gptq_quantize(W, H, "mxfp4")
    assert torch.equal(grid.fake_quant(Q, "mxfp4"), Q)


def test_dead_columns_and_padding():
    X, W, H = _problem(2, cols=100)
    H[:, 7] = 0
    H[7, :] = 0
    Q, _ = gptq_quantize(W, H, "hif4")
    assert Q.shape == (96, 100) and torch.all(Q[:, 7] == 0) and torch.isfinite(Q).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.zeros(4, 64), torch.eye(32), "hif4")
    with pytest.raises(ValueError, match="lazy_batch"):
        GPTQSettings(lazy_batch=100)
    with pytest.raises(ValueError, match="no calibration"):
        Hessian(4).mean()


def test_inverse_cholesky_overwrites_the_hessian_with_its_inverse_instead_of_copying_it():
    # At n = 12288 each (n, n) float32 matrix is 604 MB: H's own storage must receive the inverse.
    _, _, H = _problem(4, cols=128)
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(128)
    ptr = H.data_ptr()
    U = _inverse_cholesky(H, 0.01)
    assert H.data_ptr() == ptr
    torch.testing.assert_close(H, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)
    assert torch.equal(U, torch.triu(U))


def test_a_failed_factorization_leaves_the_hessian_as_it_was_for_the_next_damping():
    H = torch.diag(torch.tensor([4.0, 4.0, -1.0, 4.0]))      # factors only at the third damping (x 100)
    U = _inverse_cholesky(H.clone(), 0.01)
    d = 0.01 * float(H.diagonal().mean())
    k = next(k for k in range(8) if -1.0 + d * 10 ** k > 0)
    expected = torch.diag(1.0 / (H.diagonal() + d * 10 ** k))
    torch.testing.assert_close(U.T @ U, expected)


def test_the_hessian_mean_empties_its_accumulator():
    h = Hessian(8)
    h.add(torch.ones(3, 8))
    assert torch.equal(h.mean(), torch.ones(8, 8))
    with pytest.raises(ValueError, match="no calibration"):
        h.mean()
