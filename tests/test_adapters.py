"""Fitted embedding adapters (issue 34): streaming ridge regression, its shards, the CLI and runs through it.

Shapes are asymmetric on purpose (p != q != number of images), so a transposed W or a sum over the wrong
axis cannot pass."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from open_clip.transformer import VisionTransformer

from dsl_cli.adapters import (Adapter, AdaptedEncoder, Partial, Readout, RidgeSums, fit, heldout_metrics,
                              is_heldout, ridge)
from dsl_cli.encoder import HookedEncoder, build_tiny_visual
from dsl_cli.errors import UserError

N_IMAGES = 300


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls on a shared 2-core machine: one thread is 10 to 40 times faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pixels(n: int, seed: int = 0, side: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _names(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def _other_visual(width: int = 48, output_dim: int = 40, layers: int = 3, seed: int = 5) -> VisionTransformer:
    """A tiny open_clip ViT of another width than `build_tiny_visual`'s (64) and embedding (32)."""
    torch.manual_seed(seed)
    return VisionTransformer(image_size=64, patch_size=16, width=width, layers=layers, heads=4, mlp_ratio=2.0,
                             output_dim=output_dim).eval()


def _partial(names, s, t, batch: int = 37) -> Partial:
    partial = Partial.empty(s.shape[1], t.shape[1], meta={"source": "s", "target": "t"})
    for start in range(0, len(names), batch):  # batches of an odd size: the sums must not depend on them
        partial.add_rows(names[start:start + batch], s[start:start + batch], t[start:start + batch])
    return partial


def _readouts(encoder: HookedEncoder, readout: Readout, n: int = N_IMAGES, seed: int = 0) -> torch.Tensor:
    return torch.cat([readout.read(encoder, chunk) for chunk in _pixels(n, seed).split(64)]).double()


# ---------------------------------------------------------------- the split


def test_heldout_split_is_a_hash_of_the_name_alone():
    names = _names(5000)
    held = [is_heldout(n) for n in names]
    assert 0.08 < sum(held) / len(names) < 0.12
    assert held == [is_heldout(n) for n in names]  # deterministic
    assert is_heldout("a") == is_heldout("a") and not all(held)
    assert 0.27 < sum(is_heldout(n, 0.3) for n in names) / len(names) < 0.33  # adapter.heldout=0.3


# ---------------------------------------------------------------- recovery


def test_recovers_a_known_linear_map_of_a_residual_readout():
    """p = 64 (the tiny ViT's residual after block 2), q = 24, 300 images: W and b recovered exactly."""
    encoder = HookedEncoder(build_tiny_visual())
    readout = Readout("resid", 2)
    s = _readouts(encoder, readout)
    g = torch.Generator().manual_seed(7)
    A, c = torch.randn(24, 64, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    t = s @ A.T + c
    adapter = fit(_partial(_names(len(s)), s, t))
    assert adapter.W.shape == (24, 64) and adapter.b.shape == (24,)
    assert ((adapter.W.double() - A).norm() / A.norm()) <= 1e-3
    assert ((adapter.b.double() - c).norm() / c.norm()) <= 1e-3
    metrics = adapter.meta["metrics"]
    assert metrics["r2"] > 0.999999 and metrics["cosine_mean"] > 0.999999 and metrics["top1"] == 1.0


def test_heldout_r2_with_noise_is_at_the_noise_bound():
    """Target = A s + c + noise: the best any map can do on held-out images is R^2 = 1 - noise / total
    variance; the fit reaches it (within sampling error) and not beyond."""
    encoder = HookedEncoder(_other_visual())
    s = _readouts(encoder, Readout("embed"), n=1200)  # p = 40
    g = torch.Generator().manual_seed(8)
    A = torch.randn(24, 40, generator=g, dtype=torch.float64)
    clean = s @ A.T + 1.0
    sigma = 0.5 * clean.std(0).mean()
    t = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    adapter = fit(_partial(_names(len(s)), s, t))
    held = torch.tensor([is_heldout(n) for n in _names(len(s))])
    total = ((clean[held] - t[held].mean(0)) ** 2).sum() + (t[held] - clean[held]).pow(2).sum()
    bound = 1 - float((t[held] - clean[held]).pow(2).sum() / total)
    r2 = adapter.meta["metrics"]["r2"]
    assert abs(r2 - bound) < 0.03, (r2, bound)
    assert 0.5 < bound < 0.95


def test_source_equal_to_target_gives_the_identity():
    encoder = HookedEncoder(build_tiny_visual())
    s = _readouts(encoder, Readout("embed"))
    adapter = fit(_partial(_names(len(s)), s, s.clone()))
    assert (adapter.W.double() - torch.eye(32)).abs().max() < 1e-4
    assert adapter.b.abs().max() < 1e-4


def test_ridge_matches_the_normal_equations():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(90, 13, generator=g, dtype=torch.float64), torch.randn(90, 7, generator=g, dtype=torch.float64)
    sums = RidgeSums(13, 7)
    sums.add(s, t)
    W, b = ridge(sums, 2.5)
    sc, tc = s - s.mean(0), t - t.mean(0)
    expected = torch.linalg.solve(sc.T @ sc + 2.5 * torch.eye(13, dtype=torch.float64), sc.T @ tc).T
    assert torch.allclose(W, expected, atol=1e-10)
    assert torch.allclose(b, t.mean(0) - expected @ s.mean(0), atol=1e-10)
    assert abs(sums.squared_error(W, b) - float(((t - s @ W.T - b) ** 2).sum())) < 1e-8


def test_metrics_count_retrieval_among_heldout_targets():
    target = torch.eye(6, dtype=torch.float64)[:, :5].clone()
    target[5] = torch.tensor([1.0, 1, 0, 0, 0])
    pred = target.clone()
    pred[0], pred[1] = target[1], target[0]  # two predictions swapped: top-1 4/6, both still in the top 5
    m = heldout_metrics(pred, target)
    assert m["top1"] == 4 / 6 and m["top5"] == 1.0 and m["heldout_images"] == 6


# ---------------------------------------------------------------- shards


def test_sharded_fits_merged_equal_a_single_fit(tmp_path):
    encoder = HookedEncoder(build_tiny_visual())
    s = _readouts(encoder, Readout("resid", 1))  # p = 64
    g = torch.Generator().manual_seed(3)
    t = torch.tanh(s @ torch.randn(64, 24, generator=g, dtype=torch.float64) / 8)  # q = 24, not linear
    names = _names(len(s))
    whole = fit(_partial(names, s, t))
    paths = []
    for k in range(3):  # every third image, saved and loaded as `dsl adapter fit images.shard=k` does
        pick = list(range(k, len(s), 3))
        paths.append(_partial([names[i] for i in pick], s[pick], t[pick]).save(tmp_path / f"shard{k}.safetensors"))
    merged = Partial.load(paths[0])
    for path in paths[1:]:
        merged = merged.merged(Partial.load(path))
    sharded = fit(merged)
    assert torch.allclose(sharded.W, whole.W, atol=1e-6) and torch.allclose(sharded.b, whole.b, atol=1e-6)
    assert sharded.meta["lambda"] == whole.meta["lambda"]
    for key, value in whole.meta["metrics"].items():
        assert abs(sharded.meta["metrics"][key] - value) <= 1e-6, key


def test_partials_of_different_fits_do_not_merge():
    a = Partial.empty(4, 3, meta={"source": "a", "target": "t"})
    b = Partial.empty(4, 3, meta={"source": "b", "target": "t"})
    try:
        a.merged(b)
    except Exception as err:  # noqa: BLE001
        assert "differ in source" in str(err)
    else:
        raise AssertionError("merged")


def test_adapter_round_trips_through_its_file(tmp_path):
    adapter = Adapter(torch.randn(5, 7), torch.randn(5), {"readout": {"kind": "resid", "layer": 1}, "x": [1, 2]},
                      torch.randn(5))
    adapter.save(tmp_path)
    again = Adapter.load(tmp_path)
    assert torch.equal(again.W, adapter.W) and torch.equal(again.b, adapter.b)
    assert torch.equal(again.negative, adapter.negative) and again.meta == adapter.meta
    assert again.readout == Readout("resid", 1)
    assert (tmp_path / "adapter.json").is_file()


def _strict_json(text: str):
    """JSON as a strict reader (jq, JavaScript) takes it: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_shards_written_before_the_image_settings_were_json_values_still_merge(tmp_path):
    """Older shards recorded `str()` of each image setting ("None"); a newer shard of the same fit records
    null. They are one fit's, and merge; other photos still do not."""
    settings = {"source": "samples", "path": None, "names": ["coffee"], "limit": None, "num_shards": 2}
    older = {"source": "samples", "path": "None", "names": "['coffee']", "limit": "None", "num_shards": "2"}
    a = Partial.empty(4, 3, meta={"source": "s", "target": "t", "image_set": settings})
    b = Partial.empty(4, 3, meta={"source": "s", "target": "t", "image_set": older})
    b.save(tmp_path / "older.safetensors")
    a.merged(Partial.load(tmp_path / "older.safetensors"))
    with pytest.raises(UserError, match="differ in image_set"):
        a.merged(Partial.empty(4, 3, meta={"source": "s", "target": "t", "image_set": {**settings, "path": "/x"}}))


# ---------------------------------------------------------------- `dsl adapter fit` / `merge`


def _image_folder(folder, n: int = 48):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth random pictures of a few sizes: the encoders see varied, natural-ish inputs
        small = (rng.random((6, 5, 3)) * 255).astype("uint8")
        Image.fromarray(small).resize((70 + i % 3 * 9, 64 + i % 2 * 11), Image.BICUBIC).save(folder / f"p{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def resid_adapter(photos, tmp_path_factory):
    """`dsl adapter fit debug=tiny` of the tiny encoder's residual after block 3 (p = 64) to the tiny
    Kandinsky 2.2 decoder's space (q = 32), one decoded example."""
    from dsl_cli import cli

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("adapter") / "fitted"
    code = cli.main(["adapter", "fit", "debug=tiny", f"images.path={photos}", "adapter.readout=resid",
                     "adapter.layer=3", "adapter.augment=1", "adapter.examples=1", f"adapter.out={out}"])
    torch.set_num_threads(before)
    assert code == 0
    return out


def test_fit_command_writes_adapter_metrics_and_page(resid_adapter):
    adapter = Adapter.load(resid_adapter)
    assert adapter.W.shape == (32, 64) and adapter.readout == Readout("resid", 3)
    meta = adapter.meta
    assert meta["images"] == 48 and meta["train_rows"] == 2 * (48 - meta["heldout_images"])  # 1 view + itself
    assert meta["source"]["source"] == "tiny" and meta["target"]["family"] == "kandinsky22"
    assert set(meta["metrics"]) >= {"cosine_mean", "cosine_p5", "r2", "top1", "top5"}
    target = HookedEncoder(build_tiny_visual())  # the tiny decoder's own encoder: its all-zeros image's embedding
    assert torch.allclose(adapter.negative, target.zero_embed()[0], atol=1e-6)
    page = (resid_adapter / "index.html").read_text()
    assert "top-5 retrieval" in page and "examples/" in page
    assert len(list((resid_adapter / "examples").glob("*.png"))) == 3


def test_a_fit_without_held_out_images_writes_strict_json(tmp_path, monkeypatch, capsys):
    """With no image held out every tried strength's error is NaN: adapter.json held NaN (not JSON), and the
    image settings the strings "None". Now null, in adapter.json and inside adapter.safetensors; a file
    written before (NaN inside) still loads."""
    from safetensors import safe_open

    from helpers import dsl_in_process

    code, err = dsl_in_process(["adapter", "fit", "debug=tiny", "adapter.readout=resid", "adapter.layer=3",
                                "adapter.augment=1", "adapter.examples=0", "adapter.out=fitted"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err
    meta = _strict_json((tmp_path / "fitted" / "adapter.json").read_text())
    assert meta["heldout_images"] == 0 and set(meta["lambdas_tried"].values()) == {None}
    assert meta["image_set"] == {"source": "samples", "path": None, "names": None, "limit": None, "num_shards": 1}
    with safe_open(str(tmp_path / "fitted" / "adapter.safetensors"), framework="pt") as f:
        assert _strict_json(f.metadata()["dsl_adapter"]) == meta
    older = Adapter(torch.ones(2, 3), torch.zeros(2), {"metrics": {"r2": math.nan}})
    older.save(tmp_path / "older")
    from safetensors.torch import save_file  # the metadata as dsl wrote it before: NaN inside
    save_file({"W": older.W, "b": older.b}, tmp_path / "older" / "adapter.safetensors",
              metadata={"dsl_adapter": json.dumps(older.meta)})
    assert math.isnan(Adapter.load(tmp_path / "older").meta["metrics"]["r2"])


def test_fit_command_sharded_then_merged_equals_one_fit(photos, tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    common = ["adapter", "fit", "debug=tiny", f"images.path={photos}", "adapter.examples=0"]
    code, err = dsl_in_process([*common, f"adapter.out={tmp_path / 'one'}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    for k in range(3):
        code, err = dsl_in_process([*common, f"adapter.out={tmp_path / 'sharded'}", "images.num_shards=3",
                                    f"images.shard={k}"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        assert not (tmp_path / "sharded" / "adapter.safetensors").exists()
    code, err = dsl_in_process(["adapter", "merge", str(tmp_path / "sharded")], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    one, sharded = Adapter.load(tmp_path / "one"), Adapter.load(tmp_path / "sharded")
    assert torch.allclose(one.W, sharded.W, atol=1e-6) and torch.allclose(one.b, sharded.b, atol=1e-6)
    assert torch.equal(one.negative, sharded.negative)
    assert one.meta["images"] == sharded.meta["images"] == 48
    # a finished adapter takes no shard more (it was overwritten by the next merge), and shards of another
    # image set do not add to these (a shard of other photos was merged in silently)
    weights = (tmp_path / "sharded" / "adapter.safetensors").read_bytes()
    code, err = dsl_in_process([*common, f"adapter.out={tmp_path / 'sharded'}", "images.num_shards=3",
                                "images.shard=0"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "holds a finished adapter" in err, err
    assert (tmp_path / "sharded" / "adapter.safetensors").read_bytes() == weights
    code, err = dsl_in_process([*common, f"adapter.out={tmp_path / 'mixed'}", "images.num_shards=2",
                                "images.shard=0"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, err = dsl_in_process([*common, "images.limit=40", f"adapter.out={tmp_path / 'mixed'}",
                                "images.num_shards=2", "images.shard=1"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, err = dsl_in_process(["adapter", "merge", str(tmp_path / "mixed")], tmp_path, monkeypatch, capsys)
    assert code == 2 and "they differ in image_set" in err, err


def test_merge_refuses_a_missing_shard(photos, tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    code, _ = dsl_in_process(["adapter", "fit", "debug=tiny", f"images.path={photos}", "images.num_shards=2",
                              "images.shard=1", f"adapter.out={tmp_path}"], tmp_path, monkeypatch, capsys)
    assert code == 0
    code, err = dsl_in_process(["adapter", "merge", str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "shard(s) 0 of 2 not there yet" in err and len(err.strip().splitlines()) == 1


def test_fit_and_merge_write_only_their_own_folder_and_refuse_damage_in_one_line(photos, tmp_path, monkeypatch,
                                                                                  capsys):
    """`dsl adapter fit` claims its folder as `dsl run` claims a run's: a folder of the user's, a planted link
    and a finished adapter are refused in one line (status 2) with nothing of the user's changed; `merge`
    refuses a folder that is not a sharded fit's and a damaged shard file; a run refuses a damaged adapter."""
    from helpers import dsl_in_process

    fit = ["adapter", "fit", "debug=tiny", f"images.path={photos}", "adapter.examples=0"]

    def refused(args: list[str]) -> str:
        code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        return lines[0]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.html").write_text("precious")
    assert "not a dsl folder" in refused([*fit, f"adapter.out={tmp_path / 'mine'}"])
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "index.html").symlink_to(tmp_path / "mine" / "index.html")
    assert "not a dsl folder" in refused([*fit, f"adapter.out={tmp_path / 'linked'}"])  # the link is the user's
    assert dsl_in_process([*fit, f"adapter.out={tmp_path / 'one'}"], tmp_path, monkeypatch, capsys)[0] == 0
    weights = (tmp_path / "one" / "adapter.safetensors").read_bytes()
    shutil.copytree(tmp_path / "one", tmp_path / "planted")  # a link planted in a folder of dsl's
    (tmp_path / "planted" / "index.html").unlink()
    (tmp_path / "planted" / "index.html").symlink_to(tmp_path / "mine" / "index.html")
    assert "symbolic link" in refused([*fit, f"adapter.out={tmp_path / 'planted'}"])
    assert (tmp_path / "mine" / "index.html").read_text() == "precious"
    assert "already holds an adapter, complete: to make it again, choose another adapter.out" in refused(
        [*fit, f"adapter.out={tmp_path / 'one'}", "adapter.augment=2"])
    assert (tmp_path / "one" / "adapter.safetensors").read_bytes() == weights
    assert "not the folder of a sharded" in refused(["adapter", "merge", str(tmp_path / "nowhere")])
    (tmp_path / "one" / "adapter.safetensors").write_bytes(weights[:100])
    assert "adapter.safetensors: not an adapter" in refused(["run", "debug=tiny", f"adapter={tmp_path / 'one'}",
                                                            "decode.enabled=false", "hydra.run.dir=run"])
    for k in range(2):
        code, err = dsl_in_process([*fit, f"adapter.out={tmp_path / 'sharded'}", "images.num_shards=2",
                                    f"images.shard={k}"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
    (tmp_path / "sharded" / "shards" / "negative.pt").write_bytes(b"junk" * 10)
    assert "negative.pt: not the unconditional embedding" in refused(["adapter", "merge", str(tmp_path / "sharded")])


def test_a_run_continued_after_its_adapter_was_fitted_again_is_refused(resid_adapter, tmp_path, monkeypatch,
                                                                        capsys):
    """As for an SAE: the manifest keeps the adapter's fingerprint across attempts, and other weights in the
    same folder stop a continued run in one line."""
    import shutil

    from helpers import dsl_in_process

    folder = Path(shutil.copytree(resid_adapter, tmp_path / "adapter"))
    run = tmp_path / "run"
    args = [*_run_args(folder, "steering"), "decode.enabled=false", f"hydra.run.dir={run}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    adapter = Adapter.load(folder)
    Adapter(adapter.W * 1.01, adapter.b, adapter.meta, adapter.negative).save(folder)  # fitted again
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "changed since the run started" in err, err[-3000:]


def test_a_stopped_fit_says_the_same_command_starts_it_again(monkeypatch, capsys):
    """A fit has no run to resume: its stop line says so, not `dsl run resume=`."""
    import signal

    from dsl_cli import adapter_cli, cli
    from dsl_cli.errors import Interrupted

    def stopped(args):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(adapter_cli, "fit_command", stopped)
    assert cli.main(["adapter", "fit", "debug=tiny"]) == 143
    err = capsys.readouterr().err
    assert "the same command starts it again" in err and "resume=" not in err, err


def test_adapter_help_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from dsl_cli.cli import main; assert main(['adapter', '--help']) == 0; "
            "assert main(['adapter', 'fit', '--help']) == 0; assert 'torch' not in sys.modules, 'torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "adapter.readout=embed|resid" in out.stdout


def test_fit_options_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    for arg, words in (("adapter.redout=resid", "no such setting"), ("adapter.readout=mean", "choose one of"),
                       ("adapter.layer=x", "takes a number")):
        code, err = dsl_in_process(["adapter", "fit", "debug=tiny", arg, "adapter.layer=9"][:4], tmp_path,
                                   monkeypatch, capsys)
        assert code == 2 and words in err, (arg, err)


# ---------------------------------------------------------------- lenses through an adapter


def _random_adapter(encoder: HookedEncoder, q: int, readout: Readout = Readout("embed"), seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    p = readout.width(encoder)
    return Adapter(torch.randn(q, p, generator=g) / p**0.5, torch.randn(q, generator=g),
                   {"readout": {"kind": readout.kind, "layer": readout.layer}})


@pytest.mark.parametrize("visual", [build_tiny_visual, _other_visual], ids=["tiny", "width48"])
def test_closed_form_through_the_adapter_equals_the_hooked_path_through_it(visual):
    encoder = HookedEncoder(visual())
    adapter = _random_adapter(encoder, q=21)
    adapted = AdaptedEncoder(encoder, adapter)
    pixels = _pixels(3, seed=4)
    cache = adapted.run_with_cache(pixels)
    components = ["L0H1", "L1MLP", f"L{encoder.n_layers - 1}H3"]
    for mode, alpha in (("norm", 2.0), ("add", 0.7), ("scale", 3.0)):
        closed = adapted.steer(cache, components, mode=mode, alpha=alpha)  # [B, K, 21]
        assert closed.shape == (3, 3, 21)
        for k, comp in enumerate(components):
            hooked = adapter(encoder.steer_hooked(pixels, comp, mode=mode, alpha=alpha))
            assert torch.allclose(closed[:, k], hooked, atol=1e-4), (mode, comp)
    assert torch.allclose(cache.embeds, adapter(encoder.embed(pixels)), atol=1e-5)
    assert torch.allclose(adapted.embed(pixels), cache.embeds, atol=1e-5)
    dl = adapted.diffusion_lens(cache, [encoder.n_layers - 1])[:, 0]  # the last residual is the embedding
    assert torch.allclose(dl, cache.embeds, atol=1e-4)
    assert torch.allclose(adapted.zero_embed(), adapter(encoder.zero_embed()), atol=1e-5)  # no negative stored
    adapter.negative = torch.randn(21)  # the target encoder's own, as `dsl adapter fit` stores it: the decoders'
    assert torch.equal(adapted.zero_embed(), adapter.negative[None])  # unconditional embedding


def test_residual_adapter_maps_the_steered_final_residual():
    encoder = HookedEncoder(build_tiny_visual())
    readout = Readout("resid", encoder.n_layers - 1)
    adapter = _random_adapter(encoder, q=19, readout=readout)
    adapted = AdaptedEncoder(encoder, adapter)
    pixels = _pixels(2, seed=5)
    cache = adapted.run_with_cache(pixels)
    assert torch.allclose(cache.embeds, adapter(cache.resid[:, -1]))
    steered = adapted.steer(cache, ["L2H0"], mode="add", alpha=1.5)[:, 0]
    assert torch.allclose(steered, adapter(cache.resid[:, -1] + 1.5 * cache.head_writes[:, 2, 0]), atol=1e-5)
    direct = adapted.direct(cache, ["L1MLP"])[:, 0]
    assert torch.allclose(direct, adapter(cache.mlp_writes[:, 1]), atol=1e-6)


def test_residual_adapter_of_an_earlier_block_steers_the_residual_it_maps():
    """An adapter of the residual after block 1 (of 4): DSL through it maps x_2 + delta(c), the residual it was
    fitted on with c steered (every later submodule patched back); the identity steer is the clean embedding,
    norm mode scales c to |x_2|, and a component of a later block (whose write never reaches x_2) is refused."""
    encoder = HookedEncoder(build_tiny_visual())
    adapter = _random_adapter(encoder, q=19, readout=Readout("resid", 1))
    adapted = AdaptedEncoder(encoder, adapter)
    cache = adapted.run_with_cache(_pixels(3, seed=6))
    x2 = cache.resid[:, 2]
    assert torch.allclose(cache.embeds, adapter(x2))
    assert torch.allclose(adapted.steer(cache, ["L1H2", "L0MLP"], mode="scale", alpha=1.0),
                          cache.embeds[:, None].expand(-1, 2, -1), atol=1e-6)
    add = adapted.steer(cache, ["L0H3"], mode="add", alpha=1.5)[:, 0]
    assert torch.allclose(add, adapter(x2 + 1.5 * cache.head_writes[:, 0, 3]), atol=1e-5)
    write = cache.mlp_writes[:, 1]
    norm = adapted.steer(cache, ["L1MLP"], mode="norm", alpha=2.0)[:, 0]
    expected = adapter(x2 + 2.0 * x2.norm(dim=-1, keepdim=True) * write / write.norm(dim=-1, keepdim=True))
    assert torch.allclose(norm, expected, atol=1e-5)
    with pytest.raises(UserError, match=r"^L02H00 \(and 1 more\) writes after block 1, whose residual the adapter"):
        adapted.steer(cache, ["L0H0", "L2H0", "L3MLP"])


def test_a_run_steering_past_a_residual_adapter_s_block_is_refused_before_loading(resid_adapter, tmp_path,
                                                                                  monkeypatch, capsys):
    from helpers import dsl_in_process

    path = _saved_like(resid_adapter, tmp_path / "block1", readout={"kind": "resid", "layer": 1})
    code, err = dsl_in_process(_run_args(path, "steering", "layer=[1,2]", "clamp_to_model=false",
                                         f"hydra.run.dir={tmp_path / 'run'}"), tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "L02H00 (and 3 more) writes after block 1" in err and "layer='range(0,2)'" in err
    assert not (tmp_path / "run").exists()
    # debug=tiny moves layers into the model (clamp_to_model) once it is loaded: refused there, as a bad input
    code, err = dsl_in_process(_run_args(path, "steering", "layer=2", f"hydra.run.dir={tmp_path / 'late'}"),
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and err.splitlines()[-1].startswith("dsl: error: L02H00 (and 3 more) writes after block 1")


def _run_args(adapter, lens: str, *extra: str) -> list[str]:
    return ["run", "debug=tiny", f"adapter={adapter}", f"lens={lens}", "images.names=[chelsea]", *extra]


def test_runs_decode_through_the_adapter_with_every_lens(resid_adapter, tmp_path, monkeypatch, capsys):
    import json

    from helpers import dsl_in_process

    from dsl_cli.figures import models_text  # what the grids' and heatmaps' titles name the models with

    for lens, extra in (("steering", ["layer=3", "head=[0,2]"]), ("diffusion", ["layer=[1,3]"]),
                        ("direct", ["layer=3", "head=[1]"])):
        out = tmp_path / lens
        code, err = dsl_in_process(_run_args(resid_adapter, lens, *extra, f"hydra.run.dir={out}"), tmp_path,
                                   monkeypatch, capsys)
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["adapter"]["name"] == "fitted"
        assert manifest["adapter"]["heldout_cosine"] == Adapter.load(resid_adapter).meta["metrics"]["cosine_mean"]
        assert manifest["decoded"] == manifest["to_decode"] >= 1 and list(out.rglob("*.png"))
        cosine = manifest["adapter"]["heldout_cosine"]
        assert f"tiny encoder via adapter fitted (held-out cos {cosine:.2f}) -> kandinsky22" in models_text(out)


def test_verify_runs_through_an_embedding_adapter(photos, tmp_path, monkeypatch, capsys):
    """lens.verify compares the closed form with the hooked pass, both through the adapter."""
    import json

    from helpers import dsl_in_process

    code, err = dsl_in_process(["adapter", "fit", "debug=tiny", f"images.path={photos}", "adapter.examples=0",
                                f"adapter.out={tmp_path / 'a'}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    identity = Adapter.load(tmp_path / "a")  # tiny to tiny: the identity
    assert (identity.W - torch.eye(32)).abs().max() < 1e-3
    code, err = dsl_in_process(_run_args(tmp_path / "a", "steering", "layer=2", "head=[1]", "lens.verify=true",
                                         "decode.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"), tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["adapter"]


def _saved_like(resid_adapter, folder, **changes) -> str:
    adapter = Adapter.load(resid_adapter)
    for key, value in changes.items():
        adapter.meta[key] = value
    adapter.save(folder)
    return str(folder)


@pytest.mark.parametrize("change, args, words", [
    ({"source": {"source": "open_clip", "name": "ViT-L-14", "pretrained": "openai", "checkpoint": None}}, [],
     "was fitted for encoder ViT-L-14 (openai), not tiny encoder"),
    ({}, ["decoder=kandinsky21_tiny", "encoder=vitl14_tiny"], "maps to decoder kandinsky22 (tiny), not kandinsky21"),
    ({"source_shape": {"n_layers": 6, "d_model": 64, "d_embed": 32, "readout_kind": "cls"}}, [],
     "fitted on another readout of another model: n_layers 6"),
    ({}, ["lens=logit"], "an adapter decodes the lenses steering, diffusion, direct"),
    ({}, ["lens.verify=true"], "lens.verify=true with adapter="),
])
def test_runs_refuse_an_adapter_fitted_for_something_else(resid_adapter, tmp_path, monkeypatch, capsys, change, args,
                                                          words):
    from helpers import dsl_in_process

    path = _saved_like(resid_adapter, tmp_path / "other", **change)
    code, err = dsl_in_process(["run", "debug=tiny", f"adapter={path}", "layer=3", "images.names=[chelsea]", *args,
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bench_script_answers_help_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_adapter_memory.py"
    # as `python scripts/bench_adapter_memory.py` runs it: the script's folder first on the path
    code = (f"import runpy, sys; sys.argv = ['x', '--help']; sys.path.insert(0, {str(script.parent)!r})\n"
            f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2000" in out.stdout and "--small" in out.stdout


def _family_encoder(source: str) -> HookedEncoder:
    """The any-ViT interface's tiny timm (mean readout) or transformers DINOv2 (registers) encoder; skipped
    where this checkout does not have them yet."""
    from types import SimpleNamespace

    from dsl_cli.encoder import load_encoder

    cfg = SimpleNamespace(source=source, name="tiny", pretrained=None, checkpoint=None, repo_id=f"tiny-{source}",
                          subfolder="", dtype="fp32", batch_size=4)
    try:
        return load_encoder(cfg)[0]
    except (UserError, ImportError, AttributeError) as err:
        pytest.skip(f"encoder.source={source}: {err}")


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_any_vit_of_the_encoder_interface_decodes_through_an_adapter(source):
    """An adapter fitted on another library's ViT (timm's mean readout, DINOv2's registers) keeps the closed
    form equal to the hooked pass, both through the adapter."""
    encoder = _family_encoder(source)
    s = _readouts(encoder, Readout("embed"), n=120)
    g = torch.Generator().manual_seed(2)
    t = torch.tanh(s @ torch.randn(s.shape[1], 24, generator=g, dtype=torch.float64) / 4)
    adapter = fit(_partial(_names(len(s)), s, t))
    assert adapter.W.shape == (24, s.shape[1]) and adapter.meta["metrics"]["r2"] > 0.5
    adapted = AdaptedEncoder(encoder, adapter)
    pixels = _pixels(2, seed=6)
    cache = adapted.run_with_cache(pixels)
    closed = adapted.steer(cache, ["L1H0", "L2MLP"], mode="norm", alpha=2.0)
    for k, comp in enumerate(["L1H0", "L2MLP"]):
        assert torch.allclose(closed[:, k], adapter(encoder.steer_hooked(pixels, comp, mode="norm", alpha=2.0)),
                              atol=1e-4), comp


@pytest.mark.parametrize("folder", ["/tmp/my ad (v2)", "/tmp/it's [x]", "/tmp/plain"])
def test_adapter_out_with_spaces_and_brackets_is_the_folder_typed(folder: str) -> None:
    """`adapter.out=/tmp/my ad (v2)` was quoted for Hydra (config.path_override) and the quotes kept: the fit
    wrote to `./'/tmp/my ad (v2)'/`, relative to the working folder."""
    from dsl_cli.adapter_cli import parse_options
    from dsl_cli.config import folder_overrides

    options, rest = parse_options(folder_overrides([f"adapter.out={folder}", "debug=tiny"]))
    assert options.out == folder and rest == ["debug=tiny"]


def _error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("dsl: error:"))


def test_a_wrong_target_is_fixed_by_the_setting_the_message_names(tmp_path: Path, monkeypatch, capsys) -> None:
    """`adapter.target=vitl14` with the tiny decoder said "use encoder=tiny or ...": adding `encoder=tiny`
    changed nothing; the setting to change is adapter.target."""
    from helpers import dsl_in_process

    fit = ["adapter", "fit", "debug=tiny", "images.limit=2", "adapter.examples=0"]
    code, err = dsl_in_process([*fit, "adapter.target=vitl14"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "use adapter.target=tiny" in _error_line(err) and "encoder=tiny" not in _error_line(err), err
    code, err = dsl_in_process([*fit, "adapter.target=vitl"], tmp_path, monkeypatch, capsys)  # not a preset
    assert code == 2 and _error_line(err).startswith(
        "dsl: error: adapter.target=vitl: no such option of encoder (did you mean adapter.target=vitl14?"), err
    code, err = dsl_in_process([*fit, "adapter.target=tiny", f"adapter.out={tmp_path / 'a'}"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err


def test_adapter_layer_without_a_residual_readout_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """`adapter.layer=2` alone fitted the embedding and recorded layer 2 in adapter.json."""
    from helpers import dsl_in_process

    code, err = dsl_in_process(["adapter", "fit", "debug=tiny", "adapter.layer=2", f"adapter.out={tmp_path / 'a'}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and "add adapter.readout=resid" in _error_line(err) and not (tmp_path / "a").exists()


def test_a_fit_refused_for_missing_weights_leaves_no_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """The fit claimed its folder before looking up the weights: a refusal left it marked `started`."""
    import huggingface_hub.constants as constants
    from helpers import dsl_in_process

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "a"
    code, err = dsl_in_process(["adapter", "fit", "debug=tiny", "encoder=vitl14", "images.limit=2", f"adapter.out={out}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and "hf download" in err and not out.exists(), err


@pytest.mark.parametrize(("preset", "name"), [("tiny", "tiny"), ("tiny_timm", "timm_tiny"), ("vitl14", "ViT-L-14"),
                                              ("hf", "hf_dinov2-base")])
def test_default_adapter_and_sae_folders_differ_by_encoder(preset: str, name: str) -> None:
    """`debug=tiny_timm` and `debug=tiny` both fitted into `tiny-embed-to-...` (the second refused as "already
    holds a run"), and every transformers model into `hf-...`."""
    from dsl_cli.adapter_cli import FitOptions, compose, default_out
    from dsl_cli.config import encoder_folder_name

    cfg = compose([f"encoder={preset}", "decoder=tiny"])
    assert encoder_folder_name(cfg.encoder) == name
    assert default_out(cfg, FitOptions()).name == f"{name}-embed-to-kandinsky22_tiny"
    other = compose([f"encoder={preset}", "encoder.repo_id=google/siglip-base-patch16-224"]).encoder
    assert (encoder_folder_name(other) == "hf_siglip-base-patch16-224") == (preset == "hf")


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--force"]])
def test_adapter_merge_without_one_folder_is_one_line(args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    from helpers import dsl_in_process

    code, err = dsl_in_process(["adapter", "merge", *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith("dsl: error: usage: dsl adapter merge FOLDER") and len(err.splitlines()) == 1


# ---------------------------------------------------------------- damaged metadata, refused fits, names


def _damaged_copy(resid_adapter, folder: Path, field: str, value) -> Path:
    """The fitted adapter with one metadata field (dotted: `metrics.cosine_mean`) set to `value`, as a hand
    edit of adapter.safetensors's header leaves it."""
    from safetensors.torch import save_file

    adapter = Adapter.load(resid_adapter)
    meta = json.loads(json.dumps(adapter.meta))
    *parents, key = field.split(".")
    holder = meta
    for name in parents:
        holder = holder[name]
    holder[key] = value
    folder.mkdir(parents=True)
    tensors = {"W": adapter.W.contiguous(), "b": adapter.b.contiguous(), "negative": adapter.negative.contiguous()}
    save_file(tensors, folder / "adapter.safetensors", metadata={"dsl_adapter": json.dumps(meta)})
    return folder


@pytest.mark.parametrize("field, value", [
    ("metrics.cosine_mean", "0.9"), ("metrics.r2", [1]), ("readout.layer", True), ("readout.layer", -1),
    ("readout.layer", 2.5), ("readout.kind", None), ("lambda", "0.1"), ("lambda", math.inf),
    ("relative_lambda", False), ("heldout_fraction", "x"), ("images", True), ("heldout_images", "2"),
    ("name", 7), ("source_label", None), ("target.family", 3), ("target.space.width", "32"),
    ("source_shape.n_layers", True), ("source.name", 1), ("lambdas_tried.0", "x"), ("metrics", "good"),
])
def test_adapter_metadata_of_the_wrong_type_is_refused_naming_the_field(resid_adapter, tmp_path, field, value):
    """A string in metrics.cosine_mean loaded, and a run ended in `internal error ... Unknown format code 'f'`
    where describe() formatted it; `readout.layer: true` passed (a bool is an int) and said `after block True`."""
    path = _damaged_copy(resid_adapter, tmp_path / "a", field, value)
    with pytest.raises(UserError, match=rf"\(metadata {re.escape(field)} is .*\); the file is damaged"):
        Adapter.load(path)


def test_a_run_through_an_adapter_with_a_damaged_metric_is_one_line(resid_adapter, tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    path = _damaged_copy(resid_adapter, tmp_path / "a", "metrics.cosine_mean", "high")
    code, err = dsl_in_process(_run_args(path, "steering", "layer=3", f"hydra.run.dir={tmp_path / 'run'}"),
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "metadata metrics.cosine_mean is" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("images, args, words", [
    (3, ["adapter.readout=resid", "adapter.layer=99"], "adapter.layer=99: the encoder has blocks 0 to 3"),
    (1, [], "1 training image(s): an adapter needs at least 2"),
])
@pytest.mark.parametrize("from_config", [True, False], ids=["from-config", "after-load"])
def test_a_refused_fit_leaves_no_folder_it_made(images, args, words, from_config, tmp_path, monkeypatch, capsys):
    """Refused after its folder was claimed, a fit left `manifest.json` (status: started) in a folder it
    made. Checked from the config where it tells (`after-load`: where it does not, and the check needs the
    model): the folder dsl made is removed, and one the user made is left as it was, empty."""
    import dsl_cli.encoder
    from helpers import dsl_in_process

    if not from_config:
        monkeypatch.setattr(dsl_cli.encoder, "model_shape", lambda cfg: None)
        monkeypatch.setattr("dsl_cli.adapters.training_rows", lambda *a, **k: 2, raising=False)
    photos = _image_folder(tmp_path / "photos", images)
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "made" / "ad", tmp_path / "mine"):
        code, err = dsl_in_process(["adapter", "fit", "debug=tiny", f"images.path={photos}", "adapter.examples=0",
                                    f"adapter.out={out}", *args], tmp_path, monkeypatch, capsys)
        assert code == 2 and words in _error_line(err) and "Traceback" not in err, err
    assert not (tmp_path / "made" / "ad").exists()
    assert list((tmp_path / "mine").iterdir()) == []


def test_an_adapter_knows_its_checkpoint_by_resolved_path_and_content(tmp_path, monkeypatch):
    """`encoder.checkpoint=./w.safetensors` at the fit and its absolute path at the run were told apart (a
    false refusal), and another file put at the same path was taken for the one fitted on."""
    from dsl_cli.adapter_cli import compose
    from dsl_cli.adapters import encoder_identity, run_adapter

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(bytes(range(256)) * 40)
    fitted = compose(["debug=tiny", "encoder=tiny_timm", "encoder.checkpoint=./w.safetensors"])
    meta = {"source": encoder_identity(fitted.encoder), "readout": {"kind": "embed", "layer": None},
            "target": {"family": str(fitted.decoder.family), "decoder_source": str(fitted.decoder.source)}}
    Adapter(torch.zeros(32, 40), torch.zeros(32), meta).save(tmp_path / "a")
    run = compose(["debug=tiny", "encoder=tiny_timm", f"encoder.checkpoint={weights}", f"adapter={tmp_path / 'a'}"])
    assert run_adapter(run) is not None
    weights.write_bytes(bytes(range(255, -1, -1)) * 40)  # another file at the same path
    with pytest.raises(UserError, match=r"fitted on another file at encoder\.checkpoint=.*w\.safetensors"):
        run_adapter(run)
    from dsl_cli.adapters import checkpoint_fingerprint

    big = tmp_path / "big.bin"  # past 1 MiB only samples are read: a change in one of them is seen
    big.write_bytes(bytes(3 << 20))
    before = checkpoint_fingerprint(big)
    with open(big, "r+b") as handle:
        handle.seek((3 << 20) - 1)
        handle.write(b"\x01")
    assert checkpoint_fingerprint(big) != before


def test_held_out_examples_of_names_alike_get_pictures_of_their_own(tmp_path):
    """`a b` and `a_b` were both filed as examples/a_b.*.png: the second overwrote the first's pictures."""
    from PIL import Image

    from dsl_cli.adapter_cli import compose, decode_examples
    from dsl_cli.images import ImageSet, InputImage

    names = ["a b", "a_b", "A_B"]
    cfg = compose(["debug=tiny"])
    partial = Partial.empty(32, 32)
    g = torch.Generator().manual_seed(0)
    partial.add_heldout(names, torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g))
    images = ImageSet([InputImage(n, Image.new("RGB", (40, 30), (40 * i, 90, 200)), "memory")
                       for i, n in enumerate(names)])
    target = HookedEncoder(build_tiny_visual())
    decode_examples(cfg, tmp_path, Adapter(torch.eye(32), torch.zeros(32)), partial, images, 3, target, "cpu")
    examples = json.loads((tmp_path / "examples.json").read_text())
    files = [ex[key] for ex in examples for key in ("input", "target", "adapted")]
    assert len({f.casefold() for f in files}) == 9 and [ex["name"] for ex in examples] == sorted(names)
    assert len(list((tmp_path / "examples").glob("*.png"))) == 9


def test_the_guides_tiny_fit_holds_out_sample_photos():
    """The guide's `dsl adapter fit debug=tiny ...` on the five sample photos held none out (a tenth, by
    name hash): it printed `no held-out image` and wrote no metrics."""
    from dsl_cli.images import SAMPLES

    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    line = next(l for l in guide.splitlines() if l.startswith("dsl adapter fit debug=tiny"))
    share = re.search(r"adapter\.heldout=([0-9.]+)", line)
    held = [name for name in SAMPLES if is_heldout(name, float(share.group(1)) if share else 0.1)]
    assert 1 <= len(held) < len(SAMPLES) - 1, (line, held)


@pytest.mark.parametrize("preset", ["tiny_dinov2", "tiny_timm"])
def test_the_tiny_any_vit_presets_fit_into_the_tiny_decoder_and_decode_small(preset: str, tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    """debug=tiny_dinov2 and debug=tiny_timm are debug=tiny with another ViT: an adapter fits into the tiny
    decoder (it targeted the real Kandinsky prior, and asked for its download), and a run through it decodes
    debug=tiny's 64-pixel, 2-step pictures (it decoded 512 pixels in 100 steps: 11 minutes for 2 pictures)."""
    from PIL import Image

    from helpers import dsl_in_process

    out = tmp_path / "adapter"
    code, err = dsl_in_process(["adapter", "fit", f"debug={preset}", "adapter.heldout=0.4", f"adapter.out={out}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert json.loads((out / "adapter.json").read_text())["target"]["decoder_source"] == "tiny"
    run = tmp_path / "run"
    code, err = dsl_in_process(["run", f"debug={preset}", f"adapter={out}", "decode.enabled=true", "layer=3",
                                "images.limit=1", "decode.top_k=1", f"hydra.run.dir={run}"], tmp_path, monkeypatch,
                               capsys)
    assert code == 0, err[-3000:]
    (picture,) = run.glob("images/*/steering/*.png")
    assert Image.open(picture).size == (64, 64)
