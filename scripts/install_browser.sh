#!/usr/bin/env bash
# Make Debian's headless Chromium and its chromedriver available for the browser tests
# (tests/integration/test_sagas_page.py): /usr/bin/chromium and /usr/bin/chromedriver.
# Idempotent and quick when both are already there (no apt-get at all).
# Never downloads a browser build of its own: Debian's packages only.
# If they cannot be installed: exits 1 under CI (CI set), else warns and exits 0, so a local
# `make test` goes on and the browser test skips.
set -uo pipefail

CHROMIUM=${SAGAS_CHROMIUM:-/usr/bin/chromium}
CHROMEDRIVER=${SAGAS_CHROMEDRIVER:-/usr/bin/chromedriver}

in_ci() { case "${CI:-}" in "" | 0 | false | no) return 1 ;; *) return 0 ;; esac; }
present() { [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; }
give_up() {
  if in_ci; then
    echo "install_browser: $*; CI needs it" >&2
    exit 1
  fi
  echo "install_browser: $*; the browser tests will skip" >&2
  exit 0
}

if present; then
  echo "browser: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM"), $CHROMEDRIVER"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || give_up "no apt-get to install chromium"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || give_up "not root and no sudo"
  SUDO="sudo -n"
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_browser: apt-get install chromium chromium-driver"
$SUDO apt-get update -qq </dev/null || give_up "apt-get update failed"
# fonts-liberation: readable text in screenshots (DejaVu alone is enough, but may be absent)
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation \
  </dev/null || give_up "apt-get install chromium chromium-driver failed"

present || give_up "$CHROMIUM or $CHROMEDRIVER still missing after apt-get install"
echo "browser: $("$CHROMIUM" --version 2>/dev/null), $CHROMEDRIVER"
