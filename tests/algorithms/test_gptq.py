import pytest
import torch

from lpq.formats import grid
from lpq.algorithms.gptq import GPTQSettings, Hessian, gptq_quantize


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
