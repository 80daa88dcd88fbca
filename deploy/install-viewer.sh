#!/usr/bin/env bash
# Installs what the OHIF viewer test needs, idempotently, into an ignored cache folder:
#   - the @ohif/app dist (npm pack of the published package: the built viewer, no dependency install),
#   - playwright-core (npm; it never downloads a browser: the test uses Debian's chromium),
#   - Debian chromium (apt, when missing).
# Usage: deploy/install-viewer.sh [CACHE_DIR]   (default: .cache/viewer in the repository)
set -euo pipefail
OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.65.1}"
here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-$here/.cache/viewer}"
mkdir -p "$cache"

if ! command -v chromium >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "viewer: installing chromium"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if [ ! -f "$cache/ohif-$OHIF_VERSION/dist/index.html" ]; then
  echo "viewer: fetching @ohif/app@$OHIF_VERSION"
  work="$(mktemp -d "$cache/.ohif-XXXXXX")"
  (cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null && tar xzf ohif-app-"$OHIF_VERSION".tgz)
  rm -rf "$cache/ohif-$OHIF_VERSION"
  mv "$work/package" "$cache/ohif-$OHIF_VERSION"
  rm -rf "$work"
fi

if [ ! -f "$cache/node_modules/playwright-core/package.json" ] || \
   ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$cache/node_modules/playwright-core/package.json"; then
  echo "viewer: installing playwright-core@$PLAYWRIGHT_VERSION"
  (cd "$cache" && [ -f package.json ] || echo '{"private": true}' > package.json)
  (cd "$cache" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
fi
echo "viewer: ready in $cache (OHIF $OHIF_VERSION, playwright-core $PLAYWRIGHT_VERSION, $(command -v chromium))"
