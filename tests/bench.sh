#!/usr/bin/env bash
# make bench: the library's overhead against plain net/http, the rollover
# time, the stress figures of our hand-over against a naive one, and real
# clients no one here wrote (wrk, ab) when they are installed.
#
# It checks the targets and exits 1 if one is missed, but only after every
# section has run and printed its figures:
#   - requests/s, library / plain net/http, the median of paired rounds in
#     one run (BenchmarkOverhead's "ratio"), with and without keep-alive:
#     at least BENCH_MIN_RATIO (0.97);
#   - an idle rollover, active to the old generation gone, p50
#     (BenchmarkRolloverIdle's "drain-ms/p50"): at most its drain grace
#     ("grace-ms") plus BENCH_IDLE_SLACK_MS (100);
#   - time to new code, from the request to the first answer of the new
#     generation, the median over NEW_CODE_ROLLOVERS (25) rollovers each
#     (BenchmarkTimeToNewCode), against fork + exec of the same demoapp
#     standalone, measured in the same run: SIGHUP to the coordinator at
#     most BENCH_MAX_SIGHUP_RATIO (1.3) times that, `rollover next` at most
#     BENCH_MAX_NEXT_RATIO (1.6) times;
#   - every run that must not fail (the benchmarks, the steered stress and
#     wrk/ab runs) exits 0. The naive hand-over runs are there to fail.
# Set BENCH_MIN_RATIO, BENCH_IDLE_SLACK_MS or a BENCH_MAX_*_RATIO to see a
# miss; ROLLOVERS (100) sets the length of the stress runs.
set -uo pipefail
cd "$(dirname "$0")/.."
S=./bin/rollover-stress
ROLLOVERS=${ROLLOVERS:-100}
MIN_RATIO=${BENCH_MIN_RATIO:-0.97}
IDLE_SLACK_MS=${BENCH_IDLE_SLACK_MS:-100}
NEW_CODE_ROLLOVERS=${NEW_CODE_ROLLOVERS:-25}
MAX_SIGHUP_RATIO=${BENCH_MAX_SIGHUP_RATIO:-1.3}
MAX_NEXT_RATIO=${BENCH_MAX_NEXT_RATIO:-1.6}

misses=()
miss() {
	misses+=("$*")
	echo "MISSED: $*"
}

section() { printf '\n== %s\n' "$*"; }

# stress ARGS...: one rollover-stress run that must not fail (a failed run
# is a miss), without its per-rollover progress lines; with KEEP set, only
# the lines matching the extended regexp KEEP.
stress() {
	"$S" "$@" | filter
	local rc=${PIPESTATUS[0]}
	if [ "$rc" -ne 0 ]; then miss "rollover-stress $* exited $rc"; fi
}
filter() {
	if [ -n "${KEEP:-}" ]; then grep --line-buffered -E -- "$KEEP"; else grep --line-buffered -v '^rollover '; fi
}

# naive ARGS...: the naive hand-over, which is expected to fail requests.
naive() { "$S" -naive "$@" | filter || true; }

# metric BENCH UNIT prints the value that benchmark BENCH (without its -N
# suffix) reported in UNIT in $benchout.
metric() {
	awk -v bench="$1" -v unit="$2" '
		{ name = $1; sub(/-[0-9]+$/, "", name) }
		name == bench { for (i = 3; i < NF; i++) if ($(i + 1) == unit) print $i }
	' "$benchout"
}

# holds A OP B: the numeric comparison, in awk's floating point.
holds() { awk -v a="$1" -v b="$3" "BEGIN { exit !(a $2 b) }"; }

benchout=$(mktemp)
trap 'rm -f "$benchout"' EXIT

section "1. requests/s, library vs plain net/http (same handler, alternating 1s rounds), and idle rollover time"
# bench PATTERN N: the benchmarks matching PATTERN, N iterations each,
# their output kept in $benchout.
bench() {
	go test -run '^$' -bench "$1" -benchtime "$2x" ./tests/ 2>&1 | tee -a "$benchout" | grep --line-buffered -E '^Benchmark|^ok|FAIL|^ +[a-z_]+\.go:[0-9]+:'
	local rc=${PIPESTATUS[0]}
	if [ "$rc" -ne 0 ]; then miss "the benchmarks $1 exited $rc"; fi
}
bench '^Benchmark(Overhead|RolloverIdle)$' 15
for ka in true false; do
	b="BenchmarkOverhead/keepalive=$ka"
	r=$(metric "$b" ratio)
	if [ -z "$r" ]; then
		miss "$b reported no ratio"
	elif holds "$r" '>=' "$MIN_RATIO"; then
		echo "target met: $b ratio $r >= $MIN_RATIO"
	else
		miss "$b ratio $r < $MIN_RATIO"
	fi
done
b=BenchmarkRolloverIdle
p50=$(metric $b drain-ms/p50)
grace=$(metric $b grace-ms)
if [ -z "$p50" ] || [ -z "$grace" ]; then
	miss "$b reported no drain-ms/p50 or grace-ms"
else
	budget=$(awk -v g="$grace" -v s="$IDLE_SLACK_MS" 'BEGIN { print g + s }')
	if holds "$p50" '<=' "$budget"; then
		echo "target met: $b p50 ${p50}ms <= grace ${grace}ms + ${IDLE_SLACK_MS}ms"
	else
		miss "$b p50 ${p50}ms > grace ${grace}ms + ${IDLE_SLACK_MS}ms"
	fi
fi

section "1b. time to new code: request to the first answer of the new generation, $NEW_CODE_ROLLOVERS rollovers each"
bench '^BenchmarkTimeToNewCode$' "$NEW_CODE_ROLLOVERS"
b=BenchmarkTimeToNewCode
printf '%-34s %8s %8s %8s\n' "ms" p50 p10 p90
for w in "fork:fork + exec, standalone (floor)" "sighup:SIGHUP to the coordinator" "next:rollover next (from its fork)"; do
	printf '%-34s %8s %8s %8s\n' "${w#*:}" "$(metric $b "${w%%:*}-ms/p50")" "$(metric $b "${w%%:*}-ms/p10")" "$(metric $b "${w%%:*}-ms/p90")"
done
for w in "sighup:$MAX_SIGHUP_RATIO" "next:$MAX_NEXT_RATIO"; do
	r=$(metric $b "${w%%:*}/fork")
	if [ -z "$r" ]; then
		miss "$b reported no ${w%%:*}/fork"
	elif holds "$r" '<=' "${w#*:}"; then
		echo "target met: $b ${w%%:*} p50 / fork p50 = $r <= ${w#*:}"
	else
		miss "$b ${w%%:*} p50 / fork p50 = $r > ${w#*:}"
	fi
done

section "2. stress: $ROLLOVERS rollovers every 0.5s, 32 clients, new connection per request (steered hand-over)"
stress -rollovers "$ROLLOVERS" -interval 500ms -slow 4
section "2b. the same with keep-alive clients"
stress -rollovers "$ROLLOVERS" -interval 500ms -slow 4 -keepalive

section "3. for contrast: the naive hand-over (listener close + Shutdown), 20 rollovers each"
naive -rollovers 20 -interval 500ms
naive -rollovers 20 -interval 500ms -keepalive

section "4. real clients: wrk and ab, a rollover every 0.5s while they run"
if command -v wrk >/dev/null; then
	stress -interval 500ms -load-cmd "wrk -t2 -c32 -d15s {url}"
	stress -interval 500ms -load-cmd "wrk -t2 -c32 -d15s -H 'Connection: close' {url}"
	echo "(wrk prints a 'Socket errors' line and 'Non-2xx' only when there are some)"
	naive -interval 500ms -load-cmd "wrk -t2 -c32 -d15s -H 'Connection: close' {url}"
else
	echo "wrk not installed (apt-get install wrk)"
fi
if command -v ab >/dev/null; then
	KEEP='demoapp on|Complete|Failed|\(Connect|Non-2xx|Requests per|rollovers' \
		stress -interval 500ms -load-cmd "ab -q -n 100000 -c 32 {url}"
	KEEP='demoapp on|Complete|Failed|\(Connect|Non-2xx|Keep-Alive|Requests per|rollovers' \
		stress -interval 500ms -load-cmd "ab -q -k -n 300000 -c 32 {url}"
else
	echo "ab not installed (apt-get install apache2-utils)"
fi

section "targets"
if [ ${#misses[@]} -eq 0 ]; then
	echo "all met"
	exit 0
fi
for m in "${misses[@]}"; do echo "MISSED: $m"; done
exit 1
