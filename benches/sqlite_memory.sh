#!/usr/bin/env bash
# Resident memory of a tollgate instance with the SQLite store after it loaded USERS users at
# start-up: the users are imported through the admin API into a fresh file, tollgate is
# stopped and started again on that file, and VmRSS, the peak (VmHWM) and the CPU time are
# printed a few seconds after it is ready, once per USERS value.
#
#   benches/sqlite_memory.sh                     (about 1 minute per million users, plus the build)
#   USERS="100000 1000000" benches/sqlite_memory.sh
#
# `TOLLGATE_ENV="MIMALLOC_PURGE_DELAY=0"` runs the restarted instance with freed memory
# returned at once, for comparison. Tunables (environment): USERS (1000000), PORT_BASE (19520),
# TOLLGATE_BIN (skip the build), TOLLGATE_ENV. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-1000000}
PORT_BASE=${PORT_BASE:-19520}
ADMIN_KEY=bench-admin-key-0123456789
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
bench_workspace sqlite_memory
trap load_cleanup EXIT

scripts/setup.sh curl
plain_release_bin
port_free_or_die "$PROXY_PORT" "$ADMIN_PORT"

start() { # extra environment words
  # shellcheck disable=SC2086  # a list of NAME=value words
  env $1 ADMIN_KEY=$ADMIN_KEY RUST_LOG=warn "$TOLLGATE_BIN" -c "$WORK/tollgate.yaml" \
    2>>"$WORK/tollgate.err" &
  TOLLGATE_PID=$!
  PIDS+=("$TOLLGATE_PID")
  for _ in $(seq 3000); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null && return
    kill -0 "$TOLLGATE_PID" 2>/dev/null || die "tollgate stopped: $(tail -3 "$WORK/tollgate.err")"
    sleep 0.1
  done
  die "tollgate never became ready"
}

# USERS users, 200,000 per PUT (the admin API takes bodies of up to 64 MiB).
populate() { # users
  python3 - "$1" "$WORK" <<'EOF'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
for start in range(0, n, 200000):
    users = [{"token": "%08x-1b2c-4d3e-8f90-a1b2c3d4e5f6" % i, "type": "normal",
              "nickname": "user%d" % i, "ip": ["203.0.113.%d" % (i % 250)]}
             for i in range(start, min(n, start + 200000))]
    json.dump({"users": users}, open("%s/part%08d.json" % (work, start), "w"))
EOF
  for part in "$WORK"/part*.json; do
    curl -sf -o /dev/null -X PUT -H "Authorization: Bearer $ADMIN_KEY" \
      -H 'content-type: application/json' --data-binary "@$part" \
      "http://127.0.0.1:$ADMIN_PORT/admin/users" || die "the import failed"
    rm -f "$part"
  done
}

echo "| users | VmRSS | VmHWM (peak) | CPU time until measured |"
echo "|---|---|---|---|"
for users in $USERS; do
  rm -f "$WORK"/data.db*
  cat >"$WORK/tollgate.yaml" <<EOF
listen: ["127.0.0.1:$PROXY_PORT"]
upstream: { addrs: ["127.0.0.1:$ORIGIN_PORT"] }
gatekeeper: { mode: user_token }
admin: { listen: "127.0.0.1:$ADMIN_PORT", persist_timeout_ms: 120000 }
store: { kind: sqlite, flush_interval_seconds: 1, sqlite: { path: $WORK/data.db } }
pingora: { pid_file: $WORK/tollgate.pid, upgrade_sock: $WORK/tollgate.sock }
EOF
  start ""
  populate "$users"
  load_stop TERM
  start "${TOLLGATE_ENV:-}"
  # Past the sync engine's first checks of the file.
  sleep 5
  status=/proc/$TOLLGATE_PID/status
  printf '| %s | %s MiB | %s MiB | %s s |\n' "$users" \
    "$(awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "$status")" \
    "$(awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "$status")" \
    "$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$TOLLGATE_PID/stat")"
  load_stop TERM
done
