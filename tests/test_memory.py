"""Memory: the logit lens's text tower built alone (checked against open_clip's whole CLIP), read from a
checkpoint without the vision tensors, never built when its classifier is kept, and released before
anything else runs; batches sized from free memory, and the encoder parked off a GPU that is short."""

from __future__ import annotations

import json
import platform
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dsl_cli import lenses, memory, studies
from dsl_cli.config import EncoderConfig
from dsl_cli.decoder import decoder_bytes, load_decoder
from dsl_cli.encoder import build_tiny_clip, build_tiny_text, loading, load_text_model
from dsl_cli.encoder.loading import TINY_EMBED_DIM, TINY_TEXT_CFG, TINY_VISION_CFG
from dsl_cli.errors import UserError
from dsl_cli.memory import GB, module_bytes

TINY_NAME = "dsl-test-tiny"  # the tiny CLIP registered in open_clip, so that its own loader can load it
PROMPTS = ["a photo of a dog.", "cat", "", "a " * 70 + "long one", "an origami toucan on a tiled floor."]


@pytest.fixture(scope="module")
def tiny_registered(tmp_path_factory) -> str:
    """Register the tiny CLIP's architecture with open_clip under TINY_NAME."""
    folder = tmp_path_factory.mktemp("configs")
    config = {"embed_dim": TINY_EMBED_DIM, "vision_cfg": TINY_VISION_CFG, "text_cfg": TINY_TEXT_CFG}
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    return TINY_NAME


def open_clip_config(name: str, pretrained) -> EncoderConfig:
    return EncoderConfig(source="open_clip", name=name, pretrained=pretrained)


def test_the_text_tower_alone_encodes_as_open_clips_clip() -> None:
    """TextTower.encode_text (padding cut off where the tower is causal) equals CLIP.encode_text on the full
    77 tokens, for prompts from empty to nearly the whole context."""
    clip, tower = build_tiny_clip(), build_tiny_text()
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    assert tower.trims and int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # some padding is cut
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_text(tokens, normalize=True), clip.encode_text(tokens, normalize=True),
                                   atol=1e-6, rtol=1e-5)
        short = tokens[1:3]  # the cut depends on the batch: two short prompts are computed on 3 columns
        torch.testing.assert_close(tower.encode_text(short), clip.encode_text(short), atol=1e-6, rtol=1e-5)
    assert tower.text.attn_mask.shape == (77, 77)  # the full mask is back after the call


def test_the_text_tower_computes_only_the_columns_up_to_the_last_end_of_text_token() -> None:
    """The trimmed pass runs the transformer on exactly the columns up to the batch's last end-of-text token
    (counted here from the tokenizer's own end-of-text id), not one more."""
    tower = build_tiny_text()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    seen: list[int] = []
    tower.text.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    for prompts in (PROMPTS[1:3], PROMPTS):
        tokens = tokenizer(prompts)
        last = max(row.tolist().index(tokenizer.eot_token_id) for row in tokens)
        with torch.no_grad():
            tower.encode_text(tokens)
        assert seen.pop() == last + 1


def test_a_tower_that_cannot_cut_padding_encodes_all_columns_as_open_clips_clip() -> None:
    """A text tower without a causal mask sees the padding, so nothing is cut: TextTower.encode_text equals
    CLIP.encode_text of the same weights, normalised or not."""
    text_cfg = {**TINY_TEXT_CFG, "no_causal_mask": True}
    torch.manual_seed(0)
    clip = open_clip.CLIP(TINY_EMBED_DIM, TINY_VISION_CFG, text_cfg).eval()
    tower = loading.TextTower(loading.build_text_tower(TINY_EMBED_DIM, open_clip.CLIPTextCfg(**text_cfg))).eval()
    state = clip.state_dict()
    tower.text.load_state_dict({key: state[key] for key in tower.text.state_dict()})
    assert not tower.trims
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(tower.encode_text(tokens, normalize=normalize),
                                       clip.encode_text(tokens, normalize=normalize), atol=1e-6, rtol=1e-5)


def _save_checkpoints(folder: Path) -> dict[str, Path]:
    """The tiny CLIP's weights as open_clip saves them (safetensors), and as a training checkpoint
    (a torch file wrapping `module.`-prefixed keys in `state_dict`)."""
    state = build_tiny_clip().state_dict()
    files = {"safetensors": folder / "tiny.safetensors", "torch": folder / "tiny.pt"}
    save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, files["torch"])
    return files


def _spy_on_reads(monkeypatch) -> list[str]:
    """The names of the tensors read from checkpoint files from now on."""
    real, read = loading._open_checkpoint, []

    @contextmanager
    def spy(path: str):
        with real(path) as (names, get):
            yield names, lambda key: (read.append(key), get(key))[1]

    monkeypatch.setattr(loading, "_open_checkpoint", spy)
    return read


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_the_text_tower_reads_only_its_own_tensors(kind: str, tiny_registered: str, tmp_path: Path,
                                                   monkeypatch) -> None:
    file = _save_checkpoints(tmp_path)[kind]
    read = _spy_on_reads(monkeypatch)
    tower, tokenizer = load_text_model(open_clip_config(tiny_registered, str(file)))
    reference = open_clip.create_model(tiny_registered, pretrained=str(file)).eval()  # open_clip's own loader
    tokens = tokenizer(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_text(tokens), reference.encode_text(tokens), atol=1e-6, rtol=1e-5)
    assert read and not [key for key in read if key.startswith("visual.")], "the vision tensors were read"
    # the whole CLIP less its vision tower and logit scale: nothing else was built
    assert module_bytes(tower) == module_bytes(reference) - module_bytes(reference.visual) - 4


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_the_vision_tower_reads_only_its_own_tensors(kind: str, tiny_registered: str, tmp_path: Path,
                                                     monkeypatch) -> None:
    """The encoder from a whole-CLIP checkpoint: the same forward and preprocessing as open_clip's own loader,
    with no text tensor read and no text tower built."""
    from PIL import Image

    from dsl_cli.encoder.loading import load_encoder

    file = _save_checkpoints(tmp_path)[kind]
    read = _spy_on_reads(monkeypatch)
    encoder, preprocess = load_encoder(open_clip_config(tiny_registered, str(file)))
    reference, _, reference_preprocess = open_clip.create_model_and_transforms(tiny_registered, pretrained=str(file))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    pixels = preprocess(photo)[None]
    torch.testing.assert_close(pixels, reference_preprocess(photo)[None])
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(pixels), reference.eval().encode_image(pixels), atol=1e-6, rtol=1e-5)
    assert read and all(key.startswith("visual.") for key in read), "a text tensor was read"
    assert module_bytes(encoder) == module_bytes(reference.visual)


def test_a_tower_to_be_filled_from_a_checkpoint_draws_no_random_weights(monkeypatch) -> None:
    """The vision tower is built without drawing (its every tensor is copied in next); the text tower, whose
    causal mask no checkpoint holds, is built as usual, mask included."""
    from dsl_cli.encoder.loading import TextTower, seeded, unfilled
    from dsl_cli.encoder.openclip_api import build_text_tower, build_vision_tower

    def build_visual():
        return build_vision_tower(TINY_EMBED_DIM, TINY_VISION_CFG, False)

    def build_text():
        return TextTower(build_text_tower(TINY_EMBED_DIM, open_clip.CLIPTextCfg(**TINY_TEXT_CFG)))

    def only_on_meta(draw):
        def checked(tensor, *args, **kwargs):
            assert tensor.device.type == "meta", "random weights were drawn"
            return draw(tensor, *args, **kwargs)
        return checked

    with monkeypatch.context() as patch:
        for name in ("normal_", "uniform_"):
            patch.setattr(torch.Tensor, name, only_on_meta(getattr(torch.Tensor, name)))
        visual = unfilled(build_visual)
        with pytest.raises(AssertionError, match="random weights were drawn"):
            seeded(build_visual)  # the watch works
    assert all(t.device.type == "cpu" for t in visual.state_dict().values())
    assert module_bytes(visual) == module_bytes(seeded(build_visual))
    text, reference = unfilled(build_text), seeded(build_text)
    for (key, value), expected in zip(text.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), key
    torch.testing.assert_close(text.text.attn_mask, reference.text.attn_mask)


@pytest.mark.parametrize("fill", [{"fill_color": 128}, {}])
def test_a_pretrained_tag_gives_open_clips_preprocessing(fill: dict, tiny_registered: str, tmp_path: Path,
                                                         monkeypatch) -> None:
    """A tag's own mean, std, interpolation and resize mode, as `create_model_and_transforms` applies them
    (the tag, and its download, faked for the tiny model: the file is saved here)."""
    from PIL import Image

    import open_clip.factory
    from dsl_cli.encoder.loading import load_encoder

    file = _save_checkpoints(tmp_path)["safetensors"]
    tag = dict(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), interpolation="bilinear", resize_mode="longest",
               hf_hub="x/y/", **fill)  # longest: the photo is padded, with the tag's fill colour or the default
    for module in (open_clip, open_clip.factory):
        monkeypatch.setattr(module, "get_pretrained_cfg",
                            lambda name, weights: tag if (name, weights) == (tiny_registered, "fake") else {})
        monkeypatch.setattr(module, "download_pretrained", lambda cfg, cache_dir=None: str(file))
    _, preprocess = load_encoder(open_clip_config(tiny_registered, "fake"))
    _, _, reference = open_clip.create_model_and_transforms(tiny_registered, pretrained="fake")
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(photo), reference(photo))
    default = open_clip.image_transform(64, False)
    assert not torch.allclose(preprocess(photo), default(photo)), "the tag's settings made no difference"


def test_a_checkpoint_open_clip_must_convert_goes_through_its_loader(tiny_registered: str, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Positions saved for another grid (2 x 2 patches, not 4 x 4): open_clip resizes them as it loads, so
    the encoder is open_clip's, not a refusal."""
    from dsl_cli.encoder.loading import load_encoder

    state = build_tiny_clip().state_dict()
    state["visual.positional_embedding"] = state["visual.positional_embedding"][:5].clone()  # CLS + 2 x 2
    file = tmp_path / "other_grid.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, file)
    with caplog.at_level("INFO", logger="dsl_cli.encoder"):
        encoder, _ = load_encoder(open_clip_config(tiny_registered, str(file)))
    ours = [record.getMessage() for record in caplog.records if record.name == "dsl_cli.encoder"]
    assert ours == [f"{file}: trying open_clip's own loader ({file}: visual.positional_embedding has "
                    "shape (5, 64), the dsl-test-tiny vision tower needs (17, 64))"]
    reference = open_clip.create_model(tiny_registered, pretrained=str(file)).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(pixels), reference.encode_image(pixels), atol=1e-6, rtol=1e-5)


def test_a_checkpoint_without_the_text_tower_is_refused_in_one_line(tiny_registered: str, tmp_path: Path) -> None:
    vision_only = tmp_path / "vision.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in build_tiny_clip().visual.state_dict().items()}, vision_only)
    with pytest.raises(UserError, match="holds no dsl-test-tiny text tower weights .*token_embedding"):
        load_text_model(open_clip_config(tiny_registered, str(vision_only)))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not weights")
    with pytest.raises(UserError, match="cannot read the dsl-test-tiny text tower weights"):
        load_text_model(open_clip_config(tiny_registered, str(garbage)))


@pytest.mark.parametrize("name, content", [("empty.bin", b""), ("notes.pt", b"hello\n"),
                                           ("cut.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{")])
def test_a_file_that_is_not_weights_is_refused_in_one_line(name: str, content: bytes, tiny_registered: str,
                                                             tmp_path: Path) -> None:
    """Neither dsl's reader nor open_clip's loader can read it: the reason given is the file's, in one line."""
    from dsl_cli.encoder.loading import load_encoder

    file = tmp_path / name
    file.write_bytes(content)
    for load, what in ((load_encoder, "vision"), (load_text_model, "text")):
        with pytest.raises(UserError, match=f"{file}: cannot read the dsl-test-tiny {what} tower weights") as err:
            load(open_clip_config(tiny_registered, str(file)))
        assert "\n" not in str(err.value)


def test_random_text_weights_are_seeded_so_their_classifier_is_kept(tiny_registered: str, tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("DSL_CACHE", str(tmp_path))
    state = torch.random.get_rng_state()
    first, _ = load_text_model(open_clip_config(tiny_registered, None))
    second, _ = load_text_model(open_clip_config(tiny_registered, None))
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's random state changed"
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    kept = lenses.classifier_file(open_clip_config(tiny_registered, None), "simple")
    versions = f"torch{torch.__version__}_simple_openclip{open_clip.__version__}"
    assert kept == tmp_path / f"{tiny_registered}_random-seed0-{versions}.pt"
    assert lenses.classifier_file(EncoderConfig(source="tiny"), "simple") is None
    assert lenses.classifier_file(open_clip_config(tiny_registered, str(tmp_path)), "simple") is None  # a local path


def _tiny_run(folder: Path, *overrides: str) -> Path:
    """An in-process `dsl run debug=tiny lens=logit ...` into `folder` (so that its functions can be watched);
    `overrides` replace these settings."""
    from hydra import compose, initialize_config_module

    from dsl_cli.config import register_configs
    from dsl_cli.run import run

    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        chosen = ["debug=tiny", "lens=logit", "layer=1", "images.limit=1", "decode.steps=1", "component=[L1H0]",
                  *overrides]
        cfg = compose(config_name="run", overrides=list({o.split("=")[0]: o for o in chosen}.values()))
    run(cfg, folder)
    return folder


def test_a_kept_classifier_builds_no_text_tower_and_a_built_one_is_released_first(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """The text tower is gone before the encoder loads (and so before decoding); the encoder and decoder are
    gone before the figures are drawn; a kept classifier builds no text tower and names the same labels."""
    from dsl_cli import run as run_module
    from dsl_cli.encoder import load_encoder
    from dsl_cli.figures import redraw

    monkeypatch.setattr(lenses, "classifier_file", lambda cfg, templates: tmp_path / "kept.pt")
    towers: list[weakref.ref] = []

    def watched_text_model(*args, **kwargs):
        tower, tokenizer = load_text_model(*args, **kwargs)
        towers.append(weakref.ref(tower))
        return tower, tokenizer

    def released_before(stage: str, load):
        def check(*args, **kwargs):
            assert towers and towers[0]() is None, f"the text tower is alive when the {stage} loads"
            return load(*args, **kwargs)
        return check

    encoders: list[weakref.ref] = []

    def watched_encoder(*args, **kwargs):
        encoder, preprocess = released_before("encoder", load_encoder)(*args, **kwargs)
        encoders.append(weakref.ref(encoder))
        return encoder, preprocess

    def drawn_without_models(folder, **kwargs):
        assert encoders and encoders[-1]() is None, "the encoder is alive while the figures are drawn"
        return redraw(folder, **kwargs)

    monkeypatch.setattr(lenses, "load_text_model", watched_text_model)
    monkeypatch.setattr(run_module, "load_encoder", watched_encoder)
    monkeypatch.setattr(run_module, "load_decoder", released_before("decoder", run_module.load_decoder))
    monkeypatch.setattr(run_module, "redraw", drawn_without_models)
    first = _tiny_run(tmp_path / "first")
    assert len(towers) == 1 and (tmp_path / "kept.pt").is_file()

    def no_text_tower(*args, **kwargs):
        raise AssertionError("a text tower was built although the classifier is kept")

    monkeypatch.setattr(lenses, "load_text_model", no_text_tower)
    second = _tiny_run(tmp_path / "second")
    assert (first / "labels.csv").read_text() == (second / "labels.csv").read_text()


def test_freed_blocks_of_a_mib_and_more_go_back_to_the_system_from_the_start_of_a_run(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD = -3, 1 MiB) and mallopt(M_TRIM_THRESHOLD = -1, 8 MiB), once, before
    the encoder loads; the user's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ wins; a C library
    without mallopt is left alone."""
    from types import SimpleNamespace

    from dsl_cli import run as run_module
    from dsl_cli.encoder import load_encoder

    calls: list = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=lambda *a: calls.append(a) or 1))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    def watched_encoder(*args, **kwargs):
        calls.append("encoder")
        return load_encoder(*args, **kwargs)

    monkeypatch.setattr(run_module, "load_encoder", watched_encoder)
    _tiny_run(tmp_path / "run", "lens=direct", "decode.enabled=false")
    done = [(-3, 2**20), (-1, 8 * 2**20), "encoder"]
    assert calls == done
    for variable in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setenv(variable, "65536")
        assert memory.give_freed_blocks_back() is False and calls == done
        monkeypatch.delenv(variable)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: SimpleNamespace())  # no mallopt (macOS)
    assert memory.give_freed_blocks_back() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's M_MMAP_THRESHOLD is glibc's")
def test_glibc_accepts_the_threshold(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.give_freed_blocks_back() is True  # mallopt returns 0 for a parameter it refuses


def test_the_logit_lens_with_labels_builds_its_classifier_once(tmp_path: Path, monkeypatch) -> None:
    """lens=logit lens.text=true: the labels reuse the lens's classifier (the tiny one is never kept on disk,
    so a second build would run the text tower again)."""
    builds = []
    real = lenses.text_classifier
    monkeypatch.setattr(lenses, "text_classifier", lambda *a: builds.append(a) or real(*a))
    folder = _tiny_run(tmp_path / "run", "lens.text=true")
    assert len(builds) == 1
    assert (folder / "labels.csv").is_file()


def test_ablation_batches_are_sized_from_free_memory(tiny_encoder, monkeypatch) -> None:
    row = studies.ablation_row_bytes(tiny_encoder)
    tokens, width, heads, hidden = 17, 64, 4, 256  # the tiny ViT: (64 / 16)^2 patches + CLS
    assert row == 4 * tokens * (3 * heads * width + 2 * hidden + 8 * width)
    assert studies.ablation_rows(tiny_encoder, 7) == 7  # on the CPU: batch_size
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(10.5 * row / memory.HEADROOM))
    assert memory.rows_that_fit("cuda", row, 256) == 10
    assert memory.rows_that_fit("cuda", row, 4) == 4
    monkeypatch.setattr(memory, "free_bytes", lambda device: 0)
    assert memory.rows_that_fit("cuda", row, 256) == 1


@pytest.mark.parametrize("fraction, expected_gib", [(1.0, 71), (0.3, 21), (0.04, 1)])
def test_free_memory_is_the_drivers_within_a_per_process_cap(fraction: float, expected_gib: int, monkeypatch) -> None:
    """80 GiB card, 70 free, the allocator holding 4 (3 in use). Uncapped: 70 + 1 unused. Capped at 24 GiB
    (0.3; as bench_memory.py's --gpu-limit-gb 24): 20 more + 1. Capped below what it holds: only the 1."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def memory_fraction(device: int) -> float:  # as torch's, which refuses a device without an index
        assert isinstance(device, int), f"Expected a torch.device with a specified index or an integer: {device}"
        return fraction

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", memory_fraction)
    assert memory.free_bytes("cuda") == pytest.approx(expected_gib * gib, abs=1)
    assert memory.free_bytes("cpu") is None


def test_ablation_halves_its_batch_on_out_of_memory(tiny_encoder, tiny_pixels, monkeypatch) -> None:
    plan = [(i % 3, [f"L{i % 4}H{i % 3}"]) for i in range(7)]
    alone = studies.ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=1)
    real, sizes = tiny_encoder.ablate_hooked, []

    def small_memory(pixels, *args, **kwargs):
        sizes.append(len(pixels))
        if len(pixels) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels, *args, **kwargs)

    monkeypatch.setattr(tiny_encoder, "ablate_hooked", small_memory)
    halved = studies.ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=8)
    torch.testing.assert_close(halved, alone, atol=1e-5, rtol=1e-5)
    assert sizes == [7, 4, 2, 2, 2, 1]  # 8 rows, then 4, then 2 at a time


def test_decoder_bytes_counts_the_weights_without_building_them() -> None:
    from dsl_cli.config import DecoderConfig

    built = load_decoder(DecoderConfig(source="tiny")).pipe
    tiny = decoder_bytes("tiny", torch.float32)
    assert tiny == module_bytes(built.unet) + module_bytes(built.movq) and type(tiny) is int  # whole bytes
    assert decoder_bytes("random", torch.bfloat16) == 2 * (1_253_057_288 + 67_832_495)  # DESIGN.md section 2


class _Model(torch.nn.Module):
    """A module that records where it is asked to go instead of going (CUDA is not needed to test the plan)."""

    def __init__(self, name: str, moves: list):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1000))
        self.name, self.moves = name, moves

    def to(self, device):  # noqa: D102
        self.moves.append((self.name, str(device)))
        return self


def test_an_encoder_waits_on_the_cpu_when_the_gpu_is_short(monkeypatch) -> None:
    moves: list = []
    encoder, decoder = _Model("encoder", moves), _Model("decoder", moves)
    monkeypatch.setattr(memory, "free_bytes", lambda device: None if torch.device(device).type == "cpu" else 3000)
    assert not memory.park_if_short(encoder, "cpu", 10**9)  # the CPU: nothing moves
    assert not memory.park_if_short(encoder, "cuda", 3000)  # room enough
    assert memory.park_if_short(encoder, "cuda", 3001) and moves == [("encoder", "cpu")]
    moves.clear()
    with memory.visiting(encoder, torch.device("cuda"), idle=decoder):  # 4000 bytes do not fit in 3000 free
        assert moves == [("decoder", "cpu"), ("encoder", "cuda")]
    assert moves[2:] == [("encoder", "cpu"), ("decoder", "cuda")]
    moves.clear()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10**6)
    with memory.visiting(encoder, torch.device("cuda"), idle=decoder):  # room for both: the decoder stays
        pass
    assert moves == [("encoder", "cuda"), ("encoder", "cpu")]
    moves.clear()
    with memory.visiting(encoder, torch.device("cpu"), idle=decoder):  # already there
        pass
    assert moves == []


def test_the_memory_benchmark_names_the_smallest_card_and_never_reuses_a_run_folder(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    import bench_memory

    def result(peak_gib: float, exit: int = 0, cap: float = 0.0) -> dict:
        return {"cuda_max_reserved": int(peak_gib * GB) - 100, "cuda_context": 100, "exit": exit, "gpu_limit_gb": cap}

    assert bench_memory.smallest_gpu(result(11.6)) == "12 GB"  # 11.64 GiB is 97 % of 12
    assert bench_memory.smallest_gpu(result(11.7)) == "16 GB"
    assert bench_memory.smallest_gpu(result(22.7, cap=24)) == "24 GB"
    assert bench_memory.smallest_gpu(result(12.06, cap=12)) == "12 GB"  # a study filled the cap it finished under
    assert bench_memory.smallest_gpu(result(12.06, exit=1, cap=12)) == "16 GB"  # but it did not finish
    assert bench_memory.smallest_gpu(result(200)) == "none listed"
    runs = tmp_path / "runs"
    first = bench_memory.fresh_folder(runs, "steering")
    assert first == runs / "steering"
    first.mkdir(parents=True)
    assert bench_memory.fresh_folder(runs, "steering") == runs / "steering-2"
    assert bench_memory.fresh_folder(runs, "direct") == runs / "direct"


@pytest.mark.gpu
def test_a_parked_encoder_gives_the_same_run_on_a_gpu(tmp_path: Path, monkeypatch) -> None:
    """On CUDA, with free memory made to look short: the encoder waits on the CPU while decoding, comes back
    (the decoder stepping out) for each re-encoding, and the run's numbers are those of an unparked run."""
    import csv

    def rows(folder: Path) -> list[dict]:
        with open(folder / "similarity.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    overrides = ("device=cuda", "lens=steering", "component=all", "decode.top_k=3", "decode.batch_size=2")
    roomy = rows(_tiny_run(tmp_path / "roomy", *overrides))
    moves: list[str] = []
    real_park, real_visit = memory.park_if_short, memory.visiting
    monkeypatch.setattr(memory, "free_bytes", lambda device: 0)  # nothing fits beside anything
    from dsl_cli import run as run_module

    monkeypatch.setattr(run_module, "park_if_short", lambda *a: moves.append("park") or real_park(*a))
    parked = rows(_tiny_run(tmp_path / "parked", *overrides))
    assert moves == ["park"] and real_visit is memory.visiting
    for a, b in zip(roomy, parked, strict=True):
        assert a["component"] == b["component"] and (a["file"] == "") == (b["file"] == "")
        for key in ("sim_embed", "sim_decoded"):
            if a[key]:
                assert abs(float(a[key]) - float(b[key])) < 1e-4, (key, a, b)


def test_tower_weights_come_from_either_prefix_and_a_wrong_file_is_named_in_one_line(tmp_path: Path) -> None:
    """`copy_tower_weights` on a two-layer stand-in: the tensors under the first prefix that holds them
    all (here "" or "text."), nothing else read; otherwise one line naming the file and what is wrong."""
    def tower() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 4))

    source = tower()
    for prefix in ("", "text."):
        file = tmp_path / f"{prefix or 'top'}.safetensors"
        save_file({**{prefix + k: v for k, v in source.state_dict().items()}, "visual.w": torch.zeros(1)}, file)
        copied = tower()
        loading.copy_tower_weights(copied, str(file), ("", "text."), "test tower")
        for (key, a), b in zip(copied.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), key

    def refusal(tensors: dict) -> str:
        file = tmp_path / "bad.safetensors"
        save_file(tensors, file)
        with pytest.raises(UserError) as refused:
            loading.copy_tower_weights(tower(), str(file), ("", "text."), "test tower")
        return str(refused.value).replace(str(file), "FILE")

    weights = source.state_dict()
    assert refusal({"visual.w": torch.zeros(1)}) == "FILE holds no test tower weights (it lacks 0.weight, 0.bias, 1.weight)"
    assert refusal({"0.weight": weights["0.weight"]}) == "FILE holds no test tower weights (it lacks 0.bias, 1.weight, 1.bias)"
    assert refusal({**weights, "1.weight": torch.zeros(5, 2)}) == "FILE: 1.weight has shape (5, 2), the test tower needs (4, 2)"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not weights")
    with pytest.raises(UserError, match=f"^{garbage}: cannot read the test tower weights from it \\("):
        loading.copy_tower_weights(tower(), str(garbage), ("",), "test tower")


def test_a_registered_architecture_keeps_its_activation_and_preprocessing(tmp_path: Path) -> None:
    """An open_clip config with QuickGELU (as `open_clip.add_model_config` registers one): random weights
    get that activation in both towers, and the encoder's preprocessing is the one open_clip's own
    `create_model_and_transforms` gives for the model without pretrained weights."""
    from PIL import Image

    from dsl_cli.encoder import load_encoder
    from open_clip.transformer import QuickGELU

    name = "dsl-test-tiny-quickgelu"
    config = {"embed_dim": TINY_EMBED_DIM, "quick_gelu": True, "vision_cfg": TINY_VISION_CFG,
              "text_cfg": TINY_TEXT_CFG}
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    encoder, preprocess = load_encoder(open_clip_config(name, None))
    text, _ = load_text_model(open_clip_config(name, None))
    assert isinstance(encoder.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(text.text.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _, _, reference = open_clip.create_model_and_transforms(name, pretrained=None)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(picture), reference(picture))


def test_a_text_tower_saved_under_text_reads_as_one_saved_at_the_top(tiny_registered: str, tmp_path: Path) -> None:
    """A CustomTextCLIP checkpoint keeps the text tower under `text.`; a CLIP one at the top level."""
    state = {k: v.contiguous() for k, v in build_tiny_clip().state_dict().items()}
    top, nested = tmp_path / "top.safetensors", tmp_path / "nested.safetensors"
    save_file(state, top)
    save_file({f"text.{k}": v for k, v in state.items() if not k.startswith("visual.")}, nested)
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    with torch.no_grad():
        a, b = (load_text_model(open_clip_config(tiny_registered, str(f)))[0].encode_text(tokens) for f in (top, nested))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
