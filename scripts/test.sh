#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): formatting, lints, unit tests,
# black-box tests of the real binary (including the Firebase stand-in), doc tests, and every
# benchmark run once in quick mode so they keep compiling and running.
set -euo pipefail
cd "$(dirname "$0")/.."

# nginx and wrk: the load benchmark's smoke test (tests/e2e/scripts.rs) runs benches/load/run.sh.
scripts/setup.sh wrk nginx-light
# cargo fmt and cargo clippy below; a minimal rustup profile (e.g. rust:*-slim) lacks them.
if command -v rustup >/dev/null 2>&1; then
  components=()
  cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
  [ ${#components[@]} -eq 0 ] || rustup component add "${components[@]}"
fi

echo "== cargo fmt" >&2
cargo fmt --all -- --check

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo doc" >&2
# Doc comments: broken links, or public items linking to private ones.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

echo "== tests" >&2
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  cargo test --workspace --locked --no-fail-fast
fi

echo "== benchmarks (quick mode: each runs once)" >&2
cargo test --benches --locked

echo "== all tests passed" >&2
