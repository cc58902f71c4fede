#!/usr/bin/env bash
# Slow clients (Slowloris): SLOW connections each send a request header a few bytes a second
# and never finish it, while wrk sends ordinary requests alongside. Every INTERVAL seconds it
# prints how many of the slow connections tollgate still holds, its RSS and open file
# descriptors, and the ordinary traffic's requests/s and p99. With
# `clients.header_timeout_seconds` (HEADER_TIMEOUT, 10 here) they are closed that long after
# they began; with HEADER_TIMEOUT=0 (Pingora's behaviour: 60 s per read, so a client sending a
# byte a second is never cut) they stay.
#
#   benches/slow_clients.sh                     (about 1 minute plus the release build)
#   HEADER_TIMEOUT=0 benches/slow_clients.sh
#
# Tunables (environment): SLOW (2000), HEADER_TIMEOUT (10), DURATION seconds (40), INTERVAL
# seconds (5), CONNECTIONS of wrk (8), PORT_BASE (19320), TOLLGATE_BIN (skip the build).
# Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

SLOW=${SLOW:-2000}
HEADER_TIMEOUT=${HEADER_TIMEOUT:-10}
DURATION=${DURATION:-40}
INTERVAL=${INTERVAL:-5}
CONNECTIONS=${CONNECTIONS:-8}
PORT_BASE=${PORT_BASE:-19320}
ADMIN_KEY=bench-admin-key-0123456789
WORKERS=1

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh
bench_workspace slow_clients
trap load_cleanup EXIT
plain_release_bin
port_free_or_die "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT"
# Both tollgate and the slow clients hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((SLOW + 200)) ] || die "ulimit -n $(ulimit -n) is too low for SLOW=$SLOW"

write_origin_conf off
start_nginx origin
wait_port "$ORIGIN_PORT"
{
  tollgate_conf tollgate "$PROXY_PORT" "$ADMIN_PORT" none 0
  printf 'clients:\n  header_timeout_seconds: %s\n' "$HEADER_TIMEOUT"
} >"$WORK/tollgate.yaml"
start_tollgate "$TOLLGATE_BIN" tollgate
wait_port "$PROXY_PORT"
wait_port "$ADMIN_PORT"

# The slow clients: each opens its connection, then sends its header four bytes a second and
# never ends it; every INTERVAL seconds the number still open goes to $WORK/slow.open.
cat >"$WORK/slow.py" <<'EOF'
import asyncio, sys

port, count, duration, interval, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
open_now = 0

async def slow_client():
    global open_now
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    open_now += 1
    try:
        writer.write(b"GET /small HTTP/1.1\r\nHost: tollgate\r\n")
        while True:
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1), timeout=1.0)
            except asyncio.TimeoutError:
                writer.write(b"X-a:")
                continue
            if not data:
                break  # closed by the server
    except OSError:
        pass
    finally:
        open_now -= 1
        writer.close()

async def report():
    while True:
        with open(out, "w") as f:
            f.write(str(open_now))
        await asyncio.sleep(0.5)

async def main():
    asyncio.create_task(report())
    clients = [asyncio.create_task(slow_client()) for _ in range(count)]
    await asyncio.sleep(duration)
    for c in clients:
        c.cancel()

asyncio.run(main())
EOF
log "opening $SLOW slow connections (header_timeout_seconds: $HEADER_TIMEOUT)"
python3 "$WORK/slow.py" "$PROXY_PORT" "$SLOW" "$((DURATION + INTERVAL))" "$INTERVAL" "$WORK/slow.open" &
PIDS+=($!)
sleep 1

echo "| t (s) | slow connections open | tollgate RSS (MiB) | tollgate open fds | requests/s | p99 |"
echo "|---:|---:|---:|---:|---:|---:|"
t=0
while [ "$t" -lt "$DURATION" ]; do
  wrk_out=$(wrk -t1 -c"$CONNECTIONS" -d"${INTERVAL}s" --latency "http://127.0.0.1:$PROXY_PORT/small")
  t=$((t + INTERVAL))
  rps=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$wrk_out")
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$wrk_out")
  # shellcheck disable=SC2153 # set by start_tollgate
  rss=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$TOLLGATE_PID/status")
  fds=$(find "/proc/$TOLLGATE_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
  echo "| $t | $(cat "$WORK/slow.open") | $rss | $fds | $rps | $p99 |"
done
timeouts=$(curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '$1 == "tollgate_client_header_timeouts_total" { print $2 }')
echo
echo "tollgate_client_header_timeouts_total: $timeouts"
