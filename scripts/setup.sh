#!/usr/bin/env bash
# Installs what building mtls-edge needs on Debian/Ubuntu: BoringSSL's build (boring-sys) needs
# cmake, clang and libclang-dev; the tests use curl. Does nothing when they are present.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "setup: installing ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: ${missing[*]} missing and apt-get is not available; install them with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: ${missing[*]} missing; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
  echo "setup: could not install ${missing[*]}; install them by hand: apt-get install ${missing[*]}" >&2
  exit 1
fi
