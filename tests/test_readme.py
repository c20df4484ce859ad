"""The README's Python API example runs as written, on the tiny models instead of the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

README = Path(__file__).parents[1] / "README.md"
TINY = {  # real models and sizes in the README -> tiny ones here (the calls stay as written)
    'EncoderConfig(source="kandinsky_prior")': 'EncoderConfig(source="tiny")',
    'DecoderConfig(source="pretrained")': 'DecoderConfig(source="tiny")',
    'device="cuda"': 'device="cpu"',
    "torch.bfloat16": "torch.float32",
    '"L30H05"': '"L3H01"',
    '"L30MLP"': '"L2MLP"',
    '"L31H02"': '"L1H02"',
    "[10, 20, 30]": "[0, 1, 2]",
    "height=512, width=512, steps=100": "height=64, width=64, steps=2",
}


def test_python_api_example_runs() -> None:
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    for real, tiny in TINY.items():
        assert real in block, f"README example changed: {real!r} not found"
        block = block.replace(real, tiny)
    block = block.replace('cache["blocks.30.', 'cache["blocks.3.')
    namespace = {"pil_images": [Image.new("RGB", (80, 60), "red"), Image.new("RGB", (64, 64), "blue")],
                 "v": torch.randn(5, 64), "embeds": torch.randn(3, 32)}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["cache"].embeds.shape == (2, 32)
    assert namespace["images"].shape == (3, 64, 64, 3)
    assert namespace["negative"].shape == (1, 32)
