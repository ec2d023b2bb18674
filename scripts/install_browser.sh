#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian's packages (`chromium`,
# `chromium-driver`) for tests/test_dashboard_browser.py. Idempotent: returns at once when both
# are already on PATH. Exit status 3 means "cannot install here" (no apt-get, or not root and no
# sudo): the browser test then skips and says so. Any other failure is a real error.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "[browser] chromium and chromedriver already installed"
    exit 0
fi
if ! have apt-get; then
    echo "[browser] apt-get not available: cannot install chromium here" >&2
    exit 3
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "[browser] not root and no password-less sudo: cannot install chromium here" >&2
        exit 3
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# A stale package index is the usual reason the install fails; refresh it first.
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
have chromium && have chromedriver
echo "[browser] installed $(chromium --version 2>/dev/null)"
