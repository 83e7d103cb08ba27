#!/usr/bin/env bash
# System packages the deployment checks need (Debian/Ubuntu), installed only when missing, so
# running it again is a no-op:
#   prometheus  -> `prometheus` (the real-scrape test) and `promtool` (config and PromQL checks)
# Only the binaries are wanted: where the package's own daemon was started (a systemd host),
# it is stopped and disabled, so nothing is left listening on :9090.
set -euo pipefail

packages=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || packages+=(prometheus)

if [ "${#packages[@]}" -eq 0 ]; then
    echo "install_system_deps: nothing to install"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_system_deps: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "install_system_deps: installed ${packages[*]} ($(prometheus --version 2>&1 | head -n 1))"
