import pytest
import torch

from lpq.algorithms.hadamard import block_sizes, fwht, fwht_ref, hadamard_matrix, rotate_weight
from lpq.formats._build import load_kernel


def test_block_sizes_need_no_power_of_two_width():
    assert block_sizes(576, 64) == [64] * 9
    assert block_sizes(100, 32) == [32, 32, 32, 4]
    with pytest.raises(ValueError):
        block_sizes(64, 48)


@pytest.mark.parametrize("n,block", [(576, 64), (1536, 32), (100, 32), (7, 4), (4096, 4096)])
@pytest.mark.parametrize("rows", [1, 15, 33, 300])   # the kernel takes 16 rows at a time, the rest one by one
def test_kernel_matches_reference_exactly(n, block, rows):
    if load_kernel("fwht") is None:
        pytest.skip("C++ toolchain unavailable")
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)) * 1e3
    x[0, :3] = torch.tensor([float("inf"), float("nan"), 1e-40])
    got, ref = fwht(x, block), fwht_ref(x, block_sizes(n, block))
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))       # bit for bit, NaN and Inf included


def test_orthogonal_symmetric_and_block_diagonal():
    H = hadamard_matrix(96, 32)
    assert torch.allclose(H @ H.T, torch.eye(96), atol=1e-6)
    assert torch.equal(H, H.T)
    assert torch.all(H[:32, 32:] == 0)


def test_rotation_cancels_in_a_linear():
    x, w = torch.randn(5, 3, 192), torch.randn(10, 192)
    y = x @ w.T
    assert torch.allclose(fwht(x, 64) @ rotate_weight(w, 64).T, y, atol=1e-4)
    assert fwht(x.to(torch.bfloat16), 64).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [None, "ref"])
def test_gradient_is_the_transform_of_the_incoming_gradient(backend):
    x = torch.randn(5, 100, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 100, dtype=torch.float64)
    fwht(x, 32, backend).backward(g)
    assert torch.equal(x.grad, fwht(g, 32, backend))
    # ... which is the gradient of x @ H: H is symmetric.
    H = hadamard_matrix(100, 32).double()
    assert torch.allclose(x.grad, g @ H.T, atol=1e-6)
    assert not fwht(x.detach(), 32, backend).requires_grad
