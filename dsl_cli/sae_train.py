"""`dsl sae train`: a TopK sparse autoencoder trained on the residuals of one layer (every token of every
image, streamed batch by batch), written in the SAELens layout that `sae.path=FOLDER` reads (dsl_cli.sae).

Light at import: Hydra, torch and the models are imported when the command runs.

Deterministic and resumable: step s reads the images of batch s % steps_per_epoch of epoch s // steps_per_epoch
in an order drawn from (train.seed, epoch), so a run stopped after any step (SIGTERM, SIGINT: the step in hand
finishes, a checkpoint is written, exit 143/130) and started again with the same command continues from
its checkpoint and ends with the same weights as a run never stopped.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dsl_cli.errors import Interrupted, UserError

USAGE = """usage: dsl sae train [OVERRIDES...]   (the same overrides as `dsl run`, plus train.*)

Train a TopK SAE on every token's residual at one hook point, from a folder of images streamed each epoch:
  dsl sae train encoder=vitl14 layer=12 images.path=~/photos train.d_sae=16384 train.k=32
  dsl sae train debug=tiny layer=1 images.path=~/photos
Then read its features:  dsl run ... sae.path=FOLDER

  layer=N                    the block (its hook_resid_post, unless train.point says otherwise)
train.* settings:
  train.point=NAME           hook_resid_post (default), hook_resid_pre, hook_resid_mid, hook_mlp_out, hook_attn_out
  train.d_sae=N              features (default 8 x the residual width)
  train.k=N                  active features per token (default 16)
  train.lr=F                 Adam's learning rate (default 1e-3)
  train.epochs=N             passes over the images (default 10)
  train.batch_size=N         images per step (default encoder.batch_size)
  train.checkpoint_every=N   steps between checkpoints (default 50; one is also written when stopped)
  train.seed=N               initial weights and image order (default 0)
  train.out=FOLDER           where it goes (default OUTPUTS_ROOT/saes/ENCODER-LAYER-POINT)

Writes FOLDER/cfg.json and sae_weights.safetensors (SAELens), training.json (explained variance, dead
features, steps) and checkpoint.pt while it trains (removed at the end)."""

CHECKPOINT, METRICS = "checkpoint.pt", "training.json"


@dataclass
class TrainOptions:
    point: str = "hook_resid_post"
    d_sae: Optional[int] = None
    k: int = 16
    lr: float = 1e-3
    epochs: int = 10
    batch_size: Optional[int] = None
    checkpoint_every: int = 50
    seed: int = 0
    out: Optional[str] = None


_INTS, _FLOATS = {"d_sae", "k", "epochs", "batch_size", "checkpoint_every", "seed"}, {"lr"}


def parse_options(args: list[str]) -> tuple[TrainOptions, list[str]]:
    """(train.* settings, the remaining overrides for the run config)."""
    options, rest = TrainOptions(), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not key.startswith("train."):
            rest.append(arg)
            continue
        name = key[len("train."):]
        if not sep or name not in TrainOptions.__dataclass_fields__:
            raise UserError(f"{arg}: no such setting; train.* settings are "
                            + ", ".join(f"train.{k}" for k in TrainOptions.__dataclass_fields__))
        try:
            parsed = None if value in ("null", "None") else int(value) if name in _INTS else \
                float(value) if name in _FLOATS else value
        except ValueError:
            raise UserError(f"{arg}: train.{name} takes a number") from None
        setattr(options, name, parsed)
    for name in ("k", "epochs", "checkpoint_every"):
        if getattr(options, name) < 1:
            raise UserError(f"train.{name}={getattr(options, name)}: must be at least 1")
    if options.lr <= 0 or not math.isfinite(options.lr):
        raise UserError(f"train.lr={options.lr}: must be a positive number")
    return options, rest


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dsl_cli.config import _one_line, register_configs

    register_configs()
    try:
        with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
            return compose(config_name="run", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from None


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] != "train":
        raise UserError(f"dsl sae {args[0]}: unknown; use `dsl sae train [OVERRIDES...]` (dsl sae --help)")
    from dsl_cli.config import path_override

    options, overrides = parse_options([path_override(a) for a in args[1:]])
    if any(a.partition("=")[0] == "images.path" for a in overrides) and not any(
            a.partition("=")[0] == "images" for a in overrides):
        overrides = ["images=folder", *overrides]
    cfg = _compose(overrides)
    out = train(cfg, options)
    print(f"SAE written to {out} (dsl run ... sae.path={out})")
    return 0


# ---------------------------------------------------------------- training


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def train(cfg, options: TrainOptions) -> Path:
    """Train (or continue training) and write the SAE; returns its folder."""
    import torch
    from tqdm.auto import tqdm

    from dsl_cli.devices import resolve_device
    from dsl_cli.encoder import load_encoder
    from dsl_cli.images import load_images
    from dsl_cli.outputs import atomic_write_bytes
    from dsl_cli.sae import SAE_POINTS, Sae, save_sae

    if options.point not in SAE_POINTS:
        raise UserError(f"train.point={options.point}: use one of {', '.join(SAE_POINTS)}")
    if not isinstance(cfg.layer, int):
        raise UserError(f"layer={cfg.layer}: `dsl sae train` trains at one layer (an int)")
    device = resolve_device(cfg.device)
    encoder, preprocess = load_encoder(cfg.encoder, device=device, dtype=torch.float32)
    layer = cfg.layer + encoder.n_layers if cfg.layer < 0 else cfg.layer
    if not 0 <= layer < encoder.n_layers:
        raise UserError(f"layer={cfg.layer}: this encoder's layers run from 0 to {encoder.n_layers - 1}")
    hook = f"blocks.{layer}.{options.point}"
    name = cfg.encoder.name if cfg.encoder.source != "tiny" else "tiny"
    out = Path(options.out).expanduser() if options.out else \
        Path(str(cfg.outputs_root)) / "saes" / _slug(f"{name}-L{layer}-{options.point}")
    images = load_images(cfg.images).images
    d_in = encoder.d_model
    d_sae = options.d_sae or 8 * d_in
    if not 1 <= options.k <= d_sae:
        raise UserError(f"train.k={options.k}: must be between 1 and train.d_sae={d_sae}")
    batch = options.batch_size or cfg.encoder.batch_size
    per_epoch = math.ceil(len(images) / batch)
    total = per_epoch * options.epochs
    identity = {"hook_name": hook, "d_in": d_in, "d_sae": d_sae, "encoder": str(cfg.encoder.get("name")),
                "source": str(cfg.encoder.source), "images": [i.name for i in images], **asdict(options)}
    identity.pop("out"), identity.pop("checkpoint_every")

    gen = torch.Generator().manual_seed(options.seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec, "b_dec": torch.zeros(d_in)}
    params = {k: v.to(device).requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=options.lr)
    last_fired = torch.full((d_sae,), -1, dtype=torch.long)
    start, history = 0, []
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved["identity"] != identity:
            raise UserError(f"{checkpoint}: a checkpoint of another training (other settings or images); "
                            "give another train.out, or delete it")
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved["params"][k])
        optimizer.load_state_dict(saved["optimizer"])
        last_fired, start, history = saved["last_fired"], saved["step"], saved["history"]

    def save_checkpoint(step: int) -> None:
        import io

        buffer = io.BytesIO()
        torch.save({"identity": identity, "params": {k: v.detach().cpu() for k, v in params.items()},
                    "optimizer": optimizer.state_dict(), "last_fired": last_fired, "step": step,
                    "history": history}, buffer)
        atomic_write_bytes(checkpoint, buffer.getvalue())

    def residuals(items) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}
        pixels = torch.stack([preprocess(picture) for _, picture in _stream(cfg, items)])
        encoder.run_with_hooks(pixels, {hook: lambda x, h: got.__setitem__("x", x.float())})
        return got["x"].reshape(-1, d_in).clone()

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        top = pre.topk(options.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    stop: dict[str, int] = {}
    previous = {s: signal.signal(s, lambda signum, frame: stop.setdefault("signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tqdm(total=total, initial=start, desc="sae train", unit="step") as bar:
            for step in range(start, total):
                epoch, index = divmod(step, per_epoch)
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(options.seed * 100003 + epoch))
                picked = [images[int(i)] for i in order[index * batch:(index + 1) * batch]]
                with torch.inference_mode():
                    x = residuals(picked)
                x = x.clone()  # out of inference mode, for autograd
                if step == 0:
                    with torch.no_grad():
                        params["b_dec"].copy_(x.mean(0))
                f = encode(x)
                x_hat = f @ params["W_dec"] + params["b_dec"]
                loss = (x_hat - x).pow(2).sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
                last_fired[(f.detach() > 0).any(0).cpu()] = step
                variance = (x - x.mean(0)).pow(2).sum()
                explained = 1 - (x - x_hat.detach()).pow(2).sum().item() / max(variance.item(), 1e-12)
                dead = int((last_fired < step - per_epoch + 1).sum()) if step + 1 >= per_epoch else 0
                history.append({"step": step + 1, "loss": loss.item(), "explained_variance": explained, "dead": dead})
                bar.set_postfix(loss=f"{loss.item():.4g}", ev=f"{explained:.3f}", dead=dead)
                bar.update(1)
                _after_step(step + 1)
                if (step + 1) % options.checkpoint_every == 0 or "signal" in stop:
                    save_checkpoint(step + 1)
                if "signal" in stop:
                    raise Interrupted(stop["signal"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    with torch.no_grad():  # the whole set, once more, for the final figures
        xs = []
        for begin in range(0, len(images), batch):
            with torch.inference_mode():
                x = residuals(images[begin:begin + batch])
            xs.append(x)
        x = torch.cat(xs)
        x_hat = encode(x) @ params["W_dec"] + params["b_dec"]
        total_err, total_var = (x - x_hat).pow(2).sum().item(), (x - x.mean(0)).pow(2).sum().item()
        fired = (encode(x) > 0).any(0)
    sae = Sae(W_enc=params["W_enc"].detach().cpu(), b_enc=params["b_enc"].detach().cpu(),
              W_dec=params["W_dec"].detach().cpu(), b_dec=params["b_dec"].detach().cpu(), hook_name=hook,
              architecture="topk", k=options.k, apply_b_dec_to_input=True, source=str(out))
    save_sae(sae, out, {"model_name": identity["encoder"], "dataset_path": str(cfg.images.get("path")),
                        "trained_by": "dsl sae train"})
    metrics = {"explained_variance": 1 - total_err / max(total_var, 1e-12), "dead_features": int((~fired).sum()),
               "d_sae": d_sae, "k": options.k, "steps": total, "images": len(images), "tokens": int(x.shape[0]),
               "hook_name": hook, "history": history}
    atomic_write_bytes(out / METRICS, json.dumps(metrics, indent=1).encode())
    checkpoint.unlink(missing_ok=True)
    return out


def _stream(cfg, items):
    """(item, RGB picture) of each image, one at a time."""
    return ((item, item.load()) for item in items)


def _after_step(step: int) -> None:
    """Called after every step (tests plant a signal here)."""
