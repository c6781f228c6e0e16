#!/usr/bin/env bash
# Compiles every NVRTC kernel group for sm_90a into .kcache/ (ignored by git, ~8 MB), so that a
# device call that carries it (carry [".whl", ".kcache"]) loads cubins instead of compiling
# them: scripts/device-check.sh points IRLM_CACHE_DIR there when it exists.  The cache key
# holds NVRTC's major.minor version, so the Python given must have the device's NVRTC (13.0,
# nvidia-cuda-nvrtc 13.0.x, as torch 2.11+cu130 installs it; docs/contributing.md's
# device-versions venv); another version's cubins would only be ignored there.
#   bash scripts/device-kernel-cache.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
want="13.0"
have=$("$PY" -c "from irlm.kernels import nvrtc; print('%d.%d' % nvrtc.nvrtc_version())")
if [[ "$have" != "$want" ]]; then
    echo "device-kernel-cache: $PY has NVRTC $have; the device has $want (give a Python with" \
         "nvidia-cuda-nvrtc 13.0.x)" >&2
    exit 1
fi
rm -rf .kcache
IRLM_CACHE_DIR="$PWD/.kcache" "$PY" -c "
from irlm.kernels import nvrtc, ops
mods = nvrtc.precompile(ops.all_kernels(), arch='sm_90a')
print(f'{len(mods)} kernel groups compiled for sm_90a into .kcache/kernels')
"
du -sh .kcache
