#!/usr/bin/env bash
# Builds the mtls-edge runtime image (the Dockerfile's last stage) where no registry can be
# reached: the Debian base is made here from Debian packages (mmdebstrap), and the binary is the
# host's release build. With docker (a daemon that answers) it builds with docker, otherwise with
# buildah (--isolation chroot). Installs mmdebstrap and buildah from Debian when they are missing.
#   scripts/image.sh [tag]            (default tag: localhost/mtls-edge:latest)
#   BINARY=path/to/mtls-edge          use that binary instead of building target/release/mtls-edge
# Prints the image's name and size.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/mtls-edge:latest}
BASE=localhost/mtls-edge-base:bookworm

if docker info >/dev/null 2>&1; then TOOL=docker; else TOOL=buildah; fi
need=()
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
if [ $TOOL = buildah ]; then
  command -v buildah >/dev/null 2>&1 || need+=(buildah)
fi
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "image: needs ${need[*]} (Debian packages) and root to use them" >&2
    exit 1
  fi
  echo "image: installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

have_image() { if [ $TOOL = docker ]; then docker image inspect "$1" >/dev/null 2>&1; else buildah inspect --type image "$1" >/dev/null 2>&1; fi; }

# The base: Debian bookworm's Essential packages and apt (debian:bookworm-slim without the
# Priority: required extras), /usr merged by mmdebstrap's hook (not the usrmerge package and the
# Perl it pulls in), documentation left out.
if ! have_image "$BASE"; then
  echo "image: making $BASE with mmdebstrap" >&2
  tar=$(mktemp --suffix=.tar)
  trap 'rm -f "$tar"' EXIT
  mmdebstrap --quiet --variant=apt --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' bookworm "$tar"
  if [ $TOOL = docker ]; then docker import "$tar" "$BASE" >/dev/null; else
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tar" / >/dev/null # a tarball is unpacked
    buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
  fi
fi

# The binary: the host's release build, stripped, alone in the build context.
if [ -z "${BINARY:-}" ]; then
  scripts/setup.sh
  cargo build --release --locked
  BINARY=target/release/mtls-edge
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx" ${tar:+"$tar"}' EXIT
cp Dockerfile "$ctx/"
strip -o "$ctx/mtls-edge" "$BINARY"

args=(--build-arg BINARY=host --build-arg RUNTIME="$BASE"
      --build-arg MTLS_EDGE_REVISION="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" -t "$TAG")
if [ $TOOL = docker ]; then
  docker build -q "${args[@]}" "$ctx" >/dev/null
  size=$(docker image inspect --format '{{.Size}}' "$TAG")
else
  dangling() { buildah images --quiet --no-trunc --filter dangling=true | sort; }
  before=$(dangling)
  buildah bud --quiet --isolation chroot --layers=false "${args[@]}" "$ctx" >/dev/null
  # The binary's stage and the image this tag replaced are left untagged: remove them (and the
  # working container of the stage) so that rebuilding does not fill the disk.
  comm -13 <(echo "$before") <(dangling) | xargs -r buildah rmi --force >/dev/null
  size=$(buildah images --format '{{.Size}}' --filter reference="$TAG" | head -1)
fi
echo "$TAG ($TOOL): $size"
