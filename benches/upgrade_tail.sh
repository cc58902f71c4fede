#!/usr/bin/env bash
# Graceful upgrades under keep-alive load: how many requests fail or wait more than 2 s.
#
# A daemonised tollgate (gatekeeper none, memory store, tollgate's default grace periods)
# proxies to an nginx origin on loopback. For each of UPGRADES rounds, wrk (1 thread, CONNS=32
# keep-alive connections, --timeout 2s) runs for ROUND seconds and, LEAD seconds in, the
# configuration's generation is bumped and `tollgate -u -d -c FILE --upgrade-from PID` hands
# over. Each round prints wrk's requests, socket errors and timeouts (wrk counts a timeout for
# every connection whose request is older than 2 s at each of its 2-second checks). With
# SPACING=s, one wrk run spans all upgrades, s seconds apart, as in a soak test.
#
# PROBE=1 adds a Python prober (PROBE_CONNS keep-alive connections, one request at a time each)
# that records every request: when it was sent, how long it took, whether it opened a new
# connection, which generation (process) answered it, or the error; requests slower than
# SLOW_MS are listed with their time relative to the upgrade command and to the old process's
# exit. TRACE=1 straces the old process's accepts and closes and samples the listener's accept
# queue into the (KEEP_WORK=1) work directory. ORIGIN_BACKLOG=n gives the origin a listen
# backlog of n (nginx's default is 511; Python's http.server has 5). MODE=user_token STORE=sqlite
# USERS=n runs with n imported users.
#
#   TOLLGATE_BIN=target/release/tollgate benches/upgrade_tail.sh
#   UPGRADES=10 PROBE=1 benches/upgrade_tail.sh
#   ORIGIN_BACKLOG=5 UPGRADES=10 PROBE=1 SLOW_MS=1000 benches/upgrade_tail.sh
#
# Loopback only; all processes it starts are stopped on exit.
set -euo pipefail

UPGRADES=${UPGRADES:-6}
ROUND=${ROUND:-20}
LEAD=${LEAD:-3}
PROBE=${PROBE:-0}
PROBE_CONNS=${PROBE_CONNS:-8}
CONNS=${CONNS:-32}
MODE=${MODE:-none}       # or user_token (USERS users are imported, wrk sends one's token)
STORE=${STORE:-memory}   # or sqlite
USERS=${USERS:-0}
SLOW_MS=${SLOW_MS:-500}
PORT_BASE=${PORT_BASE:-18480}
ORIGIN_PORT=$PORT_BASE
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 2))
WORKERS=${WORKERS:-2}
ADMIN_KEY=${ADMIN_KEY:-upgrade-tail-admin-key-0123456789}
NGINX=${NGINX:-nginx}
WORK=$(mktemp -d /tmp/upgrade_tail.XXXXXX)
LOG_TAG=upgrade_tail
# shellcheck source=benches/load/lib.sh
. "$(dirname "$0")/load/lib.sh"

TOLLGATES=() # every tollgate pid seen (old ones may still be leaving)
PROBE_PID=
cleanup() {
  local pid
  [ -n "$PROBE_PID" ] && kill "$PROBE_PID" 2>/dev/null
  if [ -s "$WORK/tollgate.pid" ]; then TOLLGATES+=("$(cat "$WORK/tollgate.pid")"); fi
  for pid in "${TOLLGATES[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  load_stop INT
  for pid in "${TOLLGATES[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${KEEP_WORK:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

plain_release_bin
port_free_or_die "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT"

# The origin echoes the generation header tollgate adds, so each answer names its process.
write_origin_conf off
# shellcheck disable=SC2016  # an nginx variable
sed -i 's|return 200 "hello from origin\\n";|add_header x-gen $http_x_gen always; return 200 "hello from origin\\n";|' \
  "$WORK/origin.conf"
if [ -n "${ORIGIN_BACKLOG:-}" ]; then # an origin with a short accept queue
  sed -i "s|listen 127.0.0.1:$ORIGIN_PORT;|listen 127.0.0.1:$ORIGIN_PORT backlog=$ORIGIN_BACKLOG;|" "$WORK/origin.conf"
fi
start_nginx origin
wait_port "$ORIGIN_PORT"

write_conf() { # generation
  cat >"$WORK/tollgate.yaml" <<EOF
listen: ["127.0.0.1:$PROXY_PORT"]
pingora:
  threads: $WORKERS
  upgrade_sock: $WORK/upgrade.sock
  pid_file: $WORK/tollgate.pid
  error_log: $WORK/tollgate.log
upstream:
  addrs: ["127.0.0.1:$ORIGIN_PORT"]
  set_headers:
    x-gen: "$1"
gatekeeper:
  mode: $MODE
rate_limit:
  requests_per_minute: 0
admin:
  listen: "127.0.0.1:$ADMIN_PORT"
store:
  kind: $STORE
  sqlite:
    path: $WORK/users.db
access_log:
  enabled: false
EOF
}

write_conf 0
ADMIN_KEY=$ADMIN_KEY "$TOLLGATE_BIN" -d -c "$WORK/tollgate.yaml" 2>>"$WORK/upgrade.stderr" ||
  die "tollgate did not start (see $WORK/upgrade.stderr)"
TOLLGATES+=("$(cat "$WORK/tollgate.pid")")
wait_port "$PROXY_PORT"
URL=http://127.0.0.1:$PROXY_PORT/small
AUTH=()
if [ "$USERS" -gt 0 ]; then
  import_users "$USERS" "$ADMIN_PORT"
  AUTH=(-H "Authorization: Bearer $TOKEN")
fi

cat >"$WORK/probe.py" <<'EOF'
# One keep-alive connection per thread, one request at a time; a line per request:
# sent_at_s duration_ms new_conn(0/1) generation|ERR:<error> local_port
import http.client, socket, sys, threading, time
port, conns, out = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "w", buffering=1)
headers = {"Authorization": "Bearer " + sys.argv[4]} if sys.argv[4] else {}
lock = threading.Lock()
def run():
    conn = None
    while True:
        new = conn is None
        if new:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.time()
        lport = 0
        try:
            if conn.sock is None:
                conn.connect()
            lport = conn.sock.getsockname()[1]
            conn.request("GET", "/small", headers=headers)
            r = conn.getresponse()
            r.read()
            what = r.getheader("x-gen", "-")
            if r.status != 200:
                what += ":%d" % r.status
            if r.will_close:
                conn.close(); conn = None
        except Exception as e:
            what = "ERR:" + type(e).__name__
            conn.close(); conn = None
        with lock:
            out.write("%.6f %.1f %d %s %d\n" % (t0, (time.time() - t0) * 1000, new, what, lport))
for _ in range(conns):
    threading.Thread(target=run, daemon=True).start()
while True:
    time.sleep(3600)
EOF

# Prober lines of one round, relative to the upgrade command (t=0) and the old process's exit.
probe_report() { # from to t_upgrade t_old_exit
  awk -v a="$1" -v b="$2" -v t0="$3" -v tx="$4" -v slow="$SLOW_MS" '
    $1 >= a && $1 < b {
      n++
      if ($4 ~ /^ERR/) err++
      if ($2 > slow) {
        ns++
        printf "    slow: sent t%+.3fs (old exit t%+.3fs) took %.0f ms, %s connection, answer %s, port %s\n",
          $1 - t0, tx - t0, $2, ($3 ? "new" : "kept-alive"), $4, $5
      }
    }
    END { printf "    prober: %d requests, %d errors, %d over %d ms\n", n, err, ns, slow }
  ' "$WORK/probe.out"
}

if [ "$PROBE" = 1 ]; then
  python3 "$WORK/probe.py" "$PROXY_PORT" "$PROBE_CONNS" "$WORK/probe.out" "${TOKEN:-}" &
  PROBE_PID=$!
fi

wrk_counts() { # file -> "requests connect read write timeout"
  awk '
    /requests in/ { n = $1 }
    /Socket errors/ { gsub(/,/, ""); c = $4; r = $6; w = $8; t = $10 }
    END { print n + 0, c + 0, r + 0, w + 0, t + 0 }' "$1"
}
upgrade() { # round; sets T_UP, starts a watcher that writes the old process's exit time
  local old
  old=$(cat "$WORK/tollgate.pid")
  if [ "${TRACE:-0}" = 1 ]; then
    # The old process's accepts and closes, and the listener's accept queue every 50 ms.
    strace -f -tt -e trace=accept4,close,shutdown -o "$WORK/strace.$1" -p "$old" 2>/dev/null &
    (while kill -0 "$old" 2>/dev/null; do
      printf '%s %s\n' "$(date +%s.%N)" "$(ss -Hltn "sport = :$PROXY_PORT" | awk '{ print $2 }')"
      sleep 0.05
    done) >"$WORK/backlog.$1" &
    sleep 0.5
  fi
  write_conf "$1"
  T_UP=$(date +%s.%N)
  ADMIN_KEY=$ADMIN_KEY "$TOLLGATE_BIN" -u -d -c "$WORK/tollgate.yaml" --upgrade-from "$old" \
    2>>"$WORK/upgrade.stderr" || die "upgrade $1 failed (see $WORK/upgrade.stderr)"
  TOLLGATES+=("$(cat "$WORK/tollgate.pid")")
  (while kill -0 "$old" 2>/dev/null; do sleep 0.05; done; date +%s.%N >"$WORK/exit.$1") &
}
since() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }

if [ -z "${SPACING:-}" ]; then
  # One wrk run per upgrade.
  total_t=0 total_e=0 total_n=0
  printf 'round  requests  timeouts  errors(connect/read/write)  old_exit_s\n'
  for round in $(seq "$UPGRADES"); do
    wrk -t1 -c"$CONNS" -d"${ROUND}s" --timeout 2s --latency "${AUTH[@]}" "$URL" >"$WORK/wrk.$round" 2>&1 &
    wrk_pid=$!
    start=$(date +%s.%N)
    sleep "$LEAD"
    upgrade "$round"
    wait "$wrk_pid" || true
    end=$(date +%s.%N)
    [ -s "$WORK/exit.$round" ] || die "the old process outlived round $round (ROUND=$ROUND)"
    t_exit=$(cat "$WORK/exit.$round")
    read -r n c r w t < <(wrk_counts "$WORK/wrk.$round")
    printf '%5d  %8d  %8d  %6d (%d/%d/%d)  %10s\n' "$round" "$n" "$t" $((c + r + w)) "$c" "$r" "$w" \
      "$(since "$t_exit" "$T_UP")"
    total_t=$((total_t + t)) total_e=$((total_e + c + r + w)) total_n=$((total_n + n))
    if [ "$PROBE" = 1 ]; then probe_report "$start" "$end" "$T_UP" "$t_exit"; fi
  done
  printf 'total  %8d  %8d  %6d\n' "$total_n" "$total_t" "$total_e"
else
  # One wrk run across all upgrades, SPACING seconds apart (as a soak test does); wrk's counts
  # are for the whole run, the prober's per upgrade.
  wrk -t1 -c"$CONNS" -d"$((LEAD + UPGRADES * SPACING + 15))s" --timeout 2s --latency "${AUTH[@]}" "$URL" \
    >"$WORK/wrk.all" 2>&1 &
  wrk_pid=$!
  sleep "$LEAD"
  ups=()
  for round in $(seq "$UPGRADES"); do
    upgrade "$round"
    ups+=("$T_UP")
    sleep "$(awk -v s="$SPACING" -v t="$T_UP" -v now="$(date +%s.%N)" 'BEGIN { d = t + s - now; print (d > 0 ? d : 0) }')"
  done
  wait "$wrk_pid" || true
  read -r n c r w t < <(wrk_counts "$WORK/wrk.all")
  printf 'wrk over %d upgrades %ss apart: %d requests, %d timeouts, %d errors (connect %d, read %d, write %d)\n' \
    "$UPGRADES" "$SPACING" "$n" "$t" $((c + r + w)) "$c" "$r" "$w"
  if [ "$PROBE" = 1 ]; then
    ups+=("$(date +%s.%N)")
    for round in $(seq "$UPGRADES"); do
      t_exit=$(cat "$WORK/exit.$round" 2>/dev/null || echo 0)
      printf 'upgrade %d (old process exited after %ss):\n' "$round" "$(since "$t_exit" "${ups[$((round - 1))]}")"
      probe_report "${ups[$((round - 1))]}" "${ups[$round]}" "${ups[$((round - 1))]}" "$t_exit"
    done
  fi
fi
