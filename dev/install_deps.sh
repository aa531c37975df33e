#!/usr/bin/env bash
# Installs the Debian packages the CPU build, the tests and the benchmarks need, if missing.
# Called by `make deps` (and so by `make test`); safe to run again: it installs only what is absent.
set -eu
pkgs="build-essential pkg-config libcjson-dev libpcre2-dev libopenblas-dev libopenblas0-pthread
      python3 python3-torch python3-numpy python3-matplotlib"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
