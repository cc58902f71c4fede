#!/usr/bin/env bash
# Builds the release binary operators deploy, profile-guided (PGO), and prints its path as the
# last line of standard output:
#
#   scripts/build-release.sh          # about 15 minutes on 2 cores the first time
#   PGO=0 scripts/build-release.sh    # a plain release build: target/release/tollgate
#
# 1. builds an instrumented tollgate (target/pgo-gen), with the release profile's fat LTO;
# 2. trains it: a short load run on loopback (benches/load/lib.sh): an nginx origin, tollgate
#    in pass-through (`none`, no rate limit) and in `user_token` mode (rate limit on, 2,000
#    users imported through the admin API), GET and POST requests with small and 64 KiB
#    responses, and requests with unknown tokens (401), under wrk;
# 3. merges the profile with the toolchain's llvm-profdata (rustup component llvm-tools,
#    added if missing) and builds the final binary with it: target/pgo/release/tollgate.
#
# Why: the profile lets LLVM lay out and inline Pingora's and tokio's request path for the
# branches real proxying takes; on this project's 2-core machine it cut the proxy's CPU per
# request by about a sixth (docs/performance.md). Behaviour is identical; only code layout and
# inlining differ, and a workload unlike the training one still gets a correct binary.
# The profile is reused while the instrumented binary is unchanged (no new training); after a
# source change both builds redo what changed, the training runs again, and the final build is
# redone in full, since every crate's compilation reads the profile (about 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR=${CARGO_TARGET_DIR:-target}
LOG_TAG=build-release
CARGO_BUILD=(cargo build --release --locked -p tollgate --bin tollgate)

if [ "${PGO:-1}" = 0 ]; then
  scripts/setup.sh
  "${CARGO_BUILD[@]}" >&2
  echo "$TARGET_DIR/release/tollgate"
  exit 0
fi

scripts/setup.sh wrk nginx-light curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
GEN_DIR=$(realpath -m "$TARGET_DIR/pgo-gen")
RAW_DIR=$GEN_DIR/raw
PROFILE=$GEN_DIR/tollgate.profdata
GEN_BIN=$GEN_DIR/release/tollgate

host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ] && command -v rustup >/dev/null 2>&1; then
  echo "build-release: adding the rustup component llvm-tools (for llvm-profdata)" >&2
  rustup component add llvm-tools >&2 || rustup component add llvm-tools-preview >&2 || true
fi
if [ ! -x "$PROFDATA" ]; then
  echo "build-release: no llvm-profdata at $PROFDATA (it comes with rustup's llvm-tools" \
    "component, matching the compiler's LLVM); PGO=0 builds without a profile" >&2
  exit 1
fi

echo "build-release: building the instrumented binary ($GEN_DIR)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW_DIR" CARGO_TARGET_DIR=$GEN_DIR "${CARGO_BUILD[@]}" >&2

if [ ! -s "$PROFILE" ] || [ "$GEN_BIN" -nt "$PROFILE" ]; then
  # Build scripts and proc macros were instrumented too and wrote their profiles while building.
  rm -rf "$RAW_DIR"
  ORIGIN_PORT=${PORT_BASE:-19180}
  PASS_PORT=$((ORIGIN_PORT + 1))
  PASS_ADMIN=$((ORIGIN_PORT + 2))
  USER_PORT=$((ORIGIN_PORT + 3))
  USER_ADMIN=$((ORIGIN_PORT + 4))
  WORKERS=1
  ADMIN_KEY=pgo-training-admin-key-0123456789
  WORK=$(mktemp -d /tmp/tollgate-pgo.XXXXXX)
  chmod 755 "$WORK"
  # shellcheck source=benches/load/lib.sh
  . benches/load/lib.sh
  trap load_cleanup EXIT
  port_free_or_die "$ORIGIN_PORT" "$PASS_PORT" "$PASS_ADMIN" "$USER_PORT" "$USER_ADMIN"

  write_origin_conf off
  tollgate_conf pass "$PASS_PORT" "$PASS_ADMIN" none 0 >"$WORK/pass.yaml"
  tollgate_conf user "$USER_PORT" "$USER_ADMIN" user_token 1000000000 >"$WORK/user.yaml"
  start_nginx origin
  start_tollgate "$GEN_BIN" pass
  start_tollgate "$GEN_BIN" user
  for port in $ORIGIN_PORT $PASS_PORT $PASS_ADMIN $USER_PORT $USER_ADMIN; do wait_port "$port"; done
  import_users 2000 "$USER_ADMIN"

  cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"a-model","messages":[{"role":"user","content":"' .. string.rep("x", 1500) .. '"}]}'
EOF
  train() { # what seconds port path [wrk args...]
    local out
    out=$(wrk -t1 -c32 -d"$2s" "${@:5}" "http://127.0.0.1:$3$4") || die "wrk failed on $3$4"
    log "trained $1 $4: $(awk '/Requests\/sec/{print $2}' <<<"$out") requests/s"
  }
  log "training the instrumented binary (about 40 s)"
  bearer=(-H "Authorization: Bearer $TOKEN")
  for mode in pass user; do
    port=$PASS_PORT
    [ $mode = user ] && port=$USER_PORT
    train "$mode GET" 8 "$port" /small "${bearer[@]}"
    train "$mode GET" 5 "$port" /64k "${bearer[@]}"
    train "$mode POST" 4 "$port" /small "${bearer[@]}" -s "$WORK/post.lua"
  done
  train "user, unknown token:" 2 "$USER_PORT" /small \
    -H "Authorization: Bearer 00000000-0000-4000-8000-000000000000"
  # tollgate writes its profile when it exits: a graceful stop (SIGTERM).
  load_stop TERM
  compgen -G "$RAW_DIR/*.profraw" >/dev/null || die "the instrumented binary wrote no profile in $RAW_DIR"
  "$PROFDATA" merge -o "$PROFILE" "$RAW_DIR"/*.profraw
  load_cleanup
  trap - EXIT
fi

echo "build-release: building with the profile ($TARGET_DIR/pgo)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" CARGO_TARGET_DIR=$TARGET_DIR/pgo "${CARGO_BUILD[@]}" >&2
echo "$TARGET_DIR/pgo/release/tollgate"
