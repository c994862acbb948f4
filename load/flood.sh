#!/usr/bin/env bash
# Floods do not starve valid devices: 8 clients make TLS handshakes with an untrusted
# certificate as fast as they can, while a valid device makes requests on new connections; its
# p50/p95 latency with the flood against without it, for the edge (with its default
# limits.failed_handshakes_per_ip, which delays a failing IP; without it; with it refusing)
# and for nginx doing the same job (1 and then 2 workers each, WORKERS="1 2 4" for more; mTLS
# required), side by side. The flood comes from 127.0.0.2, the device from 127.0.0.1.
#   load/flood.sh [SECONDS=20] [PROBES=200]
source "$(dirname "$0")/lib.sh"
SECONDS_=${1:-20}
PROBES=${2:-200}
WORKERS=${WORKERS:-1 2}
start_origin

# run TAG NAME PORT: the probe alone, then under the flood.
run() {
  local tag=$1-$workers name=$2 port=$3
  local base; base=$(python3 load/flood.py probe "$port" "$D" "$PROBES")
  local flooders=()
  for i in $(seq 8); do python3 load/flood.py flood "$port" "$D" "$SECONDS_" > "$D/flood-$tag-$i" & flooders+=($!); done
  sleep 1
  local under; under=$(python3 load/flood.py probe "$port" "$D" "$PROBES")
  local made=0
  for p in "${flooders[@]}"; do wait "$p"; done
  for f in "$D"/flood-"$tag"-*; do made=$((made + $(cat "$f"))); done
  read -r b50 b95 <<<"$base"; read -r u50 u95 <<<"$under"
  printf '| %s | %s | %s | %s | %s | %s | %.2fx | %d (%.0f/s) |\n' "$name" "$workers" "$b50" "$b95" "$u50" "$u95" \
    "$(echo "$u95 / $b95" | bc -l)" "$made" "$(echo "$made / $SECONDS_" | bc -l)"
}
echo "| server | workers | p50 ms alone | p95 ms alone | p50 ms flooded | p95 ms flooded | p95 ratio | untrusted attempts |"
echo "|---|---|---|---|---|---|---|---|"
for workers in $WORKERS; do
  start_edge "$workers"; edges=("$EDGE")
  EDGE_PORT=8445 ADMIN_PORT=9101 EXTRA_YAML="limits: { failed_handshakes_per_ip: { max: 20, window_secs: 10 } }" start_edge "$workers"
  edges+=("$EDGE")
  EDGE_PORT=8446 ADMIN_PORT=9102 EXTRA_YAML="limits: { failed_handshakes_per_ip: null }" start_edge "$workers"
  edges+=("$EDGE")
  start_nginx_proxy "$workers" 4096
  run edge "mtls-edge (default: a 1 s delay after 100 failures in 10 s)" 8443
  run open "mtls-edge, failed_handshakes_per_ip: null" 8446
  run limited "mtls-edge, refusing after 20 failures in 10 s" 8445
  run nginx nginx 8444
  for EDGE in "${edges[@]}"; do stop_edge; done
  stop_nginx
done
