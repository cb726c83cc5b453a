"""The first step's kernel set-up run ahead (training/warmup.py) and the allocator settings the CLI
sets before CUDA starts."""

import torch

from longcat_train.cli import ALLOCATOR_DEFAULTS, allocator_settings
from longcat_train.demo.tiny_model import TINY_DIT_CONFIG
from longcat_train.training.warmup import MAX_WARM_BUCKETS, WarmupSpec, warm_up_kernels


def _spec(**changes) -> WarmupSpec:
    values = dict(dit_config=dict(TINY_DIT_CONFIG), dtype=torch.float32,
                  autocast=False, attention="sdpa", checkpointing="selective", keep_projections=("qkv",),
                  lora_rank=4, lora_targets=("attn.qkv", "ffn.w1"), batch_size=2, conditioning="i2v")
    return WarmupSpec(**(values | changes))


def test_warm_up_runs_the_largest_buckets_first_and_stops_at_the_cap():
    buckets = [(32, 32, 5), (64, 96, 9), (48, 64, 5), (32, 64, 9)]
    report = warm_up_kernels(_spec(), buckets, torch.device("cpu"))
    assert report.error is None
    assert report.buckets == [(64, 96, 9), (32, 64, 9), (48, 64, 5)][:MAX_WARM_BUCKETS]
    assert report.seconds > 0


def test_a_failing_warm_up_is_reported_not_raised():
    report = warm_up_kernels(_spec(attention="no-such-backend"), [(32, 32, 5)], torch.device("cpu"))
    assert report.buckets == []
    assert report.error is not None and "no-such-backend" in report.error
    assert report.as_event()["warmup_error"] == report.error


def test_allocator_settings_add_defaults_and_keep_the_users_keys():
    assert allocator_settings("") == ",".join(f"{k}:{v}" for k, v in ALLOCATOR_DEFAULTS.items())
    mine = allocator_settings("expandable_segments:False, pinned_use_cuda_host_register:False")
    assert "expandable_segments:False" in mine and "pinned_use_cuda_host_register:False" in mine
    assert "expandable_segments:True" not in mine and "pinned_use_cuda_host_register:True" not in mine
    assert mine.endswith("pinned_num_register_threads:8")
