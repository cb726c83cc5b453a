"""The fused LoRA linear (`longcat_train.lora.fused_linear`) against PEFT's own forward.

On CUDA the fused path runs under autocast only; here it is exercised under CPU bf16 autocast by
adding "cpu" to FUSED_DEVICE_TYPES, and its autograd function is checked exactly in float32.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from longcat_train.lora import fused_linear
from longcat_train.lora.adapters import add_lora, compute_lora_in_autocast_dtype, load_lora_into_adapter, lora_state
from longcat_train.lora.fused_linear import (
    FusedLoraLinear,
    _BaseHalfFunction,
    _LoraHalfFunction,
    lora_linear,
    use_fused_lora_linears,
)

from .reference import load_reference, rel_l2

FUSED_NODE = "GeneratedBackwardFor_longcat_lora_linear_defaultBackward"  # autograd node of `lora_linear`


def _linear_cases():
    """The fused function, and the two-function split a block's last linear uses, in float32."""
    def fused(x, w, b, a, up, s):
        return lora_linear(x, w, b, a, up, s, "")[0].view(*x.shape[:-1], -1)

    def split(x, w, b, a, up, s):
        y = _LoraHalfFunction.apply(x, b, a, up, s)
        return _BaseHalfFunction.apply(y, x, w, a, up, s).view(*x.shape[:-1], -1)

    return {"fused": fused, "split": split}


@pytest.mark.parametrize("variant", ["fused", "split"])
def test_function_equals_lora_math_in_float32(variant):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    w, b = torch.randn(10, 12, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    a, up = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    results = []
    for fused in (True, False):
        xs, As, Bs = (t.float().requires_grad_(True) for t in (x, a, up))
        if fused:
            y = _linear_cases()[variant](xs, w.float(), b.float(), As, Bs, 2.5)
        else:
            y = torch.nn.functional.linear(xs, w.float(), b.float()) + (xs @ As.t() @ Bs.t()) * 2.5
        y.backward(dy.float())
        results.append([y, xs.grad, As.grad, Bs.grad])
    for fused_t, eager_t in zip(*results):
        assert rel_l2(fused_t, eager_t) < 1e-6


@pytest.mark.parametrize("variant, base_gemms", [("fused", 3), ("split", 2)])
def test_split_last_linear_ends_the_checkpoint_recomputation_before_its_base_gemm(variant, base_gemms):
    """Under non-reentrant checkpointing a region ending in the split linear (plus a residual that
    saves nothing) is recomputed only up to its adapter: the base GEMM (an in-place addmm) runs in
    forward and for the input gradient, not a third time in the recomputation."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint

    class CountAddmm(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # the fused op is opaque to dispatch modes: its base GEMM counts as one call
            CountAddmm.calls += func in (torch.ops.aten.addmm_.default, torch.ops.longcat.lora_linear.default)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 12, generator=g)
    x = torch.randn(2, 7, 12, generator=g, requires_grad=True)
    a, up = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((3, 12), (10, 3)))
    linear = _linear_cases()[variant]

    def region(inp):  # a residual that saves nothing follows the linear
        return linear(torch.tanh(inp), w, None, a, up, 2.5) + 1.0

    with CountAddmm():
        checkpoint(region, x, use_reentrant=False).sum().backward()
    assert CountAddmm.calls == base_gemms


def _model(dropout: float = 0.0, dtype: torch.dtype = torch.bfloat16):
    tensors, config = load_reference()
    from longcat_train.model import LongCatVideoTransformer3DModel

    model = LongCatVideoTransformer3DModel(**config)
    model.load_state_dict({k.removeprefix("dit."): v for k, v in tensors.items() if k.startswith("dit.")})
    model.to(dtype)
    add_lora(model, rank=4, alpha=8.0, dropout=dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.set_activation_checkpointing("selective")
    return model, tensors


def _loss_and_grads(model, tensors, autocast: bool = True):
    inputs = (tensors["inputs.hidden_states"], tensors["i2v.timestep"], tensors["inputs.encoder_hidden_states"],
              tensors["inputs.encoder_attention_mask"])
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(*inputs, num_cond_latents=1).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _fused_calls(model, tensors, autocast: bool = True) -> int:
    calls = []
    def record(_module, _inputs, out):
        node = out.grad_fn
        if type(node).__name__.startswith("View"):  # the fused path returns a view of its output
            node = node.next_functions[0][0]
        calls.append(type(node).__name__)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, LoraLayer)]
    _loss_and_grads(model, tensors, autocast)
    for h in hooks:
        h.remove()
    assert calls
    return sum(name.startswith((FUSED_NODE, "_BaseHalfFunction")) for name in calls)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fused_linear, "FUSED_DEVICE_TYPES", ("cpu",))


def test_fused_model_matches_peft_under_bf16_autocast(fused_on_cpu):
    model, tensors = _model()
    eager_loss, eager_grads = _loss_and_grads(model, tensors)
    compute_lora_in_autocast_dtype(model)
    assert _fused_calls(model, tensors) > 0
    fused_loss, fused_grads = _loss_and_grads(model, tensors)
    assert abs(fused_loss - eager_loss) / eager_loss < 1e-2
    assert fused_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        assert fused_grads[name].dtype == torch.float32
        assert rel_l2(fused_grads[name], eager_grads[name]) < 3e-2, name


def test_fused_path_only_where_it_matches_peft(fused_on_cpu):
    model, tensors = _model(dropout=0.1)
    use_fused_lora_linears(model)
    assert _fused_calls(model, tensors) == 0  # dropout on the LoRA branch: PEFT's forward

    model, tensors = _model()
    use_fused_lora_linears(model)
    assert _fused_calls(model, tensors, autocast=False) == 0  # no autocast

    model, tensors = _model(dtype=torch.float32)
    use_fused_lora_linears(model)
    assert _fused_calls(model, tensors) == 0  # base weights not in the autocast dtype

    model, tensors = _model()
    use_fused_lora_linears(model)
    seen = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.base_layer.register_forward_pre_hook(lambda mod, args: seen.append(mod))
    assert _fused_calls(model, tensors) == 0 and seen  # hooks on the base layer (offloading) keep running


def test_cpu_runs_peft_forward_unchanged():
    model, tensors = _model()
    eager_loss, eager_grads = _loss_and_grads(model, tensors)
    compute_lora_in_autocast_dtype(model)
    assert _fused_calls(model, tensors) == 0
    loss, grads = _loss_and_grads(model, tensors)
    assert torch.equal(loss, eager_loss)
    assert all(torch.equal(grads[n], eager_grads[n]) for n in eager_grads)


def test_swapped_modules_stay_peft_layers_with_the_same_state():
    model, _ = _model()
    before = get_peft_model_state_dict(model, adapter_name="default")
    weights = lora_state(model, alpha=8.0)
    swapped = use_fused_lora_linears(model)
    assert swapped == len(weights.modules) > 0
    lora_modules = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(type(m) is FusedLoraLinear for m in lora_modules)
    after = get_peft_model_state_dict(model, adapter_name="default")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
    load_lora_into_adapter(model, weights)
    reloaded = get_peft_model_state_dict(model, adapter_name="default")
    assert all(torch.equal(before[k], reloaded[k]) for k in before)


def test_last_linear_splits_only_where_its_weight_stays_resident(fused_on_cpu):
    from longcat_train.memory import enable_block_swap

    model, tensors = _model()
    compute_lora_in_autocast_dtype(model)
    enable_block_swap(model, 1, device="cpu", offload_device="cpu")  # the last block is swapped
    kinds = {}

    def record(index):
        def hook(_module, _inputs, out):
            kinds[index] = type(out.grad_fn.next_functions[0][0]).__name__
        return hook

    for index, block in enumerate(model.blocks):
        block.ffn.w2.register_forward_hook(record(index))
    loss, grads = _loss_and_grads(model, tensors)
    assert kinds == {0: "_BaseHalfFunctionBackward", 1: FUSED_NODE}
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_kept_projections_skip_their_gemm_in_the_recomputation(fused_on_cpu):
    """Selective checkpointing keeps the outputs of the projections named in `keep_projections`:
    their fused op runs once per block (forward only), the others twice (forward + recomputation),
    and the gradients do not change."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountRoles(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.longcat.lora_linear.default:
                roles[args[6]] += 1
            return func(*args, **(kwargs or {}))

    model, tensors = _model()
    compute_lora_in_autocast_dtype(model)  # takes the fused path
    blocks = len(model.blocks)
    results = {}
    for kept in ((), ("qkv", "ffn_w1")):
        model.set_activation_checkpointing("selective", keep_projections=kept)
        roles = Counter()
        with CountRoles():
            results[kept] = _loss_and_grads(model, tensors)
        results[kept] += (roles,)
    assert results[()][2] == {r: 2 * blocks for r in ("qkv", "attention_out", "cross_q", "cross_out", "ffn_w1", "ffn_w3")} \
        | {"": 2 * blocks}  # cross_attn.kv_linear has no role
    kept_counts = results[("qkv", "ffn_w1")][2]
    assert kept_counts["qkv"] == kept_counts["ffn_w1"] == blocks and kept_counts["ffn_w3"] == 2 * blocks
    (loss, grads, _), (kept_loss, kept_grads, _) = results[()], results[("qkv", "ffn_w1")]
    assert torch.equal(loss, kept_loss)
    assert all(torch.equal(grads[n], kept_grads[n]) for n in grads)


def test_unknown_projection_names_the_choices():
    model, _ = _model()
    with pytest.raises(ValueError, match="keep_projections \\['qkvv'\\].*attention_out"):
        model.set_activation_checkpointing("selective", keep_projections=["qkvv"])
