"""`dsl adapter fit` and `dsl adapter merge` (issue 34): fit a linear adapter from any encoder's readout to a
decoder's embedding space, from a folder of images streamed once (`dsl_cli.adapters` does the math).

Light at import: Hydra, torch and the models are imported when a command runs.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from dsl_cli.config import encoder_folder_name, folder_overrides, split_options
from dsl_cli.errors import Interrupted, UserError, printable
from dsl_cli.libraries import import_frozen

USAGE = """usage: dsl adapter fit [OVERRIDES...]     fit an adapter (the same overrides as `dsl run`, plus adapter.*)
       dsl adapter merge FOLDER            add the shards' partial sums in FOLDER/shards and fit

Fit W, b so that W s + b approximates the decoder's own image embedding t of the same image, where s is the
source encoder's readout, by ridge regression from running sums (one pass over the images, memory that does
not grow with their number). Examples:
  dsl adapter fit encoder=vitl14 decoder=kandinsky22 images.path=~/photos
  dsl adapter fit debug=tiny images.path=~/photos adapter.readout=resid adapter.layer=2 adapter.augment=2
  dsl adapter fit ... images.num_shards=4 images.shard=0   (one shard's sums; then dsl adapter merge FOLDER)
Then decode any lens through it:  dsl run encoder=vitl14 decoder=kandinsky22 adapter=FOLDER lens=steering

adapter.* settings:
  adapter.readout=embed|resid    map the source's image embedding (default) or its residual stream
  adapter.layer=N                with resid: the residual after block N
  adapter.augment=N              N random crops/flips of each training image besides itself (default 0)
  adapter.heldout=F              share of the images held out by name hash, for lambda and metrics (0.1)
  adapter.examples=K             held-out images decoded on the page, target vs adapter (default 4; 0: none;
                                 a sharded fit's page, written by merge, shows the metrics alone)
  adapter.target=PRESET          the encoder config of the target space (default: the decoder family's own,
                                 the tiny encoder for a tiny decoder)
  adapter.out=FOLDER             where it goes (default OUTPUTS_ROOT/adapters/SOURCE-READOUT-to-FAMILY)
  adapter.name=TEXT              its name on the page and in run manifests

Writes FOLDER/adapter.safetensors (W [q,p], b [q], the target's unconditional embedding, metadata inside),
adapter.json (metadata and held-out metrics) and index.html (metrics; decoded examples).
"""


@dataclass
class FitOptions:
    readout: str = "embed"
    layer: Optional[int] = None
    augment: int = 0
    heldout: float = 0.1
    examples: int = 4
    target: Optional[str] = None
    out: Optional[str] = None
    name: Optional[str] = None


def parse_options(args: list[str]) -> tuple[FitOptions, list[str]]:
    """(adapter.* settings, the remaining overrides for the run config)."""
    options, rest = split_options(args, "adapter", FitOptions)
    if options.augment < 0 or options.examples < 0:
        raise UserError("adapter.augment and adapter.examples must be at least 0")
    if not 0 < options.heldout < 1:
        raise UserError(f"adapter.heldout={options.heldout}: must be between 0 and 1 (e.g. 0.1)")
    if "adapter" in {a.partition("=")[0] for a in rest}:
        raise UserError("adapter=PATH decodes a run through an adapter (dsl run); `dsl adapter fit` writes one "
                        "(adapter.out=FOLDER)")
    return options, rest


def compose(overrides: list[str], config_name: str = "run"):
    """The config `dsl run` would compose from these overrides (its schema checks them): one line on error."""
    from dsl_cli.config import compose_run, single_values

    single_values(overrides)  # one fit: Hydra's refusal of a sweep was several lines run together
    return compose_run(overrides, config_name)


# ---------------------------------------------------------------- who the adapter maps from and to


def target_identity(decoder_cfg, space) -> dict:
    return {"family": str(decoder_cfg.family), "decoder_source": str(decoder_cfg.source),
            "space": {"model": space.model, "weights": space.weights, "width": space.width}}


def target_label(target: dict) -> str:
    source = target.get("decoder_source")
    return target["family"] + ("" if source == "pretrained" else f" ({source})")


def target_encoder_cfg(cfg, options: FitOptions):
    """The encoder config of the decoder's own embedding space: adapter.target, else the family's preset
    (the tiny encoder for a tiny decoder, as `check_pairing` asks)."""
    from dsl_cli.decoder import get_family

    own = "tiny" if cfg.decoder.source == "tiny" else get_family(cfg.decoder.family).encoder_preset
    preset = options.target or own
    try:
        return compose([f"encoder={preset}"]).encoder
    except UserError as err:  # the option is adapter.target's here, not encoder='s
        raise UserError(str(err).replace(f"encoder={preset}:", f"adapter.target={preset}:", 1)
                        .replace("did you mean encoder=", "did you mean adapter.target=")) from None


def default_out(cfg, options: FitOptions) -> Path:
    read = "embed" if options.readout == "embed" else f"resid{options.layer}"
    family = cfg.decoder.family + ("" if cfg.decoder.source == "pretrained" else f"_{cfg.decoder.source}")
    name = f"{encoder_folder_name(cfg.encoder)}-{read}-to-{family}"
    return Path(str(cfg.outputs_root)) / "adapters" / name


def preflight_fit(cfg, target_cfg, decodes: bool) -> None:
    """Every weight the fit loads, looked up before any model is built (as `dsl run`'s preflight): the source
    encoder, the target encoder and, when examples are decoded, the decoder. One UserError lists what is
    missing."""
    from dsl_cli.decoder import get_family
    from dsl_cli.encoder import loading
    from dsl_cli.weights import combined, require

    parts = [loading.needs(cfg.encoder), loading.needs(target_cfg)]
    if decodes:
        parts.append(get_family(cfg.decoder.family).needs(cfg.decoder))
    require(combined(parts))


# ---------------------------------------------------------------- the commands


def fit_command(args: list[str]) -> int:
    options, overrides = parse_options(folder_overrides(args))
    cfg = compose(overrides)
    import_frozen("dsl_cli.encoder")  # the model libraries, as `dsl run` imports them (dsl_cli.libraries)
    from dsl_cli.adapters import Readout
    from dsl_cli.decoder import check_pairing
    from dsl_cli.encoder import embedding_space
    from dsl_cli.images import load_images

    readout = Readout(options.readout, options.layer)
    target_cfg = target_encoder_cfg(cfg, options)
    space = embedding_space(target_cfg)
    check_pairing(space, cfg.decoder, "adapter.target")  # the target space is one this decoder decodes
    image_set = load_images(cfg.images)
    decodes = bool(options.examples and cfg.decode.enabled and cfg.images.num_shards == 1)
    preflight_fit(cfg, target_cfg, decodes)  # before the claim: a refusal leaves no folder marked `started`
    check_before_claim(cfg, options, readout, image_set)
    out = claim_out(Path(options.out).expanduser() if options.out else default_out(cfg, options),
                    sharded=cfg.images.num_shards > 1)
    with dropped_if_refused(out):
        return fit_into(out, cfg, options, readout, target_cfg, space, image_set, decodes)


def check_before_claim(cfg, options: FitOptions, readout, image_set) -> None:
    """What the config and the images' names refuse, checked before the folder is claimed so that a refusal
    leaves none: a block past the encoder's (where its config tells how many it has), and fewer than 2
    training rows (a sharded fit's are counted when its shards merge)."""
    from dsl_cli.adapters import check_training_rows, training_rows
    from dsl_cli.encoder import model_shape

    shape = model_shape(cfg.encoder)
    if shape is not None:
        readout.check_blocks(shape[0])
    if cfg.images.num_shards == 1:
        check_training_rows(training_rows([item.name for item in image_set.images], options.augment,
                                          options.heldout))


@contextmanager
def dropped_if_refused(out: Path) -> Iterator[None]:
    """A fit refused or stopped before it wrote anything (a check that needs the loaded model, images that
    fail to read) leaves no folder, as a run that fails before its first result leaves none: the claim's
    manifest and lock go, and the folder where the claim made it (`job.drop_bookkeeping`: dsl's files only; a
    folder of finished shards, or one the user made, stays). Called while the folder is held, as it must be."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        from dsl_cli.job import drop_bookkeeping
        from dsl_cli.outputs import RunFolder

        drop_bookkeeping(RunFolder(out))
        raise


def fit_into(out: Path, cfg, options: FitOptions, readout, target_cfg, space, image_set, decodes: bool) -> int:
    """The fit, once its folder `out` is claimed: both encoders over the images, then the adapter and its
    page (or, for a shard, its partial sums)."""
    import torch
    from tqdm.auto import tqdm

    from dsl_cli.adapters import Partial, accumulate, fit
    from dsl_cli.devices import resolve_device, resolve_dtype
    from dsl_cli.encoder import load_encoder

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.encoder.dtype, device)
    source, source_pre = load_encoder(cfg.encoder, device=device, dtype=dtype)
    readout.check(source)
    target, target_pre = load_encoder(target_cfg, device=device, dtype=dtype)
    meta = fit_meta(cfg, options, readout, source, target, target_cfg, space)
    partial = Partial.empty(meta["p"], meta["q"], meta)
    items = ((item.name, picture) for item, picture in image_set.stream(image_set.images))
    with torch.inference_mode():
        accumulate(partial, tqdm(items, total=len(image_set.images), desc="adapter", unit="img"), source, source_pre,
                   target, target_pre, readout, options.augment, cfg.encoder.batch_size, options.heldout)
    negative = target.zero_embed().float().cpu().reshape(-1)  # the decoders' unconditional embedding
    if cfg.images.num_shards > 1:
        path = partial.save(out / "shards" / f"shard-{cfg.images.shard}-of-{cfg.images.num_shards}.safetensors")
        torch.save(negative, out / "shards" / "negative.pt")
        print(printable(f"partial sums of {partial.images} images: {path}"))  # paths the user named: escaped
        print(printable(f"when every shard is done: dsl adapter merge {out}"))
        return 0
    adapter = fit(partial)
    adapter.negative = negative
    adapter.meta["name"] = options.name or out.name
    adapter.save(out)
    if decodes:
        decode_examples(cfg, out, adapter, partial, image_set, options.examples, target, device)
    finish(out, adapter)
    return 0


def claim_out(out: Path, sharded: bool = False, merging: bool = False) -> Path:
    """Claim the adapter's folder as `dsl run` claims a run's (`RunFolder.claim`; released when the command
    ends): one writer at a time, no planted link, never a folder of the user's. A fit refuses a folder that
    holds a finished adapter; a shard's fit and the merge add to a folder of this adapter's shards."""
    from dsl_cli.outputs import RunFolder, read_manifest

    adds = sharded or merging
    ours = adds and out.is_dir() and (read_manifest(out) or {}).get("kind") == "adapter"
    if merging and not ours:
        raise UserError(f"{out}: not the folder of a sharded `dsl adapter fit` (give its adapter.out)")
    if sharded and ours and (read_manifest(out) or {}).get("status") == "complete":  # merged: a shard more changed it
        raise UserError(f"{out}: holds a finished adapter, merged from its shards; choose another adapter.out")
    RunFolder(out).claim(resume=ours, kind="adapter")
    return out


def fit_meta(cfg, options: FitOptions, readout, source, target, target_cfg, space) -> dict:
    """Who the adapter maps from and to: the source encoder (config and shape) and readout, the target
    decoder and its embedding space, the settings every shard must share."""
    from dsl_cli.adapters import encoder_identity
    from dsl_cli.config import encoder_text

    source_ident, target_ident = encoder_identity(cfg.encoder), target_identity(cfg.decoder, space)
    return {
        "source": source_ident, "source_label": encoder_text(source_ident),
        "source_shape": {"n_layers": source.n_layers, "d_model": source.d_model, "d_embed": source.d_embed,
                         "readout_kind": getattr(source, "readout_kind", "cls")},
        "readout": {"kind": readout.kind, "layer": readout.layer},
        "target": target_ident, "target_label": target_label(target_ident),
        "target_encoder": encoder_identity(target_cfg),
        "augment": options.augment, "heldout_fraction": options.heldout,
        "image_set": image_set_meta(cfg.images),
        "p": readout.width(source), "q": target.d_embed,
    }


def image_set_meta(images_cfg) -> dict:
    """The image settings a fit records, as JSON values: an unset one is null (`str()` of each wrote "None",
    and the names list as Python's repr)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(images_cfg, enum_to_str=True)
    return {k: plain.get(k) for k in ("source", "path", "names", "limit", "num_shards")}


def merge_command(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):  # the whole help, on standard output, said nothing was wrong
        raise UserError("usage: dsl adapter merge FOLDER (the adapter.out of the shards' `dsl adapter fit`)")
    import torch

    from dsl_cli.adapters import Partial, fit

    out = claim_out(Path(args[0]).expanduser(), merging=True)
    files = sorted((out / "shards").glob("shard-*-of-*.safetensors"))
    if not files:
        raise UserError(f"{out}/shards: no partial sums (shard-K-of-N.safetensors from `dsl adapter fit "
                        "images.num_shards=N images.shard=K`)")
    counts = {int(m.group(2)) for m in (re.search(r"shard-(\d+)-of-(\d+)", f.name) for f in files)}
    if len(counts) != 1:
        raise UserError(f"{out}/shards: partial sums of different shardings ({sorted(counts)} shards): keep one")
    count = counts.pop()
    have = {int(re.search(r"shard-(\d+)-of-", f.name).group(1)) for f in files}
    missing = sorted(set(range(count)) - have)
    if missing:
        raise UserError(f"{out}/shards: shard(s) {', '.join(map(str, missing))} of {count} not there yet")
    merged = Partial.load(files[0])
    for path in files[1:]:
        merged = merged.merged(Partial.load(path))
    adapter = fit(merged)
    negative = out / "shards" / "negative.pt"
    if negative.is_file():
        try:  # tensors only, never pickled code
            adapter.negative = torch.load(negative, weights_only=True)
            if not isinstance(adapter.negative, torch.Tensor):
                raise TypeError("not a tensor")
        except Exception as err:  # noqa: BLE001 - anything but the tensor a shard's fit wrote
            raise UserError(f"{negative}: not the unconditional embedding a shard's fit writes "
                            f"({type(err).__name__}); fit a shard again to write it") from None
    adapter.meta["name"] = adapter.meta.get("name") or out.name
    adapter.save(out)
    finish(out, adapter)
    return 0


def finish(out: Path, adapter) -> None:
    from dsl_cli.adapter_page import write_adapter_page
    from dsl_cli.outputs import Manifest, RunFolder

    page = write_adapter_page(out)
    Manifest(RunFolder(out).manifest_json).complete()
    m = adapter.meta.get("metrics") or {}
    if m.get("heldout_images"):
        print(printable(f"{adapter.describe()}; R^2 {m['r2']:.3f}, cosine p5 {m['cosine_p5']:.3f}, top-1 "
                        f"{m['top1']:.2f}, top-5 {m['top5']:.2f} over {m['heldout_images']} held-out images"))
    else:
        print(printable(f"{adapter.describe()}; no held-out image, so no metrics and a ridge strength not "
                        "validated: give more images (about a tenth are held out, by name) or a larger "
                        "adapter.heldout"))
    print(printable(f"adapter: {out / 'adapter.safetensors'} (page: {page})"))  # a folder named with an escape


def decode_examples(cfg, out: Path, adapter, partial, image_set, count: int, target, device) -> None:
    """Decode the first `count` held-out images (by name) twice, with one seed: from the target encoder's own
    embedding and through the adapter; the pictures and examples.json for the page."""
    import json

    import torch
    from PIL import Image, ImageOps

    from dsl_cli.decoder import CPU_BATCH, load_decoder, to_pil
    from dsl_cli.devices import resolve_dtype

    order = sorted(range(len(partial.heldout_names)), key=lambda i: partial.heldout_names[i])[:count]
    if not order:
        return
    names = [partial.heldout_names[i] for i in order]
    s = torch.stack([partial.heldout_s[i] for i in order]).float()
    t = torch.stack([partial.heldout_t[i] for i in order]).float()
    mapped = adapter(s)
    decoder = load_decoder(cfg.decoder, device=device, dtype=resolve_dtype(cfg.decode.dtype, device),
                           scheduler=cfg.decode.scheduler)
    negative = decoder.negative_embed(target).float().cpu()
    batch = cfg.decode.batch_size if isinstance(cfg.decode.batch_size, int) else CPU_BATCH
    pictures = decoder.decode(torch.cat([t, mapped]), negative, [cfg.seed] * (2 * len(names)), cfg.decode.height,
                              cfg.decode.width, steps=cfg.decode.steps, guidance=float(cfg.decode.guidance),
                              batch_size=batch)
    folder = out / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    items = {item.name: item for item in image_set.images}
    cos = torch.nn.functional.cosine_similarity(mapped, t, dim=-1).tolist()
    examples = []
    for i, (name, stem) in enumerate(zip(names, example_stems(names))):
        picture = ImageOps.fit(items[name].load(), (cfg.decode.width, cfg.decode.height), Image.Resampling.BICUBIC)
        picture.save(folder / f"{stem}.input.png")
        to_pil(pictures[i]).save(folder / f"{stem}.target.png")
        to_pil(pictures[len(names) + i]).save(folder / f"{stem}.adapter.png")
        examples.append({"name": name, "input": f"examples/{stem}.input.png", "target": f"examples/{stem}.target.png",
                         "adapted": f"examples/{stem}.adapter.png", "cosine": cos[i]})
    (out / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


def example_stems(names: list[str]) -> list[str]:
    """A file name stem per held-out image, distinct: the name where it is safe in a file name and unique also
    ignoring case (as a file system may), else the name with other characters than letters, digits, `.`, `_`
    and `-` made `_` and a hash of the name (`a b` and `a_b` each overwrote the other's pictures)."""
    folded = Counter(name.casefold() for name in names)
    stems = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        unique = stem == name and folded[name.casefold()] == 1 and not name.startswith(".") and name != ""
        stems.append(name if unique else f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}")
    return stems


def main(args: list[str]) -> int:
    from dsl_cli.errors import report

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if args[0] == "fit":
            if args[1:] in (["-h"], ["--help"]):
                print(USAGE)
                return 0
            return fit_command(args[1:])
        if args[0] == "merge":
            return merge_command(args[1:])
    except UserError as err:
        report(err)
        return 2
    except Interrupted as err:  # no run to resume: a fit reads every image again
        err.advice = "the same command starts it again (a sharded fit's finished shards are kept)"
        raise
    report(f"dsl adapter {args[0]}: unknown; use `dsl adapter fit ...` or `dsl adapter merge FOLDER`")
    return 2
