#!/usr/bin/env bash
# The paper's figures and validations, one experiment each (dsl_cli/configs/experiment/paper_*.yaml), each
# into outputs/paper/<experiment>, then outputs/paper/index.html linking every figure. Needs the
# Kandinsky 2.2 weights in the Hugging Face cache and, in practice, a CUDA GPU (docs/studies.md, "Reproducing the
# paper" has the expected times). Arguments are added to every run, e.g.
#   scripts/reproduce_paper.sh images.path=~/photos           # your own images
#   scripts/reproduce_paper.sh debug=tiny images.limit=2       # a dry run of the whole script on tiny models
# A folder of outputs/paper that holds a run already is refused: move it away to run that experiment again.
# A tiny preview (debug=...) goes to outputs/debug/paper, never into the real runs' folders.
set -euo pipefail

root=outputs
for arg in "$@"; do
  case "$arg" in
    debug=*) root=outputs/debug ;;
  esac
done
for arg in "$@"; do  # an explicit outputs_root wins, wherever it stands
  case "$arg" in
    outputs_root=*) root="${arg#outputs_root=}" ;;
  esac
done

experiments=(
  paper_residual_stream   # the Diffusion Lens over the residual stream, layer by layer
  paper_top_heads         # DSL over all heads: the 10 most similar to the input, decoded
  paper_dl_vs_dsl         # the heads of layer 30 through the naive lens and through DSL, side by side
  paper_head_importance   # does DSL track ablation importance? (zero and mean ablation)
  paper_overlay_removal   # does DSL find the heads of a pasted object? (with decoded fades)
  paper_logit_lens        # the logit lens over the residual stream
)
for name in "${experiments[@]}"; do
  dsl run "experiment=$name" "$@"
done
dsl report "$root/paper"   # every run's page, and an index.html there linking every figure
