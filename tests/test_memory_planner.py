"""The VRAM planner: calibrated on the measured H200 step, monotone in what saves memory, and
refusing (with advice) what will not fit."""

from dataclasses import replace

import pytest
import torch
from rich.console import Console

from longcat_train.config.training import TrainingConfig
from longcat_train.memory import MemorySettings, PlanRefusal, plan_memory
from longcat_train.memory.planner import bucket_tokens, estimate, parameter_counts, usable_gib
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.release_facts import RELEASE_DIT_CONFIG

BUCKET = (480, 832, 93)


def _peak(settings: MemorySettings, gpu: float = 200.0) -> float:
    return plan_memory(settings, [BUCKET], gpu).buckets[0].estimate.vram


def test_the_bucket_has_the_measured_token_count():
    assert bucket_tokens(*BUCKET) == 37_440


@pytest.mark.parametrize(
    "settings, measured",
    [  # docs/benchmarks.md, H200, bf16 autocast, fused kernels, LoRA r32, rows of the current code
        (dict(checkpoint_mode="selective", offload_block_inputs=True), 37.38),
        (dict(checkpoint_mode="selective", offload_block_inputs=True, keep_projections=("qkv", "attention_out")), 38.53),
        (dict(checkpoint_mode="selective", offload_block_inputs=True,
              keep_projections=("qkv", "attention_out", "cross_q")), 38.81),
        *[(dict(checkpoint_mode="selective", offload_block_inputs=True, blocks_to_swap=k), peak)
          for k, peak in ((8, 33.84), (16, 29.69), (24, 25.54), (34, 20.35), (40, 17.23))],
        (dict(offload_block_inputs=True), 37.02),
        (dict(offload_block_inputs=True, blocks_to_swap=42), 15.93),
        (dict(base_model_precision="int8-quanto", checkpoint_mode="selective", offload_block_inputs=True), 25.96),
        (dict(base_model_precision="fp8-torchao", checkpoint_mode="selective", offload_block_inputs=True), 25.65),
    ],
)
def test_prediction_is_within_15_percent_of_every_measured_row(settings, measured):
    assert _peak(MemorySettings(lora_rank=32, **settings)) == pytest.approx(measured, rel=0.15)


def test_more_swapped_blocks_predict_less_vram_and_more_host_ram():
    for precision in ("bf16", "int8-quanto"):
        plans = [plan_memory(MemorySettings(base_model_precision=precision, blocks_to_swap=k), [BUCKET], 200.0)
                 .buckets[0].estimate for k in (0, 8, 16, 24, 40)]
        vram = [e.vram for e in plans]
        assert vram == sorted(vram, reverse=True) and len(set(vram)) == len(vram)
    # a streamed quantized load never holds the bf16 model, so the pinned swapped blocks show
    assert plans[-1].host > plans[1].host > plans[0].host


def test_quantization_and_activation_offload_predict_less_vram():
    bf16 = _peak(MemorySettings())
    assert _peak(MemorySettings(base_model_precision="int8-quanto")) < bf16
    assert _peak(MemorySettings(base_model_precision="int4-quanto")) < _peak(MemorySettings(base_model_precision="int8-quanto"))
    assert _peak(MemorySettings(offload_block_inputs=True)) < bf16
    assert _peak(MemorySettings(checkpoint_mode="selective")) > bf16


def test_24_gib_gets_swapping_or_quantization_and_a_refusal_for_plain_bf16():
    plan = plan_memory(TrainingConfig(lora_rank=32), [BUCKET, (480, 832, 45)], 24.0)
    assert not plan.fits
    with pytest.raises(PlanRefusal, match="480x832x93") as refusal:
        plan.raise_if_oom()
    r = plan.recommendation
    assert r is not None and (r.blocks_to_swap > 0 or r.base_model_precision != "bf16")
    assert plan.recommendation_estimate.vram <= 24.0
    assert str(r.blocks_to_swap) in str(refusal.value)  # the advice is in the message
    # what it recommends is itself predicted to fit every bucket
    assert plan_memory(r, [BUCKET, (480, 832, 45)], 24.0).fits


def test_a_large_gpu_runs_plain_bf16_and_prefers_faster_settings():
    plan = plan_memory(TrainingConfig(lora_rank=32), [BUCKET], 80.0)
    plan.raise_if_oom()
    assert plan.largest_fitting_bucket == BUCKET
    assert plan.recommendation.blocks_to_swap == 0 and plan.recommendation.base_model_precision == "bf16"


def test_largest_fitting_bucket_is_named_and_rendered():
    plan = plan_memory(TrainingConfig(lora_rank=32), [BUCKET, (480, 832, 45), (256, 256, 33)], 40.0)
    assert plan.largest_fitting_bucket == (480, 832, 45)
    console = Console(record=True, width=160)
    plan.render(console)
    text = console.export_text()
    assert "480x832x93" in text and "largest bucket that fits: 480x832x45" in text


def test_the_config_keys_reach_the_plan():
    cfg = TrainingConfig(lora_rank=32, musubi_blocks_to_swap=16, base_model_precision="int8-quanto")
    settings = plan_memory(cfg, [BUCKET], 48.0).settings
    assert (settings.blocks_to_swap, settings.base_model_precision, settings.lora_rank) == (16, "int8-quanto", 32)


def test_host_ram_shortfall_refuses_and_recommends_settings_that_fit_both():
    settings = MemorySettings(checkpoint_mode="selective", offload_block_inputs=True, lora_rank=32)
    assert plan_memory(settings, [(720, 1280, 93)], 141.0, host_memory_gib=512.0).fits
    assert plan_memory(settings, [(720, 1280, 93)], 141.0).fits  # host RAM not given: not checked
    tight = plan_memory(settings, [(720, 1280, 93)], 141.0, host_memory_gib=48.0)
    (bucket,) = tight.buckets
    assert bucket.fits_gpu and not bucket.fits_host
    with pytest.raises(PlanRefusal, match="out of host RAM: bucket 720x1280x93") as refusal:
        tight.raise_if_oom()
    # keeping the activations on this roomy GPU frees the host; the advice says so
    assert tight.recommendation.offload_block_inputs is False
    assert "activation_offload=false" in str(refusal.value)
    assert tight.recommendation_estimate.host <= 0.9 * 48.0


TIER_HOST_GIB = 64.0  # the tiers are written for a workstation with 64 GiB of RAM (their comments say so)


@pytest.mark.parametrize("tier, gib", [("24gb", 24.0), ("48gb", 48.0), ("80gb", 80.0)])
def test_each_tier_config_is_predicted_to_fit_its_gpu(tier, gib):
    from pathlib import Path

    from longcat_train.config.jsonc import loads_jsonc

    path = Path(__file__).resolve().parents[1] / "configs" / "tiers" / f"{tier}.json"
    config = TrainingConfig(**loads_jsonc(path.read_text()))
    plan = plan_memory(config, [BUCKET], gib, host_memory_gib=TIER_HOST_GIB)
    plan.raise_if_oom()
    # the tier is the planner's own pick (the fastest settings that fit), not a looser one
    assert plan.recommendation == plan.settings


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="bucket"):
        plan_memory(MemorySettings(), [], 24.0)
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        plan_memory(MemorySettings(), [BUCKET], 0)


def test_kept_projections_cost_their_output_bytes_on_the_bf16_fused_path_only():
    from typing import get_args

    from longcat_train.config.training import KeptProjection
    from longcat_train.model.transformer import PROJECTION_ROLES
    from longcat_train.release_facts import PROJECTION_MODULES

    # config and model name the same projections, and each names a linear of a block
    assert set(get_args(KeptProjection)) == set(PROJECTION_ROLES) == set(PROJECTION_MODULES)
    with torch.device("meta"):
        block = LongCatVideoTransformer3DModel(**dict(RELEASE_DIT_CONFIG, depth=1)).blocks[0]
    assert all(isinstance(block.get_submodule(path), torch.nn.Linear) for path in PROJECTION_MODULES.values())
    tokens = bucket_tokens(*BUCKET)
    base = MemorySettings(checkpoint_mode="selective", offload_block_inputs=True)
    kept = replace(base, keep_projections=("qkv", "attention_out"))
    plain, more = (estimate(parameter_counts(), s, tokens) for s in (base, kept))
    per_block = tokens * (3 * 4096 + 4096) * 2 / 2**30  # qkv and attention-out outputs, bf16
    assert more.vram - plain.vram == pytest.approx(2 * per_block)  # two blocks in flight on the GPU
    # every block's copy on the host (plus the ends of the arena's slabs)
    assert more.host - plain.host == pytest.approx(48 * per_block, rel=0.1)
    # quantized weights take PEFT's path (nothing kept); full checkpointing keeps nothing either
    for other in (replace(kept, base_model_precision="int8-quanto"), replace(kept, checkpoint_mode="full")):
        assert other.kept_projections == ()
        assert estimate(parameter_counts(), other, tokens) == estimate(parameter_counts(), replace(other, keep_projections=()), tokens)


@pytest.mark.parametrize("bucket, settings, pinned", [  # pinned GiB measured on an H200 (docs/benchmarks.md)
    (BUCKET, dict(), 27.52),
    (BUCKET, dict(keep_projections=("qkv", "attention_out", "cross_q")), 99.0),
    # block-sparse attention at 720p: its kept output is in raster order, like SDPA's
    ((720, 1280, 93), dict(), 67.03),
])
def test_host_prediction_follows_the_measured_pinned_bytes(bucket, settings, pinned):
    from longcat_train.memory.planner import HOST_BASE_GIB

    s = MemorySettings(checkpoint_mode="selective", offload_block_inputs=True, **settings)
    predicted = plan_memory(s, [bucket], 141.0).buckets[0].estimate.host - HOST_BASE_GIB
    # never more than 5 % under (a machine would run out) nor 15 % over (the 480p default is 14 % over:
    # the arena packed its tensors tighter on the GPU than the planner's simulation of them)
    assert 0.95 * pinned <= predicted <= 1.15 * pinned


def test_projections_are_recommended_as_far_as_host_ram_allows():
    from longcat_train.memory.planner import fastest_projections

    settings = MemorySettings(checkpoint_mode="selective", offload_block_inputs=True)
    assert fastest_projections(settings, BUCKET, 141.0, 128.0) == ("qkv", "attention_out", "cross_q")
    assert fastest_projections(settings, BUCKET, 141.0, 96.0) == ("qkv",)
    assert fastest_projections(settings, BUCKET, 141.0, 48.0) == ()
    plan = plan_memory(settings, [BUCKET], 80.0, host_memory_gib=128.0)
    assert plan.recommendation.kept_projections == ("qkv", "attention_out", "cross_q")
    assert 'keep_projections=["qkv", "attention_out", "cross_q"]' in plan.advice()


def test_train_picks_the_fastest_fitting_values_of_the_memory_keys_left_unset():
    from longcat_train.memory.planner import fastest_projections, planned_config_keys

    defaults = TrainingConfig(lora_rank=32)
    picked = planned_config_keys(defaults, [BUCKET], 141.0, 128.0)
    # what `longcat bench` keeps on the same GPU and RAM, and nothing else changes on an H200
    bench = fastest_projections(MemorySettings.from_config(defaults), BUCKET, 141.0, 128.0)
    assert picked == {"keep_projections": list(bench)} and bench == ("qkv", "attention_out", "cross_q")
    # less host RAM: activations stay on the roomy GPU instead, with fewer projections kept
    tight = planned_config_keys(defaults, [BUCKET], 141.0, 96.0)
    assert tight == {"keep_projections": ["qkv", "attention_out"], "activation_offload": False}
    assert plan_memory(defaults.model_copy(update=tight), [BUCKET], 141.0, host_memory_gib=96.0).fits
    assert not plan_memory(defaults.model_copy(update=picked), [BUCKET], 141.0, host_memory_gib=96.0).fits


def test_train_keeps_every_memory_key_the_user_set():
    from longcat_train.memory.planner import planned_config_keys

    explicit = TrainingConfig(lora_rank=32, keep_projections=[], activation_offload=True)
    assert planned_config_keys(explicit, [BUCKET], 141.0, 128.0) == {}
    # a 24 GiB GPU: blocks are swapped, the weights stay bf16 (precision is a choice of what is trained)
    picked = planned_config_keys(TrainingConfig(lora_rank=32), [BUCKET], 24.0, 128.0)
    assert picked["musubi_blocks_to_swap"] > 0 and "base_model_precision" not in picked
    settings = MemorySettings.from_config(TrainingConfig(lora_rank=32).model_copy(update=picked))
    assert plan_memory(settings, [BUCKET], 24.0, host_memory_gib=128.0).fits
    # the user's checkpointing mode is kept while the rest is planned around it
    full = planned_config_keys(TrainingConfig(lora_rank=32, gradient_checkpointing_mode="full"), [BUCKET], 24.0, 128.0)
    assert "gradient_checkpointing_mode" not in full and full["musubi_blocks_to_swap"] > 0
    # group offload chosen: placement is the user's, nothing is picked
    assert planned_config_keys(TrainingConfig(enable_group_offload=True), [BUCKET], 24.0, 128.0) == {}


def test_fsdp_shares_the_bf16_weights_out_over_the_gpus():
    """Each GPU holds its share of the blocks, two whole blocks in flight and the parts outside the
    blocks; the LoRA, its optimizer state and the activations are each GPU's own, as with DDP."""
    counts = parameter_counts()
    block = (counts.per_block_quantizable + counts.per_block_other) * 2 / 2**30
    outside = counts.outside_blocks * 2 / 2**30
    fsdp = TrainingConfig(lora_rank=32, distributed_strategy="fsdp")
    alone = plan_memory(fsdp, [BUCKET], 24.0).buckets[0].estimate  # one process: nothing to shard
    whole = plan_memory(TrainingConfig(lora_rank=32), [BUCKET], 24.0, processes=4).buckets[0].estimate
    assert alone.weights == whole.weights
    assert whole.weights > 24.0  # the bf16 DiT alone overflows a 24 GB GPU
    for gpus in (2, 4, 8):
        shared = plan_memory(fsdp, [BUCKET], 24.0, processes=gpus).buckets[0].estimate
        assert shared.weights == pytest.approx(outside + block * (counts.depth / gpus + 2))
        assert (shared.lora_state, shared.activations) == (whole.lora_state, whole.activations)
    # four 24 GB GPUs train 480x832x93 on bf16 weights without swapping blocks; DDP needs to swap
    plan = plan_memory(fsdp, [BUCKET], 24.0, processes=4)
    assert plan.recommendation.shards == 4 and plan.recommendation.blocks_to_swap == 0
    assert plan.recommendation.base_model_precision == "bf16"
    assert plan_memory(TrainingConfig(lora_rank=32), [BUCKET], 24.0, processes=4).recommendation.blocks_to_swap > 0


def test_every_process_on_a_machine_counts_in_its_host_memory():
    """FSDP loads the bf16 model into host memory in each process before sharding it."""
    settings = MemorySettings(lora_rank=32, offload_block_inputs=False)
    one = plan_memory(settings, [BUCKET], 80.0).buckets[0].estimate.host
    two = plan_memory(replace(settings, processes_per_machine=2), [BUCKET], 80.0).buckets[0].estimate.host
    assert two == pytest.approx(2 * one)
    sharded = plan_memory(replace(settings, shards=2, processes_per_machine=2), [BUCKET], 80.0).buckets[0].estimate.host
    assert sharded > two + 2 * 25.0  # + a 25.3 GiB bf16 model per process


def test_ulysses_splits_the_activations_and_keeps_the_weights_whole():
    """720x1280x93 (86,400 tokens): each of N GPUs holds 1/N of every token-sized tensor."""
    bucket = (720, 1280, 93)
    estimates = {n: plan_memory(TrainingConfig(lora_rank=32, distributed_strategy="ulysses"), [bucket], 80.0,
                                processes=n).buckets[0].estimate for n in (1, 2, 4, 8)}
    for n in (2, 4, 8):
        assert estimates[n].weights == estimates[1].weights
        assert estimates[n].activations == pytest.approx(estimates[1].activations / n, rel=1e-3)
    assert estimates[1].vram > usable_gib(48.0) > estimates[2].vram  # one 48 GB GPU is short; two fit
