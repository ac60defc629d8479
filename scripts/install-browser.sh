#!/usr/bin/env bash
# Debian's Chromium and a CJK font, for the operator console's browser tests
# (tests/console/: Playwright drives /usr/bin/chromium; the zh-CN pages need a font with
# Chinese glyphs for the screenshots in docs/console/). Installs with apt-get (as root, or
# through `sudo -n`); does nothing when both are there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "wenquanyi"; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo -n"
fi
PACKAGES=(chromium fonts-wqy-microhei)
if ! ${SUDO} apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1; then
    # The package lists may be missing or stale: refresh them once, then try again.
    ${SUDO} apt-get update -qq
    ${SUDO} apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi
chromium --headless --no-sandbox --version 2>/dev/null | tail -n 1
