"""LowRankLinear (LoRA's factors) against nn.Linear: the same values and gradients, products in another orientation."""

import pytest
import torch
from torch import nn

from peftkit.methods.lora import LoraLinear
from peftkit.methods.lowrank import MAX_THREADS, LowRankLinear


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _pair(in_features: int, out_features: int) -> tuple[LowRankLinear, nn.Linear]:
    torch.manual_seed(0)
    fast = LowRankLinear(in_features, out_features)
    plain = nn.Linear(in_features, out_features, bias=False)
    plain.weight.data.copy_(fast.weight.data)
    return fast, plain


@pytest.mark.parametrize("shape", [(64, 8), (8, 96), (96, 4), (8, 8), (32, 24)])
def test_values_and_gradients_match_nn_linear(shape, threads):
    threads(1)
    fast, plain = _pair(*shape)
    x = torch.randn(3, 37, shape[0])
    grad_out = torch.randn(3, 37, shape[1])
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    (y_fast * grad_out).sum().backward()
    (y_plain * grad_out).sum().backward()
    # Same products summed in another order: float32 rounding apart, relative to the tensors' size.
    for a, b in [(y_fast, y_plain), (x_fast.grad, x_plain.grad), (fast.weight.grad, plain.weight.grad)]:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()))


def _graph_nodes(tensor: torch.Tensor) -> set[str]:
    names, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_lora_layer_products_take_the_fast_path_on_few_cpu_threads(threads):
    layer = LoraLinear(nn.Linear(48, 40), r=8, alpha=16)
    threads(MAX_THREADS)
    out = layer(torch.randn(2, 5, 48, requires_grad=True))
    assert "_LowRankMatmulBackward" in _graph_nodes(out)
    assert "MmBackward0" not in _graph_nodes(layer.update(torch.randn(2, 5, 48)))  # neither factor runs F.linear
    threads(MAX_THREADS + 1)  # not measured there: nn.Linear's products
    assert "_LowRankMatmulBackward" not in _graph_nodes(layer.update(torch.randn(2, 5, 48)))


def test_frozen_factor_and_input_without_grad(threads):
    """LoRA-FA freezes A; the first layers' input needs no gradient: only B's gradient is computed, and it matches."""
    threads(1)
    fast_a, plain_a = _pair(64, 8)
    fast_b, plain_b = _pair(8, 48)
    fast_a.weight.requires_grad_(False)
    plain_a.weight.requires_grad_(False)
    x = torch.randn(4, 20, 64)
    (fast_b(fast_a(x)) ** 2).sum().backward()
    (plain_b(plain_a(x)) ** 2).sum().backward()
    assert fast_a.weight.grad is None
    torch.testing.assert_close(fast_b.weight.grad, plain_b.weight.grad, rtol=1e-5, atol=1e-5)


def test_state_dict_names_are_nn_linear_ones():
    fast, plain = _pair(16, 8)
    assert list(fast.state_dict()) == list(plain.state_dict()) == ["weight"]
    assert isinstance(fast, nn.Linear) and fast.bias is None
