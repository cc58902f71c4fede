#!/usr/bin/env bash
# Resident memory of a tollgate instance with the Firebase store: USERS users of the older
# proxy's shape (two addresses, three model families, about 380 bytes of JSON each) stored in
# the local Firebase stand-in, loaded at start-up and followed by the change stream. Prints
# VmRSS and the peak (VmHWM) a few seconds after the instance is ready, once per USERS value.
#
#   benches/firebase_memory.sh                  (about 2 minutes plus the release builds)
#   USERS="100000 200000" benches/firebase_memory.sh
#
# A freed start-up allocation the allocator keeps (mimalloc purges lazily) counts in VmRSS;
# `TOLLGATE_ENV="MIMALLOC_PURGE_DELAY=0"` shows the instance without it. Size for the peak.
# Tunables (environment): USERS (100000), PORT_BASE (19500), TOLLGATE_BIN (skip the build),
# TOLLGATE_ENV (extra environment for tollgate). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${USERS:-100000}
PORT_BASE=${PORT_BASE:-19500}
STANDIN_PORT=$PORT_BASE
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
ADMIN_KEY=bench-admin-key-0123456789
WORK=$(mktemp -d /tmp/tollgate-firebase-memory.XXXXXX)
LOG_TAG=firebase_memory
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
trap load_cleanup EXIT

scripts/setup.sh curl
plain_release_bin
log "building the Firebase stand-in (release)"
cargo build --release --locked -p rtdb-standin >&2
STANDIN_BIN=${CARGO_TARGET_DIR:-target}/release/rtdb-standin
port_free_or_die "$PROXY_PORT" "$ADMIN_PORT"

# The stand-in lives for one measurement: a fresh one per USERS value, on a port of its own
# (the previous one may still be closing its sockets).
start_standin() { # port
  "$STANDIN_BIN" --port "$1" --keepalive-ms 5000 >"$WORK/standin.out" 2>&1 &
  PIDS+=($!)
  wait_port "$1"
  FIREBASE_RTDB_URL=http://127.0.0.1:$1
  for _ in $(seq 50); do
    FIREBASE_KEY=$(sed -n 's/^export FIREBASE_KEY=//p' "$WORK/standin.out")
    [ -n "$FIREBASE_KEY" ] && break
    sleep 0.1
  done
  [ -n "$FIREBASE_KEY" ] || die "the stand-in printed no FIREBASE_KEY: $(head -c 300 "$WORK/standin.out")"
  export FIREBASE_RTDB_URL FIREBASE_KEY
}

# Writes USERS users, 50,000 per PATCH (the stand-in takes bodies of at most 64 MiB).
populate() { # users
  local token part code
  token=$(curl -sS -X POST "$FIREBASE_RTDB_URL/_fake/auth/token" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
  python3 - "$1" "$WORK" <<'EOF'
import json, sys
n, work = int(sys.argv[1]), sys.argv[2]
for start in range(0, n, 50000):
    part = {}
    for i in range(start, min(n, start + 50000)):
        t = "%08x-1b2c-4d3e-8f90-a1b2c3d4e5f6" % i
        part[t] = {
            "token": t, "ip": ["203.0.113.%d" % (i % 250), "198.51.100.%d" % (i // 250 % 250)],
            "nickname": "user%d" % i, "type": "normal", "promptCount": i * 7,
            "tokenCounts": {"turbo": 12345, "gpt4": 678, "claude": 1},
            "tokenLimits": {"turbo": 0, "gpt4": 5},
            "createdAt": 1700000000000, "lastUsedAt": 1700000500000,
        }
    json.dump(part, open("%s/part%08d.json" % (work, start), "w"))
EOF
  for part in "$WORK"/part*.json; do
    code=$(curl -sS -o "$WORK/populate.out" -w '%{http_code}' -X PATCH \
      -H "Authorization: Bearer $token" --data-binary "@$part" "$FIREBASE_RTDB_URL/users.json")
    [ "$code" = 200 ] || die "the stand-in answered $code: $(head -c 300 "$WORK/populate.out")"
    rm -f "$part"
  done
}

measure() { # users
  cat >"$WORK/tollgate.yaml" <<EOF
listen: ["127.0.0.1:$PROXY_PORT"]
upstream: { addrs: ["127.0.0.1:$PORT_BASE"] }
gatekeeper: { mode: user_token }
admin: { listen: "127.0.0.1:$ADMIN_PORT" }
store: { kind: firebase_rtdb, firebase: { startup_timeout_seconds: 300 } }
pingora: { pid_file: $WORK/tollgate.pid, upgrade_sock: $WORK/tollgate.sock }
EOF
  # shellcheck disable=SC2086  # TOLLGATE_ENV is a list of NAME=value words
  env ${TOLLGATE_ENV:-} ADMIN_KEY=$ADMIN_KEY RUST_LOG=warn "$TOLLGATE_BIN" -c "$WORK/tollgate.yaml" \
    2>"$WORK/tollgate.err" &
  local pid=$! status
  PIDS+=("$pid")
  for _ in $(seq 3000); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || die "tollgate stopped: $(tail -3 "$WORK/tollgate.err")"
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null || die "tollgate never became ready"
  # The stream's snapshot follows the start-up read; give it time to arrive and be applied.
  sleep 5
  status=/proc/$pid/status
  printf '| %s | %s MiB | %s MiB |\n' "$1" \
    "$(awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "$status")" \
    "$(awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "$status")"
}

echo "| users | VmRSS | VmHWM (peak) |"
echo "|---|---|---|"
round=0
for users in $USERS; do
  start_standin $((STANDIN_PORT + 10 + round))
  populate "$users"
  measure "$users"
  load_stop KILL
  round=$((round + 1))
done
