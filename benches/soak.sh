#!/usr/bin/env bash
# The long soak: the `soak` test (64 clients of mixed traffic against one
# node) for SECONDS seconds (default 600) on a release build, printing the
# calls by kind and status and resident memory after warm-up and at the end.
#
#   bash benches/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/fnrunner-target}
export FNRUNNER_SOAK_SECS=${1:-600}
cargo test --release --test soak -- --nocapture
