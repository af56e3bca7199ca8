package tests

// What a newcomer meets first (issue 19): plain `status` says where a
// rollover stands, `rollback` names what it restores, a bad socket path or
// metrics address gets one clear line, and a start whose generation 1
// fails says so once.

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// Plain `status` shows the phase: a bake and its time left, falling (held
// open with --bake 1h, ended by promote), a canary stepping on by itself
// (--step 1h, ended by abort) and one waiting for a promote (ended by
// abort); nothing when idle.
func TestStatusShowsPhase(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	phaseLine := regexp.MustCompile(`(?m)^phase: .*$`)
	plain := func() string {
		t.Helper()
		out, stderr, code, err := svc.CLI(ctx, "status")
		if err != nil || code != 0 {
			t.Fatalf("status: exit %d %v: %s", code, err, stderr)
		}
		return phaseLine.FindString(out)
	}
	// timeLeft reads the duration re finds in the phase line, which must
	// lie within (0, most].
	timeLeft := func(re *regexp.Regexp, most time.Duration) time.Duration {
		t.Helper()
		p := plain()
		m := re.FindStringSubmatch(p)
		if m == nil {
			t.Fatalf("status: %q, want it to match %s", p, re)
		}
		d, err := time.ParseDuration(m[1])
		if err != nil || d <= 0 || d > most {
			t.Fatalf("status: %q: the time left is not within (0, %v]", p, most)
		}
		return d
	}
	if p := plain(); p != "" {
		t.Errorf("status with no rollover under way shows %q", p)
	}
	aborted := func(run *nextRun) {
		t.Helper()
		if _, stderr, code, err := svc.CLI(ctx, "abort"); err != nil || code != 0 {
			t.Fatalf("abort: exit %d %v: %s", code, err, stderr)
		}
		if code := run.wait(t, 20*time.Second); code != 1 {
			t.Errorf("aborted canary: next exit %d, want 1", code)
		}
		testproc.WaitFor(t, 20*time.Second, "the rollover to end", func() bool {
			st, err := svc.Status(ctx)
			return err == nil && !st.InProgress
		})
	}

	bake := startNext(t, svc, []string{"--bake", "1h"}, svc.AppArgv("v2"))
	bake.waitPhase(t, wire.PhaseBaking, 20*time.Second)
	baking := regexp.MustCompile(`^phase: baking gen 2 \((\S+) left\): gen 1 takes the port back if it fails$`)
	first := timeLeft(baking, time.Hour)
	testproc.WaitFor(t, 10*time.Second, "the bake's time left to fall", func() bool { return timeLeft(baking, time.Hour) < first })
	if _, stderr, code, err := svc.CLI(ctx, "promote"); err != nil || code != 0 {
		t.Fatalf("promote: exit %d %v: %s", code, err, stderr)
	}
	if code := bake.wait(t, 20*time.Second); code != 0 {
		t.Fatalf("next --bake 1h, promoted: exit %d: %s", code, bake.stderr.String())
	}

	stepping := startNext(t, svc, []string{"--canary", "10%,50%", "--step", "1h"}, svc.AppArgv("v3"))
	stepping.waitFor(t, "the canary's first step", 20*time.Second, func(e wire.Event) bool { return e.Phase == wire.PhaseCanary && e.Weight == 10 })
	timeLeft(regexp.MustCompile(`^phase: canary step 1/2: gen 3 takes 10% of new connections, gen 2 the rest; next step in (\S+)$`), time.Hour)
	aborted(stepping)

	waiting := startNext(t, svc, []string{"--canary", "10%"}, svc.AppArgv("v4"))
	waiting.waitFor(t, "the canary waiting", 20*time.Second, func(e wire.Event) bool {
		return e.Phase == wire.PhaseInfo && strings.HasPrefix(e.Text, "canary waits at 10%")
	})
	if got, want := plain(), "phase: canary: gen 4 takes 10% of new connections, gen 2 the rest; waiting for rollover promote (to 100%) or rollover abort"; got != want {
		t.Errorf("status during the waiting canary: %q, want %q", got, want)
	}
	aborted(waiting)
	if p := plain(); p != "" {
		t.Errorf("status after the rollovers shows %q", p)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// `rollback` says which command line it restores, right after it started
// the generation, as text and as a JSON event.
func TestRollbackNamesCommandLine(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := svc.Next(ctx, "v2", false); err != nil {
		t.Fatal(err)
	}
	out, stderr, code, err := svc.CLI(ctx, "rollback")
	if err != nil || code != 0 {
		t.Fatalf("rollback: exit %d %v: %s", code, err, stderr)
	}
	want := "gen 3 restores the previous command line: " + strings.Join(svc.AppArgv("v1"), " ")
	if lines := strings.Split(out, "\n"); len(lines) < 2 || !strings.HasPrefix(lines[0], "started gen 3 (pid ") || lines[1] != want {
		t.Errorf("rollback's first lines: %q; want started gen 3, then %q", out, want)
	}
	out, stderr, code, err = svc.CLI(ctx, "rollback", "--json")
	if err != nil || code != 0 {
		t.Fatalf("rollback --json: exit %d %v: %s", code, err, stderr)
	}
	want = `{"phase":"info","generation":4,"text":"gen 4 restores the previous command line: ` + strings.Join(svc.AppArgv("v2"), " ") + `"}`
	if !strings.Contains(out, "\n"+want+"\n") {
		t.Errorf("rollback --json lacks %s:\n%s", want, out)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// A socket path too long for a Unix socket gets the same one line and exit
// 2 (usage) from every command, whether it comes from --socket,
// $ROLLOVER_SOCKET or $XDG_RUNTIME_DIR, and nothing is started.
func TestSocketPathTooLong(t *testing.T) {
	dir := testproc.ShortDir(t)
	long := filepath.Join(dir, strings.Repeat("s", 120)+".sock")
	app := filepath.Join(bin, "demoapp")
	commands := [][]string{
		{"start", "--metrics-addr", "", "--", app, "-addr", "127.0.0.1:1"},
		{"status"}, {"status", "--json"}, {"status", "--watch"},
		{"next"}, {"rollback"}, {"stop"}, {"promote"}, {"abort"},
	}
	for _, src := range []struct {
		from string
		env  []string
		flag []string
		path string
	}{
		{"--socket", nil, []string{"--socket", long}, long},
		{"$ROLLOVER_SOCKET", []string{"ROLLOVER_SOCKET=" + long}, nil, long},
		{"$XDG_RUNTIME_DIR and --name", []string{"ROLLOVER_SOCKET=", "XDG_RUNTIME_DIR=" + filepath.Join(dir, strings.Repeat("x", 100))}, []string{"--name", "api"},
			filepath.Join(dir, strings.Repeat("x", 100), "rollover", "api.sock")},
	} {
		want := "rollover: control socket " + src.path + " (from " + src.from + ") is " + strconv.Itoa(len(src.path)) +
			" bytes, over the 107-byte limit of a Unix socket path; pass a shorter --socket\n"
		for _, c := range commands {
			args := append(append([]string{}, src.flag...), c...)
			out, stderr, code := rolloverCLI(t, src.env, args...)
			if code != 2 || stderr != want || out != "" {
				t.Errorf("%s: rollover %s: exit %d, stdout %q, stderr %q; want exit 2 and %q", src.from, strings.Join(args, " "), code, out, stderr, want)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("a refused command left %s behind", e.Name())
	}
}

// The metrics address hint ("another coordinator there?") comes only when
// the address is taken; a port that cannot be is a usage error of its own.
func TestMetricsAddrErrors(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	app := []string{"--", filepath.Join(bin, "demoapp"), "-addr", "127.0.0.1:" + strconv.Itoa(port)}
	const hint = "another coordinator there? give each its own --metrics-addr"
	for _, tc := range []struct {
		addr string
		code int
		want string
		hint bool
	}{
		{":99999", 2, `rollover: --metrics-addr :99999: "99999" is not a port (0 to 65535; 0 picks a free one)`, false},
		{"127.0.0.1:-1", 2, `rollover: --metrics-addr 127.0.0.1:-1: "-1" is not a port`, false},
		{held.Addr().String(), 1, "rollover: metrics: listen on " + held.Addr().String() + ": address already in use (" + hint, true},
	} {
		sock := filepath.Join(testproc.ShortDir(t), "ctl.sock")
		_, stderr, code := rolloverCLI(t, nil, append([]string{"start", "--socket", sock, "--metrics-addr", tc.addr}, app...)...)
		if code != tc.code || !strings.HasPrefix(stderr, tc.want) || strings.Count(stderr, "\n") != 1 || strings.Contains(stderr, hint) != tc.hint {
			t.Errorf("start --metrics-addr %s: exit %d, stderr %q; want exit %d, one line %q…, the hint: %v", tc.addr, code, stderr, tc.code, tc.want, tc.hint)
		}
	}
}

// A start whose generation 1 fails (its port is held by a socket without
// SO_REUSEPORT) ends with one clear line, and its log says nothing about
// draining or a stop.
func TestFailedStartSaysItOnce(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0") // SO_REUSEADDR, not SO_REUSEPORT
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	sock := filepath.Join(testproc.ShortDir(t), "ctl.sock")
	_, stderr, code := rolloverCLI(t, nil, "start", "--socket", sock, "--metrics-addr", "", "--",
		filepath.Join(bin, "demoapp"), "-addr", held.Addr().String())
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	last := lines[len(lines)-1]
	if code != 1 || !strings.HasPrefix(last, "rollover: rollover failed: gen 1 exited before it was ready (exit status 1); last stderr: ") ||
		!strings.HasSuffix(last, "address already in use") {
		t.Errorf("start on a held port: exit %d, last line %q; want exit 1 and gen 1's failure with its stderr", code, last)
	}
	var bad []string
	for _, l := range lines[:len(lines)-1] {
		if regexp.MustCompile(`draining|drained|stopped:|^rollover: `).MatchString(l) {
			bad = append(bad, l)
		}
	}
	if len(bad) > 0 {
		t.Errorf("the failed start logged a drain, a stop or a second error:\n%s\nwhole stderr:\n%s", strings.Join(bad, "\n"), stderr)
	}
}
