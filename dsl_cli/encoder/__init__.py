"""The CLIP image encoder, opened up: loading (open_clip, the Kandinsky prior's HF image_encoder, tiny),
the CLS-position cache and its exact decomposition, and the lenses read from it (DESIGN.md section 3)."""

from dsl_cli.encoder.families import FAMILIES, Family, register_family
from dsl_cli.encoder.hooked import (ABLATIONS, HOOK_POINTS, STEER_MODES, EncoderCache, HookedEncoder, HookPoint,
                                    MeanWrites, head_writes, only_heads, steering_delta)
from dsl_cli.encoder.loading import (RANDOM_SEED, EmbeddingSpace, TextTower, build_tiny_clip, build_tiny_text,
                                     build_tiny_visual, embedding_space, load_encoder, load_text_model, model_shape,
                                     text_model_id)

__all__ = [
    "ABLATIONS",
    "STEER_MODES",
    "EmbeddingSpace",
    "EncoderCache",
    "FAMILIES",
    "Family",
    "HOOK_POINTS",
    "HookPoint",
    "HookedEncoder",
    "MeanWrites",
    "RANDOM_SEED",
    "TextTower",
    "build_tiny_clip",
    "build_tiny_text",
    "build_tiny_visual",
    "embedding_space",
    "head_writes",
    "load_encoder",
    "load_text_model",
    "model_shape",
    "only_heads",
    "register_family",
    "steering_delta",
    "text_model_id",
]
