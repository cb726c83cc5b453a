"""Run under `torchrun --nproc_per_node P` (gloo): the tiny DiT with its tokens shared by P processes
(Ulysses) against the same model on one process, for dense and block-sparse attention, text-to-video
and image-to-video (a condition frame), token grids cut into bands of rows and of columns. Prints
`ulysses ok P` when the predictions and the parameter gradients (summed over the processes) equal
the single-process ones to float32 rounding."""

import os

import torch
import torch.distributed as dist

from longcat_train.demo.tiny_model import TINY_DIT_CONFIG
from longcat_train.model import LongCatVideoTransformer3DModel, bsa
from longcat_train.model.ulysses import SequenceParallel

CONFIG = {**TINY_DIT_CONFIG, "hidden_size": 128, "num_heads": 4,  # 4 heads: 2 or 4 processes share them
          "bsa_params": {"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}}


def main() -> None:
    # the Triton kernel needs CUDA: its PyTorch reference (the same block selection, masked dense
    # attention over the raster-ordered grid) stands in, called the same way by the dispatcher
    bsa.block_sparse_attention = bsa.block_sparse_attention_reference
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same model and inputs on every process
    model = LongCatVideoTransformer3DModel(**CONFIG)
    text = torch.randn(1, 1, 7, CONFIG["caption_channels"])
    mask = torch.ones(1, 7, dtype=torch.long)
    shared = SequenceParallel()
    # token grids (5, 8, 8): cut into bands of rows; (5, 5, 8): 5 rows, so into bands of columns
    for height in (16, 10):
        latents = torch.randn(1, 16, 5, height, 16)
        weights = torch.randn(1, 16, 5, height, 16)  # the loss weighs every output element differently
        for implementation in ("sdpa", "bsa"):
            model.set_attention_implementation(implementation)
            for num_cond in (0, 1):
                case = f"height {height}, {implementation}, {num_cond} condition frames"
                timestep = torch.tensor([[0.0 if f < num_cond else 700.0 for f in range(5)]])
                results = []
                for sequence_parallel in (None, shared):
                    model.set_sequence_parallel(sequence_parallel)
                    model.zero_grad(set_to_none=True)
                    out = model(latents, timestep, text, mask, num_cond_latents=num_cond)
                    (out * weights).sum().backward()
                    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
                    if sequence_parallel is not None:
                        for grad in grads.values():
                            dist.all_reduce(grad)
                    results.append((out.detach(), grads))
                (reference, reference_grads), (split, split_grads) = results
                torch.testing.assert_close(split, reference, rtol=1e-5, atol=1e-5, msg=case)
                for name, grad in reference_grads.items():
                    # float32 sums in another order: within 1e-6 of the gradient's largest element
                    torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()),
                                               msg=f"{case}: {name}")
    print(f"ulysses ok {dist.get_world_size()} rank {os.environ['RANK']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
