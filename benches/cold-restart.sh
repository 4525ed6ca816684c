#!/usr/bin/env bash
# The coldest call a node answers from its store: the first call of each of
# COUNT functions with distinct module bytes (so none shares a compiled
# module in memory), after a restart of the node, with their artifacts
# already in the module store. Each call is timed by curl (one new loopback
# connection per call, client side) beside the node's `server-timing`.
# Server on core 1, client on core 0. Prints a Markdown table.
#
#   cargo build --release && bash benches/cold-restart.sh [MODULE] [COUNT]
#
# Environment: FNRUNNER_BIN (default: the release build).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$HOME/.cache/fnrunner-target}
bin=${FNRUNNER_BIN:-$target_dir/release/fnrunner}
module=${1:-$root/fixtures/functions/hello.wasm}
count=${2:-50}
port=18190
[ -x "$bin" ] || { echo "no fnrunner binary at $bin: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

# COUNT copies of the module, each with its own custom section appended
# (valid in a core module and in a component), hence its own digest.
mkdir -p "$work/functions"
python3 - "$module" "$work/functions" "$count" <<'EOF'
import sys
module, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(module, "rb").read()
def leb(n):
    b = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        b.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(b)
for i in range(count):
    name = b"fnrunner-bench"
    payload = leb(len(name)) + name + str(i).encode()
    open(f"{out}/f{i}.wasm", "wb").write(data + b"\x00" + leb(len(payload)) + payload)
EOF

start() {
    taskset -c 1 "$bin" serve "$work/functions" --listen "127.0.0.1:$port" --store-dir "$work/store" \
        >"$work/node.out" 2>"$work/node.err" &
    pid=$!
    local tries=0
    until curl -s -o /dev/null "http://127.0.0.1:$port/readyz"; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { echo "the node never answered" >&2; cat "$work/node.err" >&2; exit 1; }
        sleep 0.1
    done
}
stop() { kill "$pid"; wait "$pid" || true; pid=; }

# First run: every module is compiled into the store.
start
for i in $(seq 0 $((count - 1))); do curl -s -o /dev/null "http://127.0.0.1:$port/fn/f$i"; done
stop

# Second run: a fresh process; every first call loads its module from the store.
start
for i in $(seq 0 $((count - 1))); do
    taskset -c 0 curl -s -o /dev/null -D - -w 'total %{time_total}\n' "http://127.0.0.1:$port/fn/f$i"
done >"$work/calls"
stop
sources=$(grep -c 'source="\?store' "$work/node.err" || true)

python3 - "$work/calls" "$count" "$sources" <<'EOF'
import re, sys
text, count, sources = open(sys.argv[1]).read(), int(sys.argv[2]), sys.argv[3]
total = sorted(float(v) * 1e6 for v in re.findall(r"^total ([0-9.]+)", text, re.M))
sched = sorted(float(v) * 1e3 for v in re.findall(r"sched;dur=([0-9.]+)", text))
exec_ = sorted(float(v) * 1e3 for v in re.findall(r"exec;dur=([0-9.]+)", text))
statuses = re.findall(r"^HTTP/\S+ (\d+)", text, re.M)
def pct(xs, p):
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
print(f"{count} functions, {statuses.count('200')} answered 200, {sources} slots loaded from the store")
print()
print("| first call after a restart | p50 | p90 | max |")
print("| --- | --- | --- | --- |")
for name, xs in [("client (curl, new connection)", total), ("server sched", sched), ("server exec", exec_)]:
    print(f"| {name} | {pct(xs, 50):.0f} µs | {pct(xs, 90):.0f} µs | {xs[-1]:.0f} µs |")
EOF
