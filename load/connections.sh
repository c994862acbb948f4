#!/usr/bin/env bash
# Memory per parked connection: hold N TLS connections with a device certificate against the
# edge and against nginx doing the same job (1 and then 2 workers each, WORKERS="1 2 4" for
# more; mTLS required, keep-alive and
# header timeouts long enough to keep them all), half idle after a request and half with a
# request header half sent. Reports RSS per connection for each, side by side, while a valid
# device is asked to fetch a file every second throughout.
#   load/connections.sh [N=10000]
source "$(dirname "$0")/lib.sh"
N=${1:-10000}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) > N + 1000 )) || { echo "connections: the fd limit $(ulimit -n) is too low for $N connections" >&2; exit 1; }
WORKERS=${WORKERS:-1 2}
start_origin

rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }

# probe PORT: a valid device fetching a file once a second; prints how many failed.
probe() {
  local fails=0
  while [ ! -f "$D/stop-probe" ]; do
    curl -sS -o /dev/null -m 5 --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" \
      --resolve "localhost:$1:127.0.0.1" "https://localhost:$1/files/probe.bin?size=4096" || fails=$((fails + 1))
    sleep 1
  done
  echo "$fails"
}

# hold NAME PORT PID...: open N connections, measure, release.
hold() {
  local name=$1 port=$2; shift 2
  local tag=$name-$workers # files of this run
  # Warm up: a few requests so that allocator arenas and the pools exist before the baseline.
  for _ in 1 2 3; do curl -sS -o /dev/null --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" \
    --resolve "localhost:$port:127.0.0.1" "https://localhost:$port/files/manifest.json?size=512"; done
  local before; before=$(rss_kib "$@")
  rm -f "$D/stop-probe"
  probe "$port" > "$D/probe-$tag" &
  local probe_pid=$!
  mkfifo "$D/in-$tag"
  python3 load/connections.py "$port" "$N" "$D" < "$D/in-$tag" > "$D/held-$tag" 2>"$D/held-$tag.err" &
  local py=$!
  exec {keep}>"$D/in-$tag"
  until grep -q READY "$D/held-$tag" 2>/dev/null; do sleep 1; kill -0 $py 2>/dev/null || { cat "$D/held-$tag.err"; exit 1; }; done
  sleep 5
  local after; after=$(rss_kib "$@")
  local alive; alive=$(grep alive= "$D/held-$tag" | tail -1 | cut -d= -f2)
  exec {keep}>&-
  wait $py
  touch "$D/stop-probe"; wait $probe_pid
  local open; open=$(grep -o 'open=[0-9]*' "$D/held-$tag" | cut -d= -f2)
  printf '| %s | %s | %d | %d | %d | %.1f | %.1f | %s |\n' "$name" "$workers" "$open" "${alive:-0}" "$N" \
    "$(echo "$before / 1024" | bc -l)" "$(echo "$after / 1024" | bc -l)" \
    "$(echo "scale=1; ($after - $before) / $open" | bc -l) KiB, probe failures $(cat "$D/probe-$tag")"
}

echo "| server | workers | opened | still open after 5 s | asked | RSS before MiB | RSS held MiB | per connection |"
echo "|---|---|---|---|---|---|---|---|"
for workers in $WORKERS; do
  EXTRA_YAML="limits: { handshake_timeout_ms: 600000, request_header_timeout_ms: 600000, keepalive_idle_timeout_ms: 600000 }" \
    start_edge "$workers"
  start_nginx_proxy "$workers" 20000 "    keepalive_timeout 600s;
    client_header_timeout 600s;"
  hold mtls-edge 8443 "$EDGE"
  hold nginx 8444 $(nginx_pids)
  stop_edge; stop_nginx
done
