"""Lenses: which components a run looks at, and the embedding each lens gives them.

The third stage: encoder cache -> lens embeddings `[batch, component, d_embed]` and their scores.
A lens is a `Lens` subclass in the `LENSES` registry (`@register`); the runner names none of them:

- diffusion: the readout R(x) of the residual stream after each chosen layer (Diffusion Lens)
- direct:    the readout of a head's or MLP's write as it is (the naive baseline DSL improves on)
- steering:  DSL, the closed-form steered-and-patched embedding (`lens.mode`, `lens.alpha`)
- logit:     the readout of the residual stream and of the chosen submodules, named by CLIP's text tower
- attribution: each head's and MLP's exact direct attribution, ln_post's scale frozen (`encoder.reading`)
"""

from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from omegaconf import ListConfig
from tqdm.auto import tqdm

from dsl_cli.components import Component, parse_component
from dsl_cli.config import DECLARED, declare_settings, declared_owners
from dsl_cli.encoder import RANDOM_SEED, load_text_model, text_model_id
from dsl_cli.encoder.loading import text_tower_needs
from dsl_cli.encoder.reading import direct_attribution, source_shares
from dsl_cli.errors import UserError
from dsl_cli.libraries import Library
from dsl_cli.memory import release_memory
from dsl_cli.outputs import LABELS, SIMILARITY, RunFolder, atomic_write_bytes
from dsl_cli.weights import Needs, cache_folder, fp32_fix, refuse_damaged_weights

log = logging.getLogger("dsl_cli.lenses")
open_clip = Library("open_clip")  # imported when the logit lens first needs it, not when a run starts

# Prompts per text-tower batch of the ImageNet classifier (3 classes x 80 OpenAI templates): at bigG in float32
# a batch's activations stay well under a gigabyte, and the batch is still large enough to keep a GPU busy.
PROMPTS_PER_BATCH = 256
TEMPLATES = ("openai", "simple")  # prompt sets of the logit lens's classifier (open_clip's)


def _as_list(value) -> list:
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return [value]


def _inside(number: int, count: int, clamp: bool, refusal: str) -> int:
    """`number` if it is one of `range(count)`; else the nearest one, with a warning, when `clamp` (what
    debug=tiny sets, to run experiments written for bigger models), or a UserError saying `refusal`."""
    if 0 <= number < count:
        return number
    if not clamp:
        raise UserError(refusal)
    inside = min(max(number, 0), count - 1)
    log.warning("%s; clamp_to_model=true (debug=tiny) uses %d instead", refusal, inside)
    return inside


def parse_layers(spec, n_layers: int, clamp: bool = False) -> list[int]:
    """`layer` config value -> sorted layer indices: an int, a list, `all`, or an inclusive range `10-20`.

    Negative ints count from the end (-1 is the last layer), as in Python. Layers outside the model are
    refused, or with `clamp` moved to the nearest layer.
    """
    valid = f"layers run from 0 to {n_layers - 1} (or -{n_layers} to -1)"
    layers: list[int] = []
    for item in _as_list(spec):
        text = str(item).strip()
        if text == "all":
            layers.extend(range(n_layers))
            continue
        single, span = re.fullmatch(r"-?\d+", text), re.fullmatch(r"(\d+)-(\d+)", text)
        if single:
            numbers = [int(text)]
        elif span:
            numbers = list(range(int(span[1]), int(span[2]) + 1))
        else:
            raise UserError(f"layer={item!r}: use an int, a list [10,20], all, or a range 10-20; {valid}")
        for number in numbers:
            index = number + n_layers if -n_layers <= number < 0 else number
            layers.append(_inside(index, n_layers, clamp, f"layer={number} is outside this model: {valid}"))
    if not layers:
        raise UserError(f"layer={spec!r} names no layer; {valid}")
    return sorted(set(layers))


def parse_heads(spec, n_heads: int, clamp: bool = False) -> list[int]:
    """`head` config value -> sorted head indices: `all`, an int or a list (see `parse_layers` for `clamp`)."""
    if str(spec).strip() == "all":
        return list(range(n_heads))
    heads: list[int] = []
    for item in _as_list(spec):
        # an int or its digits; never a float (1.5) or a bool (true), which int() would quietly take
        whole = isinstance(item, int) and not isinstance(item, bool)
        if not whole and not (isinstance(item, str) and re.fullmatch(r"\s*-?\d+\s*", item)):
            raise UserError(f"head={item!r}: use all, an int or a list of ints")
        number = int(item)
        heads.append(_inside(number, n_heads, clamp,
                             f"head={number} is outside this model: heads run from 0 to {n_heads - 1}"))
    if not heads:
        raise UserError(f"head={spec!r} names no head: use all, an int or a list of ints")
    return sorted(set(heads))


def select_components(
    lens: str, layer_spec, head_spec, component, n_layers: int, n_heads: int, mid: bool = False,
    clamp: bool = False,
) -> list[Component]:
    """The components lens `lens` (a registered name) reads: `Lens.components` with default settings."""
    return lens_class(lens)().components(layer_spec, head_spec, component, n_layers, n_heads, mid, clamp)


def check_components(labels: list[str], n_layers: int, n_heads: int, clamp: bool = False) -> list[Component]:
    """Parse explicit labels and check them against the model; one clear error for any bad one (layers and
    heads outside the model are moved to the nearest one instead with `clamp`)."""
    if not labels:
        raise UserError("component=[] names no component: use heads, mlp, all, or labels [L3H01,L2MLP]")
    components = []
    for label in labels:
        try:
            comp = parse_component(label)
        except ValueError as err:
            raise UserError(f"{err}; or use component=heads, mlp or all") from None
        if comp.kind != "embed":  # resid_mid included
            layer = _inside(comp.layer, n_layers, clamp,
                            f"{label}: layer {comp.layer} is outside this model (0 to {n_layers - 1})")
            head = comp.head if comp.kind != "head" else _inside(
                comp.head, n_heads, clamp, f"{label}: head {comp.head} is outside this model (0 to {n_heads - 1})")
            comp = Component(comp.kind, layer, head)
        components.append(comp)
    return list(dict.fromkeys(components))  # clamping may map two labels onto one component


@dataclass
class Scores:
    """Per-component scores of one batch of images: each `[batch, component]`."""

    sim_embed: torch.Tensor  # cos(lens embedding, clean embedding of the input)
    norm: torch.Tensor  # |write| of the component in the residual stream (|x| for the residual stream)


def score(encoder, cache, components: list[Component], embeds: torch.Tensor) -> Scores:
    """Similarity of every lens embedding to the input's own embedding, and the size of each write."""
    clean = cache.embeds.float().unsqueeze(1)
    sim = torch.nn.functional.cosine_similarity(embeds.float(), clean, dim=-1)
    norm = encoder.component_writes(cache, components).float().norm(dim=-1)
    return Scores(sim_embed=sim, norm=norm)


def encoder_part(weight: str) -> str:
    """Which model a damaged `weight` of the run's encoder belongs to: its adapter's, its SAE's, or its own."""
    return "adapter" if weight.startswith("adapter.") else "SAE" if weight.startswith("sae.") else "encoder"


def encoder_files(weight: str) -> str:
    """What to do about the file that holds a damaged `weight` of the run's encoder (as `nonfinite_weight`
    names it: an adapter's and an SAE's tensors come with their prefix)."""
    if weight.startswith("adapter."):
        return "check the file adapter= names (or fit it again with `dsl adapter fit`)"
    if weight.startswith("sae."):
        return "check the SAE folder sae.path names (or fetch it again)"
    return "fetch them again, or check the file or folder encoder.checkpoint names"


def check_finite(lens: "Lens", dtype: str, names: list[str], components: list[Component], clean: torch.Tensor,
                 embeds: torch.Tensor, scores: Scores, encoder: Any = None) -> None:
    """Stop at an embedding or score that is NaN or infinite, naming the image, the component and the
    setting that made it. clean [B, E], embeds [B, K, E], scores [B, K] each. With the `encoder` that made
    them, weights holding NaN or inf are named first: no setting fixes damaged weight files."""
    bad_clean = ~torch.isfinite(clean).all(-1)
    bad = ~(torch.isfinite(embeds).all(-1) & torch.isfinite(scores.sim_embed) & torch.isfinite(scores.norm))
    if not (bad_clean.any() or bad.any()):
        return
    if encoder is not None:
        refuse_damaged_weights(encoder_part, encoder, encoder_files)
    if bad_clean.any():
        image = names[int(bad_clean.nonzero()[0, 0])]
        raise UserError(f"{image}: the encoder's embedding is not finite (NaN or inf) with encoder.dtype={dtype}; "
                        + fp32_fix(dtype))
    i, k = (int(v) for v in bad.nonzero()[0])
    setting, fix = lens.unstable_setting(dtype)
    raise UserError(f"{names[i]} {components[k].label}: the {lens.name} lens embedding or its score is "
                    f"not finite (NaN or inf) with {setting}; {fix}")


TOP_PATCHES = 5  # patches named in the `top_patches` column


@dataclass
class Looks:
    """Where each chosen head looks in one batch: each source token's share of the head's CLS write.

    shares  [B, K_heads, T] (CLS first, then the patches row by row); each sums to 1 over T
    heads   the index in the run's component list of each chosen head
    """

    shares: torch.Tensor
    heads: list[int]
    prefix: int = 1  # tokens before the patches: the class token (and register or distillation tokens)

    @property
    def grid(self) -> int:
        """Patches per side of the (square) patch grid."""
        return math.isqrt(self.shares.shape[-1] - self.prefix)

    def top_patches(self, n_components: int) -> list[list[str]]:
        """[B][K]: the TOP_PATCHES patches with the largest shares, `r3c7;r0c1;...` (row and column in the
        patch grid, from the top left), best first; empty for a component that is not a head."""
        patches = self.shares[..., self.prefix:]
        best = patches.topk(min(TOP_PATCHES, patches.shape[-1]), dim=-1).indices.tolist()
        out = [[""] * n_components for _ in best]
        for i, image in enumerate(best):
            for j, k in enumerate(self.heads):
                out[i][k] = ";".join(f"r{p // self.grid}c{p % self.grid}" for p in image[j])
        return out

    def rows(self, i: int, image: str, lens: str, components: list[Component]) -> list[dict]:
        """patches.csv rows of image i: the CLS token's share and every patch's, row by row."""
        return [{"image": image, "lens": lens, "component": components[k].label, "grid": self.grid,
                 "cls_share": self.shares[i, j, :self.prefix].sum().item(),  # with the registers' shares
                 "shares": ";".join(f"{v:.5f}" for v in self.shares[i, j, self.prefix:].tolist())}
                for j, k in enumerate(self.heads)]


def where_heads_look(encoder, pixels: torch.Tensor, components: list[Component]) -> Optional[Looks]:
    """`Looks` of the head components (None when there is none); pixels [B, 3, S, S]."""
    heads = [k for k, c in enumerate(components) if c.kind == "head"]
    if not heads:
        return None
    shares = source_shares(encoder, pixels, [components[k] for k in heads])
    family = getattr(encoder, "family", None)
    return Looks(shares.cpu(), heads, family.n_prefix if family is not None else 1)


def n_labels() -> int:
    """How many labels the logit lens names embeddings with: the ImageNet-1k classes, as many as
    `open_clip.IMAGENET_CLASSNAMES` (tests/test_lenses.py), counted without importing open_clip."""
    return 1000


def rank(values: torch.Tensor) -> torch.Tensor:
    """1-based rank along the last axis, 1 = most similar; ties keep component order (stable)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, values.shape[-1] + 1, device=values.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks


def text_classifier(text_model, tokenizer, templates: str, device) -> tuple[torch.Tensor, list[str]]:
    """Unit-norm class embeddings `[d_embed, 1000]` for the ImageNet names, averaged over prompt templates:
    open_clip's zero-shot classifier, built a few classes at a time (about PROMPTS_PER_BATCH prompts, so the
    text tower's working memory stays small whatever the templates) under one labelled progress bar."""
    names = list(open_clip.IMAGENET_CLASSNAMES)
    if templates not in TEMPLATES:
        raise UserError(f"lens.templates={templates!r}: use {' or '.join(TEMPLATES)}")
    prompts = open_clip.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else open_clip.SIMPLE_IMAGENET_TEMPLATES
    step = max(1, PROMPTS_PER_BATCH // len(prompts))
    parts = []
    log.info("ImageNet classifier: %d classes x %d prompts through the text tower", len(names), len(prompts))
    with tqdm(total=len(names), desc="classifier", unit="class") as bar:
        for start in range(0, len(names), step):
            batch = names[start:start + step]
            parts.append(open_clip.build_zero_shot_classifier(
                text_model, tokenizer=tokenizer, classnames=batch, templates=prompts, num_classes_per_batch=None,
                device=device).float().cpu())
            bar.update(len(batch))
    return torch.cat(parts, dim=1), names


def classifier_file(encoder_cfg, templates: str) -> Path | None:
    """Where the ImageNet classifier of the encoder's text tower is kept; None where it is not kept: weights
    from a local file may change, and the tiny model's builds in a moment. Random weights are drawn from a
    fixed seed on the CPU, so their classifier is fixed for a given torch (named in the file)."""
    name, tag = text_model_id(encoder_cfg)
    if name == "tiny" or (tag is not None and Path(tag).expanduser().exists()):
        return None
    weights = tag if tag is not None else f"random-seed{RANDOM_SEED}-torch{torch.__version__}"
    return cache_folder() / f"{name}_{weights}_{templates}_openclip{open_clip.__version__}.pt"


def imagenet_classifier(encoder_cfg, templates: str, device) -> tuple[torch.Tensor, list[str]]:
    """`text_classifier` (`[d_embed, 1000]`, float32, on the CPU) for the encoder's text tower, kept on disk
    where `classifier_file` names a file: with the OpenAI templates it encodes 80,000 prompts, which for bigG
    is worth doing once, not once per run. A kept classifier means no text tower is built; otherwise the
    tower is built alone, in float32 on `device`, and released (its device memory too) before this returns."""
    path = classifier_file(encoder_cfg, templates)
    if path is not None and path.is_file():
        log.info("ImageNet classifier read from %s", path)
        return torch.load(path, map_location="cpu"), list(open_clip.IMAGENET_CLASSNAMES)
    text_model, tokenizer = load_text_model(encoder_cfg, device, torch.float32)
    try:
        classifier, names = text_classifier(text_model, tokenizer, templates, device)
    finally:
        del text_model
        release_memory(device)
    if path is not None:
        buffer = io.BytesIO()
        torch.save(classifier, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        log.info("ImageNet classifier kept in %s (later runs read it, no text tower)", path)
    return classifier, names


def text_needs(encoder_cfg, templates: str, classify: bool, encode: bool) -> Needs:
    """The text tower's weights where a lens uses it: to `classify` (the ImageNet classifier, unless it is
    kept on disk already: `classifier_file`) or to `encode` texts (a text pool, a target: always)."""
    if not encode:
        saved = classifier_file(encoder_cfg, templates) if classify else None
        if not classify or (saved is not None and saved.is_file()):
            return [], []
    return text_tower_needs(encoder_cfg)


def top_labels(embeds: torch.Tensor, classifier: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of each embedding `[..., d_embed]` with each class; the k best as (scores, indices) `[..., k]`."""
    unit = torch.nn.functional.normalize(embeds.float(), dim=-1)
    sims = unit @ classifier.to(unit.device, torch.float32)
    return sims.topk(k, dim=-1)


# ---------------------------------------------------------------- text for every component


def text_span(outputs: torch.Tensor, pool: torch.Tensor, k: int) -> list[int]:
    """The text-span description (TextSpan, Gandelsman et al.): greedily the pool text whose direction
    explains most of the outputs' energy, then that direction projected out of the outputs and of every
    text, k times. outputs [N, E] (a component's embeddings over the images), pool [M, E] -> k indices."""
    left = outputs.float().clone()
    texts = torch.nn.functional.normalize(pool.float(), dim=-1)
    picked: list[int] = []
    for _ in range(min(k, len(texts))):
        energy = (left @ texts.T).pow(2).sum(0)  # [M]
        energy[picked] = -1.0
        j = int(energy.argmax())
        picked.append(j)
        direction = torch.nn.functional.normalize(texts[j], dim=0)
        left = left - (left @ direction)[:, None] * direction
        texts = texts - (texts @ direction)[:, None] * direction
    return picked


def read_text_pool(path: str) -> list[str]:
    """A user's text pool: one phrase a line (blank lines and lines starting with # skipped)."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"lens.text_pool={path}: not a readable text file ({err})") from err
    phrases = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not phrases:
        raise UserError(f"lens.text_pool={path}: holds no phrase (one a line)")
    return phrases


@dataclass
class TextReader:
    """What names components, prepared before the encoder loads (its text towers built and released first).

    classifier  [E, 1000] the ImageNet classifier (unit-norm columns, float32, CPU) and `names` its classes
    pool        [M, E] the texts descriptions pick from (unit-norm), and `texts` them as words
    """

    classifier: torch.Tensor
    names: list[str]
    pool: torch.Tensor
    texts: list[str]


def prepare_text(lens_cfg, encoder_cfg, device,
                 classifier: Optional[tuple[torch.Tensor, list[str]]] = None) -> TextReader:
    """The ImageNet classifier of the encoder's text tower (kept on disk, as the logit lens's; `classifier`
    when the lens has built it already) and the text pool: its classes, or the phrases of `lens.text_pool`
    through the same tower."""
    classifier, names = classifier or imagenet_classifier(encoder_cfg, lens_cfg.templates, device)
    if lens_cfg.get("text_pool") is None:
        return TextReader(classifier, names, classifier.T, names)
    phrases = read_text_pool(lens_cfg.text_pool)
    return TextReader(classifier, names, encode_texts(encoder_cfg, phrases, device), phrases)


def describe(scored: "ScoredImages", reader: TextReader, lens_cfg) -> tuple[list[list[str]], list[list[str]]]:
    """Text for every component of every image: [image][component] its top `lens.top_labels` ImageNet labels
    with their cosines (`tabby cat 0.231; tiger cat 0.220`), and [image][component] the text-span description
    of each head and MLP (`lens.span_texts` texts from the pool, `; `-joined; empty for the stream). Each
    image is described alone, so that a row does not depend on which images share its run (a sweep's shard)."""
    labels, descriptions = [], []
    for _, embeds in scored.embeds:
        values, indices = top_labels(embeds, reader.classifier, lens_cfg.top_labels)
        labels.append(["; ".join(f"{reader.names[j]} {v:.3f}" for v, j in zip(vs, js))
                       for vs, js in zip(values.tolist(), indices.tolist())])
        descriptions.append(["; ".join(reader.texts[j] for j in text_span(embeds[k:k + 1].float().cpu(),
                                                                          reader.pool, lens_cfg.span_texts))
                             if c.kind in ("head", "mlp") else "" for k, c in enumerate(scored.components)])
    return labels, descriptions


# ---------------------------------------------------------------- lenses as objects


@dataclass
class ScoredImages:
    """What a lens may use after every image is scored (for its checks and its own files).

    embeds      (image name, lens embeddings [K, E] on the CPU) per image, in run order
    pixels      image name -> its preprocessed pixels [1, 3, S, S] on the encoder's device
    """

    encoder: Any
    encoder_cfg: Any
    components: list[Component]
    embeds: list[tuple[str, torch.Tensor]]
    pixels: Any
    run_dir: Path


class Lens:
    """A way of reading components as image embeddings. A new lens is a subclass with `@register`, a config
    `dsl_cli/configs/lens/<name>.yaml` (`name: <name>` and its settings) and a case in `tests/test_run.py`.

    stream       reads the residual stream of each chosen layer (L3, and L3mid with lens.mid=true)
    submodules   reads the chosen heads and/or MLP of each chosen layer (component=heads|mlp|all)
    label_kinds  component kinds an explicit label list may name (None: any)
    columns      the CSV columns it fills beyond the common ones (`outputs.SimilarityRow`), with `row()` (the same
                 in every row) or `values()` (per image and component)
    figures      the figures a run of it draws beyond every run's: a declaration, checked by the tests; they are
                 drawn by `figures.redraw` from the rows it writes (the layer grid for stream rows, ...)
    prepare_stage  the manifest stage of `prepare` (work with a model of its own, before the encoder loads)
    new_settings   settings of its own that `config.LensConfig` lacks, name -> default (a lens of the user's:
                 `{"sharpness": 1.0}` makes `lens.sharpness` a float setting, read as `self.cfg.sharpness`)
    """

    name: ClassVar[str] = ""
    stream: ClassVar[bool] = False
    submodules: ClassVar[bool] = True
    label_kinds: ClassVar[Optional[tuple[str, ...]]] = None
    label_refusal: ClassVar[str] = ""  # why a label list is refused (default: the kinds it reads)
    columns: ClassVar[tuple[str, ...]] = ()
    figures: ClassVar[tuple[str, ...]] = ()
    prepare_stage: ClassVar[Optional[str]] = None
    new_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any = None):
        self.cfg = cfg  # the `lens` config group

    def components(self, layer_spec, head_spec, component, n_layers: int, n_heads: int, mid: bool = False,
                   clamp: bool = False) -> list[Component]:
        """The components the run reads, in layer order (the stream first, then the submodules of each layer).
        `component` may instead list labels (`[L3H01, L2MLP]`), which are taken as they are. Layers and heads
        outside the model are refused, or with `clamp` moved to the nearest one (`clamp_to_model`)."""
        if component not in ("heads", "mlp", "all"):
            chosen = check_components([str(c) for c in _as_list(component)], n_layers, n_heads, clamp)
            if self.label_kinds is not None and any(c.kind not in self.label_kinds for c in chosen):
                why = self.label_refusal or f"reads {' and '.join(self.label_kinds)} components only"
                raise UserError(f"component={component}: lens={self.name} {why}")
            return chosen
        heads = parse_heads(head_spec, n_heads, clamp)
        return [c for layer in parse_layers(layer_spec, n_layers, clamp)
                for c in self.layer_components(layer, heads, component, mid)]

    def layer_components(self, layer: int, heads: list[int], component: str, mid: bool) -> list[Component]:
        chosen = []
        if self.stream:
            chosen += [Component("resid_mid", layer)] * mid + [Component("resid", layer)]
        if self.submodules and component in ("heads", "all"):
            chosen += [Component("head", layer, h) for h in heads]
        if self.submodules and component in ("mlp", "all"):
            chosen.append(Component("mlp", layer))
        return chosen

    def embeddings(self, encoder, cache, components: list[Component]) -> torch.Tensor:
        """[B, K, E]: by default the readout of what each component writes (or the stream it names)."""
        try:
            return encoder.direct(cache, components)
        except NotImplementedError as err:  # a readout that pools every token (attention pooling)
            raise UserError(f"lens={self.name}: {err}") from None

    def row(self) -> dict:
        """This lens's values of its `columns`, the same in every row of the run."""
        return {}

    def values(self, encoder, cache, components: list[Component], embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """This lens's per-row values of its `columns`: name -> [B, K] (beside `row()`'s constant ones)."""
        return {}

    def unstable_setting(self, dtype: str) -> tuple[str, str]:
        """(the setting, its fix) named when an embedding is not finite (NaN or inf), the encoder's own being
        finite: a lens of the user's own code is named as the likelier cause."""
        if type(self).__module__ != __name__:
            half = "" if dtype == "fp32" else f"; or {fp32_fix(dtype)}"  # half precision may overflow in it too
            return (f"encoder.dtype={dtype}", f"the encoder's own embedding is finite: look first at lens "
                    f"{self.name}'s own code ({type(self).__module__}.{type(self).__name__}){half}")
        return f"encoder.dtype={dtype}", fp32_fix(dtype)

    def needs(self, encoder_cfg) -> Needs:
        """The weights this lens loads beyond the encoder's (asked by the preflight before anything loads):
        the text tower, for every component's labels (`lens.text`) and a text pool."""
        labels = bool(self.cfg.get("text"))
        return text_needs(encoder_cfg, self.cfg.templates, labels, labels and self.cfg.get("text_pool") is not None)

    def prepare(self, encoder_cfg, device: torch.device) -> None:
        """Work of this lens that needs a model of its own, done before the encoder loads (so that the two
        never share memory), as the manifest stage `prepare_stage`; a lens without one leaves it None."""

    def check_encoder(self, encoder, encoder_cfg) -> None:
        """UserError where the loaded encoder cannot give what this lens reads, checked before any image is
        encoded (what the configs alone tell is checked before it loads)."""

    def after_scoring(self, scored: ScoredImages) -> dict:
        """Checks and files of this lens once every image is scored; returns entries for the manifest."""
        return {}


LENSES: dict[str, type[Lens]] = {}


def register(cls: type[Lens]) -> type[Lens]:
    """Class decorator: make `cls` the lens of `lens.name=<cls.name>`."""
    if not NAME_PATTERN.fullmatch(cls.name):
        raise ValueError(f"lens name {cls.name!r}: use letters, digits and _ (it names files and CSV rows)")
    unknown = [column for column in cls.columns if column not in SIMILARITY.columns]
    if unknown:  # refused now, not when the first rows are written after the run's work
        raise ValueError(f"lens {cls.name!r}: similarity.csv has no column {', '.join(map(repr, unknown))} "
                         "(its columns: outputs.SimilarityRow)")
    owned = [column for column in cls.columns if column not in LENS_COLUMNS]
    if owned:  # a lens's `image` or `layer` named other pictures' files and overwrote them
        raise ValueError(f"lens {cls.name!r}: {', '.join(map(repr, owned))} of similarity.csv is the run's to fill; "
                         f"a lens fills {', '.join(LENS_COLUMNS)}")
    taken = LENSES.get(cls.name)
    if taken is not None and taken.__module__ == __name__ and cls is not taken:
        raise ValueError(f"lens name {cls.name!r} is one of dsl's own lenses: give yours another name")
    declare_settings("lens", cls.name, cls.new_settings)
    LENSES[cls.name] = cls
    return cls


# similarity.csv's columns a lens may fill (`Lens.columns`); the others are the run's own (where the row is, its
# scores, its picture, lens.text's labels and description, the SAE's activation, the seeds' spread)
LENS_COLUMNS = ("mode", "alpha", "attribution")


NAME_PATTERN = re.compile(r"[A-Za-z0-9_]+")


def check_row(lens: Lens) -> dict:
    """`lens.row()`, its keys checked against the columns the lens declares (checked before anything loads: a
    plugin's undeclared key was refused by the CSV writer only after the pictures were decoded)."""
    row = lens.row()
    _declared(lens, "row()", row)
    return row


def check_output(lens: Lens, embeds: torch.Tensor, values: dict[str, torch.Tensor], batch: int, count: int,
                 width: int) -> None:
    """What a lens hands the run for `batch` images and `count` components: embeddings [batch, count, width]
    (the encoder's embedding width) and `values` of its declared columns, each [batch, count]. A lens of a
    plugin that breaks this is named in one line, not reported as a bug in dsl (or, worse, broadcast into wrong
    numbers)."""
    if embeds.dim() != 3 or tuple(embeds.shape) != (batch, count, width):
        raise UserError(f"lens={lens.name}: embeddings() gave a tensor of shape {tuple(embeds.shape)} for {batch} "
                        f"images and {count} components of an encoder that embeds into {width}; a lens gives "
                        f"[image, component, d_embed] = ({batch}, {count}, {width}) (Lens.embeddings)")
    _declared(lens, "values()", values)
    for column, value in values.items():
        if tuple(value.shape) != (batch, count):
            raise UserError(f"lens={lens.name}: values() gave {column!r} of shape {tuple(value.shape)}; each value is "
                            f"[image, component] = ({batch}, {count}) (Lens.values)")


def _declared(lens: Lens, method: str, given: dict) -> None:
    undeclared = [key for key in given if key not in lens.columns]
    if undeclared:
        raise UserError(f"lens={lens.name}: {method} gave {', '.join(map(repr, undeclared))}, which the lens does not "
                        f"declare in `columns` ({', '.join(lens.columns) or 'none'}); declare it, or leave it out")


def refuse_unread_settings(lens_cfg: Any, readers: list[str]) -> None:
    """A setting a plugin lens declared, changed from its default where none of the lenses that run (`readers`:
    the run's lens, or the lenses a study compares) declared it (`lens=steering lens.blend=0.5`), would be
    recorded as if it had been used: refused, as a study refuses a setting it does not read. (dsl's own lens
    settings are the lenses' in common, and stay accepted.)"""
    for name, default in DECLARED["lens"].items():
        owners = declared_owners("lens", name)
        if not owners & set(readers) and lens_cfg.get(name, default) != default:
            raise UserError(f"lens.{name}={lens_cfg[name]}: no lens of this run reads it ({', '.join(readers)}; it "
                            f"is a setting of lens {', '.join(sorted(owners))}); leave it out")


def lens_class(name: str) -> type[Lens]:
    if name not in LENSES:
        raise UserError(f"lens={name!r}: choose one of {', '.join(LENSES)} "
                        "(one of your own: import the module that registers it, then call dsl_cli.cli.main; "
                        "docs/extending.md)")
    return LENSES[name]


def get_lens(lens_cfg: Any = "steering", **settings: Any) -> Lens:
    """The lens object of a `lens` config group: the run's (a DictConfig), a `LensConfig`, or a lens name,
    with `settings` overriding its fields (`get_lens("steering", mode="add", alpha=4)`). Every form is
    checked against the schema: a misspelt setting or a bad value is a UserError."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dsl_cli.config import group_schema

    if isinstance(lens_cfg, str):
        lens_cfg = {"name": lens_cfg}
    if not isinstance(lens_cfg, DictConfig) or settings:
        try:  # as plain values: the schema may have grown by a plugin's settings since `lens_cfg` was made
            given = lens_cfg if isinstance(lens_cfg, dict) else OmegaConf.to_container(OmegaConf.structured(lens_cfg))
            lens_cfg = OmegaConf.merge(OmegaConf.structured(group_schema("lens")), given, settings)
        except OmegaConfBaseException as err:
            raise UserError(f"lens settings {settings or lens_cfg}: {str(err.msg).splitlines()[0]}") from None
    return lens_class(lens_cfg.name)(lens_cfg)


def lens_embeddings(lens: Any, encoder, cache, components: list, **settings: Any) -> torch.Tensor:
    """[batch, component, d_embed]: what lens `lens` (a `Lens`, or anything `get_lens` takes: a name, a
    `LensConfig`, the run's `lens` group, with `settings`) reads for each of `components` (labels such as
    `L3H01`, `L2MLP`, `L3`, or `Component`s) from an encoder's cache."""
    lens = lens if isinstance(lens, Lens) else get_lens(lens, **settings)
    return lens.embeddings(encoder, cache, [parse_component(c) for c in components])


@register
class DiffusionLens(Lens):
    """Diffusion Lens: the readout of the residual stream after each chosen layer."""

    name = "diffusion"
    stream, submodules = True, False
    figures = ("grids/<image>_<lens>_layers.png",)


@register
class DirectLens(Lens):
    """The naive submodule lens: the readout of a head's or MLP's write as it is."""

    name = "direct"


@register
class SteeringLens(Lens):
    """DSL: the closed-form steered-and-patched embedding; `lens.verify` checks it against the hooked pass."""

    name = "steering"
    label_kinds = ("head", "mlp")
    label_refusal = "steers heads and MLPs only (L3H01, L2MLP)"
    columns = ("mode", "alpha")

    def embeddings(self, encoder, cache, components: list[Component]) -> torch.Tensor:
        return encoder.steer(cache, components, mode=self.cfg.mode, alpha=float(self.cfg.alpha))

    def row(self) -> dict:
        return {"mode": self.cfg.mode, "alpha": float(self.cfg.alpha)}

    def unstable_setting(self, dtype: str) -> tuple[str, str]:
        return f"lens.alpha={self.cfg.alpha} (lens.mode={self.cfg.mode})", "use a smaller lens.alpha"

    def after_scoring(self, scored: ScoredImages) -> dict:
        # a readout with no closed form (attention pooling) was steered through the hooked path: the manifest says so
        path = {} if getattr(scored.encoder, "exact", True) else {
            "steering_path": f"hooked ({scored.encoder.readout_kind} readout)"}
        if not self.cfg.verify:
            return path
        worst_abs, worst_rel = self.verify(scored)
        tolerance = VERIFY_TOLERANCE[scored.encoder.dtype == torch.float32]
        if worst_rel > tolerance:
            log.warning("lens.verify: closed form and hooked reference differ by %.3g of the embedding's norm (> %g)",
                        worst_rel, tolerance)
        return {**path, "verify_max_abs_diff": worst_abs, "verify_max_rel_diff": worst_rel,
                "verify_ok": worst_rel <= tolerance}

    def verify(self, scored: ScoredImages) -> tuple[float, float]:
        """The largest gaps between the closed form and the hooked reference over all images and components:
        (max |closed - hooked|, max ||closed - hooked|| / ||hooked||)."""
        worst_abs = worst_rel = 0.0
        encoder = scored.encoder
        with tqdm(scored.embeds, desc="verify", unit="img") as bar:  # closed on an error too
            for name, embeds in bar:
                pixels = scored.pixels(name)
                for k, comp in enumerate(scored.components):
                    hooked = encoder.steer_hooked(pixels, comp, mode=self.cfg.mode, alpha=float(self.cfg.alpha))
                    gap_abs, gap_rel = verify_gap(hooked[0].float().cpu(), embeds[k])
                    worst_abs, worst_rel = max(worst_abs, gap_abs), max(worst_rel, gap_rel)
        return worst_abs, worst_rel


# lens.verify's tolerance on ||closed - hooked|| / ||hooked||, by [encoder in float32]. bf16 rounds each
# layer's output to 8 bits of mantissa, so the two paths drift apart in proportion to the embedding's size
# (docs/benchmarks.md: relative gaps measured in bf16); an absolute bound failed correct bigG runs.
VERIFY_TOLERANCE = {True: 1e-5, False: 3e-2}


def verify_gap(hooked: torch.Tensor, closed: torch.Tensor) -> tuple[float, float]:
    """(max |closed - hooked|, ||closed - hooked|| / ||hooked||) of one embedding `[d_embed]`."""
    gap = closed.float() - hooked.float()
    return gap.abs().max().item(), (gap.norm() / hooked.float().norm().clamp_min(1e-12)).item()


@register
class LogitLens(Lens):
    """The classic logit lens: the stream and the chosen submodules, named by CLIP's text tower (labels.csv)."""

    name = "logit"
    stream = True
    figures = ("grids/<image>_<lens>_layers.png", "plots/<image>_logit.png")
    prepare_stage = "classifier"
    classifier: Optional[tuple[torch.Tensor, list[str]]] = None  # ([d_embed, 1000], class names) once prepared

    def needs(self, encoder_cfg) -> Needs:
        """The text tower: its ImageNet classifier names every component, whatever `lens.text` says (a timm or
        transformers ViT's own classifier head names them instead)."""
        if encoder_cfg.source in ("timm", "hf") and not self.cfg.get("text"):
            return [], []
        pool = bool(self.cfg.get("text")) and self.cfg.get("text_pool") is not None
        return text_needs(encoder_cfg, self.cfg.templates, True, pool)

    def prepare(self, encoder_cfg, device: torch.device) -> None:
        """The ImageNet classifier, before the encoder loads: its text tower is built, used and released
        first, so that the two never share memory (a kept classifier builds no tower at all). A timm or
        transformers ViT names labels with its own classifier head instead (`head_labels`), or has none."""
        if encoder_cfg.source in ("timm", "hf"):
            return
        self.classifier = imagenet_classifier(encoder_cfg, self.cfg.templates, device)

    @staticmethod
    def no_labels(encoder_cfg) -> str:
        return (f"lens=logit names labels with a classifier head or a CLIP text tower, and encoder "
                f"{encoder_cfg.source}:{encoder_cfg.name if encoder_cfg.source == 'timm' else encoder_cfg.repo_id} "
                "has neither: use lens=diffusion, direct, steering or attribution")

    def head_labels(self, encoder, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top `lens.top_labels` logits of the encoder's own classifier head: embeds [K, E] -> (values,
        indices) [K, k]."""
        with torch.no_grad():
            logits = encoder.classifier(embeds.to(encoder.device, encoder.dtype)).float().cpu()
        return logits.topk(min(self.cfg.top_labels, logits.shape[-1]), dim=-1)

    def check_encoder(self, encoder, encoder_cfg) -> None:
        """A timm or transformers ViT without a classifier head (DINOv2, a CLIP image tower) has nothing to
        name labels with: refused before its images are encoded, not after."""
        if getattr(encoder, "classifier", None) is None and encoder_cfg.source in ("timm", "hf"):
            raise UserError(self.no_labels(encoder_cfg))

    def after_scoring(self, scored: ScoredImages) -> dict:
        """The top ImageNet labels of every component's embedding, into labels.csv (`check_encoder` made sure
        that a timm or transformers ViT has its own classifier head)."""
        head = getattr(scored.encoder, "classifier", None)
        if head is None and self.classifier is None:
            self.prepare(scored.encoder_cfg, scored.encoder.device)
        classifier, names = (None, scored.encoder.family.class_names()) if head is not None else self.classifier
        rows = []
        for image, embeds in scored.embeds:
            values, indices = (self.head_labels(scored.encoder, embeds) if head is not None
                               else top_labels(embeds, classifier, self.cfg.top_labels))
            for k, comp in enumerate(scored.components):
                rows += [{"image": image, "lens": self.name, "component": comp.label, "layer": comp.layer,
                          "head": comp.head, "rank": r + 1, "label": names[int(indices[k, r])],
                          "score": values[k, r].item()} for r in range(values.shape[-1])]
        RunFolder(scored.run_dir).write(LABELS, rows)
        return {}


def encode_texts(encoder_cfg, texts: list[str], device) -> torch.Tensor:
    """[N, E] unit-norm embeddings of `texts` (float32, CPU) from the text tower matching the encoder
    (`load_text_model`), built alone in float32 and released, its device memory too, before this returns;
    PROMPTS_PER_BATCH texts at a time."""
    text_model, tokenizer = load_text_model(encoder_cfg, device, torch.float32)
    try:
        with torch.no_grad():
            embeds = torch.cat([text_model.encode_text(tokenizer(texts[start:start + PROMPTS_PER_BATCH]).to(device))
                                .float().cpu() for start in range(0, len(texts), PROMPTS_PER_BATCH)])
    finally:
        del text_model
        release_memory(device)
    return torch.nn.functional.normalize(embeds, dim=-1)


@register
class AttributionLens(Lens):
    """Exact direct attribution: each head's and MLP's part of the image embedding with ln_post's scale frozen
    at the clean run's (`dsl_cli.encoder.reading`); with the embedding and bias terms they sum to it.

    Column `attribution`: the part's share of the embedding's cosine with the target, t . part / (|e| |t|),
    so that every part's share sums to cos(e, t): the input's own embedding (shares sum to 1) or the text
    `lens.target` through the encoder's matching text tower.
    """

    name = "attribution"
    label_kinds = ("head", "mlp")
    label_refusal = "attributes heads and MLPs only (L3H01, L2MLP)"
    columns = ("attribution",)
    target: Optional[torch.Tensor] = None  # [1, E] unit-norm text target; None: each input's own embedding

    def __init__(self, cfg: Any = None):
        super().__init__(cfg)
        self.prepare_stage = "target" if cfg is not None and cfg.get("target") is not None else None

    def needs(self, encoder_cfg) -> Needs:
        """The text tower, for `lens.target` (a text to encode), and for the labels as any lens."""
        if self.cfg.get("target") is None:
            return super().needs(encoder_cfg)
        return text_needs(encoder_cfg, self.cfg.templates, True, True)

    def prepare(self, encoder_cfg, device: torch.device) -> None:
        """The text target through the encoder's matching text tower (built and released before the encoder)."""
        self.target = encode_texts(encoder_cfg, [str(self.cfg.target)], device)

    def embeddings(self, encoder, cache, components: list[Component]) -> torch.Tensor:
        if hasattr(encoder, "feature_attribution"):  # an SAE's features beside heads (dsl_cli.sae)
            return encoder.feature_attribution(cache, components)
        try:
            return direct_attribution(encoder, cache).pick(components)
        except NotImplementedError as err:  # a readout that is not a LayerNorm and a linear map
            raise UserError(f"lens={self.name}: {err}") from None

    def values(self, encoder, cache, components: list[Component], embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        clean = cache.embeds.float()  # [B, E]
        if self.target is not None and self.target.shape[-1] != clean.shape[-1]:
            raise UserError(f"lens.target: the text tower's embeddings ({self.target.shape[-1]}) do not match "
                            f"the image encoder's ({clean.shape[-1]}); set encoder.text_name")
        target = clean if self.target is None else self.target.to(clean.device)
        target = torch.nn.functional.normalize(target, dim=-1)
        shares = (embeds.float() * target.unsqueeze(1)).sum(-1) / clean.norm(dim=-1, keepdim=True)
        return {"attribution": shares}
