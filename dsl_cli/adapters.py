"""Fitted embedding adapters: decode a ViT that has no decoder of its own (issue 34, DESIGN.md section 7).

For source readouts s in R^p (an encoder's embedding, or its residual stream after one block) and target
embeddings t in R^q (the decoder's own encoder on the same image), ridge regression

    W, b = argmin sum_i |t_i - W s_i - b|^2 + lambda |W|^2

needs only running sums: the count n, sum s, sum t, S = sum s s^T, C = sum s t^T and sum |t|^2 (float64).
One pass over the images, p^2 + pq numbers in memory whatever their number; shards' sums add
(`RidgeSums.merged`, `Partial.merged`). Images are split into a training and a held-out part by a hash of
their name (`is_heldout`: the same split on every machine and in every shard). The ridge strength is picked
on the held-out part, whose squared error for any (W, b) also follows from its sums; the held-out rows are
kept (q + p numbers each) for the metrics that need them: cosine to the target (mean, 5th percentile), R^2,
top-1 and top-5 retrieval among the held-out targets.

An `Adapter` is W [q, p] and b [q] with metadata (source encoder and readout, target decoder family and
embedding space, lambda, held-out metrics, image count), written as `adapter.safetensors` (metadata inside)
and `adapter.json` beside it. `AdaptedEncoder` wraps any `HookedEncoder` so that every lens decodes through
the adapter: a linear map commutes with the closed form (steered target = W e_steered + b).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from dsl_cli.config import encoder_text
from dsl_cli.errors import UserError
from dsl_cli.weights import fp32_fix, refuse_damaged_weights

READOUTS = ("embed", "resid")  # the source's final embedding, or its residual stream after block `layer`
HELDOUT_FRACTION = 0.1  # share of the images (by name hash) kept out of the fit, for lambda and the metrics
# ridge strengths tried, relative to the mean variance of the source's dimensions (trace(S_centred) / p / n)
RELATIVE_LAMBDAS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
ADAPTER_FILE, ADAPTER_JSON, PARTIAL_FILE = "adapter.safetensors", "adapter.json", "partial.safetensors"
FORMAT = "dsl-adapter/1"


# ---------------------------------------------------------------- the split and the readout


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether image `name` is held out: a hash of the name alone, so every shard and machine agrees."""
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return digest % 1_000_000 < round(fraction * 1_000_000)


@dataclass(frozen=True)
class Readout:
    """What of the source encoder the adapter maps: `embed` (its image embedding, width E) or `resid` (the
    residual stream at the readout position after block `layer`, width D; the Diffusion Lens's `L{layer}`)."""

    kind: str = "embed"
    layer: Optional[int] = None

    def __post_init__(self):
        if self.kind not in READOUTS:
            raise UserError(f"adapter.readout={self.kind}: choose one of {', '.join(READOUTS)}")
        if self.kind == "resid" and self.layer is None:
            raise UserError("adapter.readout=resid needs adapter.layer=N (the residual after block N)")
        if self.kind == "embed" and self.layer is not None:  # it fitted the embedding, and recorded the layer
            raise UserError(f"adapter.layer={self.layer} reads the residual stream: add adapter.readout=resid (the "
                            "default, adapter.readout=embed, maps the image embedding and reads no layer)")

    @property
    def label(self) -> str:
        return "embedding" if self.kind == "embed" else f"residual after block {self.layer}"

    def check(self, encoder) -> None:
        self.check_blocks(encoder.n_layers)

    def check_blocks(self, n_layers: int) -> None:
        """UserError for a residual readout past the encoder's `n_layers` blocks (known from its config
        before it loads: `dsl adapter fit` refuses before it claims its folder)."""
        if self.kind == "resid" and not 0 <= self.layer < n_layers:
            raise UserError(f"adapter.layer={self.layer}: the encoder has blocks 0 to {n_layers - 1}")

    def width(self, encoder) -> int:
        return encoder.d_embed if self.kind == "embed" else encoder.d_model

    def read(self, encoder, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] (the encoder's preprocessing) -> [B, p]."""
        if self.kind == "embed":
            return encoder.embed(pixels)
        return encoder.run_with_cache(pixels).resid[:, self.layer + 1]

    def of_cache(self, cache) -> Tensor:
        """The same readout from a cache the encoder made: [B, p] (source space)."""
        return cache.embeds if self.kind == "embed" else cache.resid[:, self.layer + 1]


# ---------------------------------------------------------------- running sums


@dataclass
class RidgeSums:
    """n, sum s [p], sum t [q], S = sum s s^T [p, p], C = sum s t^T [p, q], sum |t|^2 (float64)."""

    p: int
    q: int
    n: int = 0
    sum_s: Tensor = None
    sum_t: Tensor = None
    S: Tensor = None
    C: Tensor = None
    tt: float = 0.0

    def __post_init__(self):
        dd = dict(dtype=torch.float64)
        self.sum_s = torch.zeros(self.p, **dd) if self.sum_s is None else self.sum_s.to(torch.float64)
        self.sum_t = torch.zeros(self.q, **dd) if self.sum_t is None else self.sum_t.to(torch.float64)
        self.S = torch.zeros(self.p, self.p, **dd) if self.S is None else self.S.to(torch.float64)
        self.C = torch.zeros(self.p, self.q, **dd) if self.C is None else self.C.to(torch.float64)

    def add(self, s: Tensor, t: Tensor) -> None:
        """Rows s [B, p] and t [B, q] of the same images."""
        s, t = s.detach().to("cpu", torch.float64), t.detach().to("cpu", torch.float64)
        if s.shape[1:] != (self.p,) or t.shape[1:] != (self.q,) or len(s) != len(t):
            raise ValueError(f"rows of shapes {tuple(s.shape)} and {tuple(t.shape)} for sums of p={self.p}, q={self.q}")
        self.n += len(s)
        self.sum_s += s.sum(0)
        self.sum_t += t.sum(0)
        self.S += s.T @ s
        self.C += s.T @ t
        self.tt += float((t * t).sum())

    def merged(self, other: "RidgeSums") -> "RidgeSums":
        if (self.p, self.q) != (other.p, other.q):
            raise UserError(f"partial sums of widths p={self.p}, q={self.q} and p={other.p}, q={other.q} do not add")
        return RidgeSums(self.p, self.q, self.n + other.n, self.sum_s + other.sum_s, self.sum_t + other.sum_t,
                         self.S + other.S, self.C + other.C, self.tt + other.tt)

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mean s, mean t, S - n mu_s mu_s^T, C - n mu_s mu_t^T)."""
        mu_s, mu_t = self.sum_s / self.n, self.sum_t / self.n
        return mu_s, mu_t, self.S - self.n * torch.outer(mu_s, mu_s), self.C - self.n * torch.outer(mu_s, mu_t)

    def squared_error(self, W: Tensor, b: Tensor) -> float:
        """sum_i |t_i - W s_i - b|^2 from the sums alone (W [q, p], b [q], float64)."""
        WS = W @ self.S @ W.T
        cross = (W.T * self.C).sum()  # sum_i t_i . W s_i = trace(W C)
        return float(self.tt - 2 * cross - 2 * b @ self.sum_t + torch.trace(WS) + 2 * b @ (W @ self.sum_s)
                     + self.n * b @ b)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.sum_s": self.sum_s, f"{prefix}.sum_t": self.sum_t, f"{prefix}.S": self.S,
                f"{prefix}.C": self.C, f"{prefix}.tt": torch.tensor([self.tt], dtype=torch.float64),
                f"{prefix}.n": torch.tensor([self.n], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str) -> "RidgeSums":
        S, C = tensors[f"{prefix}.S"], tensors[f"{prefix}.C"]
        return cls(S.shape[0], C.shape[1], int(tensors[f"{prefix}.n"].item()), tensors[f"{prefix}.sum_s"],
                   tensors[f"{prefix}.sum_t"], S, C, float(tensors[f"{prefix}.tt"].item()))


def ridge(sums: RidgeSums, lam: float) -> tuple[Tensor, Tensor]:
    """W [q, p], b [q] (float64) minimising sum |t - W s - b|^2 + lam |W|^2 over the rows summed. lam = 0
    takes the least-squares solution of least norm (a pseudo-inverse), also when S is singular."""
    mu_s, mu_t, Sc, Cc = sums.centred()
    if lam > 0:
        Wt = torch.linalg.solve(Sc + lam * torch.eye(sums.p, dtype=torch.float64), Cc)
    else:
        Wt = torch.linalg.lstsq(Sc, Cc, driver="gelsd").solution
    W = Wt.T.contiguous()
    return W, mu_t - W @ mu_s


def lambda_scale(sums: RidgeSums) -> float:
    """The unit of the relative ridge strengths: the summed centred variance per source dimension."""
    _, _, Sc, _ = sums.centred()
    return max(float(torch.trace(Sc)) / sums.p, 1e-300)


# ---------------------------------------------------------------- a fit's partial state (one shard's)


@dataclass
class Partial:
    """What one pass over (a shard of) the images leaves: training sums, held-out sums and rows, and who
    made them (`meta`: source, readout, target; must agree between shards)."""

    train: RidgeSums
    heldout: RidgeSums
    heldout_names: list[str] = field(default_factory=list)
    heldout_s: list[Tensor] = field(default_factory=list)  # [p] float64 each
    heldout_t: list[Tensor] = field(default_factory=list)  # [q] float64 each
    images: int = 0  # images read (each once, however many augmented views)
    views: int = 0  # training rows (images x views)
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, p: int, q: int, meta: Optional[dict] = None) -> "Partial":
        return cls(RidgeSums(p, q), RidgeSums(p, q), meta=dict(meta or {}))

    def add_rows(self, names: Sequence[str], s: Tensor, t: Tensor, fraction: float = HELDOUT_FRACTION) -> None:
        """Rows of named images (one view each), each to the training or the held-out part by its name."""
        held = torch.tensor([is_heldout(n, fraction) for n in names], dtype=torch.bool)
        if held.any():
            self.add_heldout([n for n, h in zip(names, held.tolist()) if h], s[held], t[held])
        if (~held).any():
            self.train.add(s[~held], t[~held])
            self.views += int((~held).sum())
        self.images += len(names)

    def add_heldout(self, names: Sequence[str], s: Tensor, t: Tensor) -> None:
        self.heldout.add(s, t)
        s, t = s.detach().to("cpu", torch.float64), t.detach().to("cpu", torch.float64)
        self.heldout_names += list(names)
        self.heldout_s += list(s)
        self.heldout_t += list(t)

    def merged(self, other: "Partial") -> "Partial":
        mine, theirs = _identity(self.meta), _identity(other.meta)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise UserError(f"partial sums from different fits do not add (they differ in {', '.join(diff)})")
        overlap = set(self.heldout_names) & set(other.heldout_names)
        if overlap:
            raise UserError(f"the same image in two shards ({sorted(overlap)[0]}): merge each shard once")
        return Partial(self.train.merged(other.train), self.heldout.merged(other.heldout),
                       self.heldout_names + other.heldout_names, self.heldout_s + other.heldout_s,
                       self.heldout_t + other.heldout_t, self.images + other.images, self.views + other.views,
                       dict(self.meta))

    def save(self, path: Path) -> Path:
        from safetensors.torch import save

        from dsl_cli.outputs import atomic_write_bytes

        tensors = {**self.train.tensors("train"), **self.heldout.tensors("heldout")}
        p, q = self.train.p, self.train.q
        for key, rows, width in (("heldout.rows_s", self.heldout_s, p), ("heldout.rows_t", self.heldout_t, q)):
            tensors[key] = torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.float64)
        info = dict(self.meta, heldout_names=self.heldout_names, images=self.images, views=self.views)
        path = Path(path)
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()},
                                      metadata={"dsl_partial": json_text(info)}))
        return path

    @classmethod
    def load(cls, path: Path) -> "Partial":
        tensors, info = _read_safetensors(Path(path), "dsl_partial", "partial sums of `dsl adapter fit`")
        names = info.pop("heldout_names")
        images, views = info.pop("images"), info.pop("views")
        return cls(RidgeSums.from_tensors(tensors, "train"), RidgeSums.from_tensors(tensors, "heldout"), names,
                   list(tensors["heldout.rows_s"]), list(tensors["heldout.rows_t"]), images, views, info)


def _adapter_problem(tensors: dict[str, Tensor], meta: Any) -> Optional[str]:
    """What is wrong with an adapter file's tensors and metadata (None when nothing is): every shape and
    metadata value that a run, its manifest or the adapter's page reads is checked here, so that a hand-edited
    file fails in one line, not later (a string where a number goes, `true` where a layer goes)."""
    W, b, negative = tensors.get("W"), tensors.get("b"), tensors.get("negative")
    if W is None or b is None or W.ndim != 2 or b.ndim != 1 or W.shape[0] != b.shape[0]:
        return "W [q, p] and b [q] expected"
    if negative is not None and negative.shape != b.shape:
        return f"negative has shape {tuple(negative.shape)}, not [q] = [{W.shape[0]}]"
    if not isinstance(meta, dict):
        return f"its metadata is a JSON {type(meta).__name__}, not an object"
    problem = _field_problem(meta, "", META_FIELDS)
    if problem:
        return problem
    readout = meta.get("readout") or {}
    if readout.get("kind") == "resid" and readout.get("layer") is None:
        return "metadata readout.layer is missing: a residual readout names its block"
    space = (meta.get("target") or {}).get("space") or {}
    if space.get("width", W.shape[0]) != W.shape[0] or meta.get("q", W.shape[0]) != W.shape[0]:
        return f"the target space is {space.get('width', meta.get('q'))} wide, and W maps to {W.shape[0]}"
    if meta.get("p", W.shape[1]) != W.shape[1]:
        return f"metadata p is {meta['p']}, and W reads {W.shape[1]}-wide inputs"
    return None


def _is_number(value: Any) -> bool:
    """A JSON number (True is an int in Python, and is no number here)."""
    return type(value) in (int, float)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


# What each metadata field must be where it is there (an older dsl's adapter may lack some): a check and what
# it asks for, by key; a dict of them is an object's fields, "*" every field of that object. Metrics may be
# null, or NaN as an older dsl wrote a metric with no image to measure it on (`json_text`).
_TEXT = (lambda v: isinstance(v, str), "a string")
_TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
_COUNT = (_is_count, "a whole number, 0 or more")
_METRIC = (lambda v: v is None or _is_number(v) and not math.isinf(v), "a number or null")
_LAMBDA = (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number, 0 or more")
META_FIELDS: dict = {
    "format": _TEXT, "name": _TEXT, "source_label": _TEXT, "target_label": _TEXT,
    "p": _COUNT, "q": _COUNT, "augment": _COUNT, "images": _COUNT, "train_rows": _COUNT, "heldout_images": _COUNT,
    "lambda": _LAMBDA, "relative_lambda": _LAMBDA,
    "heldout_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1"),
    "source": {"*": _TEXT_OR_NULL}, "target_encoder": {"*": _TEXT_OR_NULL}, "image_set": {},
    "source_shape": {"n_layers": _COUNT, "d_model": _COUNT, "d_embed": _COUNT, "readout_kind": _TEXT},
    "readout": {"kind": (lambda v: v in READOUTS, f"one of {', '.join(READOUTS)}"),
                "layer": (lambda v: v is None or _is_count(v), "a block number (0 or more) or null")},
    "target": {"family": _TEXT, "decoder_source": _TEXT,
               "space": {"model": _TEXT, "weights": _TEXT_OR_NULL, "width": _COUNT}},
    "metrics": {"*": _METRIC}, "lambdas_tried": {"*": _METRIC},
}


def _field_problem(value: dict, prefix: str, fields: dict) -> Optional[str]:
    """The first field of `value` (an object) that is not what `fields` asks for, in one line naming it."""
    for key, item in value.items():
        rule = fields.get(key, fields.get("*"))
        name = f"{prefix}{key}"
        if isinstance(rule, dict):
            if item is None:  # an object not recorded
                continue
            if not isinstance(item, dict):
                return f"metadata {name} is {_shown(item)}, not an object"
            problem = _field_problem(item, f"{name}.", rule)
            if problem:
                return problem
        elif rule is not None and not rule[0](item):
            return f"metadata {name} is {_shown(item)}, not {rule[1]}"
    return None


def _shown(value: Any) -> str:
    """A JSON value as the file holds it, cut short (a damaged field may hold anything)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _identity(meta: dict) -> dict:
    """What the shards of one fit share (the image set too: a shard of other photos merged in silently). The
    image settings are compared as text: shards fitted before they were recorded as JSON values hold `str()`
    of each ("None"), and still merge with the shards of a newer dsl."""
    shared = {k: meta.get(k) for k in ("source", "readout", "target", "augment", "heldout_fraction")}
    images = meta.get("image_set")
    return {**shared, "image_set": {k: str(v) for k, v in images.items()} if isinstance(images, dict) else images}


def json_text(value: Any, indent: Optional[int] = None) -> str:
    """`value` as strict JSON: a NaN or infinity (a held-out error or R^2 with no image to measure it on) is
    null. `json.dumps` wrote NaN, which JSON has not: adapter.json was refused by every strict reader (jq,
    JavaScript). Files written so are still read: `json.loads` takes NaN."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _read_safetensors(path: Path, key: str, what: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path}: no such file (expected {what})")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - whatever the file holds that is not what dsl wrote (SafetensorError...)
        raise UserError(f"{path}: not {what} ({type(err).__name__}); the file is damaged: write it again") from None
    return tensors, info


# ---------------------------------------------------------------- fitting and metrics


def heldout_metrics(pred: Tensor, target: Tensor) -> dict:
    """pred, target [N, q] -> cosine (mean, 5th percentile; and the mean about the held-out targets' mean,
    which a shared offset cannot inflate), R^2 (pooled over dimensions, about the held-out mean), top-1 and
    top-5 retrieval (each prediction's most cosine-similar targets among the N)."""
    pred, target = pred.to(torch.float64), target.to(torch.float64)
    n = len(pred)
    if n == 0:
        return {"heldout_images": 0}
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    total = ((target - target.mean(0)) ** 2).sum()
    r2 = 1 - float(((target - pred) ** 2).sum() / total) if total > 0 else math.nan
    sims = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(target, dim=-1).T
    own = sims.diagonal().unsqueeze(1)
    place = (sims > own).sum(1)  # how many targets beat the image's own
    centre = target.mean(0)  # cosine about the targets' mean: the shared direction that every embedding has
    centred = torch.nn.functional.cosine_similarity(pred - centre, target - centre, dim=-1)
    return {
        "heldout_images": n,
        "cosine_mean": float(cos.mean()),
        "cosine_centred": float(centred.mean()),
        "cosine_p5": float(torch.quantile(cos, 0.05)),
        "r2": r2,
        "top1": float((place < 1).double().mean()),
        "top5": float((place < 5).double().mean()),
        "retrieval_pool": n,
    }


def training_rows(names: Sequence[str], augment: int = 0, fraction: float = HELDOUT_FRACTION) -> int:
    """The training rows a fit of the images `names` adds: each image not held out, and its augmented views
    (known from the names alone, before any model loads)."""
    return sum(not is_heldout(name, fraction) for name in names) * (1 + augment)


def check_training_rows(rows: int) -> None:
    """UserError for fewer than 2 training rows: W and b of one row are its target alone, nothing fitted."""
    if rows < 2:
        raise UserError(f"{rows} training image(s): an adapter needs at least 2 (give more images)")


def fit(partial: Partial, relative_lambdas: Sequence[float] = RELATIVE_LAMBDAS) -> "Adapter":
    """The adapter with the ridge strength whose held-out squared error is least (from the held-out sums);
    without held-out images, the smallest positive strength tried. Metrics on the held-out rows."""
    train = partial.train
    check_training_rows(train.n)
    scale = lambda_scale(train)
    tried = []
    for rel in relative_lambdas:
        W, b = ridge(train, rel * scale)
        if not (torch.isfinite(W).all() and torch.isfinite(b).all()):
            continue
        err = partial.heldout.squared_error(W, b) if partial.heldout.n else math.nan
        tried.append((rel, err, W, b))
    if not tried:
        raise UserError("the ridge regression gave no finite solution (are the readouts finite?)")
    if partial.heldout.n:
        rel, _, W, b = min(tried, key=lambda x: (x[1], -x[0]))
    else:
        rel, _, W, b = next((x for x in tried if x[0] > 0), tried[0])
    metrics = {}
    if partial.heldout_s:
        S, T = torch.stack(partial.heldout_s), torch.stack(partial.heldout_t)
        metrics = heldout_metrics(S @ W.T + b, T)
    meta = dict(partial.meta, format=FORMAT, relative_lambda=rel, **{"lambda": rel * scale},
                images=partial.images, train_rows=train.n, heldout_images=partial.heldout.n, metrics=metrics,
                lambdas_tried={f"{r:g}": e for r, e, _, _ in tried})
    return Adapter(W.float(), b.float(), meta)


# ---------------------------------------------------------------- the adapter


@dataclass
class Adapter:
    """t = W s + b: W [q, p], b [q]; `negative` [q] the target encoder's own unconditional embedding (what
    the decoder's prior would give it), when known; `meta` who it maps from and to, and how well."""

    W: Tensor
    b: Tensor
    meta: dict = field(default_factory=dict)
    negative: Optional[Tensor] = None

    p = property(lambda self: self.W.shape[1], doc="p: the source readout's width")
    q = property(lambda self: self.W.shape[0], doc="q: the target embedding's width")

    @property
    def readout(self) -> Readout:
        r = self.meta.get("readout") or {}
        kind = r.get("kind", "embed")  # earlier fits recorded an adapter.layer that an embedding readout ignored
        return Readout(kind, r.get("layer") if kind == "resid" else None)

    def __call__(self, x: Tensor) -> Tensor:
        """[..., p] -> [..., q] in x's dtype and device."""
        W, b = self.W.to(x.device, x.dtype), self.b.to(x.device, x.dtype)
        return x @ W.T + b

    def save(self, folder: Path) -> Path:
        """`adapter.safetensors` (W, b, negative, the metadata inside) and `adapter.json` beside it, each
        written atomically."""
        from safetensors.torch import save

        from dsl_cli.outputs import atomic_write_bytes

        folder = Path(folder)
        tensors = {"W": self.W.float().contiguous(), "b": self.b.float().contiguous()}
        if self.negative is not None:
            tensors["negative"] = self.negative.float().reshape(-1).contiguous()
        path = folder / ADAPTER_FILE
        atomic_write_bytes(path, save(tensors, metadata={"dsl_adapter": json_text(self.meta)}))
        atomic_write_bytes(folder / ADAPTER_JSON, (json_text(self.meta, indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "Adapter":
        """From `adapter.safetensors` or the folder holding it."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / ADAPTER_FILE
        tensors, meta = _read_safetensors(path, "dsl_adapter", "an adapter written by `dsl adapter fit`")
        problem = _adapter_problem(tensors, meta)
        if problem:
            raise UserError(f"{path}: not an adapter as `dsl adapter fit` writes it ({problem}); the file is "
                            "damaged: fit it again")
        return cls(tensors["W"], tensors["b"], meta, tensors.get("negative"))

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "adapter")

    def describe(self) -> str:
        """One line: `adapter tiny encoder (embedding) -> kandinsky22 (tiny), held-out cosine 0.93`."""
        cos = (self.meta.get("metrics") or {}).get("cosine_mean")
        source, target = self.meta.get("source_label", "?"), self.meta.get("target_label", "?")
        text = f"adapter {source} ({self.readout.label}) -> {target}"
        return text + (f", held-out cosine {cos:.3f}" if cos is not None else "")


class AdaptedEncoder:
    """A `HookedEncoder` whose every embedding goes through an adapter: steer, diffusion_lens, direct,
    readout, embed, steer_hooked and the cache's `embeds` give target-space embeddings [.., q]; what is not
    an embedding (the cache's residuals and writes, shapes, devices, hooks) is the source encoder's.

    Embedding readout: lens(x) = W R(x) + b, so the closed form stays one norm and two matmuls and equals
    the hooked path through the adapter. Residual readout (after block l): lens(x) = W x + b, applied to
    the residual the lens reads: a block's residual (the Diffusion Lens, as a tuned lens would be), a write
    (direct), and for DSL the steered residual after block l, x_{l+1} + delta(c) (norm mode scales c to
    |x_{l+1}|), of components of blocks 0 to l only (`check_steerable`). `steer_writes` is that closed form
    for any writes and `map_hooked` the hooked path through the adapter, so that an SAE's features
    (dsl_cli.sae) are read as heads are."""

    def __init__(self, encoder, adapter: Adapter):
        self.__dict__.update(base=encoder, adapter=adapter, adapter_readout=adapter.readout)
        adapter.readout.check(encoder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)

    @property
    def d_embed(self) -> int:
        return self.adapter.q

    def _map(self, x: Tensor) -> Tensor:
        return self.adapter(x)

    def readout(self, v: Tensor) -> Tensor:
        if self.adapter_readout.kind == "embed":
            return self._map(self.base.readout(v))
        return self._map(v.to(self.base.device, self.base.dtype))

    def run_with_cache(self, pixels: Tensor):
        cache = self.base.run_with_cache(pixels)
        return dataclasses.replace(cache, embeds=self._map(self.adapter_readout.of_cache(cache)))

    def embed(self, pixels: Tensor) -> Tensor:
        return self._map(self.adapter_readout.read(self.base, pixels.to(self.base.device, self.base.dtype)))

    def zero_embed(self) -> Tensor:
        if self.adapter.negative is not None:
            return self.adapter.negative.reshape(1, -1).to(self.base.device, self.base.dtype)
        side = self.base.image_size
        return self.embed(torch.zeros(1, 3, side, side))

    def steer(self, cache, components, mode: str = "norm", alpha: float = 2.0) -> Tensor:
        if self.adapter_readout.kind == "embed":
            return self._map(self.base.steer(cache, components, mode=mode, alpha=alpha))
        parsed = [self.base._parse(c, steerable=True) for c in components]
        check_steerable(self.adapter_readout, parsed)
        return self.steer_writes(cache, self.base.component_writes(cache, parsed), mode, alpha)

    def steer_writes(self, cache, writes: Tensor, mode: str = "norm", alpha: float = 2.0) -> Tensor:
        """DSL of any writes at the readout position (heads', MLPs', SAE features'): writes [B, K, D] -> the
        steered embeddings [B, K, q]. Each write's delta is added to the residual the adapter reads, every
        later write patched to its clean value: W R(x_L + delta) + b (embedding readout, exact readouts
        only), W (x_{l+1} + delta) + b (residual after block l; norm mode scales to |x_{l+1}|). The caller
        makes sure each write reaches that residual (`check_steerable`)."""
        from dsl_cli.encoder import steering_delta

        if self.adapter_readout.kind == "embed":
            final = cache.resid[:, -1:]  # [B, 1, D]
            return self.readout(final + steering_delta(writes, final, mode, alpha))
        # the residual after the adapter's block is x_{l+1} + delta: the adapter maps what it was fitted on,
        # and the identity steer gives the clean one
        block = self.adapter_readout.layer
        read = cache.resid[:, block + 1:block + 2]  # [B, 1, D]
        return self._map(read + steering_delta(writes, read, mode, alpha))

    def map_hooked(self, reference: Any) -> Tensor:
        """A hooked reference through the adapter: `reference`, a callable of the source encoder, runs a real
        forward pass and gives its embedding [B, E], mapped to [B, q]. An adapter of the residual stream reads no embedding: refused in
        one line before any pass."""
        if self.adapter_readout.kind != "embed":
            raise UserError("lens.verify: the hooked reference reads the embedding; an adapter of the residual "
                            "stream has no hooked path (lens.verify=false)")
        return self._map(reference(self.base))

    def steer_hooked(self, pixels: Tensor, component, mode: str = "norm", alpha: float = 2.0,
                     patch: bool = True) -> Tensor:
        return self.map_hooked(lambda base: base.steer_hooked(pixels, component, mode=mode, alpha=alpha, patch=patch))

    def diffusion_lens(self, cache, layers, mid: bool = False) -> Tensor:
        if self.adapter_readout.kind == "embed":
            return self._map(self.base.diffusion_lens(cache, layers, mid=mid))
        picked = [self.base._parse(f"L{l}" if isinstance(l, int) else l) for l in layers]
        if mid:
            return self._map(cache.resid_mid[:, [c.layer for c in picked]])
        return self._map(cache.resid[:, [c.layer + 1 for c in picked]])

    def direct(self, cache, components) -> Tensor:
        if self.adapter_readout.kind == "embed":
            return self._map(self.base.direct(cache, components))
        return self._map(self.base.component_writes(cache, components))


# ---------------------------------------------------------------- streaming a folder through two encoders


def views(picture, count: int, seed: str) -> Iterator:
    """The picture itself, then `count` augmented views of it, one at a time (memory does not grow with
    `count`): a random crop (60 to 100 % of each side) and a horizontal flip half the time, drawn from a
    generator seeded by `seed` (the image's name)."""
    from PIL import ImageOps

    yield picture
    rng = random.Random(hashlib.sha256(seed.encode()).hexdigest())
    w, h = picture.size
    for _ in range(count):
        fw, fh = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
        cw, ch = max(1, round(w * fw)), max(1, round(h * fh))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        view = picture.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        yield view


def accumulate(partial: Partial, items: Iterable[tuple[str, Any]], source, source_pre, target, target_pre,
               readout: Readout, augment: int = 0, batch_size: int = 16,
               fraction: float = HELDOUT_FRACTION) -> Partial:
    """Stream (name, PIL picture) pairs through both encoders into `partial`, `batch_size` rows per pass: a
    training image adds itself and `augment` augmented views to the training sums; a held-out image adds
    itself (unaugmented) to the held-out sums and rows. Pictures are released batch by batch."""
    rows: dict[bool, list] = {True: [], False: []}

    def flush(held: bool) -> None:
        batch = rows[held]
        if not batch:
            return
        names = [n for n, _, _ in batch]
        s = readout.read(source, torch.stack([a for _, a, _ in batch])).float().cpu()
        t = target.embed(torch.stack([b for _, _, b in batch])).float().cpu()
        if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
            raise_not_finite(names[0], source, target)
        if held:
            partial.add_heldout(names, s, t)
        else:
            partial.train.add(s, t)
            partial.views += len(batch)
        batch.clear()

    for name, picture in items:
        held = is_heldout(name, fraction)
        partial.images += 1
        for view in ([picture] if held else views(picture, augment, name)):
            rows[held].append((name, source_pre(view), target_pre(view)))
            if len(rows[held]) >= batch_size:
                flush(held)
    flush(True)
    flush(False)
    return partial


def raise_not_finite(name: str, source, target) -> None:
    """The reason an embedding of image `name` came out NaN or inf: an encoder's damaged weights (no setting
    fixes those), else half precision where it is in use; in fp32 with sound weights, the model itself."""
    refuse_damaged_weights("source encoder", source, "fetch them again, or check the file encoder.checkpoint names")
    refuse_damaged_weights("target encoder", target, "fetch them again, or check the target encoder's files")
    in_fp32 = source.dtype == torch.float32 and target.dtype == torch.float32
    raise UserError(f"{name}: an embedding is not finite (NaN or inf); {fp32_fix('fp32' if in_fp32 else 'half')}")


# ---------------------------------------------------------------- `dsl run adapter=PATH`


def encoder_identity(cfg) -> dict:
    """What makes two encoder configs give the same readouts (not their dtype or batch size). A local
    checkpoint is named by its absolute, resolved path (`./w.safetensors` and its full path are one file),
    and by a fingerprint of its content (`checkpoint_fingerprint`: another file at that path is another model)."""
    keys = ("source", "name", "pretrained", "checkpoint")
    ident = {k: (None if getattr(cfg, k, None) is None else str(getattr(cfg, k))) for k in keys}
    if ident["source"] in ("kandinsky_prior", "hf"):  # the model is named by its repository
        ident.update(repo_id=str(cfg.repo_id), subfolder=str(cfg.subfolder))
    if ident["checkpoint"]:
        ident["checkpoint"] = checkpoint_path(ident["checkpoint"])
        ident["checkpoint_fingerprint"] = checkpoint_fingerprint(Path(ident["checkpoint"]))
    return ident


def checkpoint_path(path: str) -> str:
    """`~/w.safetensors`, `./w.safetensors` -> the absolute path, links resolved (relative to the working folder:
    an adapter of an older dsl recorded the path as typed)."""
    return str(Path(path).expanduser().resolve())


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 16  # 1 MiB of a checkpoint read for its fingerprint


def checkpoint_fingerprint(path: Path) -> Optional[str]:
    """A cheap fingerprint of a local checkpoint, a file or a folder's files: SHA-256 of each file's relative
    name, size and 16 blocks of 64 KiB spread evenly over it (the whole file when smaller), so 1 MiB per file
    read whatever its size, at every run through the adapter. Partial on purpose: weights of another training
    or fine-tune differ nearly everywhere and the blocks tell them apart, but an edit confined to the bytes
    between them is not seen. None where the path cannot be read (the weights preflight says why)."""
    try:
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path) if file != path else file.name}\n".encode())
            _sample_file(file, digest)
    except OSError:
        return None
    return digest.hexdigest()[:16]


def _sample_file(file: Path, digest) -> None:
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(f"{size}\n".encode())
        if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
            digest.update(handle.read())
            return
        for k in range(FINGERPRINT_BLOCKS):  # the first block at 0, the last one ending at the file's end
            handle.seek(k * (size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1))
            digest.update(handle.read(FINGERPRINT_BLOCK))


def fitted_encoder_problem(fitted: dict, current: dict) -> Optional[str]:
    """How the encoder an adapter was fitted for (`fitted`, its recorded `encoder_identity`) differs from this
    run's (`current`): None when it is the same. The recorded checkpoint path is normalised (an older dsl kept
    it as typed); its fingerprint is compared where both are known (an older adapter recorded none; a file not
    there is the weights preflight's to report)."""
    fitted, current = dict(fitted), dict(current)
    if isinstance(fitted.get("checkpoint"), str) and fitted["checkpoint"]:
        fitted["checkpoint"] = checkpoint_path(fitted["checkpoint"])
    prints = fitted.pop("checkpoint_fingerprint", None), current.pop("checkpoint_fingerprint", None)
    same_but_the_file = {**fitted, "checkpoint": None} == {**current, "checkpoint": None}
    if fitted != current and same_but_the_file and fitted.get("checkpoint") and current.get("checkpoint"):
        return (f"was fitted on encoder.checkpoint={fitted.get('checkpoint')}, not {current.get('checkpoint')}: "
                "give that one, or fit one for this checkpoint")
    if fitted != current:
        return (f"was fitted for encoder {encoder_text(fitted)}, not {encoder_text(current)}: fit one for this "
                "encoder (dsl adapter fit encoder=... decoder=...)")
    if None not in prints and prints[0] != prints[1]:
        return (f"was fitted on another file at encoder.checkpoint={current['checkpoint']} (its content differs "
                "now): fit one for this checkpoint")
    return None


ADAPTER_LENSES = ("steering", "diffusion", "direct")  # the lenses whose embeddings the adapter maps


def run_adapter(cfg) -> Optional[Adapter]:
    """The adapter `cfg.adapter` names, checked against the run's config before any model is built: one line
    (UserError) for an adapter fitted for another encoder or decoder, or a lens that does not decode its
    embeddings. None when the run has no adapter."""
    path = cfg.get("adapter") if hasattr(cfg, "get") else getattr(cfg, "adapter", None)
    if not path:
        return None
    adapter = Adapter.load(path)
    meta, where = adapter.meta, f"adapter={path}"
    problem = fitted_encoder_problem(meta.get("source") or {}, encoder_identity(cfg.encoder))
    if problem:
        raise UserError(f"{where} {problem}")
    target = meta.get("target") or {}
    if (target.get("family"), target.get("decoder_source")) != (cfg.decoder.family, cfg.decoder.source):
        raise UserError(f"{where} maps to decoder {target.get('family')} ({target.get('decoder_source')}), not "
                        f"{cfg.decoder.family} ({cfg.decoder.source}): fit one for this decoder")
    if cfg.lens.name not in ADAPTER_LENSES:
        raise UserError(f"lens={cfg.lens.name} with {where}: an adapter decodes the lenses "
                        f"{', '.join(ADAPTER_LENSES)} (their embeddings are mapped into the decoder's space)")
    if cfg.lens.text or cfg.study.name:
        raise UserError(f"{where}: labels (lens.text) and studies read the source encoder's own embeddings; "
                        "run them without the adapter")
    if cfg.lens.verify and adapter.readout.kind != "embed":
        raise UserError(f"lens.verify=true with {where}: the hooked reference reads the embedding, and this "
                        f"adapter maps the {adapter.readout.label} (lens.verify=false)")
    return adapter


def target_space(adapter: Adapter):
    """The `EmbeddingSpace` the adapter maps into (what `check_pairing` judges instead of the encoder's)."""
    from dsl_cli.encoder import EmbeddingSpace

    space = (adapter.meta.get("target") or {}).get("space") or {}
    return EmbeddingSpace(space.get("model", "?"), space.get("weights"), int(space.get("width", adapter.q)))


def check_steerable(readout: Readout, components: Sequence) -> None:
    """UserError for steering a component written after the block whose residual a residual adapter maps:
    nothing it writes reaches that residual, so its steered embedding would be the clean one."""
    late = [c.label for c in components if readout.kind == "resid" and c.layer > readout.layer]
    if late:
        more = f" (and {len(late) - 1} more)" if len(late) > 1 else ""
        raise UserError(f"{late[0]}{more} writes after block {readout.layer}, whose residual the adapter maps: "
                        f"steering it cannot change what the adapter reads. Steer layers 0 to {readout.layer} "
                        f"(layer='range(0,{readout.layer + 1})'), or fit an adapter of a later block")


def adapt_encoder(encoder, adapter: Adapter, where: str = "adapter") -> AdaptedEncoder:
    """`AdaptedEncoder(encoder, adapter)` after checking the loaded encoder is the one it was fitted on (its
    shape and readout): one line otherwise."""
    shape = adapter.meta.get("source_shape") or {}
    have = {"n_layers": encoder.n_layers, "d_model": encoder.d_model, "d_embed": encoder.d_embed,
            "readout_kind": getattr(encoder, "readout_kind", "cls")}  # cls, mean or map (an open_clip ViT: cls)
    diff = [f"{k} {shape[k]} (this encoder: {have[k]})" for k in have if k in shape and shape[k] != have[k]]
    if diff or adapter.p != adapter.readout.width(encoder):
        raise UserError(f"{where} was fitted on another readout of another model: "
                        + ("; ".join(diff) or f"{adapter.p}-wide inputs, this {adapter.readout.label} is "
                                                f"{adapter.readout.width(encoder)}-wide"))
    return AdaptedEncoder(encoder, adapter)


def manifest_entry(adapter: Adapter, path: str) -> dict:
    m = adapter.meta.get("metrics") or {}
    return {"path": str(path), "name": adapter.name, "readout": adapter.readout.label,
            "target": adapter.meta.get("target_label"), "heldout_cosine": m.get("cosine_mean"),
            "heldout_r2": m.get("r2"), "heldout_images": m.get("heldout_images"), "lambda": adapter.meta.get("lambda"),
            "description": adapter.describe()}
