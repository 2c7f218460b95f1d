#!/usr/bin/env bash
# Sets up (contrib/setup.sh), then runs the linters and the whole test suite:
# unit tests, then integration tests with real serf and wireguard-go in network
# namespaces (those need root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
echo "== ruff";  .venv/bin/ruff check meshd plugins tests bench
echo "== mypy";  .venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
