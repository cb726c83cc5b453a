"""Time PyTorch SDPA's CUDA backends on a render's self-attention shape (480x832x93 image-to-video
with the condition frame cached: 35,880 noisy queries over 37,440 keys, batch 2 for CFG, 32 heads
of 128) for each memory layout of q and k/v ([B, H, N, D] views of head-major or token-major
storage), to see which layout and kernel the sampler should feed; then FlashAttention-4 (where
flash-attn-4 is installed) on token-major tensors, with its largest difference from cuDNN's output.

    python scripts/attention_layouts.py
"""

import itertools
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, D, NQ, NK = 2, 32, 128, 35_880, 37_440
ITERATIONS = 5


def tensor(n: int, token_major: bool) -> torch.Tensor:
    if token_major:
        return torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16)


def seconds(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / ITERATIONS


def main() -> None:
    flops = 4 * B * H * NQ * NK * D
    print("backend | q layout | k/v layout | ms per call | TFLOP/s")
    for backend, q_tokens, kv_tokens in itertools.product(
            (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION), (True, False), (True, False)):
        q, k, v = tensor(NQ, q_tokens), tensor(NK, kv_tokens), tensor(NK, kv_tokens)
        try:
            with sdpa_kernel(backend):
                s = seconds(lambda: F.scaled_dot_product_attention(q, k, v))
            figure = f"{1e3 * s:.1f} | {flops / s / 1e12:.0f}"
        except RuntimeError as error:
            figure = f"refused: {str(error).splitlines()[0][:80]}"
        layout = lambda token_major: "token-major" if token_major else "head-major"  # noqa: E731
        print(f"{backend.name} | {layout(q_tokens)} | {layout(kv_tokens)} | {figure}", flush=True)
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        print("flash-attn-4 | not installed")
        return
    q, k, v = tensor(NQ, True), tensor(NK, True), tensor(NK, True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        expected = F.scaled_dot_product_attention(q, k, v)
    flash4 = lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # noqa: E731
    out = flash4()
    out = (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    s = seconds(flash4)
    difference = (out.float() - expected.float()).abs()
    print(f"flash-attn-4 | token-major | token-major | {1e3 * s:.1f} | {flops / s / 1e12:.0f} "
          f"| max |FA4 - cuDNN| {difference.max().item():.2e}, mean {difference.mean().item():.2e}", flush=True)


if __name__ == "__main__":
    main()
