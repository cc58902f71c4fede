#!/usr/bin/env bash
# A working demo on a fresh machine: builds tollgate, starts a local origin on 127.0.0.1:8080
# and tollgate in user_token mode with the SQLite store (conf/tollgate.yaml), then prints the
# admin key and the curl lines to create a user and send an authorized request. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
command -v python3 >/dev/null 2>&1 || scripts/setup.sh python3
cargo build --release --locked

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 7860 7861 8080; do
  if port_busy "$port"; then
    echo "demo: port $port is already in use; stop what is listening there first" >&2
    exit 1
  fi
done

export ADMIN_KEY="${ADMIN_KEY:-$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')}"
export GATEKEEPER=user_token

python3 scripts/demo-origin.py 8080 &
# The origin goes when the demo goes (also on Ctrl-C).
trap 'kill $! 2>/dev/null || true' EXIT

cat <<INFO

  tollgate demo: proxy on http://127.0.0.1:7860 -> demo origin on http://127.0.0.1:8080
  admin API on http://127.0.0.1:7861, users stored in data/tollgate.db (SQLite)

  ADMIN_KEY=$ADMIN_KEY

  In another terminal:
    export ADMIN_KEY=$ADMIN_KEY
    # create a user
    TOKEN=\$(curl -s -X POST -H "Authorization: Bearer \$ADMIN_KEY" http://127.0.0.1:7861/admin/users | sed 's/.*"token":"\\([^"]*\\)".*/\\1/')
    # an authorized request goes through to the origin
    curl -i -H "Authorization: Bearer \$TOKEN" http://127.0.0.1:7860/hello
    # a wrong token gets 401
    curl -i -H "Authorization: Bearer wrong" http://127.0.0.1:7860/hello
    # the user, with its promptCount and IPs
    curl -s -H "Authorization: Bearer \$ADMIN_KEY" http://127.0.0.1:7861/admin/users/\$TOKEN

INFO

# Ctrl-C stops it; pending user changes are written to data/tollgate.db before it exits.
"${CARGO_TARGET_DIR:-target}/release/tollgate" -c conf/tollgate.yaml
