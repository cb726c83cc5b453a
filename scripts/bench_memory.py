"""GPU benchmark of the memory settings (issue 7): s/step, peak VRAM and the planner's prediction per
setting, full-size LongCat-Video (random weights), 480x832x93 I2V, LoRA rank 32, batch 1.

    python scripts/bench_memory.py                   # every row, each in its own process
    python scripts/bench_memory.py --rows bf16,swap8 # some rows (a full run takes ~25 min: split it)
    python scripts/bench_memory.py --block-error     # relative error of one full-size block per precision

Rows: bf16 (no swap), bf16-kept (bf16 keeping the projections the planner fits on this machine), int8-quanto, fp8-torchao, swap 8/16/24/40 blocks (bf16), group offload, and
the planner's recommendation for a 24 GiB and a 48 GiB cap, run under
`torch.cuda.set_per_process_memory_fraction`. The model is built on the GPU in bf16 and then
quantized/swapped; the cap is set after that setup (a real 24 GB card would load with
`longcat_train.memory.load_quantized_transformer` or on the host), so it bounds the training steps.
Each row prints one JSON line (`ROW {...}`); the table comes at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from longcat_train.bench import BenchSettings, bench_train, fitting_projections  # noqa: E402
from longcat_train.memory import (  # noqa: E402
    enable_block_swap, enable_group_offload, machine_memory_gib, plan_memory, quantize_transformer,
)
from longcat_train.memory.quantize import relative_block_error  # noqa: E402

BUCKET = (480, 832, 93)
ROWS = ("bf16", "bf16-kept", "int8-quanto", "fp8-torchao", "swap8", "swap16", "swap24", "swap40", "group-offload",
        "cap24", "cap48")


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
        memory = plan_memory(bench.memory_settings(), [BUCKET], cap, host_memory_gib=machine_memory_gib()).recommendation
        bench = dataclasses.replace(bench, checkpointing=memory.checkpoint_mode, selective_blocks=memory.selective_blocks,
                                    offload_block_inputs=memory.offload_block_inputs,
                                    keep_projections=memory.kept_projections)
    return bench, memory, cap


def run_row(row: str, bench: BenchSettings) -> dict:
    bench, memory, cap = row_setup(row, bench)
    estimate = plan_memory(memory, [BUCKET], 1e9).buckets[0].estimate
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
    print(f"\n| row | settings | s/step | vs bf16 | peak VRAM GiB | planner GiB | planner error | host RSS GiB (pinned) | planner host GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | {r['settings']} | {r['error']} | | | {r['predicted_gib']} | | | {r['predicted_host_gib']} |")
            continue
        ratio = f"{r['s_per_step'] / base:.2f}x" if base else ""
        print(f"| {r['row']}{' (cap %g GiB)' % r['cap_gib'] if r['cap_gib'] else ''} | {r['settings']} | "
              f"{r['s_per_step']} | {ratio} | {r['peak_vram_gib']} | {r['predicted_gib']} | {r['prediction_error']:+.1%} | "
              f"{r['host_peak_rss_gib']} ({r['host_pinned_gib']}) | {r['predicted_host_gib']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    parser.add_argument("--one", help="run one row in this process (used by the driver)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--block-error", action="store_true", help="relative error of one full-size block per precision")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_memory needs a CUDA GPU (it builds the full 13.6B model on it)")
    bench = BenchSettings(steps=args.steps, warmup=args.warmup, rank=32, keep_projections=())
    if args.block_error:
        for precision in ("int8-quanto", "int4-quanto", "fp8-torchao"):
            print("BLOCK_ERROR " + json.dumps({"precision": precision, "rel_l2": relative_block_error(precision)}), flush=True)
        return
    if args.one:
        print("ROW " + json.dumps(run_row(args.one, bench)), flush=True)
        return
    results = []
    for row in args.rows.split(","):
        if row not in ROWS:
            sys.exit(f"--rows: unknown row {row!r}; choose from {ROWS}")
        # the allocator setting `longcat train` uses (longcat_train/cli.py)
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
        done = subprocess.run([sys.executable, __file__, "--one", row, "--steps", str(args.steps),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, env=env)
        lines = [l for l in done.stdout.splitlines() if l.startswith("ROW ")]
        result = json.loads(lines[-1][4:]) if lines else {
            "row": row, "settings": "", "predicted_gib": None, "cap_gib": None, "predicted_host_gib": None,
            "error": f"process exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        print("ROW " + json.dumps(result), flush=True)
        results.append(result)
    print_table(results)


if __name__ == "__main__":
    main()
