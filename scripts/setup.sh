#!/usr/bin/env bash
# Installs the system packages tollgate needs to build on a fresh Debian machine with the Rust
# toolchain: cmake (Pingora's zlib-ng). Extra package names may be passed (e.g. wrk nginx-light).
set -euo pipefail

needed=()
command -v cmake >/dev/null 2>&1 || needed+=(cmake)
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || needed+=("$pkg")
done
[ ${#needed[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup: need root (or sudo) to install: ${needed[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${needed[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${needed[@]}" >/dev/null
