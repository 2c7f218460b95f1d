#!/usr/bin/env bash
# The main job on one machine, as root: installs what meshd needs
# (contrib/setup.sh), then builds a lab of network namespaces and prints what
# it reaches. Pass lab options through, e.g. `--nodes 8 --topology nat`.
# Take it down again with:  .venv/bin/meshd lab down
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/meshd lab down >/dev/null 2>&1 || true
exec .venv/bin/meshd lab up --nodes 5 "$@"
