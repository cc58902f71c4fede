#!/usr/bin/env bash
# A widely shared token: one user whose every request comes from a new address. Without an IP
# limit tollgate records the user's first `gatekeeper.max_recorded_ips` addresses; before that
# cap, the list grew with every request and each new address copied it, so the rate fell as the
# list grew. This prints, run after run, the requests/s, the length of the user's `ip` list and
# the process's RSS: with the cap, the rate holds.
#
#   benches/shared_token.sh        (about 1 minute plus the release build)
#
# Tunables (environment): RUNS (5), DURATION seconds per run (10), CONNECTIONS (8),
# MAX_RECORDED_IPS (1000; 0 = record every address, the older behaviour), PORT_BASE (19280),
# TOLLGATE_BIN (skip the build). Only loopback addresses are used: the addresses come in
# X-Forwarded-For from 127.0.0.1, a trusted proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-8}
MAX_RECORDED_IPS=${MAX_RECORDED_IPS:-1000}
PORT_BASE=${PORT_BASE:-19280}
ADMIN_KEY=bench-admin-key-0123456789

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
bench_workspace shared_token
trap load_cleanup EXIT
plain_release_bin
port_free_or_die "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT"

write_origin_conf off
start_nginx origin
wait_port "$ORIGIN_PORT"

cat >"$WORK/tollgate.yaml" <<EOF
listen: ["127.0.0.1:$PROXY_PORT"]
pingora:
  threads: 1
  upgrade_sock: $WORK/upgrade.sock
  pid_file: $WORK/tollgate.pid
upstream:
  addrs: ["127.0.0.1:$ORIGIN_PORT"]
gatekeeper:
  mode: user_token
  max_recorded_ips: $MAX_RECORDED_IPS
rate_limit:
  requests_per_minute: 0
trusted_proxies: ["127.0.0.1"]
admin:
  listen: "127.0.0.1:$ADMIN_PORT"
store:
  kind: memory
EOF
ADMIN_KEY=$ADMIN_KEY RUST_LOG=warn "$TOLLGATE_BIN" -c "$WORK/tollgate.yaml" 2>>"$WORK/tollgate.stderr" &
PIDS+=($!)
TOLLGATE_PID=$!
wait_port "$PROXY_PORT"
wait_port "$ADMIN_PORT"

TOKEN=$(curl -sf -X POST -H "Authorization: Bearer $ADMIN_KEY" -H 'content-type: application/json' \
  -d '{}' "http://127.0.0.1:$ADMIN_PORT/admin/users" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
cat >"$WORK/new-address.lua" <<'EOF'
local token
function init(args)
  token = args[1]
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
function request()
  return wrk.format("GET", "/small", {["Authorization"] = "Bearer " .. token,
    ["X-Forwarded-For"] = string.format("%d.%d.%d.%d", math.random(11, 223),
      math.random(0, 255), math.random(0, 255), math.random(1, 254))})
end
EOF

echo "| run | requests/s | addresses recorded | RSS MiB |"
echo "|---|---|---|---|"
for run in $(seq "$RUNS"); do
  rps=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/new-address.lua" \
    "http://127.0.0.1:$PROXY_PORT/small" -- "$TOKEN" | awk '/Requests\/sec/ { print $2 }')
  recorded=$(curl -sf -H "Authorization: Bearer $ADMIN_KEY" "http://127.0.0.1:$ADMIN_PORT/admin/users/$TOKEN" |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["ip"]))')
  rss=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$TOLLGATE_PID/status")
  echo "| $run | ${rps%.*} | $recorded | $rss |"
done
