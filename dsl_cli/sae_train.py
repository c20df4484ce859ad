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
from typing import Any, Optional

from dsl_cli.config import encoder_folder_name, encoder_text, split_options
from dsl_cli.errors import Interrupted, UserError, stop_handler
from dsl_cli.libraries import import_frozen

USAGE = """usage: dsl sae train [OVERRIDES...]   (the same overrides as `dsl run`, plus train.*)

Train a TopK SAE on every token's residual at one hook point, from a folder of images streamed each epoch:
  dsl sae train encoder=vitl14 layer=12 images.path=~/photos train.d_sae=16384 train.k=32
  dsl sae train debug=tiny layer=1 images.path=~/photos
Then read its features:  dsl run ... sae.path=FOLDER

  layer=N                    the block, required (its hook_resid_post, unless train.point says otherwise)
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


def parse_options(args: list[str]) -> tuple[TrainOptions, list[str]]:
    """(train.* settings, the remaining overrides for the run config)."""
    options, rest = split_options(args, "train", TrainOptions)
    for name in ("k", "epochs", "checkpoint_every", "d_sae", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"train.{name}={value}: must be at least 1")
    if not 0 <= options.seed < 2**32:
        raise UserError(f"train.seed={options.seed}: must be between 0 and {2**32 - 1}")
    if options.lr <= 0 or not math.isfinite(options.lr):
        raise UserError(f"train.lr={options.lr}: must be a positive number")
    return options, rest


def require_layer(overrides: list[str]) -> None:
    """An SAE is trained at one block, which the researcher chooses: the run config's `layer` (30, `dsl run`'s
    default) would choose it for them, or refuse a smaller encoder for a layer that nobody gave."""
    if not any(o.partition("=")[0].lstrip("+") == "layer" for o in overrides):
        raise UserError("dsl sae train: give the block to train at, layer=N (0 is the first; its hook_resid_post, "
                        "unless train.point says otherwise)")


def main(args: list[str]) -> int:
    # help asked for anywhere (`dsl sae train --help`) is given before the overrides' checks (layer=N required)
    if not args or args[0] == "help" or {"-h", "--help"} & set(args):
        print(USAGE)
        return 0
    if args[0] != "train":
        raise UserError(f"dsl sae {args[0]}: unknown; use `dsl sae train [OVERRIDES...]` (dsl sae --help)")
    from dsl_cli.config import compose_run, folder_overrides, single_values

    options, overrides = parse_options(folder_overrides(args[1:]))
    require_layer(overrides)
    single_values(overrides)  # one SAE per command: `layer=1,2` was Hydra's several-line refusal, status 1
    cfg = compose_run(overrides)
    out = train(cfg, options)
    print(f"SAE written to {out} (dsl run ... sae.path={out})")
    return 0


# ---------------------------------------------------------------- training


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


@dataclass
class Setup:
    """What a training reads: the encoder, the images, the hook point and the sizes."""

    cfg: Any
    options: TrainOptions
    encoder: Any
    preprocess: Any
    images: list
    hook: str
    out: Path
    d_in: int
    d_sae: int
    batch: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.images) / self.batch)

    @property
    def total(self) -> int:
        return self.per_epoch * self.options.epochs

    def identity(self) -> dict:
        """What a checkpoint must match to be continued (not where it goes or how often it is written)."""
        # the encoder whole: its name alone is `hf` for every transformers model, and says nothing of the weights
        encoder = {key: str(self.cfg.encoder.get(key)) for key in ENCODER_IDENTITY}
        ident = {"hook_name": self.hook, "d_in": self.d_in, "d_sae": self.d_sae, "source": encoder.pop("source"),
                 "encoder": encoder.pop("name"), **encoder, "images": [i.name for i in self.images],
                 **asdict(self.options)}
        ident.pop("out"), ident.pop("checkpoint_every")
        return ident


ENCODER_IDENTITY = ("source", "name", "pretrained", "checkpoint", "repo_id", "subfolder")  # which weights, whence


def setup(cfg, options: TrainOptions) -> Setup:
    import_frozen("dsl_cli.encoder")  # the model libraries, as `dsl run` imports them (dsl_cli.libraries)
    import torch

    from dsl_cli.devices import resolve_device
    from dsl_cli.encoder import load_encoder, loading
    from dsl_cli.images import load_images
    from dsl_cli.weights import require
    from dsl_cli.sae import SAE_POINTS

    if options.point not in SAE_POINTS:
        raise UserError(f"train.point={options.point}: use one of {', '.join(SAE_POINTS)}")
    if not isinstance(cfg.layer, int):
        raise UserError(f"layer={cfg.layer}: `dsl sae train` trains at one layer (an int)")
    check_readout(known_readout(cfg.encoder), cfg.encoder)
    # the weights looked up first, as `dsl run` does: open_clip's own loader retried the hub for most of a minute
    require(loading.needs(cfg.encoder))
    encoder, preprocess = load_encoder(cfg.encoder, device=resolve_device(cfg.device), dtype=torch.float32)
    check_readout(getattr(encoder, "readout_kind", "cls"), cfg.encoder)  # an open_clip ViT reads CLS
    layer = cfg.layer + encoder.n_layers if cfg.layer < 0 else cfg.layer
    if not 0 <= layer < encoder.n_layers:
        raise UserError(f"layer={cfg.layer}: this encoder's layers run from 0 to {encoder.n_layers - 1}")
    name = encoder_folder_name(cfg.encoder)
    out = Path(options.out).expanduser() if options.out else \
        Path(str(cfg.outputs_root)) / "saes" / _slug(f"{name}-L{layer}-{options.point}")
    d_sae = options.d_sae or 8 * encoder.d_model
    if not 1 <= options.k <= d_sae:
        raise UserError(f"train.k={options.k}: must be between 1 and train.d_sae={d_sae}")
    _check_room(d_sae, encoder.d_model, encoder.device)
    return Setup(cfg, options, encoder, preprocess, load_images(cfg.images).images, f"blocks.{layer}.{options.point}",
                 out, encoder.d_model, d_sae, options.batch_size or cfg.encoder.batch_size)


def known_readout(encoder_cfg) -> Optional[str]:
    """The readout (cls, mean, map) of the encoder a config builds where the config alone tells it (the tiny
    timm ViT's pooling); None elsewhere: the loaded encoder says."""
    if str(encoder_cfg.source) == "timm" and str(encoder_cfg.name) == "tiny":
        from dsl_cli.encoder.vit_loading import TINY_TIMM

        return {"token": "cls", "avg": "mean"}.get(TINY_TIMM["global_pool"], "map")
    return None


def check_readout(readout: Optional[str], encoder_cfg) -> None:
    """`dsl run sae=` reads features at the CLS position only (a pooled readout mixes every token, and the SAE
    is not linear): an SAE of a pooling encoder would train for nothing, so it is refused before it starts."""
    if readout not in (None, "cls"):
        pooled = {"map": "attention"}.get(readout, readout)
        raise UserError(f"dsl sae train: {encoder_text(encoder_cfg)} reads its embedding by {pooled} pooling, and "
                        "`dsl run sae=` reads the features of a CLS readout only: train on a ViT that reads its CLS "
                        "token (encoder=tiny, vitl14, or encoder=hf with a CLIP or DINOv2 repo_id)")


def _check_room(d_sae: int, d_in: int, device) -> None:
    """Refuse a width whose training state cannot fit: W_enc and W_dec in float32, each with its gradient and
    Adam's two moments (the activations of a batch come on top)."""
    from dsl_cli.memory import GB, free_bytes, host_available

    need = 2 * 4 * 4 * d_sae * d_in
    room = free_bytes(device) if device.type == "cuda" else host_available()
    if room is not None and need > room:
        raise UserError(f"train.d_sae={d_sae}: the training's weights, gradients and Adam state need "
                        f"{need / GB:.1f} GB, and {room / GB:.1f} GB are free: choose a smaller train.d_sae")


class Trainer:
    """The SAE's parameters, Adam's state, when each feature last fired, and the loss history; one `step`
    at a time, a checkpoint at any step boundary."""

    def __init__(self, s: Setup):
        import torch

        self.s, self.torch = s, torch
        gen = torch.Generator().manual_seed(s.options.seed)
        W_dec = torch.randn(s.d_sae, s.d_in, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        device = s.encoder.device
        params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(s.d_sae), "W_dec": W_dec,
                  "b_dec": torch.zeros(s.d_in)}
        self.params = {k: v.to(device).requires_grad_(True) for k, v in params.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=s.options.lr)
        self.last_fired = torch.full((s.d_sae,), -1, dtype=torch.long)
        self.start, self.history = 0, []
        self.checkpoint = s.out / CHECKPOINT

    def load(self) -> None:
        """Continue from the checkpoint in the output folder, if there is one of this training."""
        if not self.checkpoint.is_file():
            return
        import pickle
        import warnings

        try:  # tensors and plain values only: a planted file's pickled code never runs
            with warnings.catch_warnings():  # torch's about a file not its own (pickle protocol 4): refused below
                warnings.simplefilter("ignore")
                saved = self.torch.load(self.checkpoint, map_location=self.s.encoder.device, weights_only=True)
            if not isinstance(saved, dict) or not {"identity", "params", "optimizer", "step"} <= saved.keys():
                raise ValueError("not the training's state")
        except Exception as err:  # noqa: BLE001 - whatever the file holds that is not the training's state
            reason = ("it holds objects other than tensors and plain values" if isinstance(err, pickle.UnpicklingError)
                      else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise UserError(f"{self.checkpoint}: not a checkpoint of `dsl sae train` ({reason[:200]}); delete it "
                            "to train from the start") from None
        if saved["identity"] != self.s.identity():
            raise UserError(f"{self.checkpoint}: a checkpoint of another training (other settings or images); "
                            "give another train.out, or delete it")
        with self.torch.no_grad():
            for k, v in self.params.items():
                v.copy_(saved["params"][k])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.last_fired, self.start, self.history = saved["last_fired"], saved["step"], saved["history"]

    def save(self, step: int) -> None:
        import io

        from dsl_cli.outputs import atomic_write_bytes

        buffer = io.BytesIO()
        self.torch.save({"identity": self.s.identity(), "params": {k: v.detach().cpu() for k, v in self.params.items()},
                         "optimizer": self.optimizer.state_dict(), "last_fired": self.last_fired, "step": step,
                         "history": self.history}, buffer)
        atomic_write_bytes(self.checkpoint, buffer.getvalue())

    def residuals(self, items) -> Any:
        """Every token's activation at the hook point: [images x tokens, d_in] (float32)."""
        got: dict[str, Any] = {}
        pixels = self.torch.stack([self.s.preprocess(picture) for _, picture in _stream(self.s.cfg, items)])
        with self.torch.inference_mode():
            self.s.encoder.run_with_hooks(pixels, {self.s.hook: lambda x, h: got.__setitem__("x", x.float())})
        return got["x"].reshape(-1, self.s.d_in).clone()

    def encode(self, x):
        p = self.params
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        top = pre.topk(self.s.options.k, dim=-1)
        return self.torch.zeros_like(pre).scatter(-1, top.indices, self.torch.relu(top.values))

    def batch_of(self, step: int) -> list:
        """The images of step `step`: its epoch's seeded order, its slice of it."""
        epoch, index = divmod(step, self.s.per_epoch)
        gen = self.torch.Generator().manual_seed(self.s.options.seed * 100003 + epoch)
        order = self.torch.randperm(len(self.s.images), generator=gen)
        return [self.s.images[int(i)] for i in order[index * self.s.batch:(index + 1) * self.s.batch]]

    def step(self, step: int) -> dict:
        """One Adam step on one batch's tokens (decoder rows back to unit norm after it); its figures."""
        torch, p = self.torch, self.params
        x = self.residuals(self.batch_of(step))
        if step == 0:
            with torch.no_grad():
                p["b_dec"].copy_(x.mean(0))
        f = self.encode(x)
        x_hat = f @ p["W_dec"] + p["b_dec"]
        loss = (x_hat - x).pow(2).sum(-1).mean()
        if not math.isfinite(loss.item()):  # every later step would be NaN too, and the SAE written all NaN
            raise UserError(f"dsl sae train: the loss of step {step + 1} is not finite (NaN or inf): the weights "
                            "diverged (train with a smaller train.lr, into another train.out) or the encoder's "
                            "residuals are not finite")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)
        self.last_fired[(f.detach() > 0).any(0).cpu()] = step
        explained = 1 - (x - x_hat.detach()).pow(2).sum().item() / max((x - x.mean(0)).pow(2).sum().item(), 1e-12)
        recent = step + 1 >= self.s.per_epoch  # dead: not fired in the last epoch's worth of steps
        dead = int((self.last_fired < step - self.s.per_epoch + 1).sum()) if recent else 0
        figures = {"step": step + 1, "loss": loss.item(), "explained_variance": explained, "dead": dead}
        self.history.append(figures)
        return figures

    def run(self) -> None:
        """Every step left; SIGINT/SIGTERM finish the step in hand, checkpoint and raise `Interrupted`."""
        from tqdm.auto import tqdm

        stop: dict[str, int] = {}
        noting = stop_handler((signal.SIGINT, signal.SIGTERM), lambda signum, frame: stop.setdefault("signal", signum))
        with noting, tqdm(total=self.s.total, initial=self.start, desc="sae train", unit="step") as bar:
            for step in range(self.start, self.s.total):
                figures = self.step(step)
                bar.set_postfix(loss=f"{figures['loss']:.4g}", ev=f"{figures['explained_variance']:.3f}",
                                dead=figures["dead"])
                bar.update(1)
                _after_step(step + 1)
                if (step + 1) % self.s.options.checkpoint_every == 0 or "signal" in stop:
                    self.save(step + 1)
                if "signal" in stop:
                    stopped = Interrupted(stop["signal"])
                    stopped.advice = f"its checkpoint is in {self.s.out}: the same command continues the training"
                    raise stopped

    def finish(self) -> Path:
        """The SAE (SAELens layout) and training.json, with the explained variance and dead features over
        every image once more; the checkpoint goes."""
        from dsl_cli.outputs import atomic_write_bytes
        from dsl_cli.sae import TRAINED_BY_DSL, Sae, encoder_model_name, save_sae

        s, p = self.s, self.params
        with self.torch.no_grad():
            x = self.torch.cat([self.residuals(s.images[b:b + s.batch]) for b in range(0, len(s.images), s.batch)])
            f = self.encode(x)
            error = (x - (f @ p["W_dec"] + p["b_dec"])).pow(2).sum().item()
            variance = (x - x.mean(0)).pow(2).sum().item()
        sae = Sae(W_enc=p["W_enc"].detach().cpu(), b_enc=p["b_enc"].detach().cpu(), W_dec=p["W_dec"].detach().cpu(),
                  b_dec=p["b_dec"].detach().cpu(), hook_name=s.hook, architecture="topk", k=s.options.k,
                  source=str(s.out))
        model = encoder_model_name(s.cfg.encoder)  # what `dsl run sae=` compares with its own encoder's
        save_sae(sae, s.out, {**({"model_name": model} if model else {}), "trained_by": TRAINED_BY_DSL,
                              "dataset_path": str(s.cfg.images.get("path"))})
        metrics = {"explained_variance": 1 - error / max(variance, 1e-12),
                   "dead_features": int((~(f > 0).any(0)).sum()),
                   "d_sae": s.d_sae, "k": s.options.k, "steps": s.total, "images": len(s.images),
                   "tokens": int(x.shape[0]), "hook_name": s.hook, "history": self.history}
        atomic_write_bytes(s.out / METRICS, json.dumps(metrics, indent=1).encode())
        self.checkpoint.unlink(missing_ok=True)
        return s.out


def train(cfg, options: TrainOptions) -> Path:
    """Train (or continue an unfinished training in the output folder, from its checkpoint if it has one) and
    write the SAE; its folder, claimed as `dsl run` claims a run's (`RunFolder.claim`): one writer at a time,
    no planted link, never a folder of the user's or one that holds a finished SAE. A training that fails or
    is stopped is recorded in its manifest as `dsl run` records a run (`failed` or `interrupted`, and why)."""
    from dsl_cli.job import record_ending
    from dsl_cli.outputs import Manifest, RunFolder

    s = setup(cfg, options)
    folder = RunFolder(s.out)
    folder.claim(resume=_unfinished(s.out), kind="sae")
    try:
        manifest = Manifest(folder.manifest_json)
        manifest.start(kind="sae", status="started")  # an earlier attempt's failure is not this one's
        trainer = Trainer(s)
        trainer.load()
        trainer.run()
        out = trainer.finish()
        manifest.complete()
        return out
    except BaseException as err:  # noqa: BLE001 - recorded, then raised on to the command's one line
        record_ending(folder, err)
        raise
    finally:
        folder.release()


def _unfinished(out: Path) -> bool:
    """Whether `out` holds a training of `dsl sae train` that did not finish (its manifest, of kind sae, says
    so), which the same command continues; a finished one, a run's folder and anything else are claimed
    afresh, which refuses them."""
    from dsl_cli.outputs import read_manifest

    try:
        manifest = read_manifest(out) or {}
    except UserError:  # damaged: the claim names it
        return False
    return manifest.get("kind") == "sae" and manifest.get("status") in ("started", "failed", "interrupted")


def _stream(cfg, items):
    """(item, RGB picture) of each image, one at a time."""
    return ((item, item.load()) for item in items)


def _after_step(step: int) -> None:
    """Called after every step (tests plant a signal here)."""
