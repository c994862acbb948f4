#!/usr/bin/env bash
# The demo: installs the build's system packages when missing, then runs `mtls-edge demo`,
# which generates a demo PKI in ./demo-pki (and installs it where conf/edge.yaml looks: conf/pki
# and secrets/), starts an mTLS origin and the edge, and prints curl commands that work. Ctrl-C
# stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --locked -- demo --conf conf "$@"
