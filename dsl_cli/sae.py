"""Sparse-autoencoder features as components: what an SAE feature writes, read by every lens (DESIGN.md 7).

An SAE at a hook point of block l (TransformerLens names: `blocks.12.hook_resid_post`) reads x [.., D] and

    f(x)  = act(W_enc^T (x - b_dec * apply_b_dec_to_input) + b_enc)        [.., d_sae]
    x_hat = f W_dec + b_dec                                                  [.., D]

with act = ReLU (`standard`), TopK (`topk`: the k largest pre-activations, ReLU'd, the rest 0) or JumpReLU
(`jumprelu`: ReLU(pre) where pre > threshold, else 0). Feature i's write at the readout (CLS) position is
f_i(x) W_dec[i] (component `L12F01234`); the error term eps = x - x_hat is a component of its own (`L12Ferr`),
so that x = b_dec + sum_i f_i W_dec[i] + eps exactly. Steering a feature's write w by alpha adds delta
(add: alpha w; scale: (alpha - 1) w; norm: alpha |x_L| w / |w|) at the SAE's hook point; with every later
attention and MLP write patched to its clean value the final residual is x_L + delta, so DSL's closed form
R(x_L + delta) holds as for a head (`steer_features`; `steer_feature_hooked` is the real-forward reference).
Through an adapter (`adapters.AdaptedEncoder`) a feature is read as a head is: its delta goes to the residual
the adapter reads (`steer_writes`: x_{l+1} for a residual adapter of block l, which an SAE after block l never
reaches: `check_adapter_reach`), and the real-forward reference is mapped through it (`map_hooked`).

Two ways to store an SAE (both read by `load_sae`):

- SAELens: a folder with `cfg.json` (`d_in`, `d_sae`, `hook_name` (or the older `hook_point`),
  `architecture` standard | topk | jumprelu, `k` for topk (or `activation_fn_kwargs.k`),
  `apply_b_dec_to_input` (default true), `normalize_activations` (only none is read)) and
  `sae_weights.safetensors` with `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in],
  and `threshold` [d_sae] for jumprelu (`log_threshold` is taken too).
- plain: one `.safetensors` file with the same tensors and the cfg fields as string metadata in its header
  (`hook_name`, `architecture`, `k`, `apply_b_dec_to_input`: "true"/"false").

Only CLS readouts (CLIP): a mean or attention-pooled readout mixes every token, and the SAE is not linear.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from dsl_cli.components import FEATURE_KINDS, Component, parse_component
from dsl_cli.errors import UserError

log = logging.getLogger("dsl_cli.sae")

ARCHITECTURES = ("standard", "topk", "jumprelu")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# Where an SAE may sit (TransformerLens names within a block), and the writes that come after it in its
# block: those (and every write of later blocks) are patched to their clean values when a feature is steered.
SAE_POINTS = {"hook_resid_pre": ("hook_attn_out", "hook_mlp_out"), "hook_attn_out": ("hook_mlp_out",),
              "hook_resid_mid": ("hook_mlp_out",), "hook_mlp_out": (), "hook_resid_post": ()}


# ---------------------------------------------------------------- the SAE


@dataclass
class Sae:
    """One sparse autoencoder (module docstring). Tensors in float32 unless moved with `to`."""

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    hook_name: str  # blocks.{layer}.{point}
    architecture: str = "standard"
    k: Optional[int] = None  # topk
    threshold: Optional[Tensor] = None  # jumprelu [d_sae]
    apply_b_dec_to_input: bool = True
    source: str = ""  # where it was read from (for messages and the manifest)
    cfg: dict = field(default_factory=dict)  # the cfg.json as read

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"SAE {self.source}: architecture {self.architecture!r} is not read by dsl: "
                            f"use one of {', '.join(ARCHITECTURES)}")
        d_in, d_sae = self.W_enc.shape
        shapes = {"b_enc": (self.b_enc, (d_sae,)), "W_dec": (self.W_dec, (d_sae, d_in)), "b_dec": (self.b_dec, (d_in,))}
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise UserError(f"SAE {self.source}: a jumprelu SAE needs a `threshold` tensor")
            shapes["threshold"] = (self.threshold, (d_sae,))
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise UserError(f"SAE {self.source}: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                                f"(W_enc is [d_in={d_in}, d_sae={d_sae}])")
        # checked here, on the whole tensors: a NaN in W_enc or the threshold compares false, so every feature
        # read as off and the run said "no feature is active" instead of naming the damaged file
        for name, tensor in (("W_enc", self.W_enc), *((n, t) for n, (t, _) in shapes.items())):
            if not tensor.is_meta and not bool(torch.isfinite(tensor).all()):  # meta: `read_sae_header`'s
                raise UserError(f"SAE {self.source}: {name} holds NaN or inf: the file is damaged (or saved from a "
                                "training that diverged)")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise UserError(f"SAE {self.source}: a topk SAE needs k between 1 and d_sae={d_sae} (cfg `k`), "
                            f"not {self.k}")
        parts = self.hook_name.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in SAE_POINTS:
            raise UserError(f"SAE {self.source}: hook_name {self.hook_name!r} is not one dsl reads: use "
                            f"blocks.<layer>.<{' | '.join(SAE_POINTS)}>")

    d_in = property(lambda self: self.W_enc.shape[0], doc="the residual width it reads")
    d_sae = property(lambda self: self.W_enc.shape[1], doc="its number of features")

    @property
    def layer(self) -> int:
        return int(self.hook_name.split(".")[1])

    @property
    def point(self) -> str:
        return self.hook_name.split(".")[2]

    def to(self, *args, **kwargs) -> "Sae":
        moved = {name: (value.to(*args, **kwargs) if isinstance(value, Tensor) else value)
                 for name, value in self.__dict__.items()}
        return Sae(**moved)

    # ---- the maps
    def pre(self, x: Tensor) -> Tensor:
        """Pre-activations [.., d_sae] of x [.., d_in]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: Tensor) -> Tensor:
        """f(x): feature activations [.., d_sae] of x [.., d_in]."""
        return self.activate(self.pre(x))

    def decode(self, f: Tensor) -> Tensor:
        """x_hat = f W_dec + b_dec: [.., d_sae] -> [.., d_in]."""
        return f @ self.W_dec + self.b_dec

    def writes(self, x: Tensor, features: Sequence[int]) -> Tensor:
        """Each feature's write f_i(x) W_dec[i]: x [.., d_in] -> [.., K, d_in]."""
        f = self.encode(x)[..., list(features)]  # [.., K]
        return f.unsqueeze(-1) * self.W_dec[list(features)]

    def error(self, x: Tensor) -> Tensor:
        """The reconstruction error eps = x - x_hat [.., d_in]."""
        x = x.to(self.W_enc.dtype)
        return x - self.decode(self.encode(x))

    def component_writes(self, x: Tensor, components: Sequence[Component]) -> Tensor:
        """x [.., d_in] -> [.., K, d_in]: each feature's write, or the error term, at x."""
        f = self.encode(x)
        out = []
        for c in components:
            if c.kind == "feature":
                out.append(f[..., c.feature, None] * self.W_dec[c.feature])
            else:
                out.append(x.to(f.dtype) - self.decode(f))
        return torch.stack(out, -2)

    def components(self, features: Iterable[int], error: bool = True) -> list[Component]:
        """The components of these features (checked against d_sae), and of the error term."""
        chosen = []
        for i in features:
            if not 0 <= int(i) < self.d_sae:
                raise UserError(f"sae.features: feature {i} is outside this SAE (0 to {self.d_sae - 1})")
            chosen.append(Component("feature", self.layer, feature=int(i)))
        return list(dict.fromkeys(chosen)) + [Component("feature_error", self.layer)] * error


# ---------------------------------------------------------------- reading and writing


def _cfg_value(cfg: dict, key: str, default=None):
    """A cfg field, also where newer SAELens versions nest it (`activation_fn_kwargs`, `metadata`)."""
    if key in cfg:
        return cfg[key]
    for nest in ("activation_fn_kwargs", "metadata"):
        if isinstance(cfg.get(nest), dict) and key in cfg[nest]:
            return cfg[nest][key]
    return default


def _as_int(value, key: str, source: str) -> int:
    """A cfg field that must be a whole number (SAELens writes `k: 64`, some tools `64.0`, and a plain
    .safetensors file's metadata holds only strings: `"64"`); one line otherwise."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # not inf, nan, 6.5
    if isinstance(value, bool) or not whole:
        where = "its metadata" if source.endswith(".safetensors") else "its cfg.json"
        raise UserError(f"SAE {source}: cfg says {key}={value!r}, which is not a whole number; fix {where}")
    return int(value)


def _as_bool(value, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def sae_from(tensors: dict[str, Tensor], cfg: dict, source: str) -> Sae:
    """An `Sae` from its tensors and cfg fields (SAELens names)."""
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in tensors]
    if missing:
        raise UserError(f"SAE {source}: no tensor {', '.join(missing)} (SAELens names: W_enc, b_enc, W_dec, b_dec)")
    hook = _cfg_value(cfg, "hook_name") or _cfg_value(cfg, "hook_point")
    if not hook:
        raise UserError(f"SAE {source}: its cfg names no hook_name (e.g. blocks.12.hook_resid_post)")
    norm = _cfg_value(cfg, "normalize_activations")
    if norm not in (None, "none", "None", False):
        raise UserError(f"SAE {source}: normalize_activations={norm!r} is not read by dsl (only none)")
    architecture = str(_cfg_value(cfg, "architecture") or _cfg_value(cfg, "activation_fn_str") or "standard")
    architecture = {"relu": "standard"}.get(architecture, architecture)
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    k = _cfg_value(cfg, "k")
    sae = Sae(W_enc=tensors["W_enc"].float(), b_enc=tensors["b_enc"].float(), W_dec=tensors["W_dec"].float(),
              b_dec=tensors["b_dec"].float(), hook_name=str(hook), architecture=architecture,
              k=None if k is None else _as_int(k, "k", source),
              threshold=None if threshold is None else threshold.float(),
              apply_b_dec_to_input=_as_bool(_cfg_value(cfg, "apply_b_dec_to_input"), True), source=source, cfg=cfg)
    for key, value in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in cfg and _as_int(cfg[key], key, source) != value:
            raise UserError(f"SAE {source}: cfg says {key}={cfg[key]}, its weights have {value}")
    return sae


def load_sae(path: Optional[str] = None, repo_id: Optional[str] = None, local_files_only: bool = True) -> Sae:
    """An SAE from a local SAELens folder or plain `.safetensors` file (`path`), or from the folder `path`
    (default: the repository's root) of the Hugging Face repository `repo_id`, looked up in the hub cache;
    missing weights: one-line UserError with the `hf download` command."""
    found = locate_sae(path, repo_id, local_files_only)
    with _readable(found):
        if found.is_file():
            return _load_plain(found)
        return _load_saelens(found)


def locate_sae(path: Optional[str] = None, repo_id: Optional[str] = None, local_files_only: bool = True) -> Path:
    """Where `load_sae` reads the SAE: a plain `.safetensors` file or a SAELens folder (UserError when there is
    none, with what to do)."""
    if repo_id:
        found = _hub_folder(repo_id, path, local_files_only)
    elif path:
        found = Path(path).expanduser()
    else:
        raise UserError("sae: give sae.path (a folder with cfg.json and sae_weights.safetensors, or a .safetensors "
                        "file) or sae.repo_id")
    if found.is_file() or ((found / CFG_FILE).is_file() and (found / WEIGHTS_FILE).is_file()):
        return found
    what = "not an SAE" if os.path.lexists(found) else "no such file or folder"
    raise UserError(f"sae.path={found}: {what}: give a folder with {CFG_FILE} and {WEIGHTS_FILE} (SAELens) "
                    "or a .safetensors file")


def read_sae_header(found: Path) -> Sae:
    """The SAE at `found` (from `locate_sae`) with its tensors on the meta device: its cfg (cfg.json, or a plain
    file's metadata) and the shapes its file's header gives, no values read; building it runs every check of
    the cfg and shapes (`sae_from`), so that a run refuses a damaged SAE before any model loads."""
    from safetensors import safe_open

    with _readable(found):
        cfg = None if found.is_file() else _cfg_json(found)
        with safe_open(str(found if found.is_file() else found / WEIGHTS_FILE), framework="pt") as handle:
            tensors = {name: torch.empty(handle.get_slice(name).get_shape(), device="meta") for name in handle.keys()}
            cfg = dict(handle.metadata() or {}) if cfg is None else cfg
    return sae_from(tensors, cfg, str(found))


@contextlib.contextmanager
def _readable(found: Path):
    """A damaged SAE file (bad JSON, a cut safetensors header) as one UserError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"SAE {found}: not readable ({reason})") from err


def _hub_folder(repo_id: str, folder: Optional[str], local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    sub = (folder or "").strip("/")
    patterns = [sub, f"{sub}/*"] if sub else None  # a plain .safetensors file, or a folder
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OSError) as err:
        raise UserError(f"sae.repo_id={repo_id}: the SAE is not in the Hugging Face cache; fetch it with: "
                        f"{hf_download_command(repo_id, sub)}") from err
    found = root / sub
    if not ((found / CFG_FILE).is_file() or found.is_file()):
        raise UserError(f"sae.repo_id={repo_id}: no SAE at {found} (a .safetensors file, or a folder with "
                        f"{CFG_FILE}); fetch it with: {hf_download_command(repo_id, sub)}")
    return found


def hf_download_command(repo_id: str, sub: str) -> str:
    """The `hf download` line that fetches the SAE at `sub` of the repository: a plain `.safetensors` file is
    named as a file (`--include` takes glob patterns, and `FILE/*` matches nothing in a file), a folder by
    the pattern of its files, the repository's root whole."""
    if not sub:
        return f"hf download {shlex.quote(repo_id)}"
    if sub.endswith(".safetensors"):
        return f"hf download {shlex.quote(repo_id)} {shlex.quote(sub)}"
    return f"hf download {shlex.quote(repo_id)} --include {shlex.quote(sub + '/*')}"


def _cfg_json(folder: Path) -> dict:
    cfg = json.loads((folder / CFG_FILE).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{CFG_FILE} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def _load_saelens(folder: Path) -> Sae:
    from safetensors.torch import load_file

    return sae_from(load_file(str(folder / WEIGHTS_FILE)), _cfg_json(folder), str(folder))


def _load_plain(file: Path) -> Sae:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        cfg = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return sae_from(tensors, cfg, str(file))


def save_sae(sae: Sae, folder: Path, extra_cfg: Optional[dict] = None) -> Path:
    """Write `sae` in the SAELens layout (folder/cfg.json, folder/sae_weights.safetensors), each file atomically
    and with the mode of any new file; returns folder."""
    from safetensors.torch import save

    from dsl_cli.outputs import atomic_write_bytes

    folder = Path(folder)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "hook_name": sae.hook_name, "architecture": sae.architecture,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           **({"k": sae.k} if sae.k is not None else {}), **(extra_cfg or {})}
    atomic_write_bytes(folder / WEIGHTS_FILE, save({name: t.detach().float().cpu().contiguous()
                                                    for name, t in tensors.items()}))
    atomic_write_bytes(folder / CFG_FILE, json.dumps(cfg, indent=2).encode())
    return folder


# ---------------------------------------------------------------- features on an encoder


def check_fits(sae: Sae, encoder) -> None:
    """UserError unless the SAE can be read on this encoder (its layer, its width, a CLS readout)."""
    if sae.layer >= encoder.n_layers:
        raise UserError(f"SAE {sae.source}: hook {sae.hook_name} is beyond this encoder's {encoder.n_layers} layers")
    if sae.d_in != encoder.d_model:
        raise UserError(f"SAE {sae.source}: d_in={sae.d_in}, but this encoder's residual width is {encoder.d_model}")
    readout = getattr(encoder, "readout_kind", "cls")  # an open_clip ViT before the any-ViT interface reads CLS
    if readout != "cls":
        raise UserError(f"SAE features need a CLS readout; this encoder's is {readout}")


# How SAE releases and model hubs spell a CLIP ViT, each read as open_clip's architecture name (`ViT-L-14`):
# open_clip's own (`ViT-bigG-14`, also inside `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` and ViT-Prisma's
# `open-clip:laion/CLIP-ViT-B-32-...`), transformers' (`openai/clip-vit-large-patch14`) and timm's
# (`vit_large_patch14_clip_224.openai`). The pretrained tag is not compared: only the architecture is read reliably.
_CLIP_SIZES = {"base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "bigG", "bigg": "bigG"}
_CLIP_SPELLINGS = ((re.compile(r"(?:^|[-_/:])ViT-([A-Za-z0-9]+)-(\d+)(?=$|[-_.@/])"), None),  # open_clip's size
                   (re.compile(r"(?:^|/)clip-vit-([a-z]+)-patch(\d+)(?=$|[-_.])", re.I), _CLIP_SIZES),
                   (re.compile(r"(?:^|/)vit_([a-z]+)_patch(\d+)_clip(?=$|_)"), _CLIP_SIZES))
TRAINED_BY_DSL = "dsl sae train"  # cfg.json's `trained_by` in an SAE of `dsl sae train` (its model_name: ours)


def clip_architecture(model_name: str) -> Optional[str]:
    """The CLIP ViT architecture (`ViT-L-14`) a model name spells, or None for a name that spells none."""
    for pattern, sizes in _CLIP_SPELLINGS:
        found = pattern.search(model_name)
        if found:
            size = sizes.get(found[1].lower()) if sizes else found[1]
            return f"ViT-{size}-{found[2]}" if size else None
    return None


def encoder_model_name(encoder_cfg) -> Optional[str]:
    """The encoder a run config names, as `dsl sae train` writes it into an SAE's cfg.json (`model_name`): a
    transformers model by its repository, a timm model as `timm/NAME` (its hub repository), an open_clip one
    (and tiny) by its architecture; None for a transformers model read from a folder (`encoder.checkpoint`),
    which the config does not name."""
    source, name = str(encoder_cfg.source), str(encoder_cfg.get("name"))
    if source == "hf":
        return None if encoder_cfg.get("checkpoint") else str(encoder_cfg.get("repo_id"))
    return f"timm/{name}" if source == "timm" else name


def check_trained_on(sae_cfg: dict, source: str, encoder_cfg) -> None:
    """UserError when the SAE's cfg names (`model_name`, SAELens's field) another encoder than the run's, as
    far as dsl can tell: a CLIP ViT of another architecture, or, for an SAE of `dsl sae train`, any other
    encoder. An SAE of the same width trained elsewhere would be read without a word, its features meaningless.
    A name that dsl cannot compare, or none, is logged and the SAE read."""
    trained, run = _cfg_value(sae_cfg, "model_name"), encoder_model_name(encoder_cfg)
    trained = str(trained) if trained else None
    name = str(encoder_cfg.get("name"))
    # a timm or transformers model by its bare encoder.name: what dsl wrote before; never `tiny`, which names the
    # tiny ViT of every library (an SAE of the open_clip one was read on the tiny DINOv2)
    earlier = [name] if str(encoder_cfg.source) in ("timm", "hf") and name != "tiny" else []
    if trained is not None and trained in (run, *earlier):
        return
    ours = clip_architecture(trained or "")
    by_dsl = _cfg_value(sae_cfg, "trained_by") == TRAINED_BY_DSL
    if trained is None or run is None or (ours is None and not by_dsl):
        log.info("SAE %s: trained on %s, this run's encoder is %s, and dsl cannot compare the two: make sure the "
                 "SAE is this encoder's", source, f"{trained} (cfg model_name)" if trained else
                 "an encoder its cfg does not name (no model_name)", run or "read from encoder.checkpoint")
    elif ours is None or ours != clip_architecture(run):
        raise UserError(f"SAE {source} was trained on {trained} (its cfg's model_name), and this run's encoder "
                        f"is {run}: run it with the encoder it was trained on (encoder=..., `dsl run --help` lists "
                        f"them), or give an SAE trained on {run}")


def sae_input(sae: Sae, cache) -> Tensor:
    """x at the SAE's hook point, readout (CLS) position: [B, D] from an `EncoderCache`."""
    readout = getattr(cache, "readout", "cls")
    if readout != "cls" or not getattr(cache, "exact", True):
        raise UserError(f"SAE features need a CLS readout; this encoder's is {readout}")
    return cache[sae.hook_name]


def feature_writes(sae: Sae, cache, components: Sequence[Component]) -> Tensor:
    """[B, K, D]: each feature's write (or the error term) at the readout position, in the cache's dtype."""
    x = sae_input(sae, cache)
    return sae.to(x.device).component_writes(x.float(), components).to(x.dtype)


def _delta(write: Tensor, final: Tensor, mode: str, alpha: float) -> Tensor:
    from dsl_cli.encoder.hooked import steering_delta

    return steering_delta(write, final, mode, alpha)


def reaches(hook_name: str, layer: int) -> bool:
    """Whether a feature steered at `hook_name` (every later write patched) changes x_{layer+1}, the residual
    after block `layer`: an SAE at any point of blocks 0 to `layer`, or at blocks.{layer+1}.hook_resid_pre,
    which reads x_{layer+1} itself; any other point of a later block comes after it."""
    _, at, point = hook_name.split(".")
    return int(at) <= layer or (int(at) == layer + 1 and point == "hook_resid_pre")


def check_adapter_reach(readout, hook_name: str, source: str) -> None:
    """UserError for steering the features of an SAE after the block whose residual a residual adapter
    (`readout`, an `adapters.Readout`, or None) maps: its writes never reach that residual, so every steered
    embedding would be the clean one (`adapters.check_steerable` refuses a later head so)."""
    if readout is None or readout.kind != "resid" or reaches(hook_name, readout.layer):
        return
    at, block = int(hook_name.split(".")[1]), readout.layer
    raise UserError(f"SAE {source} sits at {hook_name}, after block {block}, whose residual the adapter maps: "
                    f"steering its features cannot change what the adapter reads. Give an SAE of blocks 0 to {block} "
                    f"(or at blocks.{block + 1}.hook_resid_pre), or fit an adapter of block {at} "
                    f"(adapter.readout=resid adapter.layer={at})")


def steer_features(encoder, sae: Sae, cache, components: Sequence[Component], mode: str = "norm",
                   alpha: float = 2.0) -> Tensor:
    """DSL of SAE features, closed form: R(x_L + delta(w)) for each feature's write w -> [B, K, E]. Through
    an adapter (`AdaptedEncoder.steer_writes`), what the adapter reads, steered: W R(x_L + delta) + b, or
    for a residual adapter of block l W (x_{l+1} + delta) + b (an SAE after block l refused)."""
    writes = feature_writes(sae, cache, components)  # [B, K, D]
    steer_writes = getattr(encoder, "steer_writes", None)  # an AdaptedEncoder's: the residual its adapter reads
    if steer_writes is not None:
        check_adapter_reach(encoder.adapter_readout, sae.hook_name, sae.source)
        return steer_writes(cache, writes, mode, alpha)
    final = cache.resid[:, -1:]  # [B, 1, D]
    return encoder.readout(final + _delta(writes, final, mode, alpha))


def direct_features(encoder, sae: Sae, cache, components: Sequence[Component]) -> Tensor:
    """The naive readout R(w) of each feature's write -> [B, K, E]."""
    return encoder.readout(feature_writes(sae, cache, components))


def attribute_features(encoder, sae: Sae, cache, components: Sequence[Component]) -> Tensor:
    """Direct attribution of each feature's write (ln_post's scale frozen at the clean run's) -> [B, K, E]."""
    from dsl_cli.encoder.reading import frozen_scale, linear_readout

    sigma = frozen_scale(encoder, cache.resid[:, -1])
    return linear_readout(encoder, feature_writes(sae, cache, components), sigma)


def later_writes(encoder, sae: Sae) -> list[str]:
    """The hook names of every attention and MLP write computed after the SAE's hook point."""
    same = [f"blocks.{sae.layer}.{point}" for point in SAE_POINTS[sae.point]]
    return same + [f"blocks.{layer}.{point}" for layer in range(sae.layer + 1, encoder.n_layers)
                   for point in ("hook_attn_out", "hook_mlp_out")]


@torch.no_grad()
def steer_feature_hooked(encoder, sae: Sae, pixels: Tensor, component, mode: str = "norm", alpha: float = 2.0,
                         patch: bool = True) -> Tensor:
    """Reference DSL of one feature in a real forward pass -> [B, E]. A clean pass records every later
    attention/MLP write and the final residual (all tokens); the steered pass edits the SAE's hook point at
    every token (the feature's write w there: add alpha w; scale: w becomes alpha w; norm: alpha |x_L| w/|w|),
    and with patch=True every later write is replaced by its clean value."""
    target = parse_component(component)
    if target.kind not in FEATURE_KINDS or target.layer != sae.layer:
        raise ValueError(f"{target.label}: not a feature of the SAE at {sae.hook_name}")
    pixels = pixels.to(encoder.device, encoder.dtype)
    later = later_writes(encoder, sae)
    final_name = f"blocks.{encoder.n_layers - 1}.hook_resid_post"
    clean: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        clean[hook.name] = x.clone()

    encoder.run_with_hooks(pixels, [(name, keep) for name in later + [final_name]])
    final = clean[final_name]  # [B, T, D]
    local = sae.to(pixels.device)

    def steer(x: Tensor, hook) -> Tensor:
        # the write written out again from f, W_dec and the error (not through `component_writes`)
        f = local.encode(x.float())
        if target.kind == "feature":
            w = f[..., target.feature, None] * local.W_dec[target.feature]
        else:
            w = x.float() - (f @ local.W_dec + local.b_dec)
        if mode == "scale":
            new = x.float() - w + alpha * w
        elif mode == "add":
            new = x.float() + alpha * w
        elif mode == "norm":
            unit = torch.nn.functional.normalize(w, dim=-1)
            new = x.float() + alpha * final.float().norm(dim=-1, keepdim=True) * unit
        else:
            raise ValueError(f"unknown steering mode {mode!r}")
        return new.to(x.dtype)

    hooks = [(sae.hook_name, steer)]
    if patch:
        hooks += [(name, lambda x, hook: clean[hook.name]) for name in later]
    return encoder.run_with_hooks(pixels, hooks)


class FeatureEncoder:
    """A `HookedEncoder` that also reads the features of one SAE: every attribute is the encoder's, and the
    lens methods (`component_writes`, `direct`, `steer`, `steer_hooked`, `feature_attribution`) take
    feature components (`L12F01234`, `L12Ferr`) beside heads, MLPs and the stream."""

    def __init__(self, encoder, sae: Sae):
        check_fits(sae, encoder)
        self.__dict__["inner"] = encoder
        self.__dict__["sae"] = sae.to(encoder.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)

    def to(self, *args, **kwargs) -> "FeatureEncoder":
        self.inner.to(*args, **kwargs)
        self.__dict__["sae"] = self.sae.to(self.inner.device)
        return self

    def _split(self, components) -> tuple[list[int], list[int], list[Component]]:
        parsed = [parse_component(c) for c in components]
        features = [k for k, c in enumerate(parsed) if c.kind in FEATURE_KINDS]
        for k in features:
            if parsed[k].layer != self.sae.layer:
                raise UserError(f"{parsed[k].label}: the SAE sits at {self.sae.hook_name} (layer {self.sae.layer})")
        return features, [k for k in range(len(parsed)) if k not in features], parsed

    def _mixed(self, components, cache, ours, theirs) -> Tensor:
        features, others, parsed = self._split(components)
        if not features:
            return theirs(parsed)
        out = ours([parsed[k] for k in features])
        if not others:
            return out
        rest = theirs([parsed[k] for k in others])
        merged = torch.empty(out.shape[0], len(parsed), *out.shape[2:], dtype=out.dtype, device=out.device)
        merged[:, features], merged[:, others] = out, rest.to(out.dtype)
        return merged

    def component_writes(self, cache, components) -> Tensor:
        return self._mixed(components, cache, lambda c: feature_writes(self.sae, cache, c),
                           lambda c: self.inner.component_writes(cache, c))

    def direct(self, cache, components) -> Tensor:
        return self._mixed(components, cache, lambda c: direct_features(self.inner, self.sae, cache, c),
                           lambda c: self.inner.direct(cache, c))

    def steer(self, cache, components, mode: str = "norm", alpha: float = 2.0) -> Tensor:
        return self._mixed(components, cache, lambda c: steer_features(self.inner, self.sae, cache, c, mode, alpha),
                           lambda c: self.inner.steer(cache, c, mode=mode, alpha=alpha))

    def steer_hooked(self, pixels, component, mode: str = "norm", alpha: float = 2.0, patch: bool = True) -> Tensor:
        if parse_component(component).kind in FEATURE_KINDS:
            def reference(encoder) -> Tensor:
                return steer_feature_hooked(encoder, self.sae, pixels, component, mode, alpha, patch)

            # through an adapter the real pass's embedding is mapped (or, for a residual adapter, refused),
            # as a head's is: the source encoder's alone would be compared with the mapped closed form
            through = getattr(self.inner, "map_hooked", None)
            return reference(self.inner) if through is None else through(reference)
        return self.inner.steer_hooked(pixels, component, mode=mode, alpha=alpha, patch=patch)

    def feature_attribution(self, cache, components) -> Tensor:
        from dsl_cli.encoder.reading import direct_attribution

        return self._mixed(components, cache, lambda c: attribute_features(self.inner, self.sae, cache, c),
                           lambda c: direct_attribution(self.inner, cache).pick(c))

    def activations(self, cache, components) -> Tensor:
        """[B, K]: each feature's activation f_i at the readout position (NaN for other components)."""
        f = self.sae.encode(sae_input(self.sae, cache).float())
        parsed = [parse_component(c) for c in components]
        out = torch.full((f.shape[0], len(parsed)), math.nan, device=f.device)
        for k, c in enumerate(parsed):
            if c.kind == "feature":
                out[:, k] = f[:, c.feature]
        return out


# ---------------------------------------------------------------- top-activating images


class TopImages:
    """The `n` images on which each feature is most active, kept in one bounded heap per feature while the
    images stream past: memory O(d_sae * n), whatever the number of images. Shards' heaps merge (`merge`)."""

    def __init__(self, n: int):
        self.n = n
        self.heaps: dict[int, list[tuple[float, str]]] = {}

    def add(self, names: Sequence[str], acts: Tensor, features: Optional[Sequence[int]] = None) -> None:
        """acts [B, F] (for `features`, default all of 0..F-1): keep each feature's n largest (> 0)."""
        acts = acts.float().cpu()
        features = list(range(acts.shape[1])) if features is None else list(features)
        k = min(self.n, acts.shape[0])
        values, rows = acts.topk(k, dim=0)  # [k, F]: only these can enter a heap from this batch
        for j, feature in enumerate(features):
            heap = self.heaps.setdefault(feature, [])
            for value, row in zip(values[:, j].tolist(), rows[:, j].tolist()):
                if value > 0:
                    self._push(heap, (value, names[row]))

    def _push(self, heap: list, item: tuple[float, str]) -> None:
        if len(heap) < self.n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def top(self, feature: int) -> list[tuple[str, float]]:
        """(image, activation), most active first."""
        return [(name, value) for value, name in sorted(self.heaps.get(feature, []), reverse=True)]

    def rows(self, features: Iterable[int], layer: int) -> list[dict]:
        return [{"component": Component("feature", layer, feature=f).label, "feature": f, "rank": r + 1,
                 "image": name, "activation": value}
                for f in features for r, (name, value) in enumerate(self.top(f))]

    def merge(self, other: "TopImages") -> "TopImages":
        for feature, heap in other.heaps.items():
            mine = self.heaps.setdefault(feature, [])
            for item in heap:
                self._push(mine, item)
        return self


def merge_top_rows(shards: Iterable[Sequence[dict]], n: int) -> list[dict]:
    """features.csv rows of several shards -> the rows of their union's n top images per feature."""
    merged, labels = TopImages(n), {}
    for rows in shards:
        for row in rows:
            feature = int(row["feature"])
            labels[feature] = row["component"]
            merged._push(merged.heaps.setdefault(feature, []), (float(row["activation"]), str(row["image"])))
    return [{"component": labels[f], "feature": f, "rank": r + 1, "image": name, "activation": value}
            for f in sorted(merged.heaps) for r, (name, value) in enumerate(merged.top(f))]
