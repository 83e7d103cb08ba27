#!/usr/bin/env bash
# System packages the tests need (Debian/Ubuntu), installed only when missing, so running it
# again is a no-op:
#   prometheus  -> `prometheus` (the real-scrape test) and `promtool` (config and PromQL checks)
#   postgresql  -> `initdb` and `postgres` (tests/postgres.py starts its own throwaway server
#                  for the decision-log tests; as root it runs it as the package's `postgres`
#                  user)
# Only the binaries are wanted: where the packages' own daemons were started (a systemd host),
# they are stopped and disabled, so nothing is left listening on :9090 or :5432. The cluster
# Debian's postgresql creates on install is never used by the tests.
set -euo pipefail

# initdb: on PATH, or where Debian puts it (/usr/lib/postgresql/<version>/bin, not on PATH).
have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    local candidate
    for candidate in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$candidate" ] && return 0
    done
    return 1
}

packages=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
have_initdb || packages+=(postgresql)

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
    for package in "${packages[@]}"; do
        $SUDO systemctl disable --now "$package" >/dev/null 2>&1 || true
    done
elif command -v service >/dev/null 2>&1; then
    # No systemd (a container): the package's init script may still have started its daemon.
    for package in "${packages[@]}"; do
        $SUDO service "$package" stop >/dev/null 2>&1 || true
    done
fi

for package in "${packages[@]}"; do
    case "$package" in
        prometheus) version="$(prometheus --version 2>&1 | head -n 1)" ;;
        postgresql) version="$("$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)" --version)" ;;
    esac
    echo "install_system_deps: installed $package ($version)"
done
