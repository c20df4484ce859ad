#!/usr/bin/env bash
# Download the wheels that a GPU machine without network needs to run `scripts/device_check.sh`.
#
#   scripts/fetch_wheels.sh [DIR]      # default DIR: .whl (ignored by git)
#
# Run it where the package registry is reachable. The GPU machine (Python 3.12, manylinux x86-64) already has
# torch, torchvision, transformers, timm, huggingface-hub, safetensors, regex, numpy, pillow, scipy,
# scikit-image, matplotlib, tqdm, pyyaml, packaging, filelock, requests and pytest, but not the packages
# below. Each is pinned to the version this project's test suite passes with; --no-deps because their own
# needs are either in this list or already on that machine (diffusers' importlib_metadata is only imported
# on Python < 3.8). device_check.sh installs them with
#   pip install --no-index --no-deps --target /tmp/dsl-site DIR/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"

PACKAGES=(
    diffusers==0.42.1
    open_clip_torch==3.3.0
    hydra-core==1.3.8
    omegaconf==2.3.1
    antlr4-python3-runtime==4.9.3  # hydra-core and omegaconf; published as source only, built here (pure Python)
    ftfy==6.3.1                    # open_clip's tokenizer
    wcwidth==0.9.4                 # ftfy
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

python3 -m pip --version >/dev/null || { echo "fetch_wheels: needs python3 with pip" >&2; exit 2; }
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

for spec in "${PACKAGES[@]}"; do
    if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platform_args[@]}" -d "$dir" "$spec" 2>/dev/null; then
        echo "fetch_wheels: $spec (wheel)"
    else
        # no wheel on the registry: build one from the source release (pure-Python packages only)
        python3 -m pip wheel -q --no-deps -w "$dir" "$spec"
        echo "fetch_wheels: $spec (built from source)"
    fi
done

# One version of each package: two wheels of one name would stop the whole install on the GPU machine.
dupes=$(ls "$dir"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "fetch_wheels: more than one wheel of: $dupes (remove the old ones from $dir)" >&2
    exit 1
fi
ls -l "$dir"/*.whl
du -sh "$dir"
