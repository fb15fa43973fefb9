#!/usr/bin/env bash
# The browser the demo's tests drive (tests/test_app.py, scripts/screenshots.py): Debian's chromium at
# /usr/bin/chromium, which playwright runs through executable_path (playwright's own browser download is not used).
# Needs apt-get and root (or sudo); only the tests need it, never the main job. CHROMIUM overrides the path checked
# (for testing this script; the tests themselves look at /usr/bin/chromium).
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-browser.sh: no Chromium at $CHROMIUM and no apt-get to install it; install Chromium there for the demo's browser tests" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
