#!/usr/bin/env bash
# Installs the Debian peers the tests talk to. Idempotent: does nothing when all are present.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v Orthanc >/dev/null || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancGdcm.so ] || need+=(orthanc-gdcm)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -e /usr/share/java/pixelmed.jar ] || need+=(libpixelmed-java)
command -v ojph_compress >/dev/null || need+=(openjph-tools)
# promtool checks the example alerting rules in deploy/prometheus (tests/dicom_node/test_alert_rules.py).
command -v promtool >/dev/null || need+=(prometheus)
# The OHIF viewer test (tests/viewer): headless chromium, node and npm (deploy/install-viewer.sh fetches OHIF).
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then
  echo "peers: all present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "peers: installing ${need[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# policy-rc.d keeps the packaged Orthanc service from starting: tests run their own instances.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
