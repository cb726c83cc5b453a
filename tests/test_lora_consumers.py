"""LoRA files where users load them (issue 22): each consumer's own key matching and merge rules,
re-implemented here from its source, against our files.

- ComfyUI-WanVideoWrapper (kijai): LongCat-Video runs as its `WanModel` (`is_longcat`) with
  Wan-style names; a LoRA is standardised (`standardize_lora_key_format`), matched by ComfyUI's
  `load_lora` against `diffusion_model.<param without .weight>` of that model's state dict, every
  unmatched key logged "lora key not loaded", and merged as W += strength·alpha/rank·B·A.
- The official code: `LoRANetwork` modules named `lora___lorahyphen___<path>`, split ups applied to
  equal chunks of the down output, y = Wx + b + multiplier·alpha_scale·up(down(x)).
- diffusers: `load_lora_adapter` on our transformer (a diffusers `ModelMixin` with
  `PeftAdapterMixin`), by folder + weight name (reads the header) and by file path (does not).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.lora import LoraModule, LoraWeights, apply_loras, read_lora, write_lora
from longcat_train.lora.adapters import add_lora, lora_state

from .config_factory import base_datasets, base_training, write_pair
from .reference import OFFICIAL_FUSED, load_reference, official_lora_state, reference_model, rel_l2

RUNNER = CliRunner()


def _inputs():
    t, _ = load_reference()
    return (t["inputs.hidden_states"], t["i2v.timestep"], t["inputs.encoder_hidden_states"],
            t["inputs.encoder_attention_mask"])


def _render(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(), num_cond_latents=1)


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _trained_lora(rank=8, alpha=4.0, targets=None, seed=0) -> LoraWeights:
    model = reference_model()
    add_lora(model, rank=rank, alpha=alpha, **({"targets": targets} if targets else {}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora_state(model, alpha)


def _official_style_state(rank=8, alpha_scale=0.5, seed=1) -> dict[str, torch.Tensor]:
    """What the official `LoRANetwork` saves when it adapts every linear (as the released
    cfg_step / refinement LoRAs adapt the modulation and final layers too)."""
    return official_lora_state(_linears(reference_model()), rank, alpha_scale, torch.Generator().manual_seed(seed), 0.1)


def _official_deltas(state: dict[str, torch.Tensor], multiplier=1.0) -> dict[str, torch.Tensor]:
    """The weight change of each module under the official rules: up block j reads chunk j of the
    down output, so rows j of the change are up_j·down_j."""
    deltas = {}
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        base = key.removesuffix(".lora_down.weight")
        name = base.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        ups = [state[k] for k in sorted(k for k in state if k.startswith(base + ".lora_up.blocks."))]
        ups = ups or [state[base + ".lora_up.weight"]]
        downs = state[key].chunk(len(ups), dim=0)
        scale = multiplier * state[base + ".alpha_scale"].item()
        deltas[name] = scale * torch.cat([u @ d for u, d in zip(ups, downs)])
    return deltas


def _merged_model(deltas: dict[str, torch.Tensor]):
    model = reference_model()
    linears = _linears(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            linears[name].weight += delta
    return model


def _deltas(weights: LoraWeights, strength=1.0) -> dict[str, torch.Tensor]:
    return {name: strength * m.delta() for name, m in weights.modules.items()}


# --- the official LoRAs in `longcat validate --lora` ------------------------------------------


def test_an_official_style_lora_applies_every_module_as_the_official_code_does(tmp_path):
    state = _official_style_state()
    save_file(state, str(tmp_path / "cfg_step_lora.safetensors"))
    official = _render(_merged_model(_official_deltas(state, multiplier=0.7)))
    model = reference_model()
    handle = apply_loras(model, [(read_lora(tmp_path / "cfg_step_lora.safetensors").weights, 0.7)])
    ours = _render(model)
    handle.remove()
    assert rel_l2(ours, official) < 1e-5
    # the modulation, timestep-MLP and final-layer parts (fp32 layers) change the render: a hook
    # that missed them would fail the comparison above
    fp32_layers = ("adaLN_modulation", "final_layer", "t_embedder")
    without = {n: d for n, d in _official_deltas(state, 0.7).items() if not any(s in n for s in fp32_layers)}
    assert rel_l2(_render(_merged_model(without)), official) > 1e-3


def test_a_peft_target_on_the_modulation_linear_trains_and_renders(tmp_path):
    model = reference_model()
    add_lora(model, rank=4, alpha=4.0, targets=("adaLN_modulation.1",))
    base = _render(reference_model())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapted = _render(model)
    assert rel_l2(adapted, base) > 1e-3, "the adapter on adaLN_modulation.1 changed nothing"
    assert rel_l2(adapted, _render(_merged_model(_deltas(lora_state(model, 4.0))))) < 1e-5
    model(*_inputs(), num_cond_latents=1).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("targets", [["adaLN_modulation"], ["attn.qkv", "attn.q_norm", "final_layer.linear"]])
def test_training_targets_no_block_linear_has_are_refused_by_name(tmp_path, targets):
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    result = RUNNER.invoke(app, ["config", "check", "--config", str(config), "--set",
                                 f"lora_target_modules={json.dumps(targets)}"], env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    unknown = [t for t in targets if t != "attn.qkv"]
    assert "lora_target_modules" in result.output and all(t in result.output for t in unknown)
    assert "adaLN_modulation.1" in result.output  # the fix lists the names that work


# --- ComfyUI-WanVideoWrapper ------------------------------------------------------------------

# The wrapper's WanModel for LongCat (`is_longcat`), read from its source: each module and where
# its weight comes from in LongCat's checkpoint (row block j of n for a split fused linear).
WAN_BLOCK = {
    "modulation.1": ("adaLN_modulation.1", 0, 1), "self_attn.o": ("attn.proj", 0, 1),
    **{f"self_attn.{p}": ("attn.qkv", j, 3) for j, p in enumerate("qkv")},
    "cross_attn.q": ("cross_attn.q_linear", 0, 1), "cross_attn.o": ("cross_attn.proj", 0, 1),
    **{f"cross_attn.{p}": ("cross_attn.kv_linear", j, 2) for j, p in enumerate("kv")},
    **{f"ffn.w{i}": (f"ffn.w{i}", 0, 1) for i in (1, 2, 3)},
    "self_attn.norm_q": ("attn.q_norm", 0, 1), "self_attn.norm_k": ("attn.k_norm", 0, 1),
    "cross_attn.norm_q": ("cross_attn.q_norm", 0, 1), "cross_attn.norm_k": ("cross_attn.k_norm", 0, 1),
    "norm3": ("pre_crs_attn_norm", 0, 1),
}
WAN_TOP = {
    "patch_embedding": "x_embedder.proj", "time_embedding.mlp.0": "t_embedder.mlp.0",
    "time_embedding.mlp.2": "t_embedder.mlp.2", "text_embedding.0": "y_embedder.y_proj.0",
    "text_embedding.2": "y_embedder.y_proj.2", "head.head": "final_layer.linear",
    "head.modulation.1": "final_layer.adaLN_modulation.1",
}


def _wan_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as the wrapper's LongCat checkpoint holds them, under `diffusion_model.`
    (the key space ComfyUI matches LoRA keys in)."""
    ours = model.state_dict()
    blocks = {int(k.split(".")[1]) for k in ours if k.startswith("blocks.")}
    sources = {wan: (src, 0, 1) for wan, src in WAN_TOP.items()}
    sources.update({f"blocks.{i}.{wan}": (f"blocks.{i}.{src}", j, n)
                    for i in blocks for wan, (src, j, n) in WAN_BLOCK.items()})
    wan = {}
    for name, (src, j, n) in sources.items():
        for param in ("weight", "bias"):
            if f"{src}.{param}" in ours:
                wan[f"diffusion_model.{name}.{param}"] = ours[f"{src}.{param}"].chunk(n, dim=0)[j].clone()
    assert sum(v.numel() for v in wan.values()) == sum(v.numel() for v in ours.values())  # nothing left out
    return wan


def _standardize(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts of the wrapper's `standardize_lora_key_format` that can touch a PEFT-style key."""
    out = {}
    for k, v in lora.items():
        for old, new in (("transformer.", "diffusion_model."), ("base_model.model.", "diffusion_model.")):
            if k.startswith(old):
                k = new + k.removeprefix(old)
        if k.startswith("blocks."):
            k = "diffusion_model." + k
        out[k.replace(".default.", ".")] = v
    return out


def _comfy_merge(wan: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength=1.0):
    """ComfyUI's `model_lora_keys_unet` key map, `load_lora` matching and the LoRA adapter's merge:
    returns the merged weights and the keys it would log as "lora key not loaded"."""
    key_map = {}
    for k in wan:
        if k.endswith(".weight"):
            stem = k.removeprefix("diffusion_model.").removesuffix(".weight")
            key_map["lora_unet_" + stem.replace(".", "_")] = k
            key_map[k.removesuffix(".weight")] = k
        else:
            key_map[k] = k
    lora = _standardize(lora)
    merged = {k: v.clone() for k, v in wan.items()}
    loaded = set()
    for x, target in key_map.items():
        up, down = lora.get(f"{x}.lora_B.weight"), lora.get(f"{x}.lora_A.weight")
        alpha = lora.get(f"{x}.alpha")
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        if up is None:
            continue
        loaded.update({f"{x}.lora_B.weight", f"{x}.lora_A.weight"})
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        merged[target] += strength * scale * (up.float() @ down.float())
    return merged, sorted(set(lora) - loaded)


@pytest.mark.parametrize("source", ["trained", "official-style"])
def test_comfyui_file_loads_completely_in_the_wanvideo_wrapper_and_merges_to_our_weights(tmp_path, source):
    if source == "trained":
        weights = _trained_lora(rank=8, alpha=4.0)
    else:
        save_file(_official_style_state(), str(tmp_path / "official.safetensors"))
        weights = read_lora(tmp_path / "official.safetensors").weights
    lora = load_file(str(write_lora(tmp_path / "comfyui.safetensors", weights, "comfyui")))
    merged, not_loaded = _comfy_merge(_wan_state_dict(reference_model()), lora, strength=0.8)
    assert not_loaded == []
    expected = _wan_state_dict(_merged_model(_deltas(weights, 0.8)))
    base = _wan_state_dict(reference_model())
    changed = [k for k in expected if not torch.equal(expected[k], base[k])]
    assert len(changed) == len(weights.modules) + sum(  # every adapted weight, a split one per projection
        n - 1 for name in weights.modules for suffix, n in OFFICIAL_FUSED.items() if name.endswith(suffix))
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_longcat_named_form_is_what_the_wrapper_cannot_match(tmp_path):
    """The plain `diffusion_model.<LongCat name>` form stays available (`longcat-names`); in the
    wrapper only the FFN's keys, whose names the two namings share, would load."""
    weights = _trained_lora(rank=4, alpha=4.0)
    lora = load_file(str(write_lora(tmp_path / "plain.safetensors", weights, "longcat-names")))
    assert set(lora) == {f"diffusion_model.{n}.{p}" for n in weights.modules for p in ("lora_A.weight", "lora_B.weight", "alpha")}
    _, not_loaded = _comfy_merge(_wan_state_dict(reference_model()), lora)
    assert not_loaded and not any(".ffn." in k for k in not_loaded)


# --- diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["folder and weight name", "file path"])
def test_diffusers_load_lora_adapter_renders_at_the_trained_strength(tmp_path, route):
    weights = _trained_lora(rank=8, alpha=4.0)
    path = write_lora(tmp_path / "lora.diffusers.safetensors", weights, "diffusers")
    expected = _render(_merged_model(_deltas(weights)))
    assert rel_l2(expected, _render(_merged_model(_deltas(weights, 2.0)))) > 1e-3  # twice the strength shows
    model = reference_model()
    if route == "file path":
        model.load_lora_adapter(str(path))  # diffusers ignores the header on this route
    else:
        model.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer")
    assert rel_l2(_render(model), expected) < 1e-5


def test_diffusers_header_is_the_prefixed_lora_config_with_no_null_and_no_junk(tmp_path):
    save_file(_official_style_state(), str(tmp_path / "official.safetensors"))
    weights = read_lora(tmp_path / "official.safetensors").weights  # mixed ranks: qkv 24, kv 16, rest 8
    path = write_lora(tmp_path / "lora.diffusers.safetensors", weights, "diffusers")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") for k in header)
    config = {k.removeprefix("transformer."): v for k, v in header.items()}
    assert config["target_modules"] == sorted(weights.modules)  # whole names: no "1", no "linear"
    assert config["lora_alpha"] == config["r"] == 8 and None not in config.values()
    model = reference_model()
    model.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer")
    ranks = {n.removesuffix(".lora_A.default_0"): m.weight.shape[0]
             for n, m in model.named_modules() if n.endswith("lora_A.default_0")}
    assert ranks == {name: m.rank for name, m in weights.modules.items()}
    assert rel_l2(_render(model), _render(_merged_model(_deltas(weights)))) < 1e-5


# --- every format, every input: exact or refused -----------------------------------------------


def _third_party_wan_lora(tmp_path):
    """A Wan-named LoRA trained elsewhere: its own down per projection, its own alpha, no v."""
    g = torch.Generator().manual_seed(5)
    linears = _linears(reference_model())
    state = {}
    for wan, rank, alpha, (src, n) in (("self_attn.q", 4, 2.0, ("attn.qkv", 3)), ("self_attn.k", 2, 4.0, ("attn.qkv", 3)),
                                       ("cross_attn.o", 3, 3.0, ("cross_attn.proj", 1)), ("modulation.1", 2, 1.0, ("adaLN_modulation.1", 1))):
        linear = linears[f"blocks.0.{src}"]
        state[f"diffusion_model.blocks.0.{wan}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g)
        state[f"diffusion_model.blocks.0.{wan}.lora_B.weight"] = torch.randn(linear.out_features // n, rank, generator=g)
        state[f"diffusion_model.blocks.0.{wan}.alpha"] = torch.tensor(alpha)
    save_file(state, str(tmp_path / "wan.safetensors"))
    return tmp_path / "wan.safetensors", state


def _inputs_by_name(tmp_path) -> dict[str, LoraWeights]:
    save_file(_official_style_state(), str(tmp_path / "official.safetensors"))
    return {
        "trained rank 8 alpha 4": _trained_lora(rank=8, alpha=4.0),
        "official-style mixed ranks": read_lora(tmp_path / "official.safetensors").weights,
        "third-party Wan-named": read_lora(_third_party_wan_lora(tmp_path)[0]).weights,
    }


@pytest.mark.parametrize("fmt", ["comfyui", "longcat-names", "official", "diffusers"])
def test_round_trips_of_every_input_in_every_format_keep_the_weight_change(tmp_path, fmt):
    for label, weights in _inputs_by_name(tmp_path).items():
        once = read_lora(write_lora(tmp_path / f"{fmt}.safetensors", weights, fmt))
        twice = read_lora(write_lora(tmp_path / f"{fmt}.again.safetensors", once.weights, fmt))
        assert once.format == fmt and set(once.weights.modules) == set(weights.modules), label
        for name, delta in _deltas(weights).items():
            for back in (once, twice):
                torch.testing.assert_close(back.weights.modules[name].delta(), delta, rtol=1e-5, atol=1e-7,
                                           msg=f"{label}: {name}")
        if fmt == "official":  # one rank for every module: the official loader's strict load works
            state = load_file(str(tmp_path / f"{fmt}.safetensors"))
            with safe_open(str(tmp_path / f"{fmt}.safetensors"), framework="pt") as f:
                dim = int(f.metadata()["lora_network_dim"])
            for key, down in state.items():
                if key.endswith(".lora_down.weight"):
                    base = key.removesuffix(".lora_down.weight")
                    n = sum(1 for k in state if k.startswith(base + ".lora_up.blocks.")) or 1
                    assert down.shape[0] == n * dim, f"{label}: {key}"
            assert dim == 128  # every input here fits the loader's default


def test_the_official_style_rank_survives_a_trip_through_the_official_format(tmp_path):
    save_file(_official_style_state(), str(tmp_path / "official.safetensors"))
    weights = read_lora(tmp_path / "official.safetensors").weights
    assert {weights.modules["blocks.0.attn.qkv"].rank, weights.modules["blocks.0.cross_attn.kv_linear"].rank,
            weights.modules["blocks.0.ffn.w1"].rank} == {24, 16, 8}
    state = load_file(str(write_lora(tmp_path / "again.safetensors", weights, "official")))
    # back at the official layout: 3·128 and 2·128 down rows (8 real per block), one up per block
    assert state[_official_key("blocks.0.attn.qkv") + ".lora_down.weight"].shape[0] == 3 * 128
    assert state[_official_key("blocks.0.cross_attn.kv_linear") + ".lora_down.weight"].shape[0] == 2 * 128
    assert state[_official_key("blocks.0.attn.qkv") + ".lora_up.blocks.2.weight"].shape[1] == 128


def _official_key(name: str) -> str:
    return "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")


def test_a_rank_above_128_says_which_lora_network_dim_loads_it(tmp_path):
    weights = LoraWeights({"blocks.0.ffn.w2": LoraModule(torch.randn(160, 8), torch.randn(4, 160), 80.0),
                           "blocks.0.attn.proj": LoraModule(torch.randn(8, 4), torch.randn(4, 8), 8.0)})
    source = write_lora(tmp_path / "in.safetensors", weights, "comfyui")
    result = RUNNER.invoke(app, ["export-lora", str(source), str(tmp_path / "out.safetensors"), "--format", "official"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "lora_network_dim=160" in result.output
    state = load_file(str(tmp_path / "out.safetensors"))
    assert {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")} == {160}


@pytest.mark.parametrize("extra, named", [
    ({"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(2, 32),
      "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.zeros(32, 2)}, "cross_attn.k_img"),
    ({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(32)}, "self_attn.q.diff_b"),
])
def test_what_a_format_cannot_hold_is_refused_with_the_reason(tmp_path, extra, named):
    path, state = _third_party_wan_lora(tmp_path)
    save_file({**state, **extra}, str(path))
    with pytest.raises(ValueError, match=re.escape(named)):
        read_lora(path)
    result = RUNNER.invoke(app, ["export-lora", str(path), str(tmp_path / "out.safetensors")], env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR and named in result.output
