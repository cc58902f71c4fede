#!/usr/bin/env bash
# Two or more tollgate binaries against each other, alternating in the same minutes: how every
# change in docs/performance.md ("What was changed") was measured.
#
#   benches/load/ab.sh before=/path/to/tollgate after=target/pgo/release/tollgate
#   NGINX_WORKERS="1 2" benches/load/ab.sh one=BIN two=BIN,threads=2 nosteal=BIN,threads=2,work_stealing=false
#   benches/load/ab.sh idle60=BIN unbounded=BIN,keepalive=0
#   benches/load/ab.sh guarded=BIN unguarded=BIN,header_timeout=0
#
# Each NAME=BINARY runs as its own instance (same configuration, WORKERS threads unless the
# spec says `,threads=N` and/or `,work_stealing=true|false`; `,keepalive=N` sets its
# `clients.keepalive_timeout_seconds`, `,header_timeout=N` its `clients.header_timeout_seconds`)
# in front of one nginx origin; with NGINX=1 (default) nginx as a reverse proxy runs alongside as a reference, once per worker
# count in NGINX_WORKERS (default WORKERS; named nginx, or nginx_wN when there are several). Each round drives every instance once with wrk for DURATION seconds, the order
# rotated each round, and records requests/s, p99 and the instance's CPU time per request
# (user + system, from /proc). The report gives the medians, then each instance's ratios to the
# first one taken within each round (median, lowest–highest): on a shared machine a difference
# counts only when the paired ratios stay on one side of 1 across rounds.
#
# Tunables (environment): ROUNDS (10), DURATION seconds (4), WARMUP seconds (1), BODY (small;
# or 64k), MODE (none: pass-through; user_token: USERS users imported, rate limiting on but never
# triggered), USERS (100000), CONNECTIONS (32), WRK_THREADS (1), WORKERS (1), NGINX (1),
# PORT_BASE (19280), NGINX_WORKERS. Loopback only; bounded by ROUNDS x instances x DURATION.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() {
  echo "usage: $0 NAME=BINARY[,threads=N][,work_stealing=BOOL][,keepalive=N][,header_timeout=N] ...   (see the header of $0)" >&2
  exit 2
}
[ $# -ge 1 ] || usage

ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
BODY=${BODY:-small}
MODE=${MODE:-none}
USERS=${USERS:-100000}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-1}
NGINX_REF=${NGINX:-1}
read -r -a NGINX_WORKER_COUNTS <<<"${NGINX_WORKERS:-$WORKERS}"
if [ "$NGINX_REF" = 1 ] && [ ${#NGINX_WORKER_COUNTS[@]} -eq 0 ]; then
  echo "NGINX_WORKERS is empty: give worker counts, or NGINX=0 for no nginx reference" >&2
  exit 2
fi
PORT_BASE=${PORT_BASE:-19280}
ADMIN_KEY=bench-admin-key-0123456789
LOG_TAG=ab

case $BODY in small | 64k) ;; *) echo "BODY must be small or 64k" >&2 && exit 2 ;; esac
case $MODE in none) RPM=0 ;; user_token) RPM=1000000000 ;; *) echo "MODE must be none or user_token" >&2 && exit 2 ;; esac

ORIGIN_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
WORK=$(mktemp -d /tmp/tollgate-ab.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
trap load_cleanup EXIT

NAMES=()
declare -A BIN PORT PID THREADS STEAL KEEPALIVE HEADER_TIMEOUT
port=$((PORT_BASE + 1 + ${#NGINX_WORKER_COUNTS[@]}))
for spec in "$@"; do
  name=${spec%%=*}
  IFS=, read -r -a opts <<<"${spec#*=}"
  bin=${opts[0]:-}
  [[ $spec == *=* && $name =~ ^[a-z0-9_]+$ ]] || usage
  if [ -n "${BIN[$name]:-}" ] || [[ $name == nginx* ]]; then
    die "instance name '$name' used twice or reserved"
  fi
  [ -x "$bin" ] || die "no executable at $bin (for $name)"
  THREADS[$name]=$WORKERS
  STEAL[$name]=
  KEEPALIVE[$name]=
  HEADER_TIMEOUT[$name]=
  for opt in "${opts[@]:1}"; do
    case $opt in
      threads=[1-9] | threads=[1-9][0-9]) THREADS[$name]=${opt#threads=} ;;
      work_stealing=true | work_stealing=false) STEAL[$name]=${opt#work_stealing=} ;;
      keepalive=[0-9] | keepalive=[0-9][0-9]*) KEEPALIVE[$name]=${opt#keepalive=} ;;
      header_timeout=[0-9] | header_timeout=[0-9][0-9]*) HEADER_TIMEOUT[$name]=${opt#header_timeout=} ;;
      *) die "unknown option '$opt' for $name (threads=N, work_stealing=true|false, keepalive=N, header_timeout=N)" ;;
    esac
  done
  NAMES+=("$name")
  BIN[$name]=$bin
  PORT[$name]=$port
  port=$((port + 2))
done

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx not found after setup"
mapfile -t ports < <(seq "$PORT_BASE" $((port - 1)))
port_free_or_die "${ports[@]}"

write_origin_conf off
start_nginx origin
wait_port "$ORIGIN_PORT"
NGINX_CASES=()
if [ "$NGINX_REF" = 1 ]; then
  nginx_port=$NGINX_PORT
  for workers in "${NGINX_WORKER_COUNTS[@]}"; do
    [[ $workers =~ ^[1-9][0-9]?$ ]] || die "NGINX_WORKERS: '$workers' is not a worker count"
    case=nginx
    [ ${#NGINX_WORKER_COUNTS[@]} -gt 1 ] && case=nginx_w$workers
    [ -z "${PORT[$case]:-}" ] || die "NGINX_WORKERS: $workers given twice"
    WORKERS=$workers write_proxy_conf "$nginx_port" "proxy_$case"
    start_nginx "proxy_$case"
    pid_var=PROXY_${case^^}_PID
    PID[$case]=${!pid_var}
    PORT[$case]=$nginx_port
    wait_port "$nginx_port"
    NGINX_CASES+=("$case")
    nginx_port=$((nginx_port + 1))
  done
fi
for name in "${NAMES[@]}"; do
  WORKERS=${THREADS[$name]} tollgate_conf "tg_$name" "${PORT[$name]}" $((PORT[$name] + 1)) "$MODE" "$RPM" >"$WORK/tg_$name.yaml"
  if [ -n "${STEAL[$name]}" ]; then
    sed -i "s/^  threads: .*/&\n  work_stealing: ${STEAL[$name]}/" "$WORK/tg_$name.yaml"
  fi
  if [ -n "${KEEPALIVE[$name]}${HEADER_TIMEOUT[$name]}" ]; then
    {
      echo "clients:"
      [ -z "${KEEPALIVE[$name]}" ] || echo "  keepalive_timeout_seconds: ${KEEPALIVE[$name]}"
      [ -z "${HEADER_TIMEOUT[$name]}" ] || echo "  header_timeout_seconds: ${HEADER_TIMEOUT[$name]}"
    } >>"$WORK/tg_$name.yaml"
  fi
  start_tollgate "${BIN[$name]}" "tg_$name"
  pid_var=TG_${name^^}_PID
  PID[$name]=${!pid_var}
  wait_port "${PORT[$name]}"
  wait_port $((PORT[$name] + 1))
done
CASES=("${NAMES[@]}")
CASES+=("${NGINX_CASES[@]}")

TOKEN=none
if [ "$MODE" = user_token ]; then
  log "importing $USERS users into each instance"
  for name in "${NAMES[@]}"; do import_users "$USERS" $((PORT[$name] + 1)); done
fi
for c in "${CASES[@]}"; do
  out=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
    "http://127.0.0.1:${PORT[$c]}/$BODY")
  [ "$out" = 200 ] || die "$c answered $out to /$BODY"
done

run_wrk() { # case seconds -> the fields of wrk_case
  wrk_case "${PID[$1]}" "http://127.0.0.1:${PORT[$1]}/$BODY" "$2" || die "$1 is not answering cleanly"
}

log "warm-up (${WARMUP}s each)"
for c in "${CASES[@]}"; do run_wrk "$c" "$WARMUP" >/dev/null; done

RESULTS=$WORK/results.tsv
: >"$RESULTS"
log "measuring: $ROUNDS rounds x ${#CASES[@]} instances x ${DURATION}s, /$BODY, mode $MODE"
for round in $(seq "$ROUNDS"); do
  for i in "${!CASES[@]}"; do
    c=${CASES[$(((i + round - 1) % ${#CASES[@]}))]}
    r=$(run_wrk "$c" "$DURATION")
    record "$BODY" "$c" "$round" "$r"
    log "round $round $c: $r"
  done
done

describe_workers() { # the threads of each instance and nginx's workers, for the report
  local name parts=()
  for name in "${NAMES[@]}"; do
    parts+=("$name ${THREADS[$name]} thread(s)${STEAL[$name]:+, work_stealing ${STEAL[$name]}}")
  done
  for name in "${NGINX_CASES[@]}"; do
    parts+=("$name $(awk '/^worker_processes/ { sub(";", "", $2); print $2 }' "$WORK/proxy_$name.conf") worker(s)")
  done
  local joined
  joined=$(printf '%s; ' "${parts[@]}")
  echo "${joined%; }"
}

BASE=${NAMES[0]}
echo
echo "A/B, $(date -u +%Y-%m-%dT%H:%MZ): /$BODY, mode $MODE, wrk -t$WRK_THREADS -c$CONNECTIONS, $ROUNDS rounds x ${DURATION}s; $(describe_workers); $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| instance | req/s | p99 | CPU per request | req/s vs $BASE, paired | CPU per request vs $BASE, paired |"
echo "|---|---:|---:|---:|---|---|"
for c in "${CASES[@]}"; do
  if [ "$c" = "$BASE" ]; then
    vs="–"
    cvs="–"
  else
    vs=$(paired "$BODY" "$c" "$BASE" 4 3)
    cvs=$(paired "$BODY" "$c" "$BASE" 7 3)
  fi
  printf '| %s | %.0f | %s | %.1f µs | %s | %s |\n' "$c" "$(col "$BODY" "$c" 4)" \
    "$(fmt_us "$(col "$BODY" "$c" 6)")" "$(col "$BODY" "$c" 7)" "$vs" "$cvs"
done
