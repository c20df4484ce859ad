#!/usr/bin/env bash
# The paper's figures and validations, one `dsl run` each (needs the Kandinsky 2.2 weights in the Hugging
# Face cache and, in practice, a CUDA GPU). Arguments are added to every run, e.g.
#   scripts/reproduce_paper.sh images.path=~/photos                  # your own images
#   scripts/reproduce_paper.sh debug=tiny decode.enabled=false       # a dry run of the whole script, about 90 s
set -euo pipefail

dsl run experiment=paper_top_heads "$@"                         # DSL: the heads most similar to the input
dsl run lens=diffusion layer=all "$@"                           # Diffusion Lens over the residual stream
dsl run -m experiment=layer30_heads lens=steering,direct "$@"    # DSL against the naive lens, layer 30
dsl run study=head_importance layer=all "$@"                    # does DSL track ablation importance?
dsl run study=overlay_removal layer=all "$@"                    # does DSL find the heads of a pasted object?
