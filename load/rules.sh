#!/usr/bin/env bash
# The cost of Lua-free rules, and of a big list:
#  1. a list of one million serials: load time and the memory it takes (edge RSS with and
#     without it);
#  2. the request phase of a 20-rule set (load/rules-20, which also looks serials up in that
#     list), timed in-process: nanoseconds per request, facts included, with warm CPU caches
#     and with the caches evicted before each request (as in a loaded edge);
#  3. the cached 1 KiB load (ab -k, keep-alive mTLS) against two edges, one without rules and
#     one with the 20 rules, alternating: requests per second and server CPU per request.
#     Both edges are pinned to CPU 1 and ab to CPU 0: unpinned, two identical edges differ by
#     5% on this 2-core machine depending on where the scheduler puts them. Each round runs
#     both edges back to back; the change is also given per round, and its median over the
#     rounds: other tenants of this VM slow one stretch of a run, which then weighs on one pair
#     of measurements instead of on one edge's median.
#   load/rules.sh [rounds] [requests-per-round]
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-6}
REQUESTS=${2:-20000}
command -v ab >/dev/null || { echo "needs ab (apache2-utils)" >&2; exit 1; }
python3 - "$D/revoked.txt" <<'PY'
import random, sys
random.seed(7)
with open(sys.argv[1], "w") as f:
    f.write("# one million revoked serials\n")
    for _ in range(1_000_000):
        f.write(":".join(f"{random.getrandbits(8):02X}" for _ in range(16)) + "\n")
PY
RULES_YAML="rules: { dir: $PWD/load/rules-20, lists: { revoked: { file: $D/revoked.txt, kind: serial } } }"

export EDGE_CPU=1
start_origin
start_edge 1
PLAIN=$EDGE
EDGE_PORT=8445 ADMIN_PORT=9101 EXTRA_YAML=$RULES_YAML start_edge 1
RULED=$EDGE
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
echo "# a list of 1,000,000 serials"
for i in 1 2 3; do
  RUST_LOG=info "$BIN" -t -c "$D/edge-8445.yaml" 2>&1 | grep -o "list revoked: .*"
done
echo "edge RSS without rules: $(( $(rss $PLAIN) / 1024 )) MiB, with the rules and the list: $(( $(rss $RULED) / 1024 )) MiB"

echo
echo "# the request phase of 20 rules, in-process (facts built, the rules a request visits evaluated)"
for i in 1 2 3; do
  "$BIN" -c "$D/edge-8445.yaml" rules explain --cert "$D/device.pem" --path "/files/small.bin?size=1024" \
    --header "User-Agent: fw-agent/2.1" --bench 200000 2>/dev/null
done

echo
echo "# cached 1 KiB over keep-alive mTLS, ab -k, concurrency 8, $(nproc) cores"
printf "%-12s %5s %12s %14s\n" edge round "req/s" "cpu us/req"
for port in 8443 8445; do # warm both caches
  ab -q -n 2 -c 1 -E "$D/ab-client.pem" "https://localhost:$port/files/small.bin?size=1024" >/dev/null 2>&1
done
run() { # name port pid
  local before after out n=$REQUESTS
  before=$(ticks "$3")
  out=$(taskset -c 0 ab -q -k -n $n -c 8 -E "$D/ab-client.pem" "https://localhost:$2/files/small.bin?size=1024" 2>&1)
  after=$(ticks "$3")
  local rps non2xx; rps=$(awk '/Requests per second/ {print $4}' <<<"$out")
  non2xx=$(awk '/Non-2xx responses/ {print $3}' <<<"$out")
  [ -z "$non2xx" ] || { echo "$1: $non2xx non-2xx responses" >&2; exit 1; }
  awk -v s="$1" -v r="$round" -v rps="$rps" -v t=$((after - before)) -v hz="$HZ" -v n=$n \
    'BEGIN { printf "%-12s %5s %12s %14.1f\n", s, r, rps, t * 1e6 / hz / n }' | tee -a "$D/rows"
}
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then run no-rules 8443 $PLAIN; run 20-rules 8445 $RULED
  else run 20-rules 8445 $RULED; run no-rules 8443 $PLAIN; fi
done
echo
echo "# medians"
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for e in no-rules 20-rules; do
  printf "%-12s %12.1f %14.1f\n" $e "$(awk -v e=$e '$1 == e {print $3}' "$D/rows" | median)" "$(awk -v e=$e '$1 == e {print $4}' "$D/rows" | median)"
done
echo "change per round, median: $(awk '$1 == "no-rules" { a[$2] = $3 } $1 == "20-rules" { b[$2] = $3 }
  END { for (r in a) printf "%.2f\n", (b[r] - a[r]) / a[r] * 100 }' "$D/rows" | median)%"
