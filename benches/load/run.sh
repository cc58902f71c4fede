#!/usr/bin/env bash
# tollgate side by side with what operators would otherwise run, in one run, as ratios.
#
#   benches/load/run.sh            (about 6 minutes, plus about 13 for the build on first use)
#
# The tollgate measured is the one operators deploy: scripts/build-release.sh's profile-guided
# release build (PGO=0: a plain release build; TOLLGATE_BIN: a binary of your own).
#
# One nginx origin (1 worker) serves a small body (/small, 18 bytes) and a 64 KiB body (/64k).
# Each round then drives, in turn, with wrk over loopback:
#   direct      the origin itself
#   nginx       nginx as a reverse proxy, upstream keep-alive
#   tg-pass     tollgate, gatekeeper `none`, rate limiting off (pass-through)
#   tg-user     tollgate, gatekeeper `user_token`, rate limiting on (never triggers), 100,000
#               users imported through the admin API
# for both bodies. Rounds alternate the cases (order rotated each round) so that the noise of
# a shared machine falls on all of them alike; the table reports per case the median over
# rounds of requests/s, p50, p99 and the proxy's CPU time per request, then the ratios.
#
# Tunables (environment): ROUNDS (3), DURATION seconds per run (8), WARMUP seconds (2),
# CONNECTIONS (32), WRK_THREADS (1), WORKERS proxy workers for both nginx and tollgate (1),
# USERS (100000), BODIES ("small 64k"), PORT_BASE (19080), TOLLGATE_BIN (skip the build), PGO,
# ORIGIN_TCP_NOPUSH (off; "on" reproduces the origin of the first measurements, whose 64 KiB
# responses stall, see docs/performance.md), OUT (Markdown table; default
# <target dir>/bench/load.md).
#
# Nothing is pinned to cores: wrk, the origin and the proxy share the machine's cores, as they
# would on a small box. One worker per proxy by default: on two cores that wrk and the origin
# already keep more than half busy, one worker is the most efficient setting for both proxies
# (docs/performance.md); WORKERS=2 compares them with two each. Only loopback addresses are
# used, and every run is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-1}
USERS=${USERS:-100000}
BODIES=${BODIES:-"small 64k"}
PORT_BASE=${PORT_BASE:-19080}
ORIGIN_TCP_NOPUSH=${ORIGIN_TCP_NOPUSH:-off}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET_DIR/bench/load.md}
ADMIN_KEY=bench-admin-key-0123456789

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
ORIGIN_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
PASS_PORT=$((PORT_BASE + 2))
PASS_ADMIN=$((PORT_BASE + 3))
USER_PORT=$((PORT_BASE + 4))
USER_ADMIN=$((PORT_BASE + 5))
WORK=$(mktemp -d /tmp/tollgate-load.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
trap load_cleanup EXIT

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx not found after setup"

BIN_NOTE="TOLLGATE_BIN=${TOLLGATE_BIN:-}"
if [ -z "${TOLLGATE_BIN:-}" ]; then
  # The binary operators deploy: the profile-guided release build (PGO=0: a plain one).
  TOLLGATE_BIN=$(scripts/build-release.sh | tail -1)
  BIN_NOTE="built from this tree by scripts/build-release.sh (PGO=${PGO:-1})"
fi
[ -x "$TOLLGATE_BIN" ] || die "no tollgate binary at $TOLLGATE_BIN"
port_free_or_die "$ORIGIN_PORT" "$NGINX_PORT" "$PASS_PORT" "$PASS_ADMIN" "$USER_PORT" "$USER_ADMIN"

# ---------------------------------------------------------------- nginx: origin and proxy

write_origin_conf "$ORIGIN_TCP_NOPUSH"
write_proxy_conf "$NGINX_PORT"

# ---------------------------------------------------------------- tollgate: two instances

tollgate_conf pass "$PASS_PORT" "$PASS_ADMIN" none 0 >"$WORK/pass.yaml"
# 1e9 per minute: on, and far above what one token can send here.
tollgate_conf user "$USER_PORT" "$USER_ADMIN" user_token 1000000000 >"$WORK/user.yaml"

log "starting the origin, nginx proxy ($WORKERS workers) and two tollgates ($WORKERS threads)"
start_nginx origin
start_nginx proxy
start_tollgate "$TOLLGATE_BIN" pass
start_tollgate "$TOLLGATE_BIN" user
for port in $ORIGIN_PORT $NGINX_PORT $PASS_PORT $PASS_ADMIN $USER_PORT $USER_ADMIN; do
  wait_port "$port"
done

# ---------------------------------------------------------------- users

log "importing $USERS users into tollgate (user_token) through the admin API"
import_users "$USERS" "$USER_ADMIN"
cached=$(curl -sS -H "Authorization: Bearer $ADMIN_KEY" "http://127.0.0.1:$USER_ADMIN/metrics" |
  awk '/^tollgate_users_cached /{print $2}')
[ "$cached" = "$USERS" ] || die "tollgate holds $cached users, expected $USERS"
# Right after the import, the import's transient memory (the body, the parsed entries, the
# answer echoing every user) is still resident: the allocator returns it to the system on its
# next calls after a second; the figure after the warm-up is the steady state.
IMPORT_RSS_KB=$(awk '/^VmRSS/{print $2}' "/proc/$USER_PID/status")

# ---------------------------------------------------------------- cases

port_of() {
  case $1 in
    direct) echo "$ORIGIN_PORT" ;; nginx) echo "$NGINX_PORT" ;;
    tg-pass) echo "$PASS_PORT" ;; tg-user) echo "$USER_PORT" ;;
  esac
}
pid_of() { # the process that does the case's proxying (nginx: its master; workers are summed)
  case $1 in
    direct) echo "$ORIGIN_PID" ;; nginx) echo "$PROXY_PID" ;;
    tg-pass) echo "$PASS_PID" ;; tg-user) echo "$USER_PID" ;;
  esac
}

CASES=(direct nginx tg-pass tg-user)
for body in $BODIES; do
  for c in "${CASES[@]}"; do
    out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download}' \
      -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$(port_of "$c")/$body")
    want=18
    [ "$body" = 64k ] && want=65536
    [ "$out" = "200 $want" ] || die "$c /$body answered '$out', expected '200 $want'"
  done
done

run_wrk() { # case body seconds -> the fields of wrk_case
  wrk_case "$(pid_of "$1")" "http://127.0.0.1:$(port_of "$1")/$2" "$3" || die "$1 /$2 is not answering cleanly"
}

log "warm-up (${WARMUP}s per case)"
for body in $BODIES; do
  for c in "${CASES[@]}"; do run_wrk "$c" "$body" "$WARMUP" >/dev/null; done
done
USER_RSS_KB=$(awk '/^VmRSS/{print $2}' "/proc/$USER_PID/status")

RESULTS=$WORK/results.tsv
: >"$RESULTS"
total=$((ROUNDS * ${#CASES[@]} * $(wc -w <<<"$BODIES") * DURATION))
log "measuring: $ROUNDS rounds x ${#CASES[@]} cases x bodies ($BODIES) x ${DURATION}s = ${total}s"
for round in $(seq "$ROUNDS"); do
  for body in $BODIES; do
    for i in "${!CASES[@]}"; do
      c=${CASES[$(((i + round - 1) % ${#CASES[@]}))]}
      r=$(run_wrk "$c" "$body" "$DURATION")
      record "$body" "$c" "$round" "$r"
      log "round $round /$body $c: $r"
    done
  done
done

# ---------------------------------------------------------------- report

verdict() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { ok = (op == ">=" ? v >= t : v <= t); print (ok ? "met" : "NOT met") }'; }

mkdir -p "$(dirname "$OUT")"
{
  echo "## Load benchmark ($(date -u +%Y-%m-%dT%H:%MZ), tree $(git rev-parse --short HEAD 2>/dev/null || echo '?'), tollgate $BIN_NOTE)"
  echo
  echo "Machine: $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); load average $LOADAVG_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
  echo "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); wrk -t$WRK_THREADS -c$CONNECTIONS, $ROUNDS rounds x ${DURATION}s per case, medians; proxies: $WORKERS worker process(es) for nginx, as many threads for tollgate; origin tcp_nopush $ORIGIN_TCP_NOPUSH; tollgate user_token: $USERS users cached (RSS after the warm-up: $((USER_RSS_KB / 1024)) MiB; right after the import, its transient memory included: $((IMPORT_RSS_KB / 1024)) MiB)."
  echo
  echo "| body | case | req/s | p50 | p99 | p99.9 | responses > 10 ms | proxy CPU per request | origin CPU per request |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  for body in $BODIES; do
    for c in "${CASES[@]}"; do
      cpu=$(col "$body" "$c" 7)
      [ "$c" = direct ] && cpu_text="–" || cpu_text="$(printf '%.1f' "$cpu") µs"
      printf '| %s | %s | %s | %s | %s | %s | %.2f %% | %s | %.1f µs |\n' "$body" "$c" "$(col "$body" "$c" 4)" \
        "$(fmt_us "$(col "$body" "$c" 5)")" "$(fmt_us "$(col "$body" "$c" 6)")" \
        "$(fmt_us "$(col "$body" "$c" 9)")" "$(col "$body" "$c" 10)" "$cpu_text" "$(col "$body" "$c" 8)"
    done
  done
  echo
  echo "| body | tg-user / tg-pass req/s (target ≥ 0.95) | tg-pass / nginx req/s (target ≥ 0.80) | tg-pass / nginx p99 (target ≤ 1.5) | tg-pass / nginx CPU per request |"
  echo "|---|---|---|---|---|"
  for body in $BODIES; do
    u=$(ratio "$(col "$body" tg-user 4)" "$(col "$body" tg-pass 4)")
    p=$(ratio "$(col "$body" tg-pass 4)" "$(col "$body" nginx 4)")
    l=$(ratio "$(col "$body" tg-pass 6)" "$(col "$body" nginx 6)")
    k=$(ratio "$(col "$body" tg-pass 7)" "$(col "$body" nginx 7)")
    echo "| $body | $u ($(verdict "$u" ">=" 0.95)) | $p ($(verdict "$p" ">=" 0.80)) | $l ($(verdict "$l" "<=" 1.5)) | $k |"
  done
  echo
  echo "The same ratios taken within each round, median (lowest–highest) over the $ROUNDS rounds: how much the machine moved them."
  echo
  echo "| body | tg-user / tg-pass req/s | tg-pass / nginx req/s | tg-pass / nginx p99 |"
  echo "|---|---|---|---|"
  for body in $BODIES; do
    echo "| $body | $(paired "$body" tg-user tg-pass 4 2) | $(paired "$body" tg-pass nginx 4 2) | $(paired "$body" tg-pass nginx 6 2) |"
  done
} >"$OUT"
cp "$RESULTS" "${OUT%.md}.tsv"
echo
cat "$OUT"
echo
log "table written to $OUT (raw runs: ${OUT%.md}.tsv)"
