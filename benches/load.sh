#!/usr/bin/env bash
# Load benchmark on loopback: fnrunner serve against wasmtime serve (when
# installed) and nginx's fixed 200 (when installed), with wrk, the server
# pinned to core 1 and wrk to core 0. Prints a Markdown table.
#
#   cargo build --release && bash benches/load.sh
#
# Environment: FNRUNNER_BIN (default: the release build), DURATION (wrk
# time per run, default 10s), CONNECTIONS (default "1 32").
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$HOME/.cache/fnrunner-target}
bin=${FNRUNNER_BIN:-$target_dir/release/fnrunner}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-1 32}
server_core=1
client_core=0

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
[ -x "$bin" ] || { echo "no fnrunner binary at $bin: cargo build --release" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most 30 s) until URL answers.
wait_for() {
    local url=$1 tries=0
    until curl -s -o /dev/null "$url"; do
        tries=$((tries + 1))
        [ "$tries" -lt 300 ] || { echo "$url never answered" >&2; exit 1; }
        sleep 0.1
    done
}

# run NAME URL: one table row per connection count.
run() {
    local name=$1 url=$2
    curl -s -o /dev/null "$url" # warm: the slot exists, the module is loaded
    for c in $connections; do
        local out
        out=$(taskset -c "$client_core" wrk -t1 -c"$c" -d"$duration" --latency "$url")
        local rps p50 p99
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        printf '| %s | %s | %s | %s | %s |\n' "$name" "$c" "$rps" "$p50" "$p99"
    done
}

fns=$work/functions
mkdir -p "$fns"
cp "$root/fixtures/functions/hello.wasm" "$root/fixtures/functions/hello-min.wasm" "$fns/"
cp "$root/fixtures/functions/hello.wasm" "$fns/hello-reuse.wasm"
printf 'max_jobs = 1000\n' >"$fns/hello-reuse.toml"
cp "$root/fixtures/functions/costly.wasm" "$fns/costly-fresh.wasm"
cp "$root/fixtures/functions/costly.wasm" "$fns/costly-reuse.wasm"
printf 'max_jobs = 1000\n' >"$fns/costly-reuse.toml"

echo "| server, function | connections | requests/s | p50 | p99 |"
echo "| --- | --- | --- | --- | --- |"

taskset -c "$server_core" "$bin" serve "$fns" --listen 127.0.0.1:18180 --store-dir "$work/store" \
    >"$work/fnrunner.out" 2>"$work/fnrunner.err" &
pids+=($!)
wait_for http://127.0.0.1:18180/healthz
run "fnrunner, hello (component, fresh instance per call)" http://127.0.0.1:18180/fn/hello
run "fnrunner, hello (component, max_jobs = 1000)" http://127.0.0.1:18180/fn/hello-reuse
run "fnrunner, hello-min (CGI module, fresh instance per call)" http://127.0.0.1:18180/fn/hello-min
connections="8" run "fnrunner, costly (≈14 ms first call, max_jobs = 1)" http://127.0.0.1:18180/fn/costly-fresh
connections="8" run "fnrunner, costly (max_jobs = 1000)" http://127.0.0.1:18180/fn/costly-reuse

# First call after a deploy, against warm calls: costly-init builds its
# table when an instance is created, so `min_warm = 1` takes that off the
# first call. Times are curl's total, client side.
first_call() {
    local name=$1 settings=$2
    curl -s -o /dev/null -X PUT "http://127.0.0.1:18180/v1/functions/$name" \
        -F module=@"$root/fixtures/functions/costly-init.wasm" -F settings="$settings"
    local tries=0
    if [[ $settings == *min_warm* ]]; then
        until curl -s http://127.0.0.1:18180/v1/status | python3 -c "import json, sys
pool = json.load(sys.stdin)['details']['$name']['pool'] or {}
sys.exit(0 if pool.get('ready', 0) >= 1 else 1)"; do
            tries=$((tries + 1))
            [ "$tries" -lt 100 ] || break
            sleep 0.05
        done
    fi
    local first warm
    first=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:18180/fn/$name")
    warm=$(for _ in $(seq 21); do curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:18180/fn/$name"; done | sort -n | sed -n 11p)
    printf '| %s | first call %.2f ms | warm call (median of 21) %.2f ms |\n' "$name (${settings//$'\n'/, })" \
        "$(echo "$first * 1000" | bc -l)" "$(echo "$warm * 1000" | bc -l)"
}
echo
echo "| costly-init after a deploy | first | warm |"
echo "| --- | --- | --- |"
first_call cold-start "max_jobs = 1000"
first_call prewarmed "max_jobs = 1000
min_warm = 1"

if command -v wasmtime >/dev/null; then
    taskset -c "$server_core" wasmtime serve --addr 127.0.0.1:18181 -S cli "$fns/hello.wasm" \
        >"$work/ws.out" 2>&1 &
    pids+=($!)
    wait_for http://127.0.0.1:18181/
    run "wasmtime serve, hello (fresh instance per request)" http://127.0.0.1:18181/
    taskset -c "$server_core" wasmtime serve --addr 127.0.0.1:18182 -S cli --max-instance-reuse-count 1000 \
        "$fns/hello.wasm" >"$work/ws2.out" 2>&1 &
    pids+=($!)
    wait_for http://127.0.0.1:18182/
    run "wasmtime serve, hello (--max-instance-reuse-count 1000)" http://127.0.0.1:18182/
fi

if command -v nginx >/dev/null; then
    cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:18183; location / { return 200 "hello\n"; } }
}
EOF
    taskset -c "$server_core" nginx -c "$work/nginx.conf" &
    pids+=($!)
    wait_for http://127.0.0.1:18183/
    run "nginx, fixed 200 (the floor)" http://127.0.0.1:18183/
fi
