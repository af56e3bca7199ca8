#!/usr/bin/env bash
# make bench: the library's overhead against plain net/http, the rollover
# time, the stress figures of our hand-over against a naive one, and real
# clients no one here wrote (wrk, ab) when they are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
S=./bin/rollover-stress
ROLLOVERS=${ROLLOVERS:-100}

section() { printf '\n== %s\n' "$*"; }

section "1. requests/s, library vs plain net/http (same handler, alternating 2s rounds), and idle rollover time"
go test -run "^$" -bench . -benchtime 15x ./tests/ | grep -E '^Benchmark|^ok|FAIL'

section "2. stress: $ROLLOVERS rollovers every 0.5s, 32 clients, new connection per request (steered hand-over)"
$S -rollovers "$ROLLOVERS" -interval 500ms -slow 4 | grep -v '^rollover '
section "2b. the same with keep-alive clients"
$S -rollovers "$ROLLOVERS" -interval 500ms -slow 4 -keepalive | grep -v '^rollover '

section "3. for contrast: the naive hand-over (listener close + Shutdown), 20 rollovers each"
$S -rollovers 20 -interval 500ms -naive | grep -v '^rollover ' || true
$S -rollovers 20 -interval 500ms -naive -keepalive | grep -v '^rollover ' || true

section "4. real clients: wrk and ab, a rollover every 0.5s while they run"
if command -v wrk >/dev/null; then
	$S -interval 500ms -load-cmd "wrk -t2 -c32 -d15s {url}"
	$S -interval 500ms -load-cmd "wrk -t2 -c32 -d15s -H 'Connection: close' {url}"
	echo "(wrk prints a 'Socket errors' line and 'Non-2xx' only when there are some)"
	$S -interval 500ms -naive -load-cmd "wrk -t2 -c32 -d15s -H 'Connection: close' {url}" || true
else
	echo "wrk not installed (apt-get install wrk)"
fi
if command -v ab >/dev/null; then
	$S -interval 500ms -load-cmd "ab -q -n 100000 -c 32 {url}" | grep -E 'demoapp on|Complete|Failed|\(Connect|Non-2xx|Requests per|rollovers'
	$S -interval 500ms -load-cmd "ab -q -k -n 300000 -c 32 {url}" | grep -E 'demoapp on|Complete|Failed|\(Connect|Non-2xx|Keep-Alive|Requests per|rollovers'
else
	echo "ab not installed (apt-get install apache2-utils)"
fi
