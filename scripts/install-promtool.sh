#!/usr/bin/env bash
# Put `promtool` (Prometheus' rule and config checker) into .venv/bin for the tests of
# deploy/prometheus (tests/deploy/test_alerts.py). It is not on PyPI; Debian's
# `prometheus` package ships it. The package is downloaded and unpacked, never
# installed: installing it would also install and start a Prometheus service.
# Does nothing when .venv/bin/promtool is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${ROOT}/.venv/bin/promtool"

if [ -x "${TARGET}" ]; then
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}"

# `apt-get download` runs as the unprivileged `_apt` user when it can: let it write here.
chmod 0777 "${WORK}"
if ! apt-get download prometheus >/dev/null 2>&1; then
    # The package lists may be missing or stale: refresh them once, then try again.
    apt-get update -qq
    apt-get download prometheus
fi

DEB="$(ls -1 prometheus_*.deb | head -n 1)"
dpkg-deb -x "${DEB}" unpacked
mkdir -p "$(dirname "${TARGET}")"
install -m 0755 unpacked/usr/bin/promtool "${TARGET}"
"${TARGET}" --version | head -n 1
