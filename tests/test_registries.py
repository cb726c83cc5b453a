"""The extension tables (issue 26): LoRA file formats and attention backends each have one table in
the code (`LORA_FORMATS`, `ATTENTION_BACKENDS`) whose rows carry their own words; the config reads
those rows as text (torch-free), and the config, the CLI and the code all ask the one table, so a new
entry is one row."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.config import ConfigError, TrainingConfig, load_config
from longcat_train.config.extension_tables import ExtensionTableError, extension_choices
from longcat_train.config.training import ATTENTION_CHOICES, LORA_FORMAT_CHOICES
from longcat_train.data.buckets import Bucket, Placement
from longcat_train.data.items import ClipItem, FileStamp
from longcat_train.lora.formats import (
    LORA_FORMATS,
    LoraModule,
    LoraWeights,
    detect_format,
    read_lora,
    unknown_module_names,
    write_lora,
)
from longcat_train.model.attention import (
    ATTENTION_BACKENDS,
    KEPT_ATTENTION_OPS,
    AttentionBackendUnavailable,
    AttentionDispatcher,
    check_backend_available,
)
from longcat_train.objective.strategy import STRATEGIES, choose_strategy, drawn_strategy, fixed_strategy
from tests.config_factory import base_datasets, base_training, write_pair

RUNNER = CliRunner()
WIDE = {"COLUMNS": "250"}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _literal_names(field: str) -> tuple[str, ...]:
    annotation = TrainingConfig.model_fields[field].annotation
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    return typing.get_args(annotation)


def test_the_config_accepts_exactly_the_names_the_code_has():
    assert list(LORA_FORMATS) == list(LORA_FORMAT_CHOICES)
    assert list(ATTENTION_BACKENDS) == list(ATTENTION_CHOICES)
    assert _literal_names("lora_export_formats") == tuple(LORA_FORMAT_CHOICES)
    assert _literal_names("attention_implementation") == tuple(ATTENTION_CHOICES)
    for name in (*LORA_FORMAT_CHOICES, *ATTENTION_CHOICES):  # config.md describes each one
        description = TrainingConfig.model_fields[
            "lora_export_formats" if name in LORA_FORMAT_CHOICES else "attention_implementation"
        ].description
        assert f"`{name}`" in description


def test_the_configs_tables_are_the_code_tables_rows_read_as_text():
    assert list(LORA_FORMAT_CHOICES) == list(LORA_FORMATS)
    for name, fmt in LORA_FORMATS.items():
        choice = LORA_FORMAT_CHOICES[name]
        assert (choice.title, choice.note, choice.requires) == (fmt.title, fmt.note, None), name
    assert list(ATTENTION_CHOICES) == list(ATTENTION_BACKENDS)
    for name, backend in ATTENTION_BACKENDS.items():
        choice = ATTENTION_CHOICES[name]
        assert (choice.title, choice.note, choice.requires) == ("", backend.note, backend.requirement), name
    # the words made it through (an empty reading would pass the equalities above only if the code had none)
    assert ATTENTION_CHOICES["flash"].requires.modules == ("flash_attn", "flash_attn_interface")
    assert ATTENTION_CHOICES["flash"].requires.install == "pip install flash-attn --no-build-isolation"
    assert LORA_FORMAT_CHOICES["official"].note == "LongCat's own format"


def _table_source(tmp_path: Path, last_row: str) -> Path:
    source = tmp_path / "formats.py"
    source.write_text("from somewhere import Row, write\n\n"
                      "TABLE: dict = {\n"
                      '    "good": Row(write, lambda keys: True, title="Good", claims=lambda keys: True),\n'
                      f'    "last": {last_row},\n'
                      "}\n")
    return source


def test_the_reader_takes_the_literal_words_and_skips_the_rows_code(tmp_path):
    source = _table_source(tmp_path, 'Row(write, requires=("a", "b"), install="pip install ab", note="N")')
    choices = extension_choices(source, "TABLE")
    assert list(choices) == ["good", "last"]
    assert choices["good"].title == "Good" and choices["good"].requires is None
    assert choices["last"].note == "N" and choices["last"].requires.modules == ("a", "b")
    assert choices["last"].requires.install == "pip install ab"


@pytest.mark.parametrize(
    ("last_row", "complaint"),
    [
        ('Row(write, title="Last " + "one")', "title= is not a literal string"),
        ('Row(write, title=TITLE)', "title= is not a literal string"),
        ('Row(write, requires="a", install="pip install a")', "requires= is not a literal tuple of strings"),
        ('Row(write, **WORDS)', "unpacks keywords"),
        ("ROW", "is not a call"),
        ('Row(write, requires=("a",))', "has `requires` but no `install`"),
    ],
)
def test_a_row_the_config_cannot_read_as_text_is_a_clear_error(tmp_path, last_row, complaint):
    source = _table_source(tmp_path, last_row)
    with pytest.raises(ExtensionTableError) as caught:
        extension_choices(source, "TABLE")
    message = str(caught.value)
    assert str(source) in message and "TABLE['last']" in message and complaint in message, message


def test_a_table_the_reader_cannot_find_is_a_clear_error(tmp_path):
    source = _table_source(tmp_path, "Row(write)")
    with pytest.raises(ExtensionTableError, match=r"no module-level `OTHER = \{\.\.\.\}`"):
        extension_choices(source, "OTHER")
    source.write_text("TABLE = dict(good=Row(write))\n")
    with pytest.raises(ExtensionTableError, match=r"no module-level `TABLE = \{\.\.\.\}` \(a dict literal\)"):
        extension_choices(source, "TABLE")


@pytest.mark.parametrize(
    ("key", "value", "problem_key", "names"),
    [
        ("lora_export_formats", ["comfyui", "kohya"], "lora_export_formats[1]", LORA_FORMAT_CHOICES),
        ("attention_implementation", "sage", "attention_implementation", ATTENTION_CHOICES),
    ],
)
def test_a_name_not_in_the_table_is_rejected_listing_the_tables_names(tmp_path, key, value, problem_key, names):
    training = {**base_training(tmp_path), key: value}
    with pytest.raises(ConfigError) as caught:
        load_config(write_pair(tmp_path, training, base_datasets()))
    (problem,) = [p for p in caught.value.errors if p.key == problem_key]
    assert all(repr(name) in problem.fix for name in names), problem.fix


def test_every_registered_name_loads_in_the_config(tmp_path):
    training = {**base_training(tmp_path), "lora_export_formats": list(LORA_FORMAT_CHOICES)}
    config = write_pair(tmp_path, training, base_datasets())
    assert load_config(config).training.lora_export_formats == list(LORA_FORMAT_CHOICES)
    for backend, choice in ATTENTION_CHOICES.items():
        override = (f"attention_implementation={backend}",)
        if choice.requires is not None and not choice.requires.available():
            with pytest.raises(ConfigError, match=choice.requires.install.split(" (")[0]):
                load_config(config, override)
            continue
        assert load_config(config, override).training.attention_implementation == backend


def test_the_config_and_the_cli_help_load_without_torch():
    code = "import sys, longcat_train.config, longcat_train.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- LoRA formats -------------------------------------------------------------------------------


def test_export_lora_help_and_errors_list_every_registered_format(tmp_path):
    shown = RUNNER.invoke(app, ["export-lora", "--help"], env=WIDE)
    assert shown.exit_code == 0, shown.output
    for name, choice in LORA_FORMAT_CHOICES.items():
        assert name in shown.output and choice.title in shown.output
    lora = write_lora(tmp_path / "in.safetensors", _weights(), "comfyui")
    bad = RUNNER.invoke(app, ["export-lora", str(lora), "out.safetensors", "--format", "kohya"], env=WIDE)
    assert bad.exit_code == EXIT_CONFIG_ERROR
    assert all(name in bad.output for name in LORA_FORMAT_CHOICES), bad.output


def _weights() -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    return LoraWeights({
        "blocks.0.attn.qkv": LoraModule(torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g), 8.0),
        "blocks.0.ffn.w2": LoraModule(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 8.0),
    })


@pytest.mark.parametrize("fmt", list(LORA_FORMATS))
def test_every_registered_format_writes_reads_back_and_is_detected(tmp_path, fmt):
    assert LORA_FORMAT_CHOICES[fmt].title, "a LoRA format needs a title (CLI help, error messages)"
    weights = _weights()
    path = write_lora(tmp_path / f"lora.{fmt}.safetensors", weights, fmt, {"steps": 2})
    back = read_lora(path)
    assert back.format == fmt and back.metadata["steps"] == 2
    assert back.weights.modules.keys() == weights.modules.keys()
    for name, m in weights.modules.items():
        got = back.weights.modules[name]
        if fmt == "diffusers":  # alpha/rank folded into up (alpha = rank): the same weight change
            assert got.alpha == got.rank and torch.equal(got.up, m.up * m.scale), name
        else:
            assert torch.equal(got.up, m.up) and got.alpha == m.alpha, name
        assert torch.equal(got.down, m.down), name


def test_detection_goes_by_each_formats_prefix_most_specific_first():
    for name, fmt in LORA_FORMATS.items():
        assert detect_format(fmt.write(_weights())) == name
    # ComfyUI-WanVideoWrapper's names and LongCat's share the prefix: the names tell them apart
    assert detect_format(["diffusion_model.blocks.0.self_attn.q.lora_A.weight"]) == "comfyui"
    assert detect_format(["diffusion_model.blocks.0.attn.qkv.lora_A.weight"]) == "longcat-names"
    # a file with keys of two formats reads as the more specific (longer) prefix, as it always has
    mixed = [f"{LORA_FORMATS['comfyui'].key_prefix}a", f"{LORA_FORMATS['official'].key_prefix}b"]
    assert detect_format(mixed) == "official"
    with pytest.raises(ValueError) as caught:
        detect_format(["foreign.key"])
    assert all(f"'{fmt.key_prefix}'" in str(caught.value) for fmt in LORA_FORMATS.values())


def test_unknown_module_names_are_the_loras_names_the_model_lacks():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    weights = LoraWeights({
        "proj": LoraModule(torch.zeros(1, 4), torch.zeros(4, 1), 1.0),
        "missing": LoraModule(torch.zeros(1, 4), torch.zeros(4, 1), 1.0),
    })
    assert unknown_module_names(weights, model) == ["missing"]


# --- attention backends -------------------------------------------------------------------------


def test_every_backends_kept_ops_are_in_the_checkpoint_policys_set():
    for name, backend in ATTENTION_BACKENDS.items():
        assert backend.kept_ops, f"{name}: selective checkpointing would keep none of its attention"
        assert backend.kept_ops <= KEPT_ATTENTION_OPS, name
    assert KEPT_ATTENTION_OPS == frozenset().union(*(b.kept_ops for b in ATTENTION_BACKENDS.values()))


def test_every_kept_op_is_a_real_op():
    pytest.importorskip("triton")
    import longcat_train.model.bsa  # noqa: F401  (registers longcat::block_sparse_attention)

    for op in KEPT_ATTENTION_OPS:
        namespace, name = op.split("::")
        assert hasattr(getattr(torch.ops, namespace), name), op


@pytest.mark.parametrize("name", list(ATTENTION_BACKENDS))
def test_every_backend_is_available_or_says_what_to_install(name):
    backend = ATTENTION_BACKENDS[name]
    assert callable(backend.dense)
    requirement = ATTENTION_CHOICES[name].requires
    assert requirement == backend.requirement
    if requirement is not None and not requirement.available():
        assert requirement.install.startswith("pip install")
        with pytest.raises(AttentionBackendUnavailable, match=f"attention_implementation='{name}'"):
            check_backend_available(name)
        return
    dispatcher = AttentionDispatcher(name)
    q = torch.randn(1, 2, 8, 4)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # with a mask flash and xformers run SDPA: CPU-safe
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.allclose(dispatcher.dense(q, q, q, mask), expected, atol=1e-6)


# --- conditioning modes -------------------------------------------------------------------------


def _clip(is_i2v: bool, i2v_probability: float = 1.0) -> ClipItem:
    bucket = Bucket(32, 32, 5)
    return ClipItem(
        dataset_id="d", source=FileStamp(Path("/data/a.mp4"), 1, 1, ""), caption="", bucket=bucket,
        frame_indices=tuple(range(5)), fps=15.0, window_index=0, source_size=(32, 32),
        placement=Placement((32, 32), (0, 0, 32, 32)), is_i2v=is_i2v, i2v_probability=i2v_probability,
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_mode_keeps_its_clean_frames_and_leaves_them_out_of_the_loss(name):
    strategy = STRATEGIES[name]
    assert strategy.name == name and isinstance(strategy.start_frames, bool)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 2, 2, generator=g), torch.randn(1, 4, 3, 2, 2, generator=g)
    batch = strategy.prepare(x0, noise, torch.tensor([0.5]))
    c = strategy.num_cond_latents
    assert batch.num_cond_latents == c
    assert torch.equal(batch.hidden_states[:, :, :c], x0[:, :, :c]) and not batch.timestep[:, :c].any()
    assert batch.frame_weights.tolist() == [0.0] * c + [1.0] * (3 - c)
    assert batch.timestep[:, c:].eq(500).all()


def test_the_draw_is_the_mean_i2v_probability_and_takes_the_generator_only_when_uncertain():
    untouched = torch.Generator().manual_seed(0).get_state()
    for items, expected in [([_clip(True)], "i2v"), ([_clip(False)], "t2v"), ([_clip(True, 0.0)], "t2v"),
                            ([_clip(True, 1.0), _clip(True, 1.0)], "i2v")]:
        g = torch.Generator().manual_seed(0)
        assert choose_strategy(items, g).name == expected
        assert torch.equal(g.get_state(), untouched)
    items = [_clip(True, 0.8), _clip(False, 0.8)]  # i2v with the mean of 0.8 and 0 (a t2v item)
    chosen = set()
    for seed in range(12):
        reference = torch.Generator().manual_seed(seed)
        draw = torch.rand((), generator=reference).item()
        g = torch.Generator().manual_seed(seed)
        name = choose_strategy(items, g).name
        assert name == ("i2v" if draw < 0.4 else "t2v") and torch.equal(g.get_state(), reference.get_state())
        chosen.add(name)
    assert chosen == {"i2v", "t2v"}


def test_the_held_out_mode_and_the_warmed_mode_follow_the_items_datasets():
    assert fixed_strategy(_clip(True), latent_frames=2).name == "i2v"
    assert fixed_strategy(_clip(True, 0.0), latent_frames=2).name == "i2v"  # held out as marked, as before
    assert fixed_strategy(_clip(True), latent_frames=1).name == "t2v"  # no noisy frame after the clean one
    assert fixed_strategy(_clip(False), latent_frames=2).name == "t2v"
    assert drawn_strategy([_clip(False), _clip(True, 0.3)]).name == "i2v"
    assert drawn_strategy([_clip(False), _clip(True, 0.0)]).name == "t2v"
