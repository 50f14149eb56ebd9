"""LoRA's CPU products (peftkit.methods.lowrank) against separate products: the same values and gradients, computed in
another orientation or as one autograd node."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from peftkit.methods.lora_layers import LoraLinear
from peftkit.methods.lowrank import MAX_THREADS, LowRankLinear, fusable


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


# ----------------------------------------------------------------------------------------- fused_lora


def _lora_layer(bias: bool, dropout: float = 0.0) -> LoraLinear:
    """A LoRA layer over a non-identity frozen base, with a non-zero B (a fresh B is zero: nothing to check)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(48, 40, bias=bias).requires_grad_(False), r=8, alpha=12, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer


def _separate(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as separate products, as peft computes it: W x + b + s B A x."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    return F.linear(x, layer.base_layer.weight, layer.base_layer.bias) + (x @ a.T @ b.T) * layer.scaling


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_a", [False, True])  # LoRA-FA
def test_fused_layer_matches_separate_products(bias, frozen_a, threads):
    threads(1)
    layer = _lora_layer(bias)
    layer.lora_A.weight.requires_grad_(not frozen_a)
    reference = _lora_layer(bias)
    reference.lora_A.weight.requires_grad_(not frozen_a)
    x = torch.randn(3, 29, 48)
    grad_out = torch.randn(3, 29, 40)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert fusable(layer.base_layer, layer.factors, x_fused)
    y_fused, y_ref = layer(x_fused), _separate(reference, x_ref)
    (y_fused * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    pairs = [(y_fused, y_ref), (x_fused.grad, x_ref.grad), (layer.lora_B.weight.grad, reference.lora_B.weight.grad)]
    if frozen_a:
        assert layer.lora_A.weight.grad is None
    else:
        pairs.append((layer.lora_A.weight.grad, reference.lora_A.weight.grad))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))
    assert layer.base_layer.weight.grad is None
    assert "_FusedLoraBackward" in _graph_nodes(y_fused)


def test_fused_layer_with_an_input_that_needs_no_gradient(threads):
    """The first layer's input (a frozen embedding's output): only the factors' gradients."""
    threads(1)
    layer, reference = _lora_layer(True), _lora_layer(True)
    x = torch.randn(2, 7, 48)
    layer(x).square().sum().backward()
    _separate(reference, x).square().sum().backward()
    for got, want in [(layer.lora_A.weight.grad, reference.lora_A.weight.grad),
                      (layer.lora_B.weight.grad, reference.lora_B.weight.grad)]:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))


def test_what_keeps_the_separate_modules(threads):
    """Hooks (DeepSpeed ZeRO-3 gathers weights in them), autocast, more threads than measured, a trainable bias and a
    merged layer take the modules' path, and give the same values; dropout does not (`test_fused_dropout...`)."""
    threads(1)
    x = torch.randn(2, 5, 48, requires_grad=True)
    layer = _lora_layer(True)
    calls = []
    handle = layer.lora_B.register_forward_pre_hook(lambda module, args: calls.append(module))
    assert not fusable(layer.base_layer, layer.factors, x)
    assert "_FusedLoraBackward" not in _graph_nodes(layer(x)) and calls == [layer.lora_B]
    handle.remove()
    with torch.autocast("cpu", torch.bfloat16):
        assert not fusable(layer.base_layer, layer.factors, x)
    threads(MAX_THREADS + 1)
    assert not fusable(layer.base_layer, layer.factors, x)
    threads(1)
    layer.base_layer.bias.requires_grad_(True)
    assert not fusable(layer.base_layer, layer.factors, x)
    layer.base_layer.bias.requires_grad_(False)
    assert fusable(layer.base_layer, layer.factors, x)
    with_dropout = _lora_layer(True, dropout=0.1)
    assert "_FusedLoraBackward" in _graph_nodes(with_dropout.eval()(x))  # eval: dropout is the identity
    torch.testing.assert_close(with_dropout(x), _separate(with_dropout, x), rtol=0, atol=2e-6)
    torch.testing.assert_close(layer(x), _separate(layer, x), rtol=0, atol=2e-6)
    layer.merge()
    assert "_FusedLoraBackward" not in _graph_nodes(layer(x))


def test_fused_dropout_is_peft_s_layer_with_nn_dropout_s_mask(threads):
    """In training, LoRA's dropout runs inside the fused node (it took the separate modules, which add the update to
    the base output as a new full-size tensor): its noise is drawn as torch's CPU dropout draws it, so for one seed
    the layer is peft's LoRA layer with its nn.Dropout, values and gradients to float rounding, the same mask."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    threads(1)
    layer = _lora_layer(True, dropout=0.3)
    config = LoraConfig(r=8, lora_alpha=12, lora_dropout=0.3)
    peft = PeftLoraLinear(_lora_layer(True).base_layer, "default", config, r=8, lora_alpha=12, lora_dropout=0.3)
    peft.lora_A["default"].weight.data.copy_(layer.lora_A.weight.data)
    peft.lora_B["default"].weight.data.copy_(layer.lora_B.weight.data)
    x, grad_out = torch.randn(3, 29, 48), torch.randn(3, 29, 40)
    x_fused, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    y_fused = layer(x_fused)
    torch.manual_seed(1)
    y_peft = peft(x_peft)
    assert "_FusedLoraBackward" in _graph_nodes(y_fused)
    (y_fused * grad_out).sum().backward()
    (y_peft * grad_out).sum().backward()
    for got, want in [(y_fused, y_peft), (x_fused.grad, x_peft.grad),
                      (layer.lora_A.weight.grad, peft.lora_A["default"].weight.grad),
                      (layer.lora_B.weight.grad, peft.lora_B["default"].weight.grad)]:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))
    torch.manual_seed(2)  # another seed's mask is far off: the dropout is on, and the same mask was drawn
    assert not torch.allclose(layer(x), y_peft.detach(), atol=1e-3)


def test_fused_dropout_keeps_the_input_its_siblings_share(threads):
    """With dropout the node keeps x for A's gradient, with the noise, and makes the dropped input again in backward:
    q/k/v (gate/up) read one x, which is kept once, where a dropped copy of it was kept per layer (SmolLM2-135M, batch
    4 x 130 tokens, p 0.05: saved activations 1,032 -> 895 MiB; 598 without dropout)."""
    from peftkit.activations import saved_activation_bytes

    class Siblings(nn.Module):  # two adapted projections of one input, as q_proj and k_proj
        def __init__(self):
            super().__init__()
            self.q, self.k = _lora_layer(False, dropout=0.3), _lora_layer(False, dropout=0.3)

        def forward(self, x):
            return self.q(x) + self.k(x)

    threads(1)
    x = torch.randn(3, 29, 48, requires_grad=True)
    values = x.numel() + 2 * x.numel() + 2 * 3 * 29 * 8  # x once, each layer's noise and h (fp32)
    assert saved_activation_bytes(Siblings().train(), {"x": x}) == 4 * values  # (failed: x's two dropped copies)


def _nf4_lora_layer(dropout: float = 0.0) -> LoraLinear:
    """LoRA over a real bitsandbytes NF4 + double-quant layer (quantized on the CPU), with a bias and a non-zero B."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(64, 40)
    quantized = bnb.nn.Linear4bit(64, 40, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    quantized.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    quantized.bias = nn.Parameter(dense.bias.data, requires_grad=False)
    layer = LoraLinear(quantized.to("cpu"), r=8, alpha=12, dropout=dropout)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_over_a_4bit_base_matches_bitsandbytes_modules(dropout, threads):
    """QLoRA: the fused node multiplies by the NF4 weight with bitsandbytes' own functions; against the Linear4bit
    module's autograd path plus separate LoRA products (with dropout: nn.Dropout's mask for the same seed), values and
    gradients agree to float rounding."""
    threads(1)
    layer, reference = _nf4_lora_layer(dropout), _nf4_lora_layer()
    x = torch.randn(2, 23, 64)
    grad_out = torch.randn(2, 23, 40)
    x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert fusable(layer.base_layer, layer.factors, x_fused)
    torch.manual_seed(1)
    y_fused = layer(x_fused)
    a, b = reference.lora_A.weight, reference.lora_B.weight
    torch.manual_seed(1)
    dropped = F.dropout(x_ref, dropout, training=True)
    y_ref = reference.base_layer(x_ref) + (dropped @ a.T @ b.T) * reference.scaling  # bitsandbytes' MatMul4Bit
    assert "_FusedLoraBackward" in _graph_nodes(y_fused) and "MatMul4BitBackward" in _graph_nodes(y_ref)
    (y_fused * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    for got, want in [(y_fused, y_ref), (x_fused.grad, x_ref.grad), (layer.lora_A.weight.grad, a.grad),
                      (layer.lora_B.weight.grad, b.grad)]:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_4bit_weight_is_dequantized_once_a_forward_and_once_a_backward(dropout, threads):
    """QLoRA's fused node, with dropout or without, dequantizes the NF4 weight once for the forward and once for the
    input's gradient (counted in torch's profiler, which sees bitsandbytes' registered ops): never kept dequantized,
    never twice."""
    from torch.profiler import ProfilerActivity, profile

    threads(1)
    layer = _nf4_lora_layer(dropout)
    x = torch.randn(2, 23, 64, requires_grad=True)

    def dequantized(run) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return sum(e.name == "bitsandbytes::dequantize_4bit" for e in prof.events())

    assert dequantized(lambda: layer(x).square().sum().backward()) == 2
    assert "_FusedLoraBackward" in _graph_nodes(layer(x))
    with torch.no_grad():
        assert dequantized(lambda: layer(x)) == 1


def test_a_4bit_base_the_fused_node_cannot_read_keeps_the_modules(threads):
    """Another compute dtype than the input's, or weights repacked for a CPU's bf16 kernels (eval-time layout)."""
    threads(1)
    x = torch.randn(2, 5, 64)
    layer = _nf4_lora_layer()
    layer.base_layer.compute_dtype = torch.bfloat16
    assert not fusable(layer.base_layer, layer.factors, x)
    layer = _nf4_lora_layer()
    layer.base_layer.weight.quant_state.packing_format_for_cpu = True
    assert not fusable(layer.base_layer, layer.factors, x)


# --------------------------------------------------------------------------------------------- grouped_lora


def test_grouped_node_matches_each_group_s_dense_product(threads):
    """A mixture's experts' product, x_g @ (W_g + s lhs_g rhs_g) for each group g of x's rows, as one node: values and
    the gradients of x and both factors equal each group's dense product computed apart in float64, over groups of 5,
    0 (an expert no token chose: its factors' gradient is zero), 7 and 3 rows and 2 rows past the last group's end,
    which grouped_mm leaves out (an expert-parallel sentinel's)."""
    from peftkit.methods.lowrank import frozen_fusable, grouped_lora

    threads(1)
    torch.manual_seed(0)
    x, weight = torch.randn(17, 24), torch.randn(4, 24, 40).requires_grad_(False)  # (W_g: K 24 -> N 40, frozen)
    lhs, rhs = torch.randn(4, 24, 8).requires_grad_(), torch.randn(4, 8, 40).requires_grad_()
    offs, grad_out = torch.tensor([5, 5, 12, 15], dtype=torch.int32), torch.randn(17, 40)
    x.requires_grad_()
    assert frozen_fusable(x, weight, lhs)
    out = grouped_lora(x, weight, lhs, rhs, 0.75, offs, F.grouped_mm)
    assert "_GroupedLoraBackward" in _graph_nodes(out)
    (out[:15] * grad_out[:15]).sum().backward()
    x64, lhs64, rhs64 = (t.detach().double().requires_grad_() for t in (x, lhs, rhs))
    dense = torch.cat([x64[a:b] @ (weight[g].double() + 0.75 * lhs64[g] @ rhs64[g])
                       for g, (a, b) in enumerate([(0, 5), (5, 5), (5, 12), (12, 15)])])
    (dense * grad_out[:15].double()).sum().backward()
    for got, want in zip((out[:15], x.grad[:15], lhs.grad, rhs.grad), (dense, x64.grad[:15], lhs64.grad, rhs64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * float(want.detach().abs().max()))
    assert lhs.grad[1].abs().max() == 0 and rhs.grad[1].abs().max() == 0 and lhs.grad[0].abs().max() > 0
    assert not frozen_fusable(x, weight.requires_grad_(), lhs)  # (a weight that trains: grouped_mm gives its gradient)
    threads(MAX_THREADS + 1)  # not measured there: grouped_mm's separate products
    assert not frozen_fusable(x, weight.requires_grad_(False), lhs)
