#!/usr/bin/env bash
# What the 20 benchmark rules cost a request in instructions and cache misses, counted instead of
# timed: the edge runs under callgrind (cache simulation), once without rules and once with
# load/rules-20, and serves the same cached 1 KiB requests. On this shared 2-core machine a timed
# A/B moves by several percent between runs; these counts do not, so they show what a change to
# the rules' request path does. The last level callgrind simulates is this machine's L2 (from
# sysfs), so its misses are what comes from L3: the rules' own, and those their lines cause in
# the rest of the edge by evicting it. Needs valgrind (`apt-get install valgrind`); about a minute.
#   load/rules-footprint.sh [requests]
source "$(dirname "$0")/lib.sh"
N=${1:-2000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v ab >/dev/null || { echo "needs ab (apache2-utils)" >&2; exit 1; }
python3 - "$D/revoked.txt" <<'PY'
import random, sys
random.seed(7)
with open(sys.argv[1], "w") as f:
    for _ in range(1_000_000):
        f.write(":".join(f"{random.getrandbits(8):02X}" for _ in range(16)) + "\n")
PY
# Under valgrind the edge starts slowly (the list takes a while): wait up to two minutes.
wait_port() { for _ in $(seq 1200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }
start_origin
REAL=$BIN
url="https://localhost:8443/files/small.bin?size=1024"
l2=/sys/devices/system/cpu/cpu0/cache/index2
LL="--LL=524288,8,64" # a 512 KiB, 8-way L2 where sysfs does not say
if [ "$(cat $l2/level 2>/dev/null)" = 2 ]; then
  LL="--LL=$(( $(sed 's/K$//' $l2/size) * 1024 )),$(cat $l2/ways_of_associativity),$(cat $l2/coherency_line_size)"
fi
for edge in no-rules 20-rules; do
  cat > "$D/valgrind-$edge" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --cache-sim=yes $LL --callgrind-out-file=$D/cg-$edge.out "$REAL" "\$@"
SH
  chmod +x "$D/valgrind-$edge"
  extra=""
  [ "$edge" = 20-rules ] && extra="rules: { dir: $PWD/load/rules-20, lists: { revoked: { file: $D/revoked.txt, kind: serial } } }"
  BIN=$D/valgrind-$edge EXTRA_YAML=$extra start_edge 1
  ab -q -k -n 200 -c 8 -E "$D/ab-client.pem" "$url" >/dev/null 2>&1 # fill the cache, warm up
  callgrind_control -z "$EDGE" >/dev/null 2>&1
  ab -q -k -n "$N" -c 8 -E "$D/ab-client.pem" "$url" 2>&1 | grep -q "Complete requests: *$N" \
    || { echo "$edge: not every request completed" >&2; exit 1; }
  callgrind_control -d "$EDGE" >/dev/null 2>&1
  kill "$EDGE"; wait "$EDGE" 2>/dev/null || true
done
python3 - "$D" "$N" <<'PY'
import re, subprocess, sys
d, n = sys.argv[1], int(sys.argv[2])
def counts(edge, function="PROGRAM TOTALS"):
    """Per request: instructions, I1 misses, D1 misses (reads and writes) and L2 misses (code
    and data), from the dump made after the zeroing (events Ir Dr Dw I1mr D1mr D1mw ILmr DLmr
    DLmw), inclusive of callees."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", f"{d}/cg-{edge}.out.1"],
                          capture_output=True, text=True).stdout
    for line in text.splitlines():
        if function in line:
            fields = re.sub(r"\([^)]*\)", " ", line).split()
            v = [0 if x == "." else int(x.replace(",", "")) for x in fields[:9]]
            return v[0] / n, v[3] / n, (v[4] + v[5]) / n, (v[6] + v[7] + v[8]) / n
    return 0.0, 0.0, 0.0, 0.0
a, b = counts("no-rules"), counts("20-rules")
r = counts("20-rules", "mtls_edge::proxy::request_rules")
print(f"per request ({n} cached 1 KiB)     instructions  I1 misses  D1 misses  L2 misses")
print(f"edge without rules               {a[0]:12.0f} {a[1]:10.1f} {a[2]:10.1f} {a[3]:10.1f}")
print(f"edge with the 20 rules           {b[0]:12.0f} {b[1]:10.1f} {b[2]:10.1f} {b[3]:10.1f}")
print(f"difference                       {b[0]-a[0]:+12.0f} {b[1]-a[1]:+10.1f} {b[2]-a[2]:+10.1f} {b[3]-a[3]:+10.1f}")
print(f"the rules' own path              {r[0]:12.0f} {r[1]:10.1f} {r[2]:10.1f} {r[3]:10.1f}")
PY
