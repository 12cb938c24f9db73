"""Run configuration: typed sections, a TOML file format, and ``--section.key=value`` overrides.

A run is one :class:`RunConfig`. Each section is a dataclass owned by the module that uses it
(``data``, ``optim``, ``schedule``, ``growth``) plus ``train`` here; the ``model`` section is a family
config chosen by ``preset`` (or ``family``) with any of its fields overridden. The resolved config is
written beside every run as ``config.toml`` and loads back to an equal config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import tomli_w

from depthgrow.data import DataConfig
from depthgrow.docfield import doc_field, field_doc
from depthgrow.errors import DepthgrowError
from depthgrow.growth import GrowthConfig, ambiguous_at
from depthgrow.methods import method_plan
from depthgrow.models import FAMILIES, ModelConfig
from depthgrow.optim import OptimConfig
from depthgrow.presets import preset
from depthgrow.schedule import GrowthPlan, ScheduleConfig

DEFAULT_PRESET = "gpt2-micro-bpe"
LOGGERS = ("tensorboard", "wandb")  # the optional trackers


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = doc_field(3600, "T, the total number of optimizer steps")
    batch_size: int = doc_field(
        32, "examples per step (under torchrun: of all processes); tokens per step = batch_size * model.block_size"
    )
    seed: int = doc_field(0, "model init, new blocks at growth and the batch order all derive from it")
    eval_every: int = doc_field(
        250, "steps between validation evaluations (also at step 0, at the end and around each expansion)"
    )
    eval_batches: int = doc_field(20, "fixed held-out batches per evaluation")
    checkpoint_every: int = doc_field(1000, "steps between checkpoints (also at the end and on Ctrl-C)")
    async_checkpoint: bool = doc_field(
        False,
        "under ddp or fsdp: write each checkpoint's shards in the background while training goes on (the "
        "checkpoint counts once written: at a later step, the next checkpoint or the end)",
    )
    out_dir: str = doc_field("runs/train", "the run's folder: config.toml, log.jsonl, checkpoint.pt, summary.json")
    device: str = doc_field("auto", "cpu, cuda or cuda:N; auto takes CUDA when present, else the CPU")
    parallel: Literal["none", "ddp", "fsdp"] = doc_field(
        "none",
        "under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2, fully_shard per block); none: one process",
    )
    compile: bool = doc_field(False, "torch.compile the model (rebuilt after each expansion)")
    precision: Literal["auto", "fp32", "bf16"] = doc_field(
        "auto", "fp32, bf16 (autocast), or auto: bf16 on CUDA, fp32 on the CPU"
    )
    peak_tflops: float | None = doc_field(None, "the device's peak for MFU (none: known GPUs by name, else no MFU)")
    loggers: list[str] = doc_field(
        [], f"trackers beside log.jsonl, which is always written, from: {', '.join(LOGGERS)}"
    )
    diverge_factor: float | None = doc_field(
        3.0, "stop when a loss exceeds this many times its best (and the first training loss); none: only NaN/inf stop"
    )

    def problems(self) -> list[str]:
        found = [
            f"train.{name} must be >= 1, got {getattr(self, name)}"
            for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every")
            if getattr(self, name) < 1
        ]
        if self.seed < 0:
            found.append(f"train.seed must be >= 0, got {self.seed}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            found.append(f"train.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            found.append(f"train.peak_tflops must be > 0, got {self.peak_tflops}")
        if self.diverge_factor is not None and not (math.isfinite(self.diverge_factor) and self.diverge_factor > 1):
            found.append(f"train.diverge_factor must be a finite number > 1 (or none), got {self.diverge_factor}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            found.append(f"unknown train.loggers {', '.join(unknown)}; choose from: {', '.join(LOGGERS)}")
        return found


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "growth": GrowthConfig,
    "train": TrainConfig,
}
# keys that may differ between a checkpoint's config and the config used to resume it: none of them
# changes what is trained
RESUME_FREE_KEYS = {
    "train.out_dir",
    "train.device",
    "train.checkpoint_every",
    "train.async_checkpoint",
    "train.eval_every",
    "train.parallel",  # a checkpoint of any world size resumes at any other
    "train.compile",
    "train.peak_tflops",
    "train.loggers",
    "train.diverge_factor",
}
# keys that a resume may change (recorded in the log as a config change at the resumed step): they change
# how training goes on from there, never the state it goes on from - the model, its depth and its
# optimizer state, the data and its order, the schedule's shape and the growth plan stay as they were
RESUME_CHANGEABLE_KEYS = {
    "optim.lr",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.momentum",
    "optim.muon_adjust_lr",
}


@dataclass(kw_only=True)
class RunConfig:
    model_preset: str | None = DEFAULT_PRESET
    model: ModelConfig = field(default_factory=lambda: preset(DEFAULT_PRESET))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        model = {"family": self.model.family, **dataclasses.asdict(self.model)}
        if self.model_preset is not None:
            model = {"preset": self.model_preset, **model}
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"model": model, **sections}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(raw) - {"model", *SECTIONS})
        if unknown:
            raise DepthgrowError(
                f"unknown config section(s) {', '.join(unknown)}; sections are: model, {', '.join(SECTIONS)}"
            )
        ambiguous = ambiguous_at(_table(raw, "growth").get("at", []))
        if ambiguous:
            raise DepthgrowError(ambiguous)
        preset_name, model = _model_from_dict(dict(_table(raw, "model")))
        sections = {
            name: section_class(**_coerce_fields(section_class, _table(raw, name), name))
            for name, section_class in SECTIONS.items()
        }
        return cls(model_preset=preset_name, model=model, **sections)

    def problems(self) -> list[str]:
        found = list(self.model.problems())
        for name in SECTIONS:
            found += getattr(self, name).problems()
        if self.model.task == "image" and (
            self.data.tokenizer not in ("auto", "byte") or self.data.bpe_file is not None
        ):
            found.append("data.tokenizer and data.bpe_file are for language models; an image model reads images")
        if self.model.task == "lm" and self.data.augment:
            found.append("data.augment is for image models (random crops and flips); a language model has none")
        if not found:
            try:
                self.plan()
            except DepthgrowError as error:
                found.append(str(error))
        return found

    def plan(self) -> GrowthPlan:
        """The depth plan of this run (raises :class:`DepthgrowError` if the growth section is invalid)."""
        return method_plan(self.growth, target_depth=self.model.n_layer, total_steps=self.train.steps)

    def with_overrides(self, overrides: dict[str, str]) -> RunConfig:
        """This config with dotted ``overrides`` applied (as on the command line), validated."""
        return _resolved(RunConfig.from_dict(_with_overrides(self.to_dict(), overrides)))

    def validate(self) -> RunConfig:
        found = self.problems()
        if found:
            raise DepthgrowError("; ".join(found))
        return self


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> RunConfig:
    """The defaults, then the TOML file at ``path``, then the dotted ``overrides``; validated."""
    raw = read_toml(path) if path is not None else {}
    return _resolved(RunConfig.from_dict(_with_overrides(raw, overrides or {})))


# what _with_overrides does with a new preset, as --help and the README state it
PRESET_RULE = (
    "another preset replaces the whole model section, a config file's model keys included (model.* options given "
    "with it still apply)"
)


def _with_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    raw = dict(raw)
    if "model.preset" in overrides:
        # a new preset replaces the whole model section (a saved config lists every model field)
        raw["model"] = {}
    if "optim.name" in overrides:
        # another optimizer brings its own learning rate and weight decay unless they are given too
        raw["optim"] = {k: v for k, v in _table(raw, "optim").items() if k not in ("lr", "weight_decay")}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raise DepthgrowError(f"option --{key} needs a section, e.g. --train.steps=1000")
        if section not in ("model", *SECTIONS):
            raise DepthgrowError(
                f"unknown config section {section!r} in --{key}; sections are: model, {', '.join(SECTIONS)}"
            )
        raw[section] = {**_table(raw, section), name.replace("-", "_"): value}
    return raw


def _resolved(config: RunConfig) -> RunConfig:
    # data.tokenizer="auto" stays as it is: it is resolved against model.vocab_size where the data is loaded,
    # so that a config derived with another vocabulary size (an experiment's variant) gets its own tokenizer
    config = dataclasses.replace(config.validate(), optim=config.optim.resolved())
    if config.data.path is not None:
        # absolute, so that a resume or a compare rerun from another folder reads the same data
        absolute = str(Path(config.data.path).expanduser().resolve())
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=absolute))
    return config


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise DepthgrowError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise DepthgrowError(f"config file {path} is unreadable: {error}") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    # TOML has no null: a None value is left out and reads back as its default, which is None
    def drop_none(section: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in section.items() if value is not None}

    text = tomli_w.dumps({name: drop_none(section) for name, section in config.to_dict().items()})
    Path(path).write_text(text)


def config_changes(
    a: dict[str, Any], b: dict[str, Any], *, ignore: set[str] = frozenset()
) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two ``to_dict()`` forms, with both values."""
    changes = {}
    for section in sorted(set(a) | set(b)):
        left, right = a.get(section, {}), b.get(section, {})
        for key in sorted(set(left) | set(right)):
            dotted = f"{section}.{key}"
            if dotted not in ignore and left.get(key) != right.get(key):
                changes[dotted] = (left.get(key), right.get(key))
    return changes


def config_differences(a: dict[str, Any], b: dict[str, Any], *, ignore: set[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict()`` forms, each with both values."""
    return [f"{key} ({left!r} vs {right!r})" for key, (left, right) in config_changes(a, b, ignore=ignore).items()]


@dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, as on the command line: "train.steps"
    # as a config file spells it, but unquoted and "none" for unset; for a key of other families only, those
    # families: "(llama, moe)"
    default: str
    doc: str
    families: tuple[str, ...] = ()  # the families that have a model key the config's family lacks


def config_keys(config: RunConfig) -> list[ConfigKey]:
    """Every key of every section, with its value in ``config`` (the defaults of a command) and its doc. The
    model section lists the keys of ``config``'s family, then those only other families have (their defaults are
    their presets')."""
    keys = [
        ConfigKey("model.preset", _spelled(config.model_preset), f"a named model config (see --model); {PRESET_RULE}"),
        ConfigKey(
            "model.family",
            config.model.family,
            f"with no preset: a family's own defaults ({', '.join(FAMILIES)}); with one: the preset's family",
        ),
        *_section_keys("model", config.model),
    ]
    own = {f.name for f in dataclasses.fields(config.model)}
    others: dict[str, list[str]] = {}  # key -> the families that have it
    for family, spec in FAMILIES.items():
        for f in dataclasses.fields(spec.config):
            if f.name not in own:
                others.setdefault(f.name, []).append(family)
    for name, families in others.items():
        # the doc of the family nearest the base that declares the field (LLaMA's ffn_hidden, not a subclass's)
        nearest = min(families, key=lambda family: len(FAMILIES[family].config.__mro__))
        doc = field_doc(FAMILIES[nearest].config, name)
        keys.append(ConfigKey(f"model.{name}", f"({', '.join(families)})", doc, tuple(families)))
    for section in SECTIONS:
        keys += _section_keys(section, getattr(config, section))
    return keys


def config_table(config: RunConfig) -> str:
    """The keys of :func:`config_keys` as a Markdown table (the README's)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in config_keys(config):
        default = key.default if key.families else f"`{key.default}`"
        # escaped, so that a doc's globs (*_train_*.bin) and products (2**i) stay text
        doc = key.doc.replace("|", "\\|").replace("*", "\\*")
        rows.append(f"| `{key.key}` | {default} | {doc} |")
    return "\n".join(rows)


def _section_keys(section: str, values: Any) -> list[ConfigKey]:
    return [
        ConfigKey(f"{section}.{f.name}", _spelled(getattr(values, f.name)), field_doc(type(values), f.name))
        for f in dataclasses.fields(values)
    ]


def _spelled(value: Any) -> str:
    """``value`` as a TOML file spells it, but for strings (unquoted) and none (which TOML lacks)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(map(_spelled, value))}]"
    return str(value)


def _model_from_dict(values: dict[str, Any]) -> tuple[str | None, ModelConfig]:
    preset_name = values.pop("preset", None)
    family = values.pop("family", None)
    if preset_name is None and family is None:
        preset_name = DEFAULT_PRESET
    if preset_name is not None:
        base = preset(str(preset_name))
        if family is not None and family != base.family:
            raise DepthgrowError(f"model preset {preset_name!r} is of family {base.family!r}, not {family!r}")
    elif family in FAMILIES:
        base = FAMILIES[family].config()
    else:
        raise DepthgrowError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    changes = _coerce_fields(type(base), values, "model")
    return preset_name, dataclasses.replace(base, **changes)


def _table(raw: dict[str, Any], section: str) -> dict[str, Any]:
    values = raw.get(section, {})
    if not isinstance(values, dict):
        raise DepthgrowError(f"config section [{section}] must be a table, got {values!r}")
    return values


def _coerce_fields(section_class: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    hints = get_type_hints(section_class)
    names = [f.name for f in dataclasses.fields(section_class) if f.init]
    coerced = {}
    for key, value in values.items():
        if key not in names:
            raise DepthgrowError(f"unknown config key {section}.{key}; [{section}] has: {', '.join(names)}")
        coerced[key] = coerce(value, hints[key], f"{section}.{key}")
    return coerced


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML value or a command-line string to the field's annotated type, or say what is wrong."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except DepthgrowError:
                continue
        raise DepthgrowError(f"{key} must be {_type_name(annotation)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise DepthgrowError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif not isinstance(value, list | tuple):
            value = [value]
        return [coerce(item, args[0], key) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif annotation in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = annotation(value)
        if isinstance(number, int | float) and (annotation is float or float(number).is_integer()):
            return annotation(number)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise DepthgrowError(f"{key} must be {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a comma-separated list of {_type_name(args[0])}"
    if annotation is type(None):
        return "none"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )
