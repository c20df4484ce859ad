"""Hub look-ups: the weights a model needs, as files of a Hugging Face repository looked up in the cache
with huggingface_hub, and the check of a list of them (`require`). This module sits below the models and
imports none of them: each model says what it needs (`Needs`: the encoder loader's `needs`, a decoder
family's `Decoder.needs`, a lens's `Lens.needs`, a study's `Study.needs`), built from the pieces here, and
`dsl_cli.preflight` asks them all before any model loads.

A run may need three sets of weights: the image encoder, the decoder of its family (when it decodes) and
the CLIP text tower (for every component's labels and the logit lens, unless its ImageNet classifier is
already on disk; for a text pool or an attribution target). Each is a
local path or files of a Hugging Face repository. Missing ones
are fetched with the libraries' own download functions when downloads are allowed; whatever is still
missing, or cannot be fetched offline (`HF_HUB_OFFLINE=1`), is reported in one message, with the `hf
download` command (huggingface_hub's CLI) that fetches each.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from dsl_cli.errors import UserError

# huggingface_hub and open_clip are imported inside the functions that use them, for start-up alone (not for a
# circle: this module imports no other of dsl_cli's but errors): a module that names its weights here loads
# neither until it looks one up.
log = logging.getLogger("dsl_cli.weights")

PRIOR_ENCODER_FILES = ("config.json", "model.safetensors")  # its folder also holds a 3.7 GB pytorch_model.bin


@dataclass(frozen=True)
class HubWeights:
    """Files of one Hugging Face repository that a model needs.

    needs: one tuple per file, of alternative names (any one cached will do); `args`: what `hf download
    REPO` needs to fetch them (default: the first name of each); `fetch`: the loading library's own download."""

    role: str  # what they are for, e.g. "image encoder"
    repo: str
    needs: tuple[tuple[str, ...], ...]
    args: str = ""
    fetch: Optional[Callable[[], Any]] = field(default=None, compare=False)

    @property
    def command(self) -> str:
        return f"hf download {self.repo} {self.args or ' '.join(names[0] for names in self.needs)}"

    def cached(self) -> bool:
        from huggingface_hub import try_to_load_from_cache

        return all(any(isinstance(try_to_load_from_cache(self.repo, name), str) for name in names)
                   for names in self.needs)


def prior_encoder_weights(repo: str, subfolder: str) -> HubWeights:
    """The image encoder of the Kandinsky 2.2 prior (`image_encoder/` of its repository)."""
    from huggingface_hub import snapshot_download

    files = tuple(f"{subfolder}/{name}" for name in PRIOR_ENCODER_FILES)
    return HubWeights("image encoder", repo, tuple((f,) for f in files),
                      fetch=lambda: snapshot_download(repo, allow_patterns=list(files)))


def open_clip_weights(role: str, name: str, tag: str) -> Optional[HubWeights]:
    """The hub files open_clip loads for pretrained tag `tag` of model `name`, from its pretrained registry
    (`hf_hub: org/repo/` means open_clip's default file name, whose .safetensors twin it prefers); None
    when the tag is fetched from a plain URL (not through the Hugging Face cache) or is unknown."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    pretrained = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained.get("hf_hub"):
        return None
    repo, filename = os.path.split(pretrained["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else str(Path(filename).with_suffix(".safetensors"))
    return HubWeights(role, repo, ((filename, twin),), fetch=lambda: open_clip.download_pretrained(pretrained))


def cache_folder() -> Path:
    """dsl's own cache folder: $DSL_CACHE, else $XDG_CACHE_HOME/dsl, else ~/.cache/dsl. It keeps what is worth
    not recomputing: ImageNet classifiers of text towers, `dsl check` results, decoders' measured memory."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dsl"
    return Path(os.environ.get("DSL_CACHE", default)).expanduser()


def hub_download_command(name: str, tag: Optional[str]) -> Optional[str]:
    """`hf download ...` for an open_clip pretrained tag, if open_clip fetches it from the hub."""
    weights = open_clip_weights("weights", name, tag) if tag and not Path(tag).expanduser().exists() else None
    return weights.command if weights else None


# ---------------------------------------------------------------- damaged weights


# What the libraries raise on a weights file or config that is not what it should be: unreadable or truncated
# (OSError, EOFError, safetensors' SafetensorError, pickle's UnpicklingError: Exception subclasses named below by
# what they derive from), a header, size or key mismatch (ValueError, RuntimeError, KeyError), or a JSON file of
# the wrong shape read as if it were right (TypeError, AttributeError, IndexError).
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, RuntimeError, KeyError, TypeError,
                                                AttributeError, IndexError)


def load_errors() -> tuple[type[BaseException], ...]:
    """`LOAD_ERRORS` with safetensors' and pickle's own errors (imported here only when a model loads)."""
    import pickle

    from safetensors import SafetensorError

    return (*LOAD_ERRORS, SafetensorError, pickle.UnpicklingError)


def reason(err: BaseException) -> str:
    """An exception's message on one line, cut to 200 characters (libraries put newlines and tabs in theirs),
    with its cause's where a library wrapped it (diffusers' "Unable to load weights ..." says not why)."""
    text = " ".join(str(err).split())
    if len(text) > 200:  # cut at a word, and said to be cut
        text = text[:200].rsplit(" ", 1)[0] + " ..."
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause) and " ".join(str(cause).split())[:50] not in text:
        return f"{type(err).__name__}: {text} ({reason(cause)})"
    return f"{type(err).__name__}: {text}"


LAYER_KEY = re.compile(r"^(.*\.(?:layers?|blocks|resblocks))\.(\d+)\.")  # `vision_model.encoder.layers.7.`


def extra_layers(info: dict, model: Any) -> Optional[str]:
    """From transformers' loading report: the weights' tensors of blocks past those config.json builds (a config
    that says fewer layers than the weights hold; the library drops them and only logs it, leaving a model with
    its last blocks cut off), the first three named; None where there are none. A block list is the model's own
    when the model has one at that path (a CLIP checkpoint's text tower is not the vision model's)."""
    own = {m[1] for m in map(LAYER_KEY.match, model.state_dict()) if m}
    extra = sorted(k for k in info.get("unexpected_keys") or [] if (m := LAYER_KEY.match(k)) and m[1] in own)
    if not extra:
        return None
    return ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")


def missing_tensors(info: dict) -> Optional[str]:
    """From a library's loading report (`from_pretrained(..., output_loading_info=True)`, transformers' or
    diffusers'): the tensors the weights lack or hold in another shape than the config builds, the first three
    named; None where the weights are complete. The libraries would leave those random and only log it."""
    missing = sorted(info.get("missing_keys") or []) + [str(item[0]) for item in info.get("mismatched_keys") or []]
    if not missing:
        return None
    return ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")


def fp32_fix(dtype: str) -> str:
    """What to do about an encoder result that is not finite although its weights are sound: fp32 where the
    encoder runs in half precision (which overflows); in fp32 no setting of dsl's helps."""
    if dtype != "fp32":
        return "use encoder.dtype=fp32"
    return "the model overflows on this image even in fp32: leave the image out or use other weights"


def nonfinite_weight(model: Any) -> str | None:
    """The name of a floating-point weight of `model` holding NaN or inf (the first found), else None.

    `model` is an `nn.Module`, a diffusers pipeline, or one of dsl's objects that hold them (a decoder's
    `pipe`, an adapted encoder's `adapter.W`, a feature encoder's `sae.W_dec`). Asked only once a result came
    out not finite: damaged weight files, not a setting, are then the cause, and no setting would help."""
    import torch  # a model is loaded, so torch is in already; this module is also imported by light commands

    return next((name for name, tensor in _named_weights(model, "", set())
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def _named_weights(obj: Any, prefix: str, seen: set[int]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every weight reachable from `obj`: a module's parameters and buffers, a pipeline's
    modules, and the tensors and models that dsl's own objects hold as attributes. Other libraries' objects
    are not entered (a scheduler's tables are not weights)."""
    import torch

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, torch.nn.Module):
        for name, tensor in [*obj.named_parameters(), *obj.named_buffers()]:
            yield prefix + name, tensor
    elif isinstance(getattr(obj, "components", None), dict):  # a diffusers pipeline: unet, movq, ...
        for name, part in obj.components.items():
            if isinstance(part, torch.nn.Module):
                yield from _named_weights(part, f"{prefix}{name}.", seen)
    elif type(obj).__module__.startswith("dsl_cli.") and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            yield from _named_weights(value, f"{prefix}{name}.", seen)


def refuse_damaged_weights(who: str | Callable[[str], str], model: Any, where: str | Callable[[str], str]) -> None:
    """Raise the UserError that names a weight of `model` holding NaN or inf, if one does; `who` names the
    model (the encoder), `where` says what to do about its files (each, or gives that from the weight's name:
    an adapted encoder's damaged weight may be its adapter's)."""
    name = nonfinite_weight(model)
    if name is not None:
        who, advice = (part(name) if callable(part) else part for part in (who, where))
        raise UserError(f"the {who}'s weights hold NaN or inf (e.g. {name}): the weight files are damaged; {advice}")


# ---------------------------------------------------------------- what a model needs


Needs = tuple[list[HubWeights], list[str]]  # hub weights, and problems with local paths (one line each)


def open_clip_needs(role: str, name: str, weights: Optional[str], key: str) -> Needs:
    """open_clip `name` with `weights`: a pretrained tag it fetches from the hub, a local file, or None."""
    if weights is None:
        return [], []
    if Path(weights).expanduser().is_file():
        return [], []
    hub = open_clip_weights(role, name, weights)
    if hub is not None:
        return [hub], []
    import open_clip

    if open_clip.get_pretrained_cfg(name, weights):  # fetched from a plain URL: open_clip caches it itself
        return [], []
    return [], [f"{key}={weights}: neither a file nor a pretrained tag of open_clip's {name} "
                f"(open_clip.list_pretrained() lists them)"]


def combined(parts: list[Needs]) -> Needs:
    """The needs of several models as one: each repository's files once (bigg14's text tower is its image
    encoder: one file for both), in the order first needed, and every problem."""
    unique = {(w.repo, w.needs): w for part in reversed(parts) for w in part[0]}
    return list(reversed(unique.values())), [problem for part in parts for problem in part[1]]


# ---------------------------------------------------------------- the look-up


HUB_PROBE_SECONDS = 5.0  # how long the hub may take to answer before a run that needs a download gives up


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face hub cannot be reached (one HEAD request through huggingface_hub's own session, so
    with its endpoint and proxies, and a short timeout), or None when it answers (any HTTP status). Asked once
    before downloading: unreachable, each library's own download would spend most of a minute retrying."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - whatever stops the request (DNS, refused, timeout, proxy, TLS)
        return " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _fetch(missing: list[HubWeights]) -> list[HubWeights]:
    """Download what is missing, each with its library's own function; return what is still missing."""
    still = []
    for weights in missing:
        log.info("downloading the %s from %s", weights.role, weights.repo)
        try:
            weights.fetch()
        except Exception as err:  # any failure (network, auth, disk) is reported below with its command
            log.warning("could not download the %s from %s: %s", weights.role, weights.repo, err)
        if not weights.cached():
            still.append(weights)
    return still


def _message(missing: list[HubWeights], problems: list[str], why: str) -> str:
    from huggingface_hub import constants

    lines = []
    if missing:
        are = "is" if len(missing) == 1 else "are"
        lines.append(f"{len(missing)} of the weights this run needs {are} not in the Hugging Face cache "
                     f"({constants.HF_HUB_CACHE}) and {why}; fetch them (online) with:")
        lines += [f"  {w.role}: {w.command}" for w in missing]
        lines.append("  or load local copies with encoder.checkpoint=... and decoder.path=... (docs/user-guide.md, "
                     '"Weights: cache, offline, local folders")')
    return "\n".join(lines + problems)


def require(needs: Needs) -> None:
    """Look up every hub weight of `needs` in the cache (fetching the missing ones where downloads are
    allowed); raise one UserError listing all that are still missing (with a command for each) and every
    problem with a local path."""
    hub, problems = needs
    missing = [weights for weights in hub if not weights.cached()]
    why = "HF_HUB_OFFLINE=1 forbids downloading them" if _offline() else None
    if missing and why is None:
        unreachable = hub_unreachable()
        if unreachable is None:
            missing, why = _fetch(missing), "they could not be downloaded"
        else:
            why = (f"the hub ({_endpoint()}) did not answer within {HUB_PROBE_SECONDS:g} s ({unreachable}), so "
                   "nothing was downloaded (offline? set HF_HUB_OFFLINE=1 to skip the attempt)")
    if missing or problems:
        first, *details = _message(missing, problems, why or "").split("\n")
        raise UserError(first, details=details)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
