#!/usr/bin/env bash
# Install Debian's headless-capable Chromium if `chromium` is not on PATH.
# Used by tests/test_report.py to screenshot report.html (CI: root Debian 12 with apt).
#   bash scripts/install_chromium.sh
# Exit codes: 0 installed or already present, 3 apt-get unavailable, other = apt failure.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: apt-get not found; install chromium by hand" >&2
    exit 3
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_chromium.sh: not root and no sudo; run as root: apt-get install -y chromium" >&2
        exit 3
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Another install (a parallel test run) may hold dpkg's lock: wait for it rather than fail.
APT=(apt-get -o DPkg::Lock::Timeout=600)
# Package lists may be empty on fresh images (docker-style); update once, then install.
if ! $SUDO "${APT[@]}" install -y --no-install-recommends chromium; then
    $SUDO "${APT[@]}" update
    $SUDO "${APT[@]}" install -y --no-install-recommends chromium
fi
# apt installs into /usr/bin; a PATH that shadows /usr/bin (run_tests.sh phase 1 hides SLURM
# with a folder of symlinks made before this ran) does not show it, so check the file too.
command -v chromium >/dev/null || test -x /usr/bin/chromium
