#!/usr/bin/env bash
# Installs what building and testing mtls-edge needs on Debian/Ubuntu: BoringSSL's build
# (boring-sys) needs cmake, clang and libclang-dev; the tests use curl, and promtool (Prometheus's
# metrics linter), which is unpacked from Debian's prometheus package into target/tools so that
# no Prometheus service is installed or started; the image test builds and runs the container
# image with buildah and mmdebstrap, installed when this runs as root (or with sudo) and docker
# cannot build (otherwise that test says why it is skipped); the Kubernetes manifests are checked
# with kubernetes-validate (its schemas bundled), from PyPI into a venv in target/tools. Does
# nothing when all of it is present.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/*/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if ! docker info >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
  command -v buildah >/dev/null 2>&1 || missing+=(buildah)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
fi
tools=target/tools/prometheus
need_promtool=false
[ -x "$tools/usr/bin/promtool" ] || command -v promtool >/dev/null 2>&1 || need_promtool=true
venv=target/tools/venv
validator=kubernetes-validate==1.37.0
need_validator=false
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  need_validator=true
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
fi
install_validator() {
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q "$validator"; } >/dev/null; then
    echo "setup: could not install $validator from PyPI into $venv" >&2
    exit 1
  fi
}
if ((${#missing[@]} == 0)) && ! $need_promtool; then
  if $need_validator; then install_validator; fi
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: missing ${missing[*]} $($need_promtool && echo promtool); apt-get is not available: install them with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: ${missing[*]} missing; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
what=("${missing[@]}")
$need_promtool && what+=("promtool (unpacked into $tools)")
echo "setup: installing ${what[*]}" >&2
if ! $SUDO apt-get update -qq; then
  echo "setup: apt-get update failed" >&2
  exit 1
fi
if ((${#missing[@]})) && ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; then
  echo "setup: could not install ${missing[*]}; install them by hand: apt-get install ${missing[*]}" >&2
  exit 1
fi
if $need_promtool; then
  tmp=$(mktemp -d)
  mkdir -p "$tools"
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null) || ! dpkg-deb -x "$tmp"/prometheus_*.deb "$tools"; then
    rm -rf "$tmp"
    echo "setup: could not unpack promtool from Debian's prometheus package" >&2
    exit 1
  fi
  rm -rf "$tmp"
fi
if $need_validator; then install_validator; fi
