# shellcheck shell=bash disable=SC2034  # sourced: sets variables its callers read (TOKEN, *_PID)
# Shared by benches/load/run.sh (the side-by-side benchmark), benches/load/ab.sh (binaries
# against each other) and scripts/build-release.sh (the profile-guided build, whose training run
# is a short load run): the nginx origin and reverse proxy, tollgate instances, the user import
# and CPU accounting, all on loopback. Source it after setting WORK (a scratch
# directory), ORIGIN_PORT, WORKERS and ADMIN_KEY; set NGINX before starting nginx. Started
# processes are recorded in PIDS and stopped by load_cleanup.

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
# Connection header), X-Forwarded-For set as tollgate sets it, buffers large enough that a
# 64 KiB response never goes to a temporary file, and as many workers as tollgate has threads.
write_proxy_conf() { # port
  {
    echo "worker_processes $WORKERS;"
    nginx_common proxy
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
      proxy_buffer_size 8k;
      proxy_buffers 16 8k;
    }
  }
}
EOF
  } >"$WORK/proxy.conf"
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
