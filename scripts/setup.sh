#!/usr/bin/env bash
# Installs the system packages tollgate needs to build on a fresh Debian machine with the Rust
# toolchain: cmake (Pingora's zlib-ng), make and a C/C++ compiler (rustc links with cc; zlib-ng,
# SQLite and zstd are compiled from source, so no pkg-config is needed; rust:*-slim images lack
# them all) and curl (scripts/demo.sh prints curl commands). Extra package names may be passed
# (e.g. wrk nginx-light). Installs nothing and prints nothing when everything is present.
set -euo pipefail

needed=()
command -v cmake >/dev/null 2>&1 || needed+=(cmake)
if ! command -v make >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1 \
  || ! command -v c++ >/dev/null 2>&1; then
  needed+=(build-essential)
fi
command -v curl >/dev/null 2>&1 || needed+=(curl)
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
