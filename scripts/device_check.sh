#!/usr/bin/env bash
# The device check, in one command (docs/benchmarks.md says what each figure means):
#
#   scripts/device_check.sh OUT_DIR                 # on a CUDA machine: about 8 minutes on an H100, no network
#   scripts/device_check.sh --dry-run OUT_DIR       # on the CPU with tiny sizes (what CI runs)
#   scripts/device_check.sh OUT_DIR --steps end_to_end,compile --budget 300    # rerun some steps
#
# Packages the machine lacks (diffusers, open_clip_torch, hydra-core, omegaconf, ...) are installed from the
# wheels in .whl/ (made by scripts/fetch_wheels.sh where the registry is reachable) into /tmp/dsl-site,
# without network; the project itself is used from this checkout. PYTHON picks the interpreter (default
# python3).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"

# found, not imported: importing them here took 4.5 s of the check's time, and device_check.py imports them anyway
packages="diffusers open_clip hydra omegaconf"  # what the wheels of scripts/fetch_wheels.sh provide
if ! "$python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
        $packages 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "device_check: one of $packages is missing and .whl/ holds no wheels:" \
             "run scripts/fetch_wheels.sh where the package registry is reachable" >&2
        exit 2
    fi
    echo "device_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/dsl-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dsl-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/dsl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" scripts/device_check.py "$@"
