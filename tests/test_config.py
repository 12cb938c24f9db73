"""Run configs: defaults, the TOML file format, ``section.key=value`` overrides and their error messages."""

import dataclasses
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from depthgrow.config import (
    DEFAULT_PRESET,
    SECTIONS,
    RunConfig,
    TrainConfig,
    config_differences,
    config_keys,
    load_config,
    save_config,
)
from depthgrow.docfield import doc_field, field_doc
from depthgrow.errors import DepthgrowError
from depthgrow.growth import GrowthConfig
from depthgrow.models import FAMILIES, ModelConfig, MoEConfig, ResNetConfig
from depthgrow.optim import OPTIMIZER_DEFAULTS
from depthgrow.presets import PRESETS

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED_CONFIGS = sorted(CONFIGS_DIR.glob("*.toml"))


# -------------------------------------------------------------------------------------------- defaults


def test_default_config_is_valid():
    config = RunConfig()
    assert config.problems() == []
    assert config.model_preset == "gpt2-micro-bpe"
    assert config.model == PRESETS["gpt2-micro-bpe"]
    assert config.model.n_layer == 4
    assert config.growth.source_depth is None  # a fixed-depth run
    assert config.data.path is None  # the embedded corpus


def test_load_config_without_file_equals_defaults_with_the_optimizer_defaults_filled_in():
    loaded = load_config()
    defaults = RunConfig()
    assert defaults.optim.lr is None and defaults.optim.weight_decay is None
    assert loaded.optim.lr == OPTIMIZER_DEFAULTS[loaded.optim.name]["lr"]
    assert loaded.optim.weight_decay == OPTIMIZER_DEFAULTS[loaded.optim.name]["weight_decay"]
    assert loaded.to_dict() == dataclasses.replace(defaults, optim=defaults.optim.resolved()).to_dict()


def test_switching_optimizer_brings_its_own_learning_rate_unless_given():
    adamw = load_config(None, {"optim.name": "adamw"})
    muon = adamw.with_overrides({"optim.name": "muon-nsgd"})
    assert (muon.optim.lr, muon.optim.weight_decay) == (0.01, 0.01)
    assert adamw.with_overrides({"optim.name": "muon-nsgd", "optim.lr": "0.05"}).optim.lr == 0.05
    assert adamw.with_overrides({"optim.lr": "0.05"}).optim.weight_decay == 0.1


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_defaults(tmp_path):
    config = load_config()
    path = tmp_path / "config.toml"
    save_config(config, path)
    assert load_config(path).to_dict() == config.to_dict()


def test_round_trip_growth_run(tmp_path):
    config = load_config(
        None,
        {
            "growth.source_depth": "1",
            "growth.via": "",
            "growth.at": "0.8",
            "growth.init": "copy",
            "train.steps": "300",
            "schedule.decay_shape": "sqrt",
            "optim.name": "muon-nsgd",
        },
    )
    assert config.growth.source_depth == 1
    assert config.growth.via == []
    assert config.growth.at == [0.8]
    assert config.data.path is None
    path = tmp_path / "config.toml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.growth.via == []
    assert loaded.growth.at == [0.8]
    assert loaded.growth.source_depth == 1
    assert loaded.data.path is None
    assert loaded.data.bpe_file is None
    assert loaded.optim.name == "muon-nsgd"
    assert loaded.train.steps == 300


def test_round_trip_multi_stage_with_data_path(tmp_path):
    config = load_config(
        None,
        {
            "model.preset": "gpt2-mini",
            "model.n_layer": "12",
            "growth.source_depth": "0",
            "growth.via": "2,4",
            "growth.at": "0.2,0.4,600",
            "train.steps": "1000",
            "data.path": str(tmp_path / "corpus.txt"),
        },
    )
    path = tmp_path / "config.toml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.growth.via == [2, 4]
    assert loaded.growth.at == [0.2, 0.4, 600.0]
    assert loaded.model.n_layer == 12
    assert loaded.model_preset == "gpt2-mini"
    assert loaded.data.path == str(tmp_path / "corpus.txt")


def test_saved_file_is_plain_toml_without_none(tmp_path):
    import tomllib

    path = tmp_path / "config.toml"
    save_config(RunConfig(), path)
    raw = tomllib.loads(path.read_text())
    assert raw["model"]["preset"] == DEFAULT_PRESET
    assert raw["train"]["steps"] == TrainConfig().steps
    # TOML has no null: None values are left out
    assert "path" not in raw["data"]
    assert "source_depth" not in raw["growth"]


def test_file_values_and_overrides_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\nsteps = 100\nseed = 7\n\n[growth]\nsource_depth = 1\nat = [50]\n\n[model]\npreset = "gpt2-test"\n'
    )
    from_file = load_config(path)
    assert from_file.train.steps == 100
    assert from_file.train.seed == 7
    assert from_file.growth.at == [50.0]
    assert from_file.model.n_layer == 2  # gpt2-test
    overridden = load_config(path, {"train.steps": "200"})
    assert overridden.train.steps == 200
    assert overridden.train.seed == 7  # untouched file value survives


# ------------------------------------------------------------------------------------------- overrides


def test_override_types():
    config = load_config(
        None,
        {
            "train.steps": "1234",
            "optim.lr": "0.0005",
            "optim.weight_decay": "0",
            "growth.source_depth": "1",
            "growth.at": "0.5, 0.8",
            "growth.via": "2",
            "growth.copy_optimizer_state": "true",
            "data.val_fraction": "0.25",
        },
    )
    assert config.train.steps == 1234 and isinstance(config.train.steps, int)
    assert config.optim.lr == 0.0005
    assert config.optim.weight_decay == 0.0 and isinstance(config.optim.weight_decay, float)
    assert config.growth.at == [0.5, 0.8]
    assert config.growth.via == [2]
    assert config.growth.copy_optimizer_state is True
    assert config.data.val_fraction == 0.25


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_override_bool(text, expected):
    config = load_config(None, {"growth.copy_optimizer_state": text})
    assert config.growth.copy_optimizer_state is expected


def test_override_dash_in_key():
    config = load_config(None, {"growth.copy-optimizer-state": "true", "train.batch-size": "3"})
    assert config.growth.copy_optimizer_state is True
    assert config.train.batch_size == 3


def test_override_none_for_optional_fields(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\npath = "{tmp_path.as_posix()}/x.txt"\n\n[growth]\nsource_depth = 1\n')
    assert load_config(path).growth.source_depth == 1
    config = load_config(path, {"data.path": "none", "growth.source_depth": "None"})
    assert config.data.path is None
    assert config.growth.source_depth is None


def test_override_model_field_keeps_preset():
    config = load_config(None, {"model.n_layer": "8"})
    assert config.model.n_layer == 8
    default = PRESETS[DEFAULT_PRESET]
    assert (config.model.n_embd, config.model.n_head, config.model.block_size) == (
        default.n_embd,
        default.n_head,
        default.block_size,
    )
    assert config.model_preset == DEFAULT_PRESET


def test_override_preset_switch():
    config = load_config(None, {"model.preset": "gpt2-mini"})
    assert config.model_preset == "gpt2-mini"
    assert config.model == PRESETS["gpt2-mini"]
    assert config.model.n_layer == 8 and config.model.n_embd == 256
    with_depth = load_config(None, {"model.preset": "gpt2-test", "model.n_layer": "6"})
    assert with_depth.model.n_layer == 6
    assert with_depth.model.n_embd == PRESETS["gpt2-test"].n_embd


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"bogus.steps": "1"}, ["unknown config section", "bogus"]),
        ({"steps": "1"}, ["needs a section"]),
        ({"train.stepz": "1"}, ["unknown config key train.stepz", "steps", "batch_size", "eval_batches"]),
        ({"model.n_layers": "1"}, ["unknown config key model.n_layers", "n_layer", "n_embd"]),
        ({"train.steps": "abc"}, ["train.steps", "integer", "abc"]),
        ({"train.steps": "10.5"}, ["train.steps", "integer"]),
        ({"optim.lr": "fast"}, ["optim.lr", "number"]),
        ({"growth.copy_optimizer_state": "maybe"}, ["growth.copy_optimizer_state", "true or false"]),
        ({"growth.at": "0.5,x"}, ["growth.at"]),
        ({"model.preset": "gpt2-huge"}, ["unknown model preset", "gpt2-huge", "gpt2-tiny"]),
        ({"model.family": "rwkv"}, ["unknown model family", "rwkv"]),
        ({"optim.name": "sgd"}, ["optim.name", "adamw", "muon-nsgd", "sgd"]),
        ({"growth.init": "clone"}, ["growth.init", "copy_inter", "clone"]),
        ({"schedule.name": "step"}, ["schedule.name", "wsd"]),
        ({"data.tokenizer": "sentencepiece"}, ["data.tokenizer", "byte", "gpt2"]),
        ({"growth.source_depth": "4"}, ["must increase", "4 -> 4"]),  # gpt2-micro has n_layer 4
        ({"growth.source_depth": "6"}, ["must increase", "6 -> 4"]),
        ({"growth.source_depth": "1", "growth.at": "5000", "train.steps": "5000"}, ["outside (0, T=5000)"]),
        ({"growth.source_depth": "1", "growth.at": "0", "train.steps": "100"}, ["outside (0, T=100)"]),
        ({"growth.source_depth": "0", "growth.init": "copy"}, ["growth.init=copy", "zero-layer"]),
        ({"growth.source_depth": "0", "growth.init": "copy_last"}, ["growth.init=copy_last", "zero-layer"]),
        ({"model.n_embd": "129"}, ["model.n_embd (129)", "divisible", "model.n_head (2)"]),
        ({"train.steps": "0"}, ["train.steps must be >= 1"]),
        ({"train.device": "tpu"}, ["train.device"]),
        ({"schedule.warmup": "0.5", "schedule.decay": "0.6"}, ["schedule.warmup + schedule.decay"]),
        ({"data.val_fraction": "0"}, ["data.val_fraction"]),
        ({"optim.beta2": "1.0"}, ["optim.beta2"]),
    ],
)
def test_override_errors(overrides, fragments):
    with pytest.raises(DepthgrowError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_zero_layer_source_with_random_or_zero_init_is_valid():
    for init in ("random", "zero"):
        config = load_config(None, {"growth.source_depth": "0", "growth.init": init})
        assert config.growth.init == init


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[trainer]\nsteps = 10\n")
    with pytest.raises(DepthgrowError, match="unknown config section"):
        load_config(path)


def test_section_not_a_table_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("train = 5\n")
    with pytest.raises(DepthgrowError, match=r"\[train\] must be a table"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        ('model = "gpt2-tiny"\n', None),  # [model] is never checked to be a table
        ("train = 5\n", {"train.steps": "10"}),  # an override into a non-table section
    ],
)
def test_non_table_section_is_a_user_error(tmp_path, text, overrides):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(DepthgrowError, match="table"):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(DepthgrowError) as caught:
        load_config(missing)
    assert "does not exist" in str(caught.value)
    assert "nope.toml" in str(caught.value)


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = = 3\n")
    with pytest.raises(DepthgrowError) as caught:
        load_config(path)
    assert "unreadable" in str(caught.value)
    assert "broken.toml" in str(caught.value)


def test_wrong_value_type_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(DepthgrowError, match="train.steps must be an integer"):
        load_config(path)


def test_preset_family_mismatch_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt2-tiny"\nfamily = "llama"\n')
    with pytest.raises(DepthgrowError, match="family"):
        load_config(path)


# ------------------------------------------------------------------------------------ shipped configs


def test_configs_folder_has_toml_files():
    assert SHIPPED_CONFIGS, f"no .toml config shipped under {CONFIGS_DIR}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.problems() == []
    assert config.train.steps >= 1


# -------------------------------------------------------------------------------------- differences


def test_config_differences_names_changed_key():
    base = load_config().to_dict()
    changed = load_config(None, {"train.steps": "123"}).to_dict()
    differences = config_differences(base, changed)
    assert len(differences) == 1
    assert differences[0].startswith("train.steps")
    assert str(TrainConfig().steps) in differences[0] and "123" in differences[0]


def test_config_differences_identical_and_ignore():
    base = load_config().to_dict()
    assert config_differences(base, load_config().to_dict()) == []
    changed = load_config(None, {"train.out_dir": "elsewhere", "optim.lr": "0.0123"}).to_dict()
    differences = config_differences(base, changed)
    assert [d.split(" ")[0] for d in differences] == ["optim.lr", "train.out_dir"]
    assert [d.split(" ")[0] for d in config_differences(base, changed, ignore={"train.out_dir"})] == ["optim.lr"]


def test_config_differences_key_missing_on_one_side():
    base = RunConfig().to_dict()
    other = RunConfig().to_dict()
    del other["model"]["preset"]
    assert [d.split(" ")[0] for d in config_differences(base, other)] == ["model.preset"]


# ------------------------------------------------------------------------------------------- field docs

SECTION_CLASSES = [*SECTIONS.values(), *(family.config for family in FAMILIES.values())]


@pytest.mark.parametrize("section_class", SECTION_CLASSES, ids=lambda c: c.__name__)
def test_every_config_field_has_a_doc_that_names_its_choices(section_class):
    hints = get_type_hints(section_class)
    for f in dataclasses.fields(section_class):
        doc = field_doc(section_class, f.name)
        assert doc and "\n" not in doc, f"{section_class.__name__}.{f.name} has no one-line doc"
        if get_origin(hints[f.name]) is Literal:
            missing = [choice for choice in get_args(hints[f.name]) if choice not in doc]
            assert not missing, f"the doc of {section_class.__name__}.{f.name} leaves out {missing}"


def test_a_redeclared_field_keeps_the_doc_of_the_class_that_documents_it():
    # the families redeclare n_layer only to give it their default
    assert field_doc(MoEConfig, "n_layer") == field_doc(ModelConfig, "n_layer") != ""
    assert field_doc(ResNetConfig, "n_layer") != field_doc(ModelConfig, "n_layer")  # its own: blocks per stage


def test_documented_fields_behave_as_plain_dataclass_fields():
    first, second = GrowthConfig(), GrowthConfig()
    first.at.append(0.9)
    assert second.at == [0.8] and TrainConfig().loggers == []  # a list default is not shared
    assert dataclasses.asdict(dataclasses.replace(second, via=[2]))["via"] == [2]
    model = PRESETS["gpt2-test"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.n_layer = 3
    assert dataclasses.replace(model, n_layer=3).n_layer == 3

    @dataclasses.dataclass(kw_only=True)
    class Required:
        depth: int = doc_field(doc="a field without a default")

    with pytest.raises(TypeError, match="depth"):
        Required()
    assert Required(depth=2).depth == 2 and field_doc(Required, "depth") == "a field without a default"


def test_config_keys_cover_every_field_of_every_section_and_family_once():
    keys = config_keys(load_config())
    names = [key.key for key in keys]
    assert len(names) == len(set(names))
    expected = {"model.preset", "model.family"}
    expected |= {f"model.{f.name}" for family in FAMILIES.values() for f in dataclasses.fields(family.config)}
    expected |= {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(names) == expected
    shown = {key.key: key for key in keys}
    assert shown["optim.lr"].default == str(OPTIMIZER_DEFAULTS["muon-nsgd"]["lr"])  # the resolved default
    assert (shown["growth.at"].default, shown["data.path"].default, shown["train.compile"].default) == (
        "[0.8]",
        "none",
        "false",
    )
    with_kv_heads = tuple(
        name for name, f in FAMILIES.items() if "n_kv_head" in {x.name for x in dataclasses.fields(f.config)}
    )
    assert {"llama", "moe"} <= set(with_kv_heads) and "gpt2" not in with_kv_heads  # the decoders, not GPT-2
    assert shown["model.n_kv_head"].families == with_kv_heads and shown["model.n_embd"].families == ()
    llama = {key.key: key for key in config_keys(load_config(None, {"model.preset": "llama-micro"}))}
    assert llama["model.n_kv_head"].default == "1" and llama["model.bias"].families == ("gpt2",)


def test_a_new_preset_drops_the_model_keys_of_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt2-test"\nn_embd = 64\n')
    assert load_config(path).model.n_embd == 64
    switched = load_config(path, {"model.preset": "gpt2-mini", "model.n_layer": "6"})
    assert switched.model == dataclasses.replace(PRESETS["gpt2-mini"], n_layer=6)  # n_embd=64 went with gpt2-test
