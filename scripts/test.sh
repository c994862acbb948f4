#!/usr/bin/env bash
# The whole test suite: installs the build's system packages when missing, then runs every
# test (unit and integration, over real sockets with a PKI generated per run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
