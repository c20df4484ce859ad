"""The weights preflight: every weight a run needs, looked up at once before any model loads.

Each part of the run says what it needs, from its own config group: the encoder loader
(`dsl_cli.encoder.loading.needs`), the decoder family (`Decoder.needs`, when the run decodes), the lens
(`Lens.needs`: the text tower, for labels, the logit lens, a text pool or an attribution target) or the
study (`Study.needs`). This module only asks them, above the models; the hub look-ups they are built of,
and the check itself (`weights.require`), sit below the models in `dsl_cli.weights`.
"""

from __future__ import annotations

from typing import Any

from dsl_cli import study_registry
from dsl_cli.decoder import get_family
from dsl_cli.encoder import loading
from dsl_cli.lenses import get_lens
from dsl_cli.weights import Needs, combined, require


def needed(cfg: Any) -> Needs:
    """Every weight a run with config `cfg` loads: the encoder's; then a study's, or the decoder's (if the
    run decodes) and the lens's."""
    parts = [loading.needs(cfg.encoder)]
    if cfg.study.name is not None:
        parts.append(study_registry.needs(cfg))
    else:
        if cfg.decode.enabled:
            parts.append(get_family(cfg.decoder.family).needs(cfg.decoder))
        parts.append(get_lens(cfg.lens).needs(cfg.encoder))
    return combined(parts)


def preflight(cfg: Any) -> None:
    """Look up every weight the run needs before any model loads; raise one UserError listing all that are
    missing (with a command for each) or whose local path is wrong."""
    require(needed(cfg))
