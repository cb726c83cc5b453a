"""Which attention runs where: the dispatcher's choices and their reasons."""

import pytest

from longcat_train.model import AttentionBackendUnavailable, AttentionDispatcher

GRID_480 = (24, 30, 52)  # 480x832x93
GRID_720 = (24, 45, 80)  # 720x1280x93


@pytest.mark.parametrize(
    "implementation, enabled, on_cuda, grid, use, reason",
    [
        ("auto", False, True, GRID_480, False, "below the 720p class"),
        ("auto", False, True, GRID_720, True, "720p-class"),
        ("auto", True, True, GRID_480, True, "enable_bsa"),
        ("auto", True, False, GRID_720, False, "not on CUDA"),
        ("auto", True, True, (1, 45, 80), False, "single latent frame"),
        ("bsa", False, False, GRID_480, True, "attention_implementation=bsa"),
        ("sdpa", True, True, GRID_720, False, "attention_implementation=sdpa"),
    ],
)
def test_block_sparse_attention_is_chosen_where_the_release_uses_it(implementation, enabled, on_cuda, grid, use, reason):
    dispatcher = AttentionDispatcher(implementation, use_bsa=enabled)
    chosen, why = dispatcher.bsa_decision(on_cuda, grid)
    assert chosen is use and reason in why


def test_an_unavailable_backend_named_explicitly_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") or importlib.util.find_spec("flash_attn_interface"):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(AttentionBackendUnavailable, match="pip install flash-attn"):
        AttentionDispatcher("flash")
    with pytest.raises(AttentionBackendUnavailable, match="unknown"):
        AttentionDispatcher("fastest")


def test_flash4_runs_only_unmasked_half_precision_inference_on_cuda():
    import torch

    from longcat_train.model.attention import ATTENTION_BACKENDS, flash4_applies

    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not flash4_applies(q, None)  # CPU tensors: SDPA
        # and `auto` there is SDPA's result
        out = ATTENTION_BACKENDS["auto"].dense(q, q, q)
        expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.equal(out, expected)
    if torch.cuda.is_available():
        cuda = q.cuda()
        assert not flash4_applies(cuda, torch.ones(8, 8, dtype=torch.bool, device="cuda"))  # masked
        assert not flash4_applies(cuda.float(), None)  # fp32
        assert not flash4_applies(cuda, None)  # grad enabled: training keeps SDPA's op


def test_the_flash4_hint_is_for_hopper_and_blackwell_gpus_without_it(monkeypatch):
    import torch

    from longcat_train.model import attention

    monkeypatch.setattr(attention, "module_installed", lambda name: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, hinted in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        hint = attention.flash4_install_hint()
        assert (hint is not None) is hinted
        assert hint is None or 'pip install "longcat-train[flash4]"' in hint
    monkeypatch.setattr(attention, "module_installed", lambda name: name == "flash_attn.cute")
    assert attention.flash4_install_hint() is None  # installed: its own check speaks if it fails
