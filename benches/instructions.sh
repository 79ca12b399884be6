#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the same
# figure for the same build and load whatever else the machine is doing, so
# two builds compare within a fraction of a percent where requests/s move by
# 10-30 % from one run to the next.
#
#   benches/instructions.sh [ingress|egress] [TOLLGATE_BINARY] [SECONDS]
#
# Starts the load harness's servers (`--hold`) with Tollgate under callgrind,
# warms up, zeroes the counters, drives `wrk -t1 -c16` for SECONDS (default
# 10) at the 100-byte response, and divides the instructions Tollgate executed
# by the requests wrk counted. Needs a `cargo bench --bench load --no-run`
# build, valgrind and wrk. The profile is left for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

listener=${1:-ingress}
binary=$(realpath "${2:-target/release/tollgate}")
seconds=${3:-10}
case $listener in ingress | egress) ;; *)
    echo "usage: $0 [ingress|egress] [TOLLGATE_BINARY] [SECONDS]" >&2
    exit 2
    ;;
esac
harness=$(ls -t target/release/deps/load-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
if [ -z "$harness" ]; then
    echo "no load harness: run cargo bench --bench load --no-run first" >&2
    exit 2
fi
for tool in valgrind callgrind_control callgrind_annotate wrk; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install valgrind wrk)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/tollgate-instructions.XXXXXX)
cat >"$work/tollgate" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.%p "$binary" "\$@"
EOF
chmod +x "$work/tollgate"

"$harness" --only ingress --rounds 1 --no-write --hold 600 --tollgate "$work/tollgate" \
    >/dev/null 2>"$work/harness.log" &
harness_pid=$!
trap 'kill $harness_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
    grep -q 'haproxy pid' "$work/harness.log" && break
    sleep 1
done
grep -q 'haproxy pid' "$work/harness.log" || { cat "$work/harness.log" >&2; exit 1; }

log=$(cat "$work/harness.log")
pid=$(grep -o 'tollgate pid [0-9]*' <<<"$log" | awk '{print $3}')
ingress_addr=$(grep -o 'tollgate pid .*' <<<"$log" | grep -o 'ingress [0-9.:]*' | awk '{print $2}')
egress_addr=$(grep -o 'tollgate pid .*' <<<"$log" | grep -o 'egress [0-9.:]*' | awk '{print $2}')
if [ "$listener" = ingress ]; then
    url=$(grep -o 'http://[^ ]*/gateway/small' <<<"$log")
    header=$(grep -o 'Authorization: Bearer [0-9a-f]*' <<<"$log")
    script="wrk.headers[\"Authorization\"] = \"${header#Authorization: }\""
else
    origin=$(grep -o 'egress: http://[^ ]*' <<<"$log" | awk '{print $2}')
    header=$(grep -o 'Proxy-Authorization: Basic [A-Za-z0-9+/=]*' <<<"$log")
    url="http://$egress_addr/"
    script="wrk.path = \"$origin\"
wrk.headers[\"Host\"] = \"$(sed 's|http://||; s|/.*||' <<<"$origin")\"
wrk.headers[\"Proxy-Authorization\"] = \"${header#Proxy-Authorization: }\""
fi
: "$ingress_addr"
echo "$script" >"$work/wrk.lua"

wrk -t1 -c16 -d3s -s "$work/wrk.lua" "$url" >/dev/null
callgrind_control -z "$pid" >/dev/null
wrk -t1 -c16 -d"${seconds}s" -s "$work/wrk.lua" "$url" >"$work/wrk.out"
callgrind_control -d "$pid" >/dev/null
sleep 2

requests=$(grep -o '[0-9]* requests in' "$work/wrk.out" | awk '{print $1}')
errors=$(grep -c 'Non-2xx\|Socket errors' "$work/wrk.out" || true)
profile=$(ls -t "$work"/callgrind."$pid".* | head -n 1)
total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
if [ "$errors" != 0 ] || [ -z "$requests" ] || [ "$requests" = 0 ]; then
    cat "$work/wrk.out" >&2
    echo "the load failed; see $work" >&2
    exit 1
fi
echo "$listener: $((total / requests)) instructions per request ($total over $requests requests; $binary)"
echo "profile: $profile"
