"""The Kandinsky 2.2 prior's image preprocessing, pixel for pixel.

The prior ships a `CLIPImageProcessor` (shortest edge 224, bicubic, centre crop 224, rescale 1/255, OpenAI
CLIP mean and std). open_clip's transform does the same steps except one: its centre crop rounds the offset
half to even where the processor floors it, so for images whose resized long side minus 224 is odd the crop
differs by a pixel (640x427, 741x500, 451x301, ...). Encoders that open_clip loads keep open_clip's transform.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from dsl_cli.libraries import Library

TF = Library("torchvision.transforms.functional")  # torchvision takes a second to import: at the first picture
# OpenAI CLIP's normalisation, as `open_clip.constants` has it (tests/test_preprocess.py compares the two)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipImageProcessor:
    """PIL image -> `[3, size, size]` float32, as transformers' (PIL) `CLIPImageProcessor` computes it:
    resize the shortest edge to `size` (the long edge truncated, PIL bicubic), crop `size` x `size` at
    offsets `(long - size) // 2`, scale to [0, 1], subtract `mean` and divide by `std` per channel."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD

    def __call__(self, image: Image.Image) -> Tensor:
        image = TF.resize(image.convert("RGB"), self.size, interpolation=TF.InterpolationMode.BICUBIC)
        width, height = image.size
        # floor, as the processor does (torchvision's and open_clip's centre crop round instead)
        image = TF.crop(image, (height - self.size) // 2, (width - self.size) // 2, self.size, self.size)
        return TF.normalize(TF.to_tensor(image), list(self.mean), list(self.std))
