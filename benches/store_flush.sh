#!/usr/bin/env bash
# Does the SQLite store's flush stall the proxy? The same traffic through tollgate with the
# memory store (never writes) and with the SQLite store flushing every second, as latency
# percentiles side by side.
#
#   benches/store_flush.sh          (about 2 minutes plus the release build)
#
# An nginx origin answers a small body. tollgate runs in user_token mode with USERS users
# (imported through the admin API) and rate limiting off; wrk sends requests with a random user
# token each, so every flush writes the counters of (nearly) all USERS users: the steady state
# of a busy instance, with the flush interval at its minimum (1 s) instead of the default 20 s.
# Runs alternate memory and sqlite ROUNDS times; the table has the medians over rounds.
#
# Tunables (environment): ROUNDS (3), DURATION seconds per run (10), CONNECTIONS (16),
# USERS (10000), PORT_BASE (19180), TOLLGATE_BIN (skip the build).
# Only loopback addresses are used; every run is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
USERS=${USERS:-10000}
PORT_BASE=${PORT_BASE:-19180}
ADMIN_KEY=bench-admin-key-0123456789

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
bench_workspace store_flush
# SIGTERM: tollgate's graceful stop, which writes what the SQLite store has pending.
trap 'load_stop TERM; rm -rf "$WORK"' EXIT
plain_release_bin
port_free_or_die "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT"

write_origin_conf off
start_nginx origin
wait_port "$ORIGIN_PORT"

python3 - "$USERS" >"$WORK/users.json" <<'EOF'
import json, sys
print(json.dumps({"users": [{"token": "bench-%06d" % i} for i in range(int(sys.argv[1]))]}))
EOF
cat >"$WORK/random-user.lua" <<EOF
math.randomseed(os.time())
request = function()
  local i = math.random(0, $USERS - 1)
  return wrk.format("GET", "/small", {["Authorization"] = string.format("Bearer bench-%06d", i)})
end
EOF

# One run: start tollgate with store $1, import the users, drive it, print
# "requests/s p50_ms p99_ms" and stop it.
run() {
  rm -f "$WORK"/tollgate.db*
  cat >"$WORK/$1.yaml" <<EOF
listen: ["127.0.0.1:$PROXY_PORT"]
pingora:
  threads: 2
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
  upgrade_sock: $WORK/upgrade.sock
upstream:
  addrs: ["127.0.0.1:$ORIGIN_PORT"]
gatekeeper:
  mode: user_token
rate_limit:
  requests_per_minute: 0
admin:
  listen: "127.0.0.1:$ADMIN_PORT"
store:
  kind: $1
  flush_interval_seconds: 1
  sqlite:
    path: $WORK/tollgate.db
EOF
  ADMIN_KEY=$ADMIN_KEY RUST_LOG=warn "$TOLLGATE_BIN" -c "$WORK/$1.yaml" 2>>"$WORK/$1.stderr" &
  local pid=$!
  wait_port "$PROXY_PORT"
  curl -sf -o /dev/null -X PUT -H "Authorization: Bearer $ADMIN_KEY" \
    -H 'content-type: application/json' --data-binary @"$WORK/users.json" \
    "http://127.0.0.1:$ADMIN_PORT/admin/users" || die "import failed"
  wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/random-user.lua" \
    "http://127.0.0.1:$PROXY_PORT/small" >"$WORK/wrk.out"
  kill -TERM "$pid"
  wait "$pid" || true
  python3 - "$WORK/wrk.out" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
lat = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", text, re.M)}
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if bad:
    sys.exit("non-2xx responses: " + bad.group(1))
print(f"{rps:.0f} {lat['50']:.3f} {lat['99']:.3f}")
EOF
}

: >"$WORK/results"
for round in $(seq "$ROUNDS"); do
  for kind in memory sqlite; do
    log "round $round: $kind"
    echo "$kind $(run "$kind")" >>"$WORK/results"
  done
done

python3 - "$WORK/results" "$USERS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, *vals = line.split()
    rows.setdefault(kind, []).append([float(v) for v in vals])
print(f"| store (flush every 1 s, {int(sys.argv[2]):,} users active) | requests/s | p50 ms | p99 ms |")
print("|---|---|---|---|")
for kind in ("memory", "sqlite"):
    med = [statistics.median(col) for col in zip(*rows[kind])]
    print(f"| {kind} | {med[0]:,.0f} | {med[1]:.2f} | {med[2]:.2f} |")
EOF
