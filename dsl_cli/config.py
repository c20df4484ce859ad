"""Structured-config schema: the dataclasses Hydra checks every composed config against.

Registered in Hydra's ConfigStore as `run_schema`; `configs/run.yaml` lists it first in its defaults, so a
misspelt key (`lens.alpah=3`), a wrong type (`seed=abc`) or a value outside an enumeration (`lens.mode=nrom`,
the `Enum`s below) fails at compose time, before any model is built; `check_overrides` turns Hydra's message
into one line. Values whose *range* depends on the loaded model (layer, head) are checked later, by the lens
(`dsl_cli.lenses.Lens.components`) once the encoder is loaded. The enumerations are `StrEnum`s: a value
compares equal to its name (`cfg.lens.mode == "norm"`) and is written as it (manifest, saved config).
"""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from dataclasses import dataclass, field, fields, make_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional, TypeVar, get_args, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dsl_cli.errors import UserError

T = TypeVar("T")


# The enumerations (StrEnum: a member's value is its name).
Device = StrEnum("Device", ["auto", "cuda", "cpu"])  # auto: CUDA when present, else the CPU with a warning
Precision = StrEnum("Precision", ["fp32", "fp16", "bf16"])
DecodePrecision = StrEnum("DecodePrecision", ["auto", *Precision])  # auto: bf16 on CUDA, fp32 on the CPU
EncoderSource = StrEnum("EncoderSource", ["open_clip", "kandinsky_prior", "tiny", "timm", "hf"])
Scheduler = StrEnum("Scheduler", ["ddpm", "ddim", "dpm"])
SteerMode = StrEnum("SteerMode", ["add", "scale", "norm"])
RankBy = StrEnum("RankBy", ["sim_embed", "sim_decoded"])
Templates = StrEnum("Templates", ["openai", "simple"])  # the logit lens's prompts: 80 per class, or 7
ImageSource = StrEnum("ImageSource", ["samples", "folder"])
Ablation = StrEnum("Ablation", ["zero", "mean"])
StudyAblation = StrEnum("StudyAblation", [*Ablation, "both"])  # both: zero and mean (head importance)
OverlayPosition = StrEnum("OverlayPosition", ["center", "top-left", "top-right", "bottom-left", "bottom-right"])


@dataclass
class EncoderConfig:
    """Which CLIP image encoder to open up.

    source: `open_clip` (any open_clip ViT by `name` and `pretrained` tag; `pretrained: null` gives random
    weights), `kandinsky_prior` (the HF-format `image_encoder` of the Kandinsky 2.2 prior, mapped onto the
    open_clip module), `tiny` (random, embed_dim 32, for tests), `timm` (a timm ViT by `name` with its tag;
    `name: tiny` a tiny random one) or `hf` (a transformers ViT in the HF cache by `repo_id`, `subfolder` empty
    for none; `name: tiny` a tiny random DINOv2): `dsl_cli.encoder.vit_loading`.
    """

    source: EncoderSource = EncoderSource.open_clip
    name: str = "ViT-bigG-14"
    pretrained: Optional[str] = "laion2b_s39b_b160k"
    checkpoint: Optional[str] = None  # local weights: a file (open_clip) or a folder (kandinsky_prior)
    repo_id: str = "kandinsky-community/kandinsky-2-2-prior"
    subfolder: str = "image_encoder"
    # open_clip model whose text tower the logit lens uses (same CLIP as the encoder unless said otherwise)
    text_name: Optional[str] = None
    text_pretrained: Optional[str] = None
    dtype: Precision = Precision.fp32  # the encoder's precision
    batch_size: int = 16  # images per encoder pass


@dataclass
class Decoding:
    """The settings of a decoding, declared once: a decoder family's defaults (`decoder.*`) and what a run
    uses (`decode.*`, which takes the family's unless told otherwise: configs/decode/default.yaml)."""

    height: int = 512
    width: int = 512
    steps: int = 100
    guidance: float = 4.0
    scheduler: Scheduler = Scheduler.ddpm


@dataclass
class DecoderConfig(Decoding):
    """Which decoder: its `family` (kandinsky22 | kandinsky21 | unclip_h14, `dsl_cli.decoder.FAMILIES`) and
    `source`: `pretrained` (hub id or local `path`), `random` (real architecture, random weights, no download)
    or `tiny` (diffusers' dummy test components); the `Decoding` fields are the family's own defaults."""

    family: str = "kandinsky22"
    source: str = "pretrained"
    repo_id: str = "kandinsky-community/kandinsky-2-2-decoder"
    path: Optional[str] = None
    noise_level: int = 0  # unclip_h14: noise added to the image embedding, 0 (none) to 999


@dataclass
class DecodeConfig(Decoding):
    """How pictures are decoded: the `Decoding` fields, and how the work is done."""

    batch_size: Any = "auto"  # pictures per pipeline call: auto (fitted to free GPU memory; 8 on the CPU) or a number
    dtype: DecodePrecision = DecodePrecision.auto
    channels_last: bool = False  # NHWC UNet and MoVQ (cuDNN's channels-last kernels)
    compile: bool = False  # torch.compile the UNet (a minute or more of compilation per new batch shape)
    top_k: Optional[int] = None  # decode only the k components most similar to the input, per image
    enabled: bool = True  # false: score embeddings only, write no pictures
    seeds: int = 1  # decode each component with seeds seed .. seed+seeds-1 (seeds.csv; >1 adds baselines)
    baselines: bool = False  # also decode the unconditional and the mean embedding (baselines.csv)
    draw_early: Optional[bool] = None  # each image's figures drawn while the next images decode; null: on a GPU


@dataclass
class LensConfig:
    """Which lens: `diffusion` (residual stream), `direct` (naive submodule readout), `steering` (DSL) or
    `logit` (classic logit lens over ImageNet labels) or `attribution` (exact direct attribution)."""

    name: str = "steering"
    mode: SteerMode = SteerMode.norm  # steering
    alpha: float = 2.0
    verify: bool = False  # steering: check the closed form against the hooked reference pass
    rank_by: RankBy = RankBy.sim_embed
    mid: bool = False  # diffusion and logit lenses: also read the stream between each attention and MLP
    top_labels: int = 5  # logit lens: labels kept per component
    templates: Templates = Templates.openai  # logit lens and every lens's labels
    target: Optional[str] = None  # attribution lens: a text to attribute the similarity to (null: the input)
    text: bool = False  # every lens: top ImageNet labels (column labels) and text-span descriptions (description);
    # off by default: it needs the CLIP text tower's weights (a large download beside the encoder's)
    text_pool: Optional[str] = None  # texts the descriptions pick from: null = ImageNet classes, or a file of phrases
    span_texts: int = 3  # texts in each text-span description


@dataclass
class ImagesConfig:
    """Input images: `samples` (photos bundled with scikit-image) or `folder` (`path`: folder, glob or file)."""

    source: ImageSource = ImageSource.samples
    path: Optional[str] = None
    names: Optional[list[str]] = None  # samples: which ones (default: all)
    limit: Optional[int] = None  # use at most this many images
    skip_bad: bool = False  # go on without unreadable images (listed in the manifest) instead of stopping
    shard: Optional[int] = None  # with num_shards: this job's share of the images (0 .. num_shards-1)
    num_shards: int = 1  # split the images into this many disjoint shards (one per job of a sweep)


@dataclass
class StudyConfig:
    """An interventional study instead of a decoding run (`study=head_importance`, `study=overlay_removal` or any
    study registered in `dsl_cli.study_registry.STUDIES`, whose names are checked before anything loads);
    `name: null` (the default) runs the lens and decodes."""

    name: Optional[str] = None
    lenses: list[str] = field(default_factory=lambda: ["steering", "direct"])  # the lenses whose scores it compares
    ablation: StudyAblation = StudyAblation.zero  # head importance: `both` runs zero and mean ablation in one run
    bootstrap: int = 1000  # head importance: resamples for the 95 % intervals of the correlations
    steps: int = 20  # overlay removal: cumulative ablation steps
    greedy_pool: Optional[int] = 32  # overlay removal: greedy candidates per step; null = all remaining
    random_orders: int = 5  # overlay removal: random baseline orders
    overlay_scale: float = 0.45  # overlay removal: pasted image size relative to the background
    overlay_position: OverlayPosition = OverlayPosition.center  # overlay removal: where the image is pasted
    decode_steps: list[int] = field(default_factory=lambda: [0, 5, 10, 20])  # overlay removal: steps decoded


@dataclass
class SaeConfig:
    """A sparse autoencoder whose features the run reads instead of heads (`dsl_cli.sae`, docs/user-guide.md,
    "SAE features"): `path` (a SAELens folder with cfg.json and sae_weights.safetensors, or a .safetensors file; with
    `repo_id`, the folder inside that Hugging Face repository). `features`: `top` (each image's `top_k` most
    active features) or a list of feature indices; `top_images`: the most active images kept per feature."""

    path: Optional[str] = None
    repo_id: Optional[str] = None
    features: Any = "top"
    top_k: int = 4
    top_images: int = 8


@dataclass
class RunConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)  # sae.path=FOLDER: read an SAE's features (dsl_cli.sae)
    layer: Any = 30  # int, list of ints, "all" or a range "10-20"
    head: Any = "all"  # "all", int or list of ints
    component: Any = "heads"  # heads | mlp | all, or explicit labels [L30H05, L12MLP] (then layer/head are unused)
    seed: int = 0
    device: Device = Device.auto
    resume: Optional[str] = None  # a run folder to complete
    clamp_to_model: bool = False  # layers/heads beyond the model: nearest one with a warning, not an error
    outputs_root: str = "outputs"  # the folder below which runs and sweeps go (debug=* sets outputs/debug)
    adapter: Optional[str] = None  # a fitted adapter (`dsl adapter fit`): every lens decodes through it


# Settings that a lens or study of the user's declares on its class (`Lens.new_settings`, `Study.new_settings`),
# name -> default: `register_configs` adds them to the `lens` and `study` schemas, so that a plugin's setting
# needs no field here and is checked at compose time like dsl's own (`lens.sharpness=abc` is refused)
DECLARED: dict[str, dict[str, Any]] = {"lens": {}, "study": {}}
DECLARED_BY: dict[str, dict[str, set[str]]] = {"lens": {}, "study": {}}  # group -> setting -> who declared it
GROUP_SCHEMAS: dict[str, type] = {"lens": LensConfig, "study": StudyConfig}
SETTING_NAME = re.compile(r"[a-z][a-z0-9_]*")


def declare_settings(group: str, owner: str, settings: dict[str, Any]) -> None:
    """Add the settings `owner` (a lens or study name) declares to the `group` (`lens`, `study`) schema, all or
    none. A ValueError, when the plugin is imported, for a name dsl's schema has (read it; do not declare it), a
    name another plugin declared with another default, a name a config's methods take (`values`), or a default a
    config cannot hold. The same owner declaring again (a module reloaded) may change a default."""
    own = {f.name for f in fields(GROUP_SCHEMAS[group])}
    for name, default in settings.items():
        where = f"{group} {owner!r}: new setting {group}.{name}"
        if not isinstance(name, str) or not SETTING_NAME.fullmatch(name):
            raise ValueError(f"{where}: name it with lower-case letters, digits and _")
        if name in own:
            raise ValueError(f"{where} is one of dsl's settings already: read it as it is, or give yours another name")
        if hasattr(DictConfig, name):
            raise ValueError(f"{where}: `self.cfg.{name}` would be the config's own method; give it another name")
        if not (default is None or isinstance(default, (bool, int, float, str, list))):
            raise ValueError(f"{where}: its default {default!r} is not a bool, int, float, str, list or None")
        others = DECLARED_BY[group].get(name, set()) - {owner}
        earlier = DECLARED[group].get(name, default)
        if others and (type(earlier) is not type(default) or earlier != default):
            raise ValueError(f"{where}: {group} {', '.join(sorted(others))} declares it with the default {earlier!r}; "
                             "give yours another name")
    for name, default in settings.items():
        DECLARED[group][name] = default
        DECLARED_BY[group].setdefault(name, set()).add(owner)


def declared_owners(group: str, name: str) -> set[str]:
    """The lenses or studies that declared setting `name` of `group` (none: one of dsl's own)."""
    return DECLARED_BY[group].get(name, set())


def group_schema(group: str) -> type:
    """The schema of the `lens` or `study` group: `LensConfig` or `StudyConfig` with every declared setting (the
    type of each is its default's; `None` takes any value)."""
    declared = DECLARED[group]
    if not declared:
        return GROUP_SCHEMAS[group]
    key = (group, repr(declared))  # one class for the same settings: OmegaConf merges a class with itself only
    if key not in _MADE:
        added = [(name, _setting_type(default), field(default_factory=lambda d=default: list(d))
                  if isinstance(default, list) else field(default=default)) for name, default in declared.items()]
        _MADE[key] = make_dataclass(GROUP_SCHEMAS[group].__name__, added, bases=(GROUP_SCHEMAS[group],))
    return _MADE[key]


_MADE: dict[tuple[str, str], type] = {}


def _setting_type(default: Any) -> Any:
    return Any if default is None else list[Any] if isinstance(default, list) else type(default)


def run_schema() -> type:
    """`RunConfig` with the lens and study settings that plugins declared (`group_schema`)."""
    if not any(DECLARED.values()):
        return RunConfig
    key = ("run", repr(DECLARED))
    if key not in _MADE:
        lens, study = group_schema("lens"), group_schema("study")
        _MADE[key] = make_dataclass("RunConfig", [("lens", lens, field(default_factory=lens)),
                                                  ("study", study, field(default_factory=study))], bases=(RunConfig,))
    return _MADE[key]


def images_source(images: Any) -> Any:
    """The images' source as a run reads them (`dsl_cli.images.load_images`): `images.path=X` alone means the
    folder source, although the default `images: samples` composed `source: samples` beside it."""
    if images.get("source") == "samples" and images.get("path") and not images.get("names"):
        return "folder"
    return images.get("source")


def encoder_text(encoder: Any) -> str:
    """An encoder config (a dict or a config) in words, for titles and pages: `ViT-L-14 (openai)`,
    `ViT-bigG-14 (Kandinsky 2.2 prior)`, `timm vit_base_patch16_224 (random weights)`, `tiny encoder`."""
    get = encoder.get
    if get("source") == "tiny":
        return "tiny encoder"
    weights = "local weights" if get("checkpoint") else get("pretrained") or "random weights"
    if get("source") == "kandinsky_prior" and not get("checkpoint"):
        weights = "Kandinsky 2.2 prior"
    if get("source") in ("timm", "hf"):  # the any-ViT loaders: say which library
        name = get("repo_id") if get("source") == "hf" and get("name") != "tiny" else get("name")
        if get("source") == "hf" and get("checkpoint"):  # a local folder: the default repo_id is not the model
            name = Path(str(get("checkpoint"))).expanduser().name or str(get("checkpoint"))
        return f"{get('source')} {name} ({weights})"
    return f"{get('name')} ({weights})"


def decoder_text(decoder: Any) -> str:
    """A decoder config in words: `kandinsky21`, `kandinsky22 (tiny)`, `unclip_h14 (random)`, `kandinsky22
    (local weights)`."""
    source = "local weights" if decoder.get("path") else decoder.get("source")
    return f"{decoder.get('family')}" + ("" if source == "pretrained" else f" ({source})")


def split_options(args: list[str], prefix: str, cls: type[T]) -> tuple[T, list[str]]:
    """(the `prefix.*` settings among `args` as a `cls` dataclass, the other arguments): a command's own
    settings beside the run config's overrides (`dsl adapter fit adapter.augment=4 encoder=...`). Each value
    is converted to its field's type (`null` for none); an unknown name or a value that is not a number where
    one is wanted is a UserError."""
    hints = get_type_hints(cls)
    options, rest = cls(), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not key.startswith(prefix + "."):
            rest.append(arg)
            continue
        name = key[len(prefix) + 1:]
        if not sep or name not in hints:
            raise UserError(f"{arg}: no such setting; {prefix}.* settings are "
                            + ", ".join(f"{prefix}.{k}" for k in hints))
        kind = next((t for t in get_args(hints[name]) if t is not type(None)), hints[name])
        if value[:1] in ("'", '"'):  # quoted as Hydra quotes (path_override quotes a path with spaces, brackets)
            value = _unquoted(arg)
        try:
            setattr(options, name, None if value in ("null", "None") else kind(value) if kind in (int, float)
                    else value)
        except ValueError:
            raise UserError(f"{arg}: {prefix}.{name} takes a number") from None
    return options, rest


def _unquoted(override: str) -> str:
    """The value of `key='a quoted value'` as Hydra reads it (one line where it does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return str(OverridesParser.create().parse_override(override).value())
    except HydraException as err:
        raise UserError(f"{override}: {_one_line(err)}") from None


def encoder_folder_name(encoder) -> str:
    """The encoder part of the default folder of an adapter or SAE it reads (`ViT-L-14`, `tiny`): a
    transformers model by its repository (every one is `name: hf`), and a timm or transformers model with its
    source in front, so that `debug=tiny_timm` and `debug=tiny` (both `tiny`) fill folders of their own."""
    source, name = str(encoder.source), str(encoder.get("name") or encoder.source)
    if source == "hf":
        name = str(encoder.get("repo_id") or name).rstrip("/").rsplit("/", 1)[-1]
    name = f"{source}_{name}" if source in ("hf", "timm") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def gpu_count(at_least: int = 0) -> int:
    """`${dsl_gpus:}` in a config: the GPUs this process sees (`${dsl_gpus:1}`: at least 1)."""
    import torch  # here, not at the top: `dsl --help` imports no model library

    return max(int(at_least), torch.cuda.device_count())


def register_configs() -> None:
    """Make the schema (with the settings plugins declared) available to Hydra as the `run_schema` config, and
    `${dsl_gpus:}` to every config."""
    ConfigStore.instance().store(name="run_schema", node=run_schema())
    OmegaConf.register_new_resolver("dsl_gpus", gpu_count, replace=True)


# Settings that moved: the old spelling is refused with a line naming the new one.
MOVED = {"dtype": "encoder.dtype", "batch_size": "encoder.batch_size"}


def check_overrides(overrides: list[str]) -> None:
    """Compose the run config as `dsl run` will before Hydra starts, and check every value of every swept
    setting, whatever their number: UserError with one line for the first that Hydra would refuse (a misspelt
    key, a wrong type, a value outside an enumeration, an unknown config group option). The config is
    composed once with each setting's first value; a swept config group is composed once per option, any
    other swept value is set into that config, where the schema checks its type (fast: 10,000 values in a
    second). Hydra's own overrides (`hydra.*`) are left to it, but `hydra.searchpath` (config folders added by
    a plugin's user) goes into every compose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as err:
            raise UserError(f"{text}: {_one_line(err)} (quote a value with spaces or brackets: key='a b')") from None
    search = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]  # config folders of plugins
    # Hydra's own settings and groups (`hydra.job.env_set.X=1`, `hydra/launcher=submitit_slurm`): checked in the
    # first compose, with Hydra's config (a misspelt one was Hydra's several lines and exit status 1)
    search += [o.input_line for o in parsed if o.is_hydra_override() and o.key_or_group != "hydra.searchpath"
               and not o.is_sweep_override()]
    parsed = [o for o in parsed if not o.is_hydra_override()]
    for override in parsed:
        _check_added(override)
    values = [_values(o) for o in parsed]
    for override, options in zip(parsed, values):
        _check_sweep(override, options)
    parsed, values = [o for o, v in zip(parsed, values) if v], [v for v in values if v]  # glob: Hydra's
    first = [v[0] for v in values]
    composed = compose_run([*first, *search], hydra=any(not o.startswith("hydra.searchpath=") for o in search))
    for i, (override, options) in enumerate(zip(parsed, values)):
        if len(options) < 2:
            continue
        if _set_in_place(override):
            _check_values(composed, override)
        else:
            for option in dict.fromkeys(options[1:]):
                compose_run([*first[:i], option, *first[i + 1:], *search])


def _is_group(key: str) -> bool:
    """Whether `key` names a config group (a folder of configs/: `encoder`, `debug`), not a setting."""
    return (Path(__file__).parent / "configs" / key.replace(".", "/")).is_dir()


def _check_added(override) -> None:
    """`+key=value` adds a key where Hydra's schema would refuse a misspelt one (`+lens.alfa=2` ran, ignored):
    a setting added with `+` or `++` must be one of the schema's."""
    from hydra.core.override_parser.types import OverrideType

    key = override.key_or_group
    if override.type not in (OverrideType.ADD, OverrideType.FORCE_ADD) or override.package or _is_group(key):
        return
    if OmegaConf.select(OmegaConf.structured(run_schema()), key, default=_ABSENT) is _ABSENT:
        raise UserError(f"{override.input_line}: {key} is not a setting of dsl (`+` adds a key that nothing reads; "
                        "misspelt? `dsl run --cfg job` prints every setting)")


_ABSENT = object()


def _check_sweep(override, options: list[str]) -> None:
    """A swept setting must sweep something, and each value once: `layer=range(0,0)` launched no job and
    called the sweep complete; `layer=1,1` ran the same job twice and merged each of its rows twice."""
    if not override.is_sweep_override() or override.value_type is None:
        return
    if not options and _sweep_is_empty(override):
        raise UserError(f"{override.input_line}: sweeps no value (an empty range or list); give at least one")
    repeated = [value for value, count in Counter(options).items() if count > 1]
    if repeated:
        raise UserError(f"{override.input_line}: {repeated[0]} is swept twice, which runs the same job twice and "
                        "merges its rows twice; give each value once")


def _sweep_is_empty(override) -> bool:
    try:
        return not list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - a glob sweep: expanded by Hydra's loader only
        return False


def compose_run(overrides: list[str], config_name: str = "run", hydra: bool = False):
    """The config Hydra composes from these overrides under dsl's schema; its refusal (a misspelt key, a wrong
    type, an unknown option) as one line. `hydra`: with Hydra's own config (for overrides of its groups)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from None


def _set_in_place(override) -> bool:
    """A swept setting whose values can be checked by setting them into a composed config: a plain value
    (not a config group, no `+`, `~` or package)."""
    from hydra.core.override_parser.types import OverrideType

    return override.type == OverrideType.CHANGE and override.package is None and not _is_group(override.key_or_group)


def _check_values(composed, override) -> None:
    """Each value of a swept plain setting set into the composed config (its schema type checks it)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key = override.key_or_group
    try:
        values = list(zip(override.sweep_iterator(), override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - a sweep Hydra expands only with its loader: left to Hydra's own check
        return
    read: dict[str, str] = {}  # each value as the schema reads it -> as typed
    for value, typed in values:
        value = getattr(value, "text", value)  # a quoted value ('2'), as Hydra sets it: its text
        try:  # the key exists (the first compose checked it): the schema checks the value's type
            OmegaConf.update(composed, key, value, merge=True)
        except (OmegaConfBaseException, ValueError, TypeError) as err:
            raise UserError(f"{key}={value}: {_one_line(err)}") from None
        setting = OmegaConf.select(composed, key)
        same = repr(OmegaConf.to_container(setting) if OmegaConf.is_config(setting) else setting)
        if same in read:  # `lens.alpha=1,1.0`, `seed=1,01`: one job twice, its rows merged twice
            raise UserError(f"{override.input_line}: {key}={typed} is {key}={read[same]} again, written another "
                            "way; the sweep would run that job twice and merge its rows twice: give each value once")
        read[same] = typed


def _values(override) -> list[str]:
    if not override.is_sweep_override():
        return [override.input_line]
    try:
        return [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
    except Exception:  # noqa: BLE001 - a glob sweep needs Hydra's loader: left to Hydra's own check
        return []


def _did_you_mean(missing: Exception) -> str:
    """'did you mean lens.alpha? ' for a misspelt key, from the names its config node has (none: 'misspelt? ')."""
    node, key = getattr(missing, "parent_node", None), str(getattr(missing, "key", ""))
    names = [str(name) for name in node.keys() if name != "hydra"] if hasattr(node, "keys") else []
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        return "misspelt? "
    prefix = missing.full_key[:-len(key)] if missing.full_key.endswith(key) else ""
    return f"did you mean {prefix}{close[0]}? "


def _no_such_option(path: str, options: list[str]) -> str:
    """'lens=steerin: no such option of lens (did you mean steering? the options: ...)' for Hydra's missing
    group config `lens/steerin`."""
    group, _, name = path.rpartition("/")  # `hydra/launcher`: as a group override is typed
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)  # few options: a looser match
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={name}: no such option of {group} ({hint}the options: {', '.join(options)})"


def _one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's message (and its cause's) on one line, with what to do instead."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    causes, cause = [err], err.__cause__
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    absent = next((c for c in causes if isinstance(c, MissingConfigException) and c.options), None)
    if absent is not None:  # a config group's option misspelt (`lens=steerin`)
        return _no_such_option(str(absent.missing_cfg_file), list(absent.options))
    in_file = re.search(r"In '(lens|study)/([^']+)': ConfigKeyError raised while composing config:\s*Key '([^']+)'",
                        str(err))
    if in_file is not None:  # a plugin's config file, its module not imported (or a key misspelt in the file)
        group, option, key = in_file.groups()
        return (f"{group}={option}: its config file sets {group}.{key}, which is none of dsl's settings: a setting "
                f"that a {group} of your own declares is known once its module is imported (then call "
                f"dsl_cli.cli.main; docs/extending.md), or it is misspelt in {group}/{option}.yaml")
    unknown = (ConfigAttributeError, ConfigKeyError)  # a key the schema does not have
    missing = next((c for c in causes if isinstance(c, unknown) and getattr(c, "full_key", None)), None)
    if missing is not None:
        key = missing.full_key
        if key in MOVED:
            return f"{key}: this setting moved to {MOVED[key]}; write {MOVED[key]}=... instead"
        if key.startswith("hydra.launcher.") and key.count(".") == 2:  # the default launcher has no setting
            return (f"{key}: no such setting of this launcher ({_did_you_mean(missing)}the default one has none: "
                    "launcher=slurm and launcher=local_gpus have theirs, `dsl run launcher=slurm --cfg hydra` prints "
                    "them)")
        if key.startswith("hydra."):  # Hydra's own: a new key in a dict of its (`env_set`) takes `+`
            guess = _did_you_mean(missing)
            added = f"; a new key in one of its dicts takes a +: +{key}=..." if guess == "misspelt? " else ""
            return f"{key}: no such setting of Hydra's ({guess}`dsl run --cfg hydra` prints them{added})"
        return f"{key}: no such setting ({_did_you_mean(missing)}`dsl run --cfg job` prints every setting)"
    lines = [line.strip() for c in causes for line in str(c).split("Config search path")[0].splitlines()]
    lines = [line for line in lines if line not in ("", "None") and not line.startswith(("full_key:", "object_type=", "reference_type=",
                                                                    "To append to your config"))]
    text = " ".join(dict.fromkeys(lines)).replace("\t", " ")
    return re.sub(r"^Error merging override (\S+) ", r"\1: ", text)


# Overrides whose values are paths. `~` is expanded, as a shell does in `VAR=~/x` (but not in `a.b=~/x`), and a
# value that Hydra's override grammar refuses unquoted (a space, parentheses, `~` inside) is passed quoted.
PATH_KEYS = {"images.path", "encoder.checkpoint", "encoder.text_pretrained", "decoder.path", "resume",
             "hydra.run.dir", "hydra.sweep.dir", "adapter", "adapter.out", "sae.path"}


def folder_overrides(args: list[str]) -> list[str]:
    """The overrides of a command that reads a folder of images (`dsl sae train`, `dsl adapter fit`), paths
    made plain (`path_override`): `images.path=` alone also picks the folder image set (`images=folder`)."""
    overrides = [path_override(arg) for arg in args]
    keys = {arg.partition("=")[0] for arg in overrides}
    return ["images=folder", *overrides] if "images.path" in keys and "images" not in keys else overrides


# the paths a run reads again when it is resumed, perhaps from another folder: one that names something here
# is made absolute (`resume=` from elsewhere said "sae.path=my_sae: not an SAE" and marked the run failed);
# `sae.path` may also be a path inside `sae.repo_id`, and `encoder.text_pretrained` a tag: those name nothing here
INPUT_KEYS = {"images.path", "encoder.checkpoint", "encoder.text_pretrained", "decoder.path", "adapter", "sae.path"}


# the folders a command makes: one value each, never swept, so a comma in one is part of its name
OUTPUT_KEYS = {"hydra.run.dir", "hydra.sweep.dir", "adapter.out"}


def path_override(arg: str, sweep: bool = False) -> str:
    """`images.path=~/my photos` -> `images.path='/home/me/my photos'`, `sae=my_sae` -> `sae.path=/here/my_sae`
    where ./my_sae exists; other arguments as they are (every command that takes overrides: dsl run, dsl
    check, dsl adapter). A path holding a comma is quoted where it is one path (`_one_path`); `sweep`: the
    command is a --multirun, where an unquoted comma may also mean a sweep."""
    key, sep, value = arg.partition("=")
    if sep and key == "sae":  # `sae=FOLDER` is short for sae.path=FOLDER (dsl_cli.sae)
        return path_override(f"sae.path={value}", sweep)
    if not sep or key.lstrip("+") not in PATH_KEYS or value[:1] in ("'", '"'):
        return arg
    typed, value = value, os.path.expanduser(value)
    if key.lstrip("+") in INPUT_KEYS and value and not os.path.isabs(value) and os.path.exists(value):
        value = os.path.abspath(value)
    whole = "," in value and (key.lstrip("+") in OUTPUT_KEYS or _one_path(key, typed, sweep))
    if (not whole and parses(f"{key}={value}")) or ("'" in value and '"' in value):
        return f"{key}={value}"
    quote = '"' if "'" in value else "'"
    return f"{key}={quote}{value}{quote}"


def _one_path(key: str, typed: str, sweep: bool) -> bool:
    """Whether `key=typed`, holding a comma, names one existing file or folder: unquoted, Hydra read
    `images.path=/data/c,d` as a sweep over `/data/c` and `d` (or, without --multirun, refused it in several
    lines). A path that exists is taken as it is, as a glob's characters in one are (`images.load_images`).
    Only in a --multirun where every comma-separated part exists as well can the user have meant either: that
    is refused in one line naming both spellings, rather than a guess that runs the wrong jobs."""
    if not os.path.lexists(os.path.expanduser(typed)):
        return False
    parts = typed.split(",")
    if sweep and all(part and os.path.lexists(os.path.expanduser(part)) for part in parts):
        raise UserError(f"{key}={typed}: names one path and, as a sweep, {len(parts)} paths that all exist; for the "
                        f"one, quote it ({key}=\"'{typed}'\" in the shell), for the sweep write "
                        f"{key}='choice({typed})'")
    return True


def single_values(overrides: list[str]) -> None:
    """Refuse a sweep (`layer=1,2`, `range(...)`) in a command that runs once: Hydra's refusal was several lines
    ("Ambiguous value ...") and exit status 1. Overrides Hydra cannot read are left to `check_overrides`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            continue
        if override.is_sweep_override() and not override.is_hydra_override():
            key = override.get_key_element()
            raise UserError(f"{text}: a comma or range() sweeps several values, which only `dsl run --multirun` "
                            f"runs; a list is {key}=[a,b], one value holding a comma is quoted: {key}=\"'a,b'\"")


def sweep_overrides(hydra: Any) -> list[str]:
    """A sweep's overrides as written, unresolved (`hydra.sweep.subdir=job_${hydra.job.num}` has no value yet):
    its sweeper's `params` (an experiment config's sweep), then its command line's (`hydra.overrides.task`)."""
    params = OmegaConf.to_container(hydra.sweeper, resolve=False).get("params") or {}
    return [*(f"{key}={value}" for key, value in params.items()),
            *OmegaConf.to_container(hydra.overrides.task, resolve=False)]


def parses(override: str) -> bool:
    """Whether Hydra's override grammar reads `override` (`key=value`, `+key=value`, a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException:  # the grammar's error
        return False
    return True
