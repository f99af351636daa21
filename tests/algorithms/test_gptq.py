import pytest
import torch

from lpq.algorithms import grid
from lpq.algorithms.gptq import GPTQSettings, Hessian, asymmetric_target, gptq_quantize


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


def test_asymmetric_target_solves_the_normal_equations():
    X, W, H = _problem(2)
    Xq = grid.fake_quant(X, "hif4")              # the layer's input as the quantized model sees it
    C = X.T @ Xq / X.shape[0]
    Wt = asymmetric_target(W, (Xq.T @ Xq) / X.shape[0], C, damp=0.0)
    # No weight does better against the unquantized outputs: the residual is orthogonal to Xq.
    resid = X.double() @ W.double().T - Xq.double() @ Wt.double().T
    assert float((Xq.double().T @ resid).abs().max()) < 1e-6 * float((X.double() @ W.double().T).abs().max()) * len(X)
    # With identical inputs in both models the target is the weight itself, damped or not.
    assert torch.equal(asymmetric_target(W, H, H, damp=0.01), W)


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4"])
def test_asymmetric_gptq_is_closer_to_the_unquantized_outputs(fmt):
    X, W, _ = _problem(3)
    Xq = grid.fake_quant(X, fmt)
    Hq = Xq.T @ Xq / X.shape[0]
    err = lambda Q: float(((X @ W.T - Xq @ Q.T) ** 2).mean())
    Q_sym, _ = gptq_quantize(W, Hq, fmt)
    Q_asym, _ = gptq_quantize(asymmetric_target(W, Hq, X.T @ Xq / X.shape[0], 0.01), Hq, fmt)
    assert err(Q_asym) < 0.9 * err(Q_sym)
