# shellcheck shell=bash disable=SC2034  # sourced: sets variables its callers read (TOKEN, *_PID)
# Shared by benches/load/run.sh (the side-by-side benchmark), benches/load/ab.sh (binaries
# against each other) and scripts/build-release.sh (the profile-guided build, whose training run
# is a short load run): the nginx origin and reverse proxy, tollgate instances, the user import
# and CPU accounting, all on loopback. Source it after setting WORK (a scratch
# directory), ORIGIN_PORT, WORKERS and ADMIN_KEY; set NGINX before starting nginx. Started
# processes are recorded in PIDS and stopped by load_cleanup.

LOAD_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PIDS=()
log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "${LOG_TAG:-load}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# SIGINT is a fast shutdown for both nginx (which then stops its workers) and tollgate; SIGTERM
# is tollgate's graceful one, which a profiling build needs to write its profile on exit.
load_stop() { # signal
  local pid alive
  for pid in "${PIDS[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
  for _ in $(seq 100); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  PIDS=()
}
load_cleanup() {
  load_stop INT
  rm -rf "$WORK"
}

# The workspace of a bench with one origin and one tollgate (store_flush.sh, shared_token.sh):
# its ports from PORT_BASE, a scratch WORK directory, its log tag.
bench_workspace() { # name
  ORIGIN_PORT=$PORT_BASE
  PROXY_PORT=$((PORT_BASE + 1))
  ADMIN_PORT=$((PORT_BASE + 2))
  WORK=$(mktemp -d "/tmp/tollgate-${1//_/-}.XXXXXX")
  chmod 755 "$WORK"
  LOG_TAG=$1
}

# The binary to measure: TOLLGATE_BIN if set, else a plain release build of this tree.
plain_release_bin() {
  if [ -z "${TOLLGATE_BIN:-}" ]; then
    log "building tollgate (release)"
    cargo build --release --locked -p tollgate --bin tollgate >&2
    TOLLGATE_BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
  fi
}

port_free_or_die() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is in use (set PORT_BASE)"
    fi
  done
}

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listens on port $1 (logs in $WORK)"
}

nginx_common() {
  cat <<EOF
pid $WORK/$1.pid;
error_log $WORK/$1.error.log warn;
events { worker_connections 4096; }
EOF
}
http_common() {
  cat <<EOF
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path $WORK/tmp/body;
  proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fastcgi;
  uwsgi_temp_path $WORK/tmp/uwsgi;
  scgi_temp_path $WORK/tmp/scgi;
EOF
}

# The origin: nginx, 1 worker, /small (an 18-byte body) and /64k (a 64 KiB file), any method.
write_origin_conf() { # tcp_nopush
  mkdir -p "$WORK/www" "$WORK/tmp"
  head -c 65536 /dev/zero | tr '\0' 'x' >"$WORK/www/64k"
  {
    echo "worker_processes 1;"
    nginx_common origin
    echo "http {"
    http_common
    # sendfile, but not tcp_nopush: with TCP_CORK on loopback, about 5 % of the 64 KiB
    # responses (64 KiB plus headers: one full 65,483-byte segment and a small corked rest) wait
    # for the receiver's delayed ACK, 15-45 ms, directly and behind either proxy alike; every
    # case's p99 then depends on whether its run had more or less than 1 % of them.
    cat <<EOF
  sendfile on;
  tcp_nopush $1;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    location = /small { default_type text/plain; return 200 "hello from origin\n"; }
    location = /64k { default_type application/octet-stream; root $WORK/www; }
  }
}
EOF
  } >"$WORK/origin.conf"
}

start_nginx() { # name (of $WORK/<name>.conf); sets <NAME>_PID
  "$NGINX" -t -q -p "$WORK" -c "$WORK/$1.conf" || die "nginx rejected $1.conf"
  "$NGINX" -p "$WORK" -c "$WORK/$1.conf" -g 'daemon off;' 2>>"$WORK/$1.stderr" &
  PIDS+=($!)
  eval "${1^^}_PID=$!"
}

# The proxy gets what an operator would give it: upstream keep-alive (HTTP/1.1, no
# Connection header), X-Forwarded-For set as tollgate sets it, Access-Control-Allow-Origin
# added as tollgate adds it (cors.enabled, its default), buffers large enough that a 64 KiB
# response never goes to a temporary file, and as many workers as tollgate has threads.
write_proxy_conf() { # port [name, default proxy: writes $WORK/<name>.conf]
  local name=${2:-proxy}
  {
    echo "worker_processes $WORKERS;"
    nginx_common "$name"
    echo "http {"
    http_common
    cat <<EOF
  upstream origin {
    server 127.0.0.1:$ORIGIN_PORT;
    keepalive 128;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      add_header Access-Control-Allow-Origin "*" always;
      proxy_buffer_size 8k;
      proxy_buffers 16 8k;
    }
  }
}
EOF
  } >"$WORK/$name.conf"
}

tollgate_conf() { # name port admin_port mode requests_per_minute
  cat <<EOF
listen: ["127.0.0.1:$2"]
pingora:
  threads: $WORKERS
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
  upgrade_sock: $WORK/$1.sock
  pid_file: $WORK/$1.pid
upstream:
  addrs: ["127.0.0.1:$ORIGIN_PORT"]
gatekeeper:
  mode: $4
rate_limit:
  requests_per_minute: $5
admin:
  listen: "127.0.0.1:$3"
store:
  kind: memory
access_log:
  enabled: false
EOF
}

start_tollgate() { # binary name (of $WORK/<name>.yaml); sets <NAME>_PID
  ADMIN_KEY=$ADMIN_KEY "$1" -t -c "$WORK/$2.yaml" >/dev/null || die "tollgate rejected $2.yaml"
  ADMIN_KEY=$ADMIN_KEY RUST_LOG=warn "$1" -c "$WORK/$2.yaml" 2>>"$WORK/$2.stderr" &
  PIDS+=($!)
  eval "${2^^}_PID=$!"
}

# Imports N users with random UUID tokens through PUT /admin/users; sets TOKEN to one of them.
import_users() { # count admin_port
  awk -v n="$1" 'BEGIN {
    srand(20240601)
    printf "{\"users\":["
    for (i = 0; i < n; i++) {
      printf "%s{\"token\":\"%08x-%04x-4%03x-%04x-%04x%08x\",\"meta\":{}}", (i ? "," : ""),
        int(rand() * 4294967296), int(rand() * 65536), int(rand() * 4096),
        32768 + int(rand() * 16384), int(rand() * 65536), int(rand() * 4294967296)
    }
    printf "]}"
  }' >"$WORK/users.json"
  local code
  code=$(curl -sS -o "$WORK/import.out" -w '%{http_code}' -X PUT \
    -H "Authorization: Bearer $ADMIN_KEY" -H 'content-type: application/json' \
    --data-binary "@$WORK/users.json" "http://127.0.0.1:$2/admin/users")
  case $code in 200 | 202) ;; *) die "bulk import answered $code: $(head -c 300 "$WORK/import.out")" ;; esac
  # The client's token: one from the middle of the import.
  TOKEN=$(grep -o '"token":"[^"]*"' "$WORK/users.json" | sed -n "$(($1 / 2 + 1))p" | cut -d'"' -f4)
}

# CPU ticks (user+system) of a process and its children processes (nginx workers).
cpu_ticks() {
  local total=0 pid
  for pid in "$1" $(cat "/proc/$1/task/"*/children 2>/dev/null); do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat")))
  done
  echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# One case driven by wrk (WRK_THREADS threads, CONNECTIONS connections, TOKEN as the Bearer
# token) for the given seconds; prints "rps p50_us p99_us cpu_us_per_request
# origin_cpu_us_per_request p999_us over_10ms_pct", the CPU times being those of the given
# process (and its children) and of ORIGIN_PID. Fails, showing wrk's complaint, if any response
# was not a 2xx or any socket failed.
wrk_case() { # pid url seconds
  local out before after obefore oafter
  before=$(cpu_ticks "$1")
  obefore=$(cpu_ticks "$ORIGIN_PID")
  out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${3}s" --latency -s "$LOAD_LIB_DIR/tail.lua" \
    -H "Authorization: Bearer $TOKEN" "$2")
  after=$(cpu_ticks "$1")
  oafter=$(cpu_ticks "$ORIGIN_PID")
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
    log "$2: wrk reported errors:"
    grep 'Non-2xx\|Socket errors' <<<"$out" >&2
    return 1
  fi
  awk -v cpu=$(((after - before) * TICK_US)) -v ocpu=$(((oafter - obefore) * TICK_US)) '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /s$/) return v * 1000000
      return v
    }
    /requests in/ { n = $1 }
    /Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    $1 == "TAIL" { p999 = $3; slow = $5 }
    END { printf "%.0f %.0f %.0f %.2f %.2f %.0f %.3f\n", rps, p50, p99, (n ? cpu / n : 0), (n ? ocpu / n : 0), p999, slow }
  ' <<<"$out"
}

# Results: RESULTS is a TSV file of "body case round" and wrk_case's seven fields (columns 4-10).
record() { # body case round fields
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" | tr ' ' '\t' >>"$RESULTS"
}
median() { sort -n | awk '{v[NR] = $1} END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v b="$1" -v c="$2" -v k="$3" '$1 == b && $2 == c { print $k }' "$RESULTS" | median; }
fmt_us() { awk -v v="$1" 'BEGIN { if (v >= 1000) printf "%.2f ms", v / 1000; else printf "%.0f µs", v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# Ratio a/b within each round (the two cases ran minutes apart at most, so slow drifts of a
# shared machine cancel), then the median and range over rounds.
paired() { # body case_a case_b column decimals -> "median (min–max)"
  awk -F'\t' -v b="$1" -v x="$2" -v y="$3" -v k="$4" '
    $1 == b && $2 == x { a[$3] = $k } $1 == b && $2 == y { d[$3] = $k }
    END { for (r in a) if (d[r] > 0) printf "%.4f\n", a[r] / d[r] }' "$RESULTS" |
    sort -n | awk -v f="%.$5f (%.2f–%.2f)" '{v[NR] = $1} END {
      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf f, m, v[1], v[NR] }'
}
