"""`longcat bench --mode memory`: s/step, peak VRAM and the planner's prediction for each memory
setting, full-size LongCat-Video (random weights), I2V, batch 1 (480x832x93 and LoRA rank 32 unless
the bench options say otherwise).

Rows: bf16 (no swap), bf16-kept (bf16 keeping the projections the planner fits on this machine),
int8-quanto, fp8-torchao, swap 8/16/24/40 blocks (bf16), group offload, and the planner's
recommendation for a 24 GiB and a 48 GiB cap, run under `torch.cuda.set_per_process_memory_fraction`.
The model is built on the GPU in bf16 and then quantized/swapped; the cap is set after that setup (a
real 24 GB card would load with `longcat_train.memory.load_quantized_transformer` or on the host), so
it bounds the training steps. Each row runs in its own process (a full run takes ~25 min: split it
with `--rows`) and prints one JSON line (`ROW {...}`); the table comes at the end. `--block-error`
prints instead the relative error of one full-size block per quantized precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .bench import BenchSettings, bench_train, fitting_projections
from .memory import (
    enable_block_swap, enable_group_offload, machine_memory_gib, plan_memory, quantize_transformer,
)
from .memory.quantize import relative_block_error
from .release_facts import PATCH_SIZE, latent_shape

ROWS = ("bf16", "bf16-kept", "int8-quanto", "fp8-torchao", "swap8", "swap16", "swap24", "swap40", "group-offload",
        "cap24", "cap48")
BLOCK_ERROR_PRECISIONS = ("int8-quanto", "int4-quanto", "fp8-torchao")


@dataclass
class MemoryBenchSettings:
    rows: tuple[str, ...] = ROWS
    resolution: str = "480x832"
    frames: int = 93
    rank: int = 32
    steps: int = 2
    warmup: int = 1
    block_error: bool = False

    @property
    def tokens_grid(self) -> tuple[int, int, int]:
        """The bucket's token grid (t x h x w): its latent shape cut into the DiT's patches."""
        latent = latent_shape(self.frames, *self.bench().pixel_size)
        return tuple(n // p for n, p in zip(latent, PATCH_SIZE))  # type: ignore[return-value]

    def bench(self) -> BenchSettings:
        """The train bench every row starts from: no projections kept (only bf16-kept keeps some)."""
        return BenchSettings(resolution=self.resolution, frames=self.frames, rank=self.rank, steps=self.steps,
                             warmup=self.warmup, keep_projections=())


def _bucket(bench: BenchSettings) -> tuple[int, int, int]:
    return (*bench.pixel_size, bench.frames)


def row_setup(row: str, bench: BenchSettings):
    """(bench settings, planner settings, memory cap GiB or None) of one row."""
    cap = None
    if row in ("bf16", "int8-quanto", "fp8-torchao"):
        memory = bench.memory_settings(precision=row)
    elif row.startswith("swap"):
        memory = bench.memory_settings(swap=int(row.removeprefix("swap")))
    elif row == "group-offload":
        memory = bench.memory_settings(group_offload=True)
    elif row == "bf16-kept":  # the projections the planner keeps on this GPU and machine
        bench = dataclasses.replace(bench, keep_projections=fitting_projections(bench))
        memory = bench.memory_settings()
    else:
        cap = float(row.removeprefix("cap"))
        memory = plan_memory(bench.memory_settings(), [_bucket(bench)], cap,
                             host_memory_gib=machine_memory_gib()).recommendation
        bench = dataclasses.replace(bench, checkpointing=memory.checkpoint_mode, selective_blocks=memory.selective_blocks,
                                    offload_block_inputs=memory.offload_block_inputs,
                                    keep_projections=memory.kept_projections)
    return bench, memory, cap


def run_row(row: str, bench: BenchSettings) -> dict:
    bench, memory, cap = row_setup(row, bench)
    estimate = plan_memory(memory, [_bucket(bench)], 1e9).buckets[0].estimate
    predicted = estimate.vram

    def before_lora(model):
        if memory.base_model_precision not in ("bf16", "no_change"):
            quantize_transformer(model, memory.base_model_precision)

    def after_lora(model):
        if memory.blocks_to_swap:
            enable_block_swap(model, memory.blocks_to_swap, device="cuda")
        if memory.group_offload:
            enable_group_offload(model, "cuda", "cpu", "block_level", 1, use_stream=True)
        torch.cuda.empty_cache()
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)

    result = {"row": row, "settings": memory.describe(), "predicted_gib": round(predicted, 2), "cap_gib": cap,
              "predicted_host_gib": round(estimate.host, 2)}
    try:
        measured = bench_train(bench, before_lora=before_lora, after_lora=after_lora)
    except Exception as error:  # a refusal or an OOM is a result of this row, not a crash of the table
        result["error"] = f"{type(error).__name__}: {error}"[:400]
        return result
    result.update(s_per_step=measured["s_per_step"], peak_vram_gib=measured["peak_vram_gib"],
                  losses_finite=all(v == v and abs(v) != float("inf") for v in measured["losses"]),
                  device=measured["device"], host_pinned_gib=measured["host_pinned_gib"],
                  host_peak_rss_gib=measured["host_peak_rss_gib"])
    result["prediction_error"] = round(predicted / measured["peak_vram_gib"] - 1, 3)
    return result


def print_table(results: list[dict]) -> None:
    base = next((r["s_per_step"] for r in results if r["row"] == "bf16" and "s_per_step" in r), None)
    print("\n| row | settings | s/step | vs bf16 | peak VRAM GiB | planner GiB | planner error | host RSS GiB (pinned) | planner host GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | {r['settings']} | {r['error']} | | | {r['predicted_gib']} | | | {r['predicted_host_gib']} |")
            continue
        ratio = f"{r['s_per_step'] / base:.2f}x" if base else ""
        print(f"| {r['row']}{' (cap %g GiB)' % r['cap_gib'] if r['cap_gib'] else ''} | {r['settings']} | "
              f"{r['s_per_step']} | {ratio} | {r['peak_vram_gib']} | {r['predicted_gib']} | {r['prediction_error']:+.1%} | "
              f"{r['host_peak_rss_gib']} ({r['host_pinned_gib']}) | {r['predicted_host_gib']} |")


def _run_row_in_child(row: str, settings: MemoryBenchSettings) -> dict:
    """One row in a fresh process: a row's quantization, swap hooks and memory cap cannot leak
    into the next, and an OOM or a crash costs only that row."""
    # the allocator setting `longcat train` uses (the CLI has set it already; a plain Python caller has not)
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
    child = dataclasses.replace(settings, rows=(row,))
    done = subprocess.run([sys.executable, "-m", "longcat_train.bench_memory", json.dumps(dataclasses.asdict(child))],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    return json.loads(lines[-1][4:]) if lines else {
        "row": row, "settings": "", "predicted_gib": None, "cap_gib": None, "predicted_host_gib": None,
        "error": f"process exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}


def run_memory_bench(settings: MemoryBenchSettings) -> list[dict]:
    """Every row of `settings.rows` (or the block errors), printed as it ends; the table last."""
    if not torch.cuda.is_available():
        raise RuntimeError("longcat bench --mode memory needs a CUDA GPU (it builds the full 13.6B model on it)")
    unknown = [row for row in settings.rows if row not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {ROWS}")
    if settings.block_error:
        errors = []
        for precision in BLOCK_ERROR_PRECISIONS:
            rel_l2 = relative_block_error(precision, tokens_grid=settings.tokens_grid)
            errors.append({"precision": precision, "rel_l2": rel_l2})
            print("BLOCK_ERROR " + json.dumps(errors[-1]), flush=True)
        return errors
    results = []
    for row in settings.rows:
        results.append(_run_row_in_child(row, settings))
        print("ROW " + json.dumps(results[-1]), flush=True)
    print_table(results)
    return results


if __name__ == "__main__":
    # a row's own process (`_run_row_in_child`): argv[1] is its MemoryBenchSettings as JSON
    fields = json.loads(sys.argv[1])
    child = MemoryBenchSettings(**(fields | {"rows": tuple(fields["rows"])}))
    print("ROW " + json.dumps(run_row(child.rows[0], child.bench())), flush=True)
