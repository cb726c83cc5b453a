"""`bench --mode render`'s stand-in for flash-attn, which lets the official code's step run where
flash-attn is not installed: it must compute what flash-attn computes."""

import torch

from longcat_train.bench_render import _sdpa_as_flash_attn


def _reference(q, k, v, scale):  # [S, H, D] each → softmax(q kᵀ · scale) v
    weights = torch.einsum("qhd,khd->hqk", q, k).mul(scale).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def test_the_stand_in_takes_flash_attn_layouts_and_packed_sequences():
    flash = _sdpa_as_flash_attn()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))  # [B, S, H, D]
    out = flash.flash_attn_func(q, k, v, softmax_scale=0.3)
    for b in range(2):
        assert torch.allclose(out[b], _reference(q[b], k[b], v[b], 0.3), atol=1e-5)

    lengths_k = [4, 7]
    packed_q = torch.randn(10, 3, 8, generator=g)  # two sequences of 5 queries
    packed_k, packed_v = torch.randn(11, 3, 8, generator=g), torch.randn(11, 3, 8, generator=g)
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 11], dtype=torch.int32)
    out = flash.flash_attn_varlen_func(packed_q, packed_k, packed_v, cu_q, cu_k, 5, max(lengths_k), softmax_scale=0.3)
    assert out.shape == packed_q.shape
    assert torch.allclose(out[:5], _reference(packed_q[:5], packed_k[:4], packed_v[:4], 0.3), atol=1e-5)
    assert torch.allclose(out[5:], _reference(packed_q[5:], packed_k[4:], packed_v[4:], 0.3), atol=1e-5)


def test_the_stand_in_keeps_a_flash_attn_4_install_importable(tmp_path, monkeypatch):
    """flash-attn-4 alone makes `flash_attn` a namespace package holding `cute`: the stand-in takes
    the name for the official code but must leave `flash_attn.cute` importable for our attention."""
    import importlib
    import sys

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("MARK = 'fa4'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn", _sdpa_as_flash_attn())
    assert importlib.import_module("flash_attn.cute").MARK == "fa4"
    assert callable(sys.modules["flash_attn"].flash_attn_func)
    monkeypatch.delitem(sys.modules, "flash_attn.cute")
