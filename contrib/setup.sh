#!/usr/bin/env bash
# Installs what meshd needs on a Debian/Ubuntu machine, as root: the system
# packages, then a virtual environment in .venv with meshd (editable) and its
# dev tools. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(serf wireguard-go wireguard-tools iproute2 nftables iputils-ping iperf3 python3-venv python3-pip
          prometheus chromium dnsmasq-base knot knot-dnsutils bind9-utils systemd tcpdump coreutils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# An editable install compiles no bytecode, and where PYTHONDONTWRITEBYTECODE is set
# nothing ever does: every meshd command and agent start would compile its modules
# again (90 of the 240 ms of a join's imports, measured on the CI machine).
.venv/bin/python -m compileall -q meshd plugins >/dev/null
echo "setup: ready ($(.venv/bin/meshd version))"
