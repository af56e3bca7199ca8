package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

func TestRunExitCodes(t *testing.T) {
	cases := []struct {
		args []string
		code int
		want string // in stdout for 0, in the error otherwise
	}{
		{[]string{"--help"}, 0, "Exit codes:"},
		{[]string{"help", "next"}, 0, "rollover next [flags] [--] [CMD [ARGS...]]"},
		{[]string{"version"}, 0, "rollover dev"},
		{[]string{"--name", "x", "version"}, 0, "rollover dev"},
		{[]string{"version", "--name", "x"}, 0, "rollover dev"},
		{nil, 2, "no command given"},
		{[]string{"nope"}, 2, `unknown command "nope"`},
		{[]string{"status", "--json", "x"}, 2, "takes no arguments"},
		{[]string{"start", "--adopt-wait", "0s", "--", "true"}, 2, "--adopt-wait must be a positive duration"},
		{[]string{"start", "-drain-timeout", "1s", "--", "true"}, 2, "long flags take two dashes: --drain-timeout"},
		{[]string{"next", "--socket", "/nonexistent/x.sock"}, 3, "no coordinator at /nonexistent/x.sock"},
		{[]string{"status", "--socket", "/" + strings.Repeat("x", 107)}, 2, "is 108 bytes, over the 107-byte limit of a Unix socket path; pass a shorter --socket"},
		{[]string{"start", "--metrics-addr", ":99999", "--", "true"}, 2, `--metrics-addr :99999: "99999" is not a port`},
	}
	for _, tc := range cases {
		var out, errOut bytes.Buffer
		err := run(context.Background(), tc.args, &out, &errOut)
		if code := exitCode(err); code != tc.code {
			t.Errorf("%q: exit %d (%v), want %d", tc.args, code, err, tc.code)
			continue
		}
		got := out.String()
		if err != nil {
			got = oneLine(err)
		}
		if !strings.Contains(got, tc.want) {
			t.Errorf("%q: %q lacks %q", tc.args, got, tc.want)
		}
		if errOut.Len() > 0 {
			t.Errorf("%q wrote to stderr itself: %q", tc.args, errOut.String())
		}
	}
}

func TestFirstWord(t *testing.T) {
	for in, want := range map[string]string{
		"--name x stauts --json": "stauts",
		"--socket /s -v status":  "status",
		"--bogus":                "",
		"-- foo":                 "",
	} {
		if got := firstWord(strings.Fields(in)); got != want {
			t.Errorf("firstWord(%q) = %q, want %q", in, got, want)
		}
	}
}

// JSON logs give durations as seconds with the unit in the key; text keeps
// Go's duration strings.
func TestLogDurations(t *testing.T) {
	var b bytes.Buffer
	slog.New(logHandler(&b, "json")).Info("generation drained", "gen", 1, "after", 1006*time.Millisecond)
	var m map[string]any
	if err := json.Unmarshal(b.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if m["after_s"] != 1.006 || m["after"] != nil || m["gen"] != 1.0 {
		t.Errorf("JSON log %s: want after_s 1.006 and gen 1", b.String())
	}
	b.Reset()
	slog.New(logHandler(&b, "text")).Info("generation drained", "after", 1006*time.Millisecond)
	if !strings.Contains(b.String(), "after=1.006s") {
		t.Errorf("text log %q: want after=1.006s", b.String())
	}
}

func TestBar(t *testing.T) {
	for _, tc := range []struct {
		done, total int64
		want        string
	}{
		{0, 4, "[----]"}, {2, 4, "[##--]"}, {4, 4, "[####]"}, {0, 0, "[####]"}, {5, 4, "[####]"},
	} {
		if got := bar(tc.done, tc.total, 4); got != tc.want {
			t.Errorf("bar(%d, %d) = %s, want %s", tc.done, tc.total, got, tc.want)
		}
	}
}

// The watch pieces the rollovers together from successive statuses.
func TestWatcherHistory(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	gen := func(n int, state string, conns int64, started time.Time) wire.GenStatus {
		return wire.GenStatus{Generation: n, PID: 100 + n, State: state, StartedAt: started, Stats: wire.Stats{Connections: conns}}
	}
	w := newWatcher(time.Second, t0)
	steps := []struct {
		at   time.Duration
		st   wire.Status
		want []string
	}{
		{0, wire.Status{Active: 1, Generations: []wire.GenStatus{gen(1, "active", 3, t0.Add(-time.Hour))}}, nil},
		{time.Second, wire.Status{Active: 1, InProgress: true, Generations: []wire.GenStatus{gen(1, "active", 3, t0.Add(-time.Hour)), gen(2, "starting", 0, t0.Add(900*time.Millisecond))}},
			[]string{"gen 2 started (pid 102)"}},
		{2 * time.Second, wire.Status{Active: 2, Generations: []wire.GenStatus{gen(1, "draining", 4, t0.Add(-time.Hour)), gen(2, "active", 0, t0.Add(900*time.Millisecond))}},
			[]string{"gen 2 ready after ≤1.1s", "gen 2 active", "draining gen 1: 0 in flight, 4 connections"}},
		{3 * time.Second, wire.Status{Active: 2, Generations: []wire.GenStatus{gen(1, "draining", 1, t0.Add(-time.Hour)), gen(2, "active", 0, t0.Add(900*time.Millisecond))}}, nil},
		{4 * time.Second, wire.Status{Active: 2, Generations: []wire.GenStatus{gen(2, "active", 0, t0.Add(900*time.Millisecond))}},
			[]string{"gen 1 drained after ≤2s"}},
		{5 * time.Second, wire.Status{Active: 2, Generations: []wire.GenStatus{gen(2, "active", 0, t0.Add(900*time.Millisecond)), gen(3, "starting", 0, t0.Add(5*time.Second))}},
			[]string{"gen 3 started (pid 103)"}},
		{6 * time.Second, wire.Status{Active: 2, Generations: []wire.GenStatus{gen(2, "active", 0, t0.Add(900*time.Millisecond))}},
			[]string{"gen 3 failed: gone before it was active"}},
	}
	for i, s := range steps {
		got := w.observe(&s.st, t0.Add(s.at))
		if strings.Join(got, "\n") != strings.Join(s.want, "\n") {
			t.Errorf("step %d: events %q, want %q", i, got, s.want)
		}
		if i == 3 {
			screen := strings.Join(w.frame(&s.st, t0.Add(s.at)), "\n")
			if !strings.Contains(screen, "[###############-----] 1/4") {
				t.Errorf("step 3: no bar for gen 1's drain:\n%s", screen)
			}
		}
	}
	if len(w.recent) != 2 || w.recent[0].result != "failed" || w.recent[1].result != "ok" || w.recent[1].from != 1 || w.recent[1].drain != 2*time.Second {
		t.Errorf("history %+v %+v", *w.recent[0], *w.recent[1])
	}
}

func TestFmtDur(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0ms", 7 * time.Millisecond: "7ms", 999 * time.Millisecond: "999ms", time.Second: "1s",
		1249 * time.Millisecond: "1.2s", 1960 * time.Millisecond: "2s", 5 * time.Second: "5s", 90 * time.Second: "1m30s",
		time.Minute: "1m", time.Hour: "1h", 90 * time.Minute: "1h30m", time.Hour + 5*time.Second: "1h0m5s",
		time.Hour - 100*time.Millisecond: "59m59.9s",
	} {
		if got := fmtDur(d); got != want {
			t.Errorf("fmtDur(%v) = %q, want %q", d, got, want)
		}
	}
}

// The phase line follows the status: nothing when idle, then a starting or
// ready generation, a canary (waiting, or stepping on), a bake and its time
// left, and the old generation leaving.
func TestPhase(t *testing.T) {
	gen := func(n int, state string) wire.GenStatus { return wire.GenStatus{Generation: n, State: state} }
	canary := func(r wire.RolloutStatus) wire.Status {
		r.Generation, r.Phase, r.Weight = 3, "canary", 10
		return wire.Status{Active: 2, InProgress: true, Baking: 3, CanaryWeight: 10, Rollout: &r, Generations: []wire.GenStatus{gen(2, "active"), gen(3, "ready")}}
	}
	bake := func(left time.Duration) wire.Status {
		return wire.Status{Active: 3, InProgress: true, Baking: 3, Rollout: &wire.RolloutStatus{Generation: 3, Phase: "baking", BakeLeftMS: left.Milliseconds()},
			Generations: []wire.GenStatus{gen(2, "draining"), gen(3, "active")}}
	}
	for _, tc := range []struct {
		st   wire.Status
		want string
	}{
		{canary(wire.RolloutStatus{Step: 1, Steps: 1, Waiting: true}), "canary: gen 3 takes 10% of new connections, gen 2 the rest; waiting for rollover promote (to 100%) or rollover abort"},
		{canary(wire.RolloutStatus{Step: 1, Steps: 3, Waiting: true}), "canary step 1/3: gen 3 takes 10% of new connections, gen 2 the rest; waiting for rollover promote (to 100%) or rollover abort"},
		{canary(wire.RolloutStatus{Step: 2, Steps: 3, StepLeftMS: 4249}), "canary step 2/3: gen 3 takes 10% of new connections, gen 2 the rest; next step in 4.2s"},
		{canary(wire.RolloutStatus{Step: 1, Steps: 1, StepLeftMS: 300}), "canary: gen 3 takes 10% of new connections, gen 2 the rest; 100% in 300ms"},
		{canary(wire.RolloutStatus{Step: 3, Steps: 3, StepLeftMS: 3_600_000}), "canary step 3/3: gen 3 takes 10% of new connections, gen 2 the rest; 100% in 1h"},
		{bake(3140 * time.Millisecond), "baking gen 3 (3.1s left): gen 2 takes the port back if it fails"},
		{bake(time.Hour - time.Second), "baking gen 3 (59m59s left): gen 2 takes the port back if it fails"},
		{bake(0), "baking gen 3 (0ms left): gen 2 takes the port back if it fails"},
		{wire.Status{Active: 1, Generations: []wire.GenStatus{gen(1, "active")}}, ""},
		{wire.Status{Active: 1, InProgress: true, Generations: []wire.GenStatus{gen(1, "active"), gen(2, "starting")}}, "starting gen 2, waiting until it is ready"},
		{wire.Status{Active: 1, InProgress: true, Baking: 2, Generations: []wire.GenStatus{gen(1, "active"), gen(2, "ready")}}, "gen 2 ready, steering new connections to it"},
		{wire.Status{Active: 1, InProgress: true, Baking: 2, CanaryWeight: 10, Generations: []wire.GenStatus{gen(1, "active"), gen(2, "ready")}}, "canary: gen 2 takes 10% of new connections, gen 1 the rest"},
		{wire.Status{Active: 2, InProgress: true, Baking: 2, CanaryWeight: 100, Generations: []wire.GenStatus{gen(1, "draining"), gen(2, "active")}}, "baking gen 2: gen 1 takes the port back if it fails"},
		{wire.Status{Active: 3, InProgress: true, Baking: 3, Generations: []wire.GenStatus{gen(1, "draining"), gen(2, "draining"), gen(3, "active")}}, "baking gen 3: gen 2 takes the port back if it fails"},
		{wire.Status{Active: 2, InProgress: true, Generations: []wire.GenStatus{gen(1, "draining"), gen(2, "active")}}, "handing over: gen 1 leaves the port to gen 2"},
	} {
		if got := phase(&tc.st); got != tc.want {
			t.Errorf("phase(%+v) = %q, want %q", tc.st, got, tc.want)
		}
	}
}

// Plain status says yes or no, as the watch does, and writes the bake's
// time left and the uptimes the way the watch does.
func TestPrintStatus(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	st := &wire.Status{PID: 9, Socket: "/s", Active: 2, InProgress: true, Baking: 2,
		Rollout: &wire.RolloutStatus{Generation: 2, Phase: "baking", BakeLeftMS: 3_600_000},
		Generations: []wire.GenStatus{
			{Generation: 1, PID: 11, State: "draining", StartedAt: now.Add(-2*time.Hour - 5*time.Minute), Argv: []string{"./api"}},
			{Generation: 2, PID: 12, State: "active", StartedAt: now.Add(-3 * time.Second), Steerable: true, Sockets: 4, Instances: 4, Serving: 3, Argv: []string{"nginx"}},
		}}
	var b bytes.Buffer
	if err := printStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"rollover in progress: yes,", "\nphase: baking gen 2 (1h left): gen 1 takes the port back if it fails\n", " 2h05m ", " 3s ", " yes, 4 sockets ", " no (tcp_migrate_req) ", " active, 3/4 instances "} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
	w := newWatcher(time.Second, now)
	if sum := w.summary(st, now); !strings.HasPrefix(sum, "active gen 2, rollover in progress: yes, baking gen 2 (1h left): gen 1 takes") {
		t.Errorf("the watch's summary disagrees with status: %q", sum)
	}
}

// A generation that serves UDP shows its datagrams in status and in the
// watch; a TCP-only status has no UDP column.
func TestPrintStatusUDP(t *testing.T) {
	now := time.Now()
	st := &wire.Status{PID: 9, Socket: "/s", Active: 2, Generations: []wire.GenStatus{
		{Generation: 1, PID: 11, State: "draining", StartedAt: now, Stats: wire.Stats{Datagrams: 120, DatagramsSent: 117, InflightPackets: 3}},
		{Generation: 2, PID: 12, State: "active", StartedAt: now, Stats: wire.Stats{Datagrams: 40, DatagramsSent: 40, DatagramsLost: 2}},
	}}
	var b bytes.Buffer
	if err := printStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"UDP READ/SENT/IN-FLIGHT", " 120/117/3 ", " 40/40/0 (2 lost) "} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
	w := newWatcher(time.Second, now)
	if frame := strings.Join(w.frame(st, now), "\n"); !strings.Contains(frame, " 120/117/3 ") {
		t.Errorf("the watch lacks gen 1's datagrams:\n%s", frame)
	}
	if sum := w.summary(st, now); !strings.Contains(sum, "udp 120 read, 117 sent, 3 in flight, 0 lost") {
		t.Errorf("the watch's summary lacks gen 1's datagrams: %q", sum)
	}
	for i := range st.Generations {
		st.Generations[i].Stats = wire.Stats{}
	}
	b.Reset()
	_ = printStatus(&b, st, now)
	if strings.Contains(b.String(), "UDP") {
		t.Errorf("a status without datagrams shows a UDP column:\n%s", b.String())
	}
}

// The bake's line in next's output is in fmtDur's form; the other events
// keep the coordinator's words.
func TestEventLine(t *testing.T) {
	for e, want := range map[wire.Event]string{
		{Phase: wire.PhaseBaking, Generation: 3, Millis: 3_600_000}: "baking gen 3 for 1h",
		{Phase: wire.PhaseBaking, Generation: 3, Millis: 100}:       "baking gen 3 for 100ms",
		{Phase: wire.PhaseReady, Generation: 3, Millis: 1500}:       "ready after 1500ms",
	} {
		if got := eventLine(e); got != want {
			t.Errorf("eventLine(%+v) = %q, want %q", e, got, want)
		}
	}
}

// The README's picture of next --wait's live drain line is what the
// printer draws for the same numbers.
func TestReadmeDrainLine(t *testing.T) {
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	d := &drainProgress{gen: 3, inflight: 2, conns: 5, maxConns: 20, since: now.Add(-1200 * time.Millisecond)}
	if want := "\n" + d.line(now) + "\n"; !strings.Contains(string(raw), want) {
		t.Errorf("the README does not show the live drain line as drawn: %q", strings.TrimSpace(want))
	}
}
