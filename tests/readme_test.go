package tests

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// readmeBlocks are the README's fenced code blocks.
func readmeBlocks(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	parts := strings.Split(string(raw), "```")
	for i := 1; i < len(parts); i += 2 {
		_, body, _ := strings.Cut(parts[i], "\n") // drop the info string
		blocks = append(blocks, body)
	}
	return blocks
}

// helpSection is the text under title in a --help, up to the next blank
// line, dedented by two spaces.
func helpSection(help, title string) string {
	_, rest, ok := strings.Cut(help, "\n"+title+"\n")
	if !ok {
		return ""
	}
	rest, _, _ = strings.Cut(rest, "\n\n")
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(rest, "\n"), "\n") {
		lines = append(lines, strings.TrimPrefix(l, "  "))
	}
	return strings.Join(lines, "\n")
}

// Every `rollover` command line in the README's code blocks parses with the
// real binary: its command and flags exist and its values are well formed
// (--help first makes it print the command's help instead of running it;
// the CLI finds the command past the global flags, as it does for a run).
func TestReadmeExamplesParse(t *testing.T) {
	usage := regexp.MustCompile(`\nUsage:\n  rollover (\S+)`)
	n := 0
	for _, block := range readmeBlocks(t) {
		block = strings.ReplaceAll(block, "\\\n", " ")
		for _, line := range strings.Split(block, "\n") {
			line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "$ "))
			line = strings.TrimPrefix(line, "./bin/") // the quick start's
			if !strings.HasPrefix(line, "rollover ") {
				continue
			}
			line, _, _ = strings.Cut(line, " #")
			for _, stop := range []string{" > ", " | ", " < "} {
				line, _, _ = strings.Cut(line, stop)
			}
			args := strings.Fields(line)[1:]
			out, stderr, code := rolloverCLI(t, nil, append([]string{"--help"}, args...)...)
			m := usage.FindStringSubmatch("\n" + out)
			switch {
			case code != 0 || m == nil:
				t.Errorf("README's `%s` does not parse: exit %d: %s", line, code, stderr)
			case m[1] == "COMMAND" || !slices.Contains(args, m[1]):
				t.Errorf("README line %q names no command", line)
			}
			n++
		}
	}
	if n < 15 {
		t.Errorf("only %d rollover command lines found in the README", n)
	}
}

// The README's CLI section says what --help says: the commands, their
// usage lines, the flags of start and next with their defaults, and the
// exit codes.
func TestReadmeCLIMatchesHelp(t *testing.T) {
	blocks := readmeBlocks(t)
	has := func(block string) bool {
		for _, b := range blocks {
			if strings.TrimSpace(b) == strings.TrimSpace(block) {
				return true
			}
		}
		return false
	}
	root, _, _ := rolloverCLI(t, nil, "--help")
	if cmds := "Commands:\n  " + strings.ReplaceAll(helpSection(root, "Commands:"), "\n", "\n  "); !has(cmds) {
		t.Errorf("the README has no block with --help's commands:\n%s", cmds)
	}
	if exits := helpSection(root, "Exit codes:"); !has(exits) {
		t.Errorf("the README has no block with --help's exit codes:\n%s", exits)
	}
	var usage []string
	for _, c := range []string{"start", "next", "status", "rollback", "stop", "promote", "abort", "completion"} {
		help, _, _ := rolloverCLI(t, nil, c, "--help")
		usage = append(usage, helpSection(help, "Usage:"))
	}
	if !has(strings.Join(usage, "\n")) {
		t.Errorf("the README has no block with the usage lines:\n%s", strings.Join(usage, "\n"))
	}

	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	for _, c := range []string{"start", "next"} {
		help, _, _ := rolloverCLI(t, nil, c, "--help")
		flags := helpSection(help, "Flags:")
		_, table, ok := strings.Cut(readme, "`"+c+"` flags:\n")
		if !ok {
			t.Fatalf("the README has no `%s` flags table", c)
		}
		table, _, _ = strings.Cut(strings.TrimLeft(table, "\n"), "\n\n")
		rows := map[string]string{} // flag -> default column
		for _, row := range strings.Split(table, "\n") {
			cells := strings.Split(row, "|")
			if len(cells) < 4 {
				continue
			}
			for _, f := range regexp.MustCompile("`(--[a-z-]+)`").FindAllStringSubmatch(cells[1], -1) {
				rows[f[1]] = strings.TrimSpace(cells[2])
			}
		}
		for _, m := range regexp.MustCompile(`(?m)^ *(?:-\w, )?(--[a-z-]+)(?: \S+)?\s`).FindAllStringSubmatch(flags, -1) {
			if m[1] == "--help" {
				continue
			}
			def, ok := rows[m[1]]
			if !ok {
				t.Errorf("%s --help has %s, the README's table does not", c, m[1])
				continue
			}
			// The flag's help text runs to the next flag line.
			_, rest, _ := strings.Cut(flags, m[0])
			rest = regexp.MustCompile(`(?m)^ *(-\w, )?--`).Split(rest, 2)[0]
			want := ""
			if d := regexp.MustCompile(`\(default "?([^")]*)"?\)`).FindStringSubmatch(strings.Join(strings.Fields(rest), " ")); d != nil {
				want = d[1]
			}
			if want != "" && c == "start" && def != want {
				t.Errorf("README: %s default %q; start --help says %q", m[1], def, want)
			}
			delete(rows, m[1])
		}
		for f := range rows {
			t.Errorf("the README's %s table has %s, %s --help does not", c, f, c)
		}
	}
}

// The README's sample outputs come from real runs (TestReadmeOutputs): a
// block right after a line `<!-- output: NAME -->` is what the run named
// NAME printed, normalised (readmeNorm). `make readme` (go test -run
// TestReadmeOutputs ./tests/ -update) rewrites those blocks from a new run.
var updateReadme = flag.Bool("update", false, "rewrite the README's sample outputs from this run (TestReadmeOutputs)")

var outputMarker = regexp.MustCompile("(?m)^<!-- output: ([a-z0-9-]+) -->\n```[^\n]*\n")

// readmeOutputs finds each marked block: its name and the byte range of
// its body in raw.
func readmeOutputs(t *testing.T, raw string) map[string][2]int {
	t.Helper()
	blocks := map[string][2]int{}
	for _, m := range outputMarker.FindAllStringSubmatchIndex(raw, -1) {
		name := raw[m[2]:m[3]]
		end := strings.Index(raw[m[1]:], "```")
		if end < 0 {
			t.Fatalf("README: the block of output %s never ends", name)
		}
		if _, dup := blocks[name]; dup {
			t.Errorf("README: output %s is marked twice", name)
		}
		blocks[name] = [2]int{m[1], m[1] + end}
	}
	return blocks
}

// The README's quick start and sample outputs are what the commands print:
// each marked block is compared with a fresh run, and so are the messages
// quoted in its tables. The runs use short bakes and grace; the normaliser
// gives them the defaults' durations back, with fixed pids, paths, ports
// and clock times.
func TestReadmeOutputs(t *testing.T) {
	got := map[string]string{}
	var quoted []string // messages the README quotes inline
	readmeQuickStart(t, got, &quoted)
	readmeCLISamples(t, got, &quoted)

	raw, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	blocks := readmeOutputs(t, readme)
	if *updateReadme {
		names := make([]string, 0, len(blocks))
		for name := range blocks {
			names = append(names, name)
		}
		// From the end, so that the ranges before stay valid.
		sort.Slice(names, func(i, j int) bool { return blocks[names[i]][0] > blocks[names[j]][0] })
		for _, name := range names {
			if out, ok := got[name]; ok {
				b := blocks[name]
				readme = readme[:b[0]] + out + readme[b[1]:]
			}
		}
		if err := os.WriteFile("../README.md", []byte(readme), 0o644); err != nil {
			t.Fatal(err)
		}
		blocks = readmeOutputs(t, readme)
	}
	for name, want := range got {
		b, ok := blocks[name]
		switch {
		case !ok:
			t.Errorf("README has no block marked <!-- output: %s -->; it would be:\n%s", name, want)
		case readme[b[0]:b[1]] != want:
			t.Errorf("README's output %s differs from a real run (make readme rewrites it)\nREADME:\n%s\nrun:\n%s", name, readme[b[0]:b[1]], want)
		}
	}
	for name := range blocks {
		if _, ok := got[name]; !ok {
			t.Errorf("README marks an output %s that no run makes", name)
		}
	}
	for _, q := range quoted {
		if !strings.Contains(readme, "`"+q+"`") {
			t.Errorf("README does not quote what the CLI prints (fix by hand): `%s`", q)
		}
	}
}

// readmeSession runs the README's commands for one coordinator: the
// binaries as ./bin/… (or the app under other names) in a directory of
// their own, the way a reader would from a checkout.
type readmeSession struct {
	t    *testing.T
	dir  string
	env  []string
	ctl  []string // what the test's own status calls add (--socket)
	norm *readmeNorm

	coord  *exec.Cmd
	log    *syncBuffer
	exited chan struct{}
	err    error
}

// newReadmeSession makes dir/bin/rollover and, for each name, dir/NAME as
// the demo app, and runs everything in dir with env added.
func newReadmeSession(t *testing.T, norm *readmeNorm, env []string, apps ...string) *readmeSession {
	t.Helper()
	dir := testproc.ShortDir(t)
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	links := map[string]string{"bin/rollover": "rollover"}
	for _, a := range apps {
		links[a] = "demoapp"
	}
	for link, target := range links {
		if err := os.Symlink(filepath.Join(bin, target), filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	s := &readmeSession{t: t, dir: dir, norm: norm, log: &syncBuffer{}, exited: make(chan struct{}),
		env: append(append(os.Environ(), "ROLLOVER_SOCKET=", "XDG_RUNTIME_DIR="), env...)}
	t.Cleanup(s.cleanup)
	return s
}

func (s *readmeSession) command(args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.dir, "bin/rollover"), args...)
	cmd.Dir, cmd.Env = s.dir, s.env
	return cmd
}

// start runs `rollover start ARGS` in the background until generation 1
// is active.
func (s *readmeSession) start(args ...string) {
	s.t.Helper()
	s.coord = s.command(append([]string{"start"}, args...)...)
	s.coord.Stdout, s.coord.Stderr = s.log, s.log
	if err := s.coord.Start(); err != nil {
		s.t.Fatal(err)
	}
	go func() { s.err = s.coord.Wait(); close(s.exited) }()
	s.norm.pid(s.coord.Process.Pid, 0)
	s.waitStatus("generation 1 active", func(st wire.Status) bool { return st.Active == 1 })
}

// run runs `rollover ARGS` to its end.
func (s *readmeSession) run(args ...string) (stdout, stderr string, code int) {
	s.t.Helper()
	cmd := s.command(args...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		s.t.Fatalf("rollover %s still running after 30s", strings.Join(args, " "))
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		s.t.Fatal(err)
	}
	s.norm.pids(o.String() + e.String())
	return o.String(), e.String(), code
}

// must is run, failing unless the command exits 0.
func (s *readmeSession) must(args ...string) string {
	s.t.Helper()
	out, stderr, code := s.run(args...)
	if code != 0 {
		s.t.Fatalf("rollover %s: exit %d: %s", strings.Join(args, " "), code, stderr)
	}
	return out
}

// background runs `rollover ARGS` while the test goes on; wait ends it.
func (s *readmeSession) background(args ...string) (wait func() (stdout, stderr string, code int)) {
	s.t.Helper()
	cmd := s.command(args...)
	o, e := &syncBuffer{}, &syncBuffer{}
	cmd.Stdout, cmd.Stderr = o, e
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	done := make(chan struct{})
	var err error
	go func() { err = cmd.Wait(); close(done) }()
	s.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	return func() (string, string, int) {
		s.t.Helper()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			s.t.Fatalf("rollover %s still running after 30s", strings.Join(args, " "))
		}
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		s.norm.pids(o.String() + e.String())
		return o.String(), e.String(), code
	}
}

// waitStatus polls `status --json` until cond holds (10s at most); it
// records every generation's pid for the normaliser.
func (s *readmeSession) waitStatus(what string, cond func(wire.Status) bool) wire.Status {
	s.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st wire.Status
		out, _, code := s.run(append([]string{"status", "--json"}, s.ctl...)...)
		if code == 0 && json.Unmarshal([]byte(out), &st) == nil {
			for _, g := range st.Generations {
				s.norm.pid(g.PID, g.Generation)
			}
			if cond(st) {
				return st
			}
		}
		select {
		case <-s.exited:
			s.t.Fatalf("the coordinator exited (%v) before %s:\n%s", s.err, what, s.log.String())
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("no %s within 10s; last status %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop runs `rollover stop ARGS` and waits for the coordinator's exit 0.
func (s *readmeSession) stop(args ...string) {
	s.t.Helper()
	s.must(append([]string{"stop"}, args...)...)
	select {
	case <-s.exited:
	case <-time.After(20 * time.Second):
		s.t.Fatal("the coordinator is still running 20s after stop")
	}
	if s.err != nil {
		s.t.Errorf("the coordinator exited with %v, want 0", s.err)
	}
}

// cleanup kills what is left, by pid, and checks the coordinator's output.
func (s *readmeSession) cleanup() {
	if s.coord == nil {
		return
	}
	select {
	case <-s.exited:
	default:
		_ = s.coord.Process.Kill()
		<-s.exited
	}
	pids := s.norm.generationPIDs()
	for _, p := range pids {
		// Ours, not a process that took a pid since: it runs in s.dir.
		if cwd, err := os.Readlink("/proc/" + strconv.Itoa(p) + "/cwd"); err == nil && cwd == s.dir {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	}
	if left := harness.WaitGone(pids, 5*time.Second); len(left) > 0 {
		s.t.Errorf("generations left behind: %v", left)
	}
	checkOutput(s.t, "coordinator", s.log.String())
	if s.t.Failed() {
		s.t.Logf("coordinator log:\n%s", tailLines(s.log.String(), 60))
	}
}

// get fetches / from addr on a new connection: the body, or the error.
func readmeGet(addr string) (string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("http://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// The quick start at the top of the README, as a newcomer pastes it (plus
// short bakes), and the status samples of its safe activation section.
func readmeQuickStart(t *testing.T, got map[string]string, quoted *[]string) {
	norm := newReadmeNorm()
	got, quoted = norm.later(got, quoted)
	defer norm.flush()
	s := newReadmeSession(t, norm, nil, "bin/demoapp")
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	norm.replace(s.dir, "/home/you/rollover")
	norm.replace(addr, "127.0.0.1:8080")
	sock := []string{"--socket", "bin/demo.sock"}
	s.ctl = sock
	lean := []string{"--bake", "100ms", "--drain-grace", "100ms"}
	app := func(version string) []string {
		argv := []string{"--", "./bin/demoapp", "-addr", addr}
		if version != "" {
			argv = append(argv, "-version", version)
		}
		return argv
	}
	startArgs := append(append(append([]string{}, sock...), "--metrics-addr", "127.0.0.1:0"), app("")...)
	shown := func(args ...string) string { return "./bin/rollover " + strings.Join(args, " ") }
	got["quickstart-t1"] = "make build\n" + shown(append([]string{"start"}, startArgs...)...) + "\n"

	s.start(append(append(append([]string{}, sock...), "--metrics-addr", "127.0.0.1:0"), append(lean, app("")...)...)...)
	if m := regexp.MustCompile(`msg=metrics addr=http://127\.0\.0\.1:(\d+)/metrics`).FindStringSubmatch(s.log.String()); m == nil || m[1] == "0" {
		t.Errorf("the coordinator's log does not name the metrics port it bound:\n%s", s.log.String())
	}
	nextArgs := append(append([]string{"next"}, sock...), app("v2")...)
	statusArgs := append([]string{"status"}, sock...)
	curl := "curl -s http://" + addr + "/"
	got["quickstart-t2"] = shown(nextArgs...) + "\n" + curl + "\n" + shown(statusArgs...) + "\n" +
		shown(append(statusArgs, "--watch")...) + "     # live; Ctrl-C to quit\n"

	next := s.must(nextArgs...)
	body, err := readmeGet(addr)
	if err != nil {
		t.Fatal(err)
	}
	// The sample shows the request counted and its connection closed: wait
	// for both (the server closes it a moment after the client).
	s.waitStatus("gen 1 gone, the request counted and its connection closed", func(st wire.Status) bool {
		return len(st.Generations) == 1 && st.Generations[0].Stats.Requests == 1 && st.Generations[0].Stats.Connections == 0
	})
	status := s.must(statusArgs...)
	got["quickstart-output"] = "$ " + shown(nextArgs...) + "\n" + next +
		"$ " + curl + "\n" + body +
		"$ " + shown(statusArgs...) + "\n" + status

	// A bake held open, then promoted; a second rollover meanwhile is refused.
	bake := s.background(append(append([]string{"next", "--bake", "1h"}, sock...), app("v3")...)...)
	s.waitStatus("gen 3 baking, no connection open", func(st wire.Status) bool {
		return st.Baking == 3 && st.Active == 3 && !slices.ContainsFunc(st.Generations, func(g wire.GenStatus) bool { return g.Stats.Connections != 0 })
	})
	got["status-bake"] = "$ rollover status\n" + s.must(statusArgs...)
	_, refused, code := s.run(append(append([]string{"next"}, sock...), app("v4")...)...)
	if code != 1 {
		t.Errorf("a next during a bake: exit %d, want 1: %s", code, refused)
	}
	*quoted = append(*quoted, strings.TrimPrefix(strings.TrimSpace(refused), "rollover: "))
	s.must(append([]string{"promote"}, sock...)...)
	if _, stderr, code := bake(); code != 0 {
		t.Fatalf("next --bake 1h, promoted: exit %d: %s", code, stderr)
	}

	// A canary waiting at 10%, then promoted.
	canary := s.background(append(append([]string{"next", "--canary", "10%"}, sock...), app("v4")...)...)
	s.waitStatus("gen 4's canary at 10%", func(st wire.Status) bool { return st.CanaryWeight == 10 })
	got["status-canary"] = "$ rollover status\n" + s.must(statusArgs...)
	s.must(append([]string{"promote"}, sock...)...)
	if _, stderr, code := canary(); code != 0 {
		t.Fatalf("next --canary 10%%, promoted: exit %d: %s", code, stderr)
	}
	s.stop(sock...)
}

// The CLI section's samples: `next --wait`, the watch, `rollback`, a bake
// that rolls back, and the errors it quotes, with the app as ./api and
// ./api-v2 and the default socket under $XDG_RUNTIME_DIR.
func readmeCLISamples(t *testing.T, got map[string]string, quoted *[]string) {
	norm := newReadmeNorm()
	got, quoted = norm.later(got, quoted)
	defer norm.flush()
	runtimeDir := testproc.ShortDir(t)
	s := newReadmeSession(t, norm, []string{"XDG_RUNTIME_DIR=" + runtimeDir}, "api", "api-v2")
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	norm.replace(s.dir, "/home/you/api")
	norm.replace(runtimeDir, "/run/user/1000")
	norm.replace(addr, "127.0.0.1:8080")
	s.start("--bake", "100ms", "--drain-grace", "100ms", "--metrics-addr", "", "--", "./api", "-addr", addr)

	watch := startWatch(t, s)
	watch.frame(t, "the first frame", func(f string) bool { return strings.Contains(f, "active gen 1") })

	// The watch's screen during the bake (held open with --bake 1h, then
	// promoted), with the drain bar of the old generation.
	nextArgs := []string{"next", "--wait", "--", "./api-v2", "-addr", addr}
	wait := s.background(append([]string{"next", "--bake", "1h"}, nextArgs[1:]...)...)
	frame := watch.frame(t, "gen 2 baking and the rollover in the history", func(f string) bool {
		return strings.Contains(f, "baking gen 2") && regexp.MustCompile(`(?m)^1\s+\d+\s+draining .*\[#+\]`).MatchString(f) &&
			regexp.MustCompile(`(?m)^2\s+1\s+ok\s+≤\S+\s+draining `).MatchString(f)
	})
	got["watch"] = frame
	watch.stop(t)
	s.must("promote")
	out, stderr, code := wait()
	if code != 0 {
		t.Fatalf("next --wait, promoted: exit %d: %s", code, stderr)
	}
	got["next-wait"] = "$ rollover " + strings.Join(nextArgs, " ") + "\n" + out
	report := regexp.MustCompile(`(?m)^report: .*$`).FindString(out)
	if report == "" {
		t.Fatalf("next --wait printed no report line:\n%s", out)
	}
	got["report"] = report + "\n"

	out = s.must("rollback", "--wait")
	got["rollback"] = "$ rollover rollback --wait\n" + out

	// A new generation that crashes at its first request, in its bake.
	crash := s.background("next", "--bake", "1h", "--", "./api-v2", "-addr", addr, "-fail=crash")
	s.waitStatus("gen 4 baking", func(st wire.Status) bool { return st.Baking == 4 && st.Active == 4 })
	for i := 0; ; i++ {
		_, _ = readmeGet(addr) // the first one that reaches gen 4 crashes it
		if st := s.waitStatus("a status", func(wire.Status) bool { return true }); st.Active == 3 || i == 50 {
			_, stderr, code = crash()
			break
		}
	}
	if code != 1 {
		t.Errorf("next with a crashing generation: exit %d, want 1: %s", code, stderr)
	}
	got["bake-failure"] = stderr

	_, stderr, code = s.run("next", "--", "./api-v3", "-addr", addr)
	if code != 1 {
		t.Errorf("next -- ./api-v3 (missing): exit %d, want 1", code)
	}
	*quoted = append(*quoted, strings.TrimSpace(stderr))
	s.stop()
}

// readmeWatch is `rollover status --watch` on a pseudo-terminal, wide
// enough that no line is cut.
type readmeWatch struct {
	cmd    *exec.Cmd
	out    *syncBuffer
	done   chan struct{}
	master *os.File
}

func startWatch(t *testing.T, s *readmeSession) *readmeWatch {
	t.Helper()
	master, slave := openPTY(t, 400, 60)
	w := &readmeWatch{cmd: s.command("status", "--watch"), out: &syncBuffer{}, done: make(chan struct{}), master: master}
	w.cmd.Stdin, w.cmd.Stdout, w.cmd.Stderr = slave, slave, slave
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	go func() {
		_, _ = io.Copy(w.out, master)
		close(w.done)
	}()
	t.Cleanup(func() {
		_ = w.cmd.Process.Kill()
		_ = w.cmd.Wait()
		master.Close()
	})
	return w
}

// frame waits (10s at most) for a complete screen for which ok holds and
// returns it as plain text.
func (w *readmeWatch) frame(t *testing.T, what string, ok func(string) bool) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		screens := strings.Split(w.out.String(), "\x1b[H")
		for i := len(screens) - 1; i >= 0; i-- {
			// A screen is complete once it ends by clearing what is below it.
			if sc, complete := strings.CutSuffix(screens[i], "\x1b[J"); complete {
				f := strings.NewReplacer("\x1b[2J", "", "\x1b[K", "", "\r", "").Replace(sc)
				if ok(f) {
					return f
				}
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("status --watch showed no screen with %s; last output:\n%s", what, tailLines(w.out.String(), 30))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends the watch with Ctrl-C, as a person would, and checks it exits 0.
func (w *readmeWatch) stop(t *testing.T) {
	t.Helper()
	_ = w.cmd.Process.Signal(syscall.SIGINT)
	if err := w.cmd.Wait(); err != nil {
		t.Errorf("status --watch after Ctrl-C: %v, want exit 0", err)
	}
}

// openPTY opens a pseudo-terminal of cols × rows: the master for the test
// to read, the slave for the command.
func openPTY(t *testing.T, cols, rows uint16) (master, slave *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	var n uint32
	rc, err := master.SyscallConn()
	if err == nil {
		ctlErr := rc.Control(func(fd uintptr) {
			if err = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); err == nil {
				n, err = unix.IoctlGetUint32(int(fd), unix.TIOCGPTN)
			}
		})
		err = errors.Join(err, ctlErr)
	}
	if err != nil {
		master.Close()
		t.Fatalf("unlock the pseudo-terminal: %v", err)
	}
	slave, err = os.OpenFile("/dev/pts/"+strconv.Itoa(int(n)), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		t.Fatal(err)
	}
	if err := unix.IoctlSetWinsize(int(slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Col: cols, Row: rows}); err != nil {
		t.Fatal(err)
	}
	return master, slave
}

// readmeNorm makes a run's output the README's: fixed paths, ports, pids
// (the coordinator 5000, generation N 50N0), clock times and durations (as
// a run with the default bake and grace would show them), aligned again
// where they sit in a table.
type readmeNorm struct {
	out, raw          map[string]string
	quoted, rawQuoted *[]string

	substs []string       // old, new pairs
	pidOf  map[int]string // real pid -> shown
	gens   map[int]int    // real pid -> generation (0: the coordinator)
}

func newReadmeNorm() *readmeNorm {
	return &readmeNorm{pidOf: map[int]string{}, gens: map[int]int{}}
}

func (n *readmeNorm) replace(old, new string) { n.substs = append(n.substs, old, new) }

// later gives a scenario maps to fill with raw output; flush normalises it
// into out and quoted once every pid is known.
func (n *readmeNorm) later(out map[string]string, quoted *[]string) (map[string]string, *[]string) {
	n.out, n.quoted = out, quoted
	n.raw, n.rawQuoted = map[string]string{}, &[]string{}
	return n.raw, n.rawQuoted
}

func (n *readmeNorm) flush() {
	for k, v := range n.raw {
		n.out[k] = n.text(v)
	}
	for _, q := range *n.rawQuoted {
		*n.quoted = append(*n.quoted, n.text(q))
	}
}

// pid records the pid of generation gen (0: the coordinator).
func (n *readmeNorm) pid(pid, gen int) {
	if pid > 0 {
		n.pidOf[pid] = strconv.Itoa(5000 + 10*gen)
		n.gens[pid] = gen
	}
}

var startedPID = regexp.MustCompile(`started gen (\d+) \(pid (\d+)\)`)

// pids records the generations an output names as started.
func (n *readmeNorm) pids(out string) {
	for _, m := range startedPID.FindAllStringSubmatch(out, -1) {
		gen, _ := strconv.Atoi(m[1])
		pid, _ := strconv.Atoi(m[2])
		n.pid(pid, gen)
	}
}

func (n *readmeNorm) generationPIDs() []int {
	var out []int
	for p, g := range n.gens {
		if g > 0 {
			out = append(out, p)
		}
	}
	return out
}

// Durations as a run with the defaults shows them.
var (
	normBake  = coordinator.DefaultBake
	normGrace = coordinator.DefaultDrainGrace
	normRules = []struct {
		re  *regexp.Regexp
		new string
	}{
		{regexp.MustCompile(`ready after \d+ms`), "ready after 4ms"},
		{regexp.MustCompile(`(baking gen \d+ for )[\d.hms]+`), "${1}" + normBake.String()},
		{regexp.MustCompile(`(baking gen \d+ )\([\d.hms]+ left\)`), "${1}(4.2s left)"},
		{regexp.MustCompile(`(gen \d+ drained after )\d+ms`), fmt.Sprintf("${1}%dms", (normGrace + 4*time.Millisecond).Milliseconds())},
		{regexp.MustCompile(` over \d+ms: `), fmt.Sprintf(" over %dms: ", (normBake + normGrace + 11*time.Millisecond).Milliseconds())},
		{regexp.MustCompile(`\d+(\.\d+)?m?s after activation \(during the \S+ bake\)`), "0.4s after activation (during the " + normBake.String() + " bake)"},
		{regexp.MustCompile(`\b(ListenDrops|ListenOverflows|TCPAbortOnClose|TCPMigrateReqFailure|TCPMigrateReqSuccess) \d+`), "$1 0"},
		{regexp.MustCompile(`tcp_migrate_req=\d`), "tcp_migrate_req=0"},
		{regexp.MustCompile(`\b\d\d:\d\d:\d\d\b`), "08:22:26"},
	}
	// In the watch's history, to within its polls.
	normReady = "≤25ms"
	normDrain = "≤" + (normGrace + 100*time.Millisecond).String()
)

// text normalises s, line by line, realigning tables (a header line
// starting "GEN  ", its rows up to a blank line).
func (n *readmeNorm) text(s string) string {
	lines := strings.Split(s, "\n")
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "GEN  ") {
			lines[i] = n.line(lines[i])
			continue
		}
		j := i + 1
		for j < len(lines) && strings.TrimSpace(lines[j]) != "" {
			j++
		}
		copy(lines[i:j], n.table(lines[i:j]))
		i = j - 1
	}
	return strings.Join(lines, "\n")
}

func (n *readmeNorm) line(s string) string {
	for i := 0; i < len(n.substs); i += 2 {
		s = strings.ReplaceAll(s, n.substs[i], n.substs[i+1])
	}
	s = regexp.MustCompile(`\b\d+\b`).ReplaceAllStringFunc(s, func(w string) string {
		if p, err := strconv.Atoi(w); err == nil {
			if shown, ok := n.pidOf[p]; ok {
				return shown
			}
		}
		return w
	})
	for _, r := range normRules {
		s = r.re.ReplaceAllString(s, r.new)
	}
	return s
}

// table cuts rows into cells at the header's columns (tabwriter starts
// every cell of a column at the same rune), normalises each cell, and
// aligns them again as the CLI does.
func (n *readmeNorm) table(rows []string) []string {
	header := []rune(rows[0])
	var starts []int
	for i, r := range header {
		if r != ' ' && (i == 0 || (i >= 2 && header[i-1] == ' ' && header[i-2] == ' ')) {
			starts = append(starts, i)
		}
	}
	names := strings.Fields(rows[0])
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	for ri, row := range rows {
		r := []rune(row)
		var cells []string
		for ci, st := range starts {
			end := len(r)
			if ci+1 < len(starts) {
				end = min(starts[ci+1], len(r))
			}
			cell := ""
			if st < len(r) {
				cell = strings.TrimSpace(string(r[st:end]))
			}
			if ri > 0 && ci < len(names) {
				switch names[ci] {
				case "UPTIME", "AGE":
					cell = "1m05s"
					if ri == len(rows)-1 {
						cell = "3s"
					}
				case "READY":
					if strings.HasPrefix(cell, "≤") {
						cell = normReady
					}
				case "DRAIN":
					switch {
					case strings.HasPrefix(cell, "≤"):
						cell = normDrain
					case strings.HasPrefix(cell, "draining "):
						cell = "draining 1.2s"
					}
				}
			}
			cells = append(cells, n.line(cell))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	_ = tw.Flush()
	return strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
}
