"""LoRA adapters, the three file formats and their round trips."""

import pytest
import torch
import torch.nn.functional as F

from longcat_train.lora import apply_loras, read_lora, write_lora
from longcat_train.lora.adapters import DEFAULT_TARGETS, add_lora, load_lora_into_adapter, lora_state

from .reference import load_reference, reference_model, rel_l2


def _trained_lora_model(seed=0, rank=4, alpha=8.0):
    model = reference_model()
    add_lora(model, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs():
    t, _ = load_reference()
    return (t["inputs.hidden_states"], t["i2v.timestep"], t["inputs.encoder_hidden_states"],
            t["inputs.encoder_attention_mask"])


def test_default_targets_hit_every_block_and_nothing_else():
    model = reference_model()
    add_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_A")[0] for n in trainable if ".lora_A." in n}
    expected = {f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS}
    assert wrapped == expected
    assert not any(n.startswith(("x_embedder", "final_layer", "t_embedder", "y_embedder")) for n in wrapped)


@pytest.mark.parametrize("fmt", ["comfyui", "official", "diffusers"])
def test_round_trip_through_each_format_is_exact(tmp_path, fmt):
    model = _trained_lora_model()
    ours = lora_state(model, alpha=8.0)
    path = write_lora(tmp_path / f"lora.{fmt}.safetensors", ours, fmt, {"steps": 3})
    back = read_lora(path)
    assert back.format == fmt and back.metadata["steps"] == 3 and back.metadata["rank"] == 4
    assert back.weights.modules.keys() == ours.modules.keys()
    for name, m in ours.modules.items():
        got = back.weights.modules[name]
        assert torch.equal(got.down, m.down), name
        if fmt == "diffusers":  # alpha/rank folded into up, so header-blind loaders render it right
            assert got.alpha == got.rank and torch.equal(got.up, m.up * m.scale), name
        else:
            assert torch.equal(got.up, m.up) and got.alpha == m.alpha, name


def _official_loader_forward(model, state, inputs, multiplier=1.0):
    """An independent re-implementation of the official loader's rules: a LoRA module per
    `lora_down` key, rank = lora_network_dim (128), n split ups applied to n equal chunks of the
    down output and concatenated, y = W x + b + multiplier·alpha_scale·up(down(x))."""
    prefix, hyphen = "lora___lorahyphen___", "___lorahyphen___"
    hooks = []
    modules = dict(model.named_modules())
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        base = key[: -len(".lora_down.weight")]
        target = modules[base[len(prefix):].replace(hyphen, ".")]
        down = state[key]
        ups = [state[k] for k in sorted(k for k in state if k.startswith(base + ".lora_up.blocks."))]
        ups = ups or [state[base + ".lora_up.weight"]]
        assert down.shape[0] == 128 * len(ups)  # strict load with the default lora_network_dim
        scale = state[base + ".alpha_scale"].item() * multiplier

        def hook(_m, args, out, down=down, ups=ups, scale=scale):
            h = F.linear(args[0], down).chunk(len(ups), dim=-1)
            return out + scale * torch.cat([F.linear(h[j], ups[j]) for j in range(len(ups))], dim=-1)

        hooks.append(target.register_forward_hook(hook))
    with torch.no_grad():
        out = model(*inputs, num_cond_latents=1)
    for h in hooks:
        h.remove()
    return out


def test_official_format_gives_the_trained_model_output_under_the_official_rules(tmp_path):
    from safetensors.torch import load_file

    trained = _trained_lora_model()
    with torch.no_grad():
        expected = trained(*_inputs(), num_cond_latents=1)
    path = write_lora(tmp_path / "official.safetensors", lora_state(trained, alpha=8.0), "official")
    got = _official_loader_forward(reference_model(), load_file(str(path)), _inputs())
    assert rel_l2(got, expected) < 1e-5


def test_genuinely_split_official_lora_is_read_and_applied_exactly(tmp_path):
    """The official LoRAs have different down projections per split: reading them must keep that."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    prefix = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    state = {
        f"{prefix}.lora_down.weight": torch.randn(3 * 128, 128, generator=g) * 0.02,
        f"{prefix}.alpha_scale": torch.tensor(0.5),
        **{f"{prefix}.lora_up.blocks.{j}.weight": torch.randn(128, 128, generator=g) * 0.02 for j in range(3)},
    }
    save_file(state, str(tmp_path / "cfg_step_lora.safetensors"))
    lora = read_lora(tmp_path / "cfg_step_lora.safetensors")
    model = reference_model()
    handle = apply_loras(model, [(lora.weights, 0.7)])
    with torch.no_grad():
        ours = model(*_inputs(), num_cond_latents=1)
    handle.remove()
    official = _official_loader_forward(model, state, _inputs(), multiplier=0.7)
    assert rel_l2(ours, official) < 1e-5
    with torch.no_grad():
        base = model(*_inputs(), num_cond_latents=1)
    assert rel_l2(base, official) > 1e-4  # the hook was really removed and really mattered


def test_hooks_match_the_peft_adapter_and_stack(tmp_path):
    trained = _trained_lora_model()
    with torch.no_grad():
        expected = trained(*_inputs(), num_cond_latents=1)
    weights = lora_state(trained, alpha=8.0)
    model = reference_model()
    handle = apply_loras(model, [(weights, 0.5), (weights, 0.5)])
    with torch.no_grad():
        got = model(*_inputs(), num_cond_latents=1)
    handle.remove()
    assert rel_l2(got, expected) < 1e-5


def test_loading_a_file_back_into_the_adapter(tmp_path):
    trained = _trained_lora_model(seed=3)
    path = write_lora(tmp_path / "l.safetensors", lora_state(trained, alpha=8.0))
    fresh = reference_model()
    add_lora(fresh, rank=4, alpha=8.0)
    load_lora_into_adapter(fresh, read_lora(path).weights)
    with torch.no_grad():
        assert rel_l2(fresh(*_inputs()), trained(*_inputs())) < 1e-6
