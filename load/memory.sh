#!/usr/bin/env bash
# Bounded memory: with a 64 MiB budget, cycle three times through 16 objects of 16 MiB (4x the
# budget) and report the edge's RSS (current and peak), the bytes the cache says it holds, and
# evictions. The figure that matters: peak RSS minus the budget, the fixed overhead.
#   load/memory.sh
source "$(dirname "$0")/lib.sh"
start_origin
start_edge 2 67108864 16777216
rss() { awk '/^VmRSS/ {print $2}' "/proc/$EDGE/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$EDGE/status"; }
metric() { curl -s 127.0.0.1:9100/metrics | awk -v m="$1" '$1 == m {print $2}'; }
echo "idle: rss $(( $(rss) / 1024 )) MiB"
CURLS=()
for pass in 1 2 3; do
  for i in $(seq 16); do
    curl -sS -o /dev/null --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" \
      "https://localhost:8443/files/obj-$i.bin?size=16777000" &
    CURLS+=($!)
    if (( i % 4 == 0 )); then wait "${CURLS[@]}"; CURLS=(); fi
  done
  echo "pass $pass: rss $(( $(rss) / 1024 )) MiB, peak $(( $(hwm) / 1024 )) MiB, cache holds $(( $(metric 'mtls_edge_cache_bytes{tier="memory"}') / 1048576 )) MiB of $(( $(metric mtls_edge_cache_budget_bytes) / 1048576 )) MiB, evictions $(metric 'mtls_edge_cache_evictions_total{tier="memory"}'), fills deferred $(metric mtls_edge_cache_fills_deferred_total)"
done
