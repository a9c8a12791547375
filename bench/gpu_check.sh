#!/usr/bin/env bash
# One go on the GPU (at most ~9 minutes): bench/gpu_check.py's stages, results streamed to OUT_DIR.
#   bench/gpu_check.sh OUT_DIR [--dry-run]
# Uses python3 (the GPU image has no `python`), and ./.site first on the path when present: the
# wheels the image lacks, installed there as ../shared/device/README.md says.
set -euo pipefail
# OUT_DIR (wherever it stands among the arguments) relative to where the script was called from, not to
# the repository it moves to
args=()
for arg in "$@"; do
  if [ "${arg#-}" = "$arg" ]; then args+=("$(realpath -m -- "$arg")"); else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
cd "$(dirname "$0")/.."
if [ -d .site ]; then export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"; fi
exec python3 bench/gpu_check.py "$@"
