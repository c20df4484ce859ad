"""dsl: Diffusion Steering Lens and Diffusion Lens for CLIP vision transformers, decoded with Kandinsky 2.2."""

__version__ = "0.1.0"
