"""The prior encoder's pixels equal those of the Kandinsky 2.2 prior's own `CLIPImageProcessor`.

Reference: transformers' PIL `CLIPImageProcessor` (named `CLIPImageProcessorPil` from transformers 5 on, where
the plain name became a torchvision port), configured as the prior's `image_processor/preprocessor_config.json`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from dsl_cli.encoder.preprocess import ClipImageProcessor

transformers = pytest.importorskip("transformers")

# kandinsky-community/kandinsky-2-2-prior, image_processor/preprocessor_config.json
PRIOR_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)
# (width, height): three sample photos as they are (the first two crop differently in open_clip), an odd
# shape whose long side after resizing minus 224 is odd too, a tall one whose vertical offset is odd, a tall,
# a wide, a tiny and a square one.
SHAPES = [(640, 427), (741, 500), (451, 300), (451, 301), (427, 640), (300, 900), (1200, 250), (17, 9), (512, 512)]


def reference_processor():
    """transformers' PIL CLIPImageProcessor, whichever name this transformers gives it."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls(**PRIOR_PROCESSOR)


def photo(width: int, height: int) -> Image.Image:
    """A natural photo of this size: a sample photo that has it, else the rocket resized to it."""
    root = Path(str(resources.files("skimage") / "data"))
    for name in ("rocket.jpg", "motorcycle_left.png", "chelsea.png", "astronaut.png"):
        image = Image.open(root / name).convert("RGB")
        if image.size == (width, height):
            return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("size", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_pixels_equal_the_priors_clip_image_processor(size) -> None:
    image = photo(*size)
    expected = reference_processor()(image, return_tensors="pt")["pixel_values"][0]
    ours = ClipImageProcessor(224)(image)
    assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= 1e-6


def test_open_clip_transform_is_a_pixel_off_where_the_crop_offset_is_odd() -> None:
    """Why the prior has its own transform: open_clip's centre crop rounds the offset (half to even)."""
    image = photo(640, 427)  # resized to 335x224: offset 111 / 2 = 55.5, floored to 55, rounded to 56
    expected = reference_processor()(image, return_tensors="pt")["pixel_values"][0]
    theirs = open_clip.image_transform(224, False)(image)
    assert (theirs - expected).abs().max().item() > 0.5
    torch.testing.assert_close(theirs[:, :, :-1], expected[:, :, 1:], atol=1e-6, rtol=0)


def test_the_normalisation_is_open_clips_own() -> None:
    """dsl writes OpenAI CLIP's mean and std down (so that a run need not import open_clip to load photos)."""
    from dsl_cli.encoder import preprocess

    assert preprocess.OPENAI_DATASET_MEAN == open_clip.constants.OPENAI_DATASET_MEAN
    assert preprocess.OPENAI_DATASET_STD == open_clip.constants.OPENAI_DATASET_STD
    assert (ClipImageProcessor().mean, ClipImageProcessor().std) == (preprocess.OPENAI_DATASET_MEAN,
                                                                      preprocess.OPENAI_DATASET_STD)


def test_grayscale_input_is_converted_as_the_processor_converts_it() -> None:
    image = photo(451, 301).convert("L")
    expected = reference_processor()(image, return_tensors="pt")["pixel_values"][0]
    assert (ClipImageProcessor(224)(image) - expected).abs().max().item() <= 1e-6


def test_the_prior_encoder_is_loaded_with_this_preprocessing(tmp_path) -> None:
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=224, patch_size=56, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    _, preprocess = load_encoder(EncoderConfig(source="kandinsky_prior", checkpoint=str(tmp_path)))
    image = photo(640, 427)
    expected = reference_processor()(image, return_tensors="pt")["pixel_values"][0]
    assert (preprocess(image) - expected).abs().max().item() <= 1e-6
