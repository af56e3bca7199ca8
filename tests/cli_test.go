package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// rolloverCLI runs the rollover binary and returns its stdout, stderr and
// exit code. env adds to the test's environment.
func rolloverCLI(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "rollover"), args...)
	cmd.Env = append(os.Environ(), env...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("rollover %s: %v", strings.Join(args, " "), err)
	}
	return o.String(), e.String(), code
}

var commands = []string{"start", "next", "status", "rollback", "stop", "completion", "version", "help"}

// Every command's help is on stdout with exit 0, the same for `CMD --help`,
// `CMD -h` and `help CMD`, with a usage line, flags as --flag, exit codes,
// and, for the commands that start or steer the coordinator, its signals.
func TestCLIHelp(t *testing.T) {
	root, stderr, code := rolloverCLI(t, nil, "--help")
	if code != 0 || stderr != "" {
		t.Fatalf("rollover --help: exit %d, stderr %q", code, stderr)
	}
	for _, c := range commands {
		if !regexp.MustCompile(`(?m)^  ` + c + ` +\S`).MatchString(root) {
			t.Errorf("rollover --help does not list %s:\n%s", c, root)
		}
	}
	for _, want := range []string{"Usage:\n  rollover COMMAND [flags]", "Exit codes:\n  0  ok", "3  no coordinator", "Signals to the coordinator:", "SIGHUP, SIGUSR2", "--name NAME", "--socket PATH"} {
		if !strings.Contains(root, want) {
			t.Errorf("rollover --help lacks %q", want)
		}
	}
	for _, c := range commands {
		t.Run(c, func(t *testing.T) {
			out, stderr, code := rolloverCLI(t, nil, c, "--help")
			if code != 0 || stderr != "" {
				t.Fatalf("rollover %s --help: exit %d, stderr %q", c, code, stderr)
			}
			for _, alt := range [][]string{{c, "-h"}, {"help", c}, {"--name", "x", c, "--help"}} {
				if o, e, code := rolloverCLI(t, nil, alt...); code != 0 || e != "" || o != out {
					t.Errorf("rollover %s: exit %d, stderr %q, and not the same as %s --help:\n%s", strings.Join(alt, " "), code, e, c, o)
				}
			}
			if !strings.Contains(out, "Usage:\n  rollover "+c) {
				t.Errorf("no usage line for %s:\n%s", c, out)
			}
			if !strings.Contains(out, "Exit codes:\n  0  ") {
				t.Errorf("no exit codes for %s:\n%s", c, out)
			}
			if c != "help" && c != "version" && !strings.Contains(out, "Examples:\n  rollover ") {
				t.Errorf("no examples for %s:\n%s", c, out)
			}
			if (c == "start" || c == "next") && !strings.Contains(out, "SIGINT, SIGTERM   stop") {
				t.Errorf("%s --help does not list the coordinator's signals:\n%s", c, out)
			}
			// Flags, in the flag sections, all as --flag.
			flags := out[strings.Index(out, "\nFlags:")+1:]
			flags = flags[:strings.Index(flags, "\nExit codes:")]
			for _, line := range strings.Split(flags, "\n") {
				if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "-") && !strings.HasPrefix(f[0], "--") && f[0] != "-h," && f[0] != "-w," {
					t.Errorf("%s --help shows a flag as %q, not --flag", c, f[0])
				}
			}
			for _, l := range []string{"--help", "--name", "--socket"} {
				if !strings.Contains(flags, l) {
					t.Errorf("%s --help does not list %s", c, l)
				}
			}
		})
	}
	// The flags a command takes are in its help.
	start, _, _ := rolloverCLI(t, nil, "start", "--help")
	for _, f := range []string{"--ready-timeout", "--drain-timeout", "--drain-grace", "--kill-grace", "--metrics-addr", "--log-format", "--ready", "--addr", "--drain-signal", "--instances", "--adopt-wait", "--adopt-timeout"} {
		if !strings.Contains(start, "      "+f+" ") {
			t.Errorf("start --help does not list %s", f)
		}
	}
	next, _, _ := rolloverCLI(t, nil, "next", "--help")
	for _, f := range []string{"--wait", "--json", "--expect-generation", "--ready", "--addr", "--drain-signal", "--instances"} {
		if !strings.Contains(next, "      "+f+" ") {
			t.Errorf("next --help does not list %s", f)
		}
	}
	if v, _, code := rolloverCLI(t, nil, "version"); code != 0 || !strings.HasPrefix(v, "rollover ") {
		t.Errorf("version: exit %d, %q", code, v)
	}
}

// Usage errors: one line on stderr, "rollover: …", exit 2, nothing on
// stdout; no coordinator: exit 3. Global flags go before or after the
// command.
func TestCLIUsageErrors(t *testing.T) {
	dir := testproc.ShortDir(t)
	nosock := filepath.Join(dir, "none.sock")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "no command given"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"stauts", "--json"}, 2, `unknown command "stauts"; did you mean "start" or "status"?`},
		{[]string{"--bogus", "status"}, 2, "unknown flag: --bogus"},
		{[]string{"next", "--bogus"}, 2, "unknown flag: --bogus"},
		{[]string{"status", "-name", "x"}, 2, "-name: long flags take two dashes: --name"},
		{[]string{"stop", "extra-arg"}, 2, `rollover stop takes no arguments, got "extra-arg"`},
		{[]string{"status", "extra"}, 2, "takes no arguments"},
		{[]string{"rollback", "--", "./api"}, 2, "takes no arguments"},
		{[]string{"version", "x"}, 2, "takes no arguments"},
		{[]string{"start"}, 2, "start needs a command"},
		{[]string{"start", "--ready-timeout", "-1s", "--", "true"}, 2, "--ready-timeout must be a positive duration"},
		{[]string{"start", "--drain-timeout", "0", "--", "true"}, 2, "--drain-timeout must be a positive duration"},
		{[]string{"start", "--kill-grace", "0s", "--", "true"}, 2, "--kill-grace must be a positive duration"},
		{[]string{"start", "--drain-grace", "-1ms", "--", "true"}, 2, "--drain-grace must not be negative"},
		{[]string{"start", "--ready-timeout", "soon", "--", "true"}, 2, `invalid argument "soon" for "--ready-timeout"`},
		{[]string{"start", "--log-format", "xml", "--", "true"}, 2, "--log-format must be text or json"},
		{[]string{"start", "--metrics-addr", "9754", "--", "true"}, 2, "--metrics-addr must be HOST:PORT"},
		{[]string{"start", "--ready", "sometimes", "--", "true"}, 2, "--ready must be library, notify or listen"},
		{[]string{"start", "--instances", "65", "--", "true"}, 2, "--instances must be 1 to 64, not 65"},
		{[]string{"next", "--instances", "-1"}, 2, "--instances must be 1 to 64, not -1"},
		{[]string{"next", "--expect-generation", "-3"}, 2, "--expect-generation must be a generation number"},
		{[]string{"next", "--addr", "8080"}, 2, "--addr must be HOST:PORT"},
		{[]string{"status", "--interval", "1s"}, 2, "--interval goes with --watch"},
		{[]string{"status", "--watch", "--interval", "0s"}, 2, "--interval must be a positive duration"},
		{[]string{"--name", "a/b", "status"}, 2, "--name must be a non-empty name without '/'"},
		{[]string{"completion"}, 2, "completion takes one shell"},
		{[]string{"completion", "tcsh"}, 2, "completion takes one shell"},
		{[]string{"help", "nope"}, 2, `no help for "nope"`},
		{[]string{"--socket", nosock, "status"}, 3, "no coordinator at " + nosock},
		{[]string{"status", "--socket", nosock}, 3, "no coordinator at " + nosock},
		{[]string{"--socket", nosock, "stop"}, 3, "no coordinator at " + nosock},
		{[]string{"--socket", nosock, "rollback"}, 3, "no coordinator at " + nosock},
		{[]string{"--socket", nosock, "status", "--watch"}, 3, "no coordinator at " + nosock},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, stderr, code := rolloverCLI(t, nil, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tc.code, stderr)
			}
			if out != "" {
				t.Errorf("stdout %q, want nothing", out)
			}
			if strings.Count(stderr, "\n") != 1 || !strings.HasPrefix(stderr, "rollover: ") || !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q, want one line `rollover: …%s…`", stderr, tc.want)
			}
		})
	}
}

// The completion scripts load in their shells, and completion queries
// answer with the commands and flag values.
func TestCLICompletion(t *testing.T) {
	bash := needTool(t, "bash")
	rb := filepath.Join(bin, "rollover")
	out, stderr, code := rolloverCLI(t, nil, "__complete", "st")
	if code != 0 || !strings.Contains(out, "start\t") || !strings.Contains(out, "status\t") || !strings.Contains(out, "stop\t") || strings.Contains(out, "next") {
		t.Errorf("__complete st: exit %d, %q %q", code, out, stderr)
	}
	out, _, _ = rolloverCLI(t, nil, "__complete", "start", "--log-format", "")
	if !strings.HasPrefix(out, "text\njson\n:4") {
		t.Errorf("__complete start --log-format '': %q, want text, json, no files", out)
	}
	out, _, _ = rolloverCLI(t, nil, "__complete", "--socket", "/x", "next", "--re")
	if !strings.Contains(out, "--ready") {
		t.Errorf("__complete next --re after a global flag: %q", out)
	}

	// In bash, as a user would have it: the script sourced, then the
	// completion function called for `rollover st<TAB>`.
	bashCompletion := "/usr/share/bash-completion/bash_completion"
	if _, err := os.Stat(bashCompletion); err != nil {
		if inCI() {
			t.Fatalf("bash-completion is required in CI (install it in .ci/run): %v", err)
		}
		t.Skipf("skipping: bash-completion not installed")
	}
	script := fmt.Sprintf(`set -e
source %[2]s
source <(%[1]q completion bash)
complete -p rollover
# compopt works only inside a completion that readline started.
compopt() { :; }
COMP_WORDS=(rollover st); COMP_CWORD=1; COMP_LINE="rollover st"; COMP_POINT=${#COMP_LINE}
__start_rollover rollover st rollover
echo "words: ${COMPREPLY[*]}"
COMP_WORDS=(rollover status --w); COMP_CWORD=2; COMP_LINE="rollover status --w"; COMP_POINT=${#COMP_LINE}
__start_rollover rollover --w status
echo "flags: ${COMPREPLY[*]}"
`, rb, bashCompletion)
	cmd := exec.Command(bash, "--norc", "--noprofile", "-c", script)
	cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
	got, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bash: %v\n%s", err, got)
	}
	for _, want := range []string{"complete -o default -F __start_rollover rollover", "words: start status stop", "flags: --watch"} {
		if !strings.Contains(string(got), want) {
			t.Errorf("bash completion output lacks %q:\n%s", want, got)
		}
	}

	for _, sh := range []struct{ shell, check string }{{"zsh", "-n"}, {"fish", "--no-execute"}} {
		t.Run(sh.shell, func(t *testing.T) {
			path := needTool(t, sh.shell)
			f := filepath.Join(t.TempDir(), "completion")
			out, _, code := rolloverCLI(t, nil, "completion", sh.shell)
			if code != 0 || !strings.Contains(out, "rollover") {
				t.Fatalf("completion %s: exit %d", sh.shell, code)
			}
			if err := os.WriteFile(f, []byte(out), 0o644); err != nil {
				t.Fatal(err)
			}
			if got, err := exec.Command(path, sh.check, f).CombinedOutput(); err != nil {
				t.Errorf("%s %s: %v\n%s", sh.shell, sh.check, err, got)
			}
		})
	}
}

// make install puts the binary and the completion files under DESTDIR and
// PREFIX, the GNU way.
func TestMakeInstall(t *testing.T) {
	mk := needTool(t, "make")
	dest := t.TempDir()
	cmd := exec.Command(mk, "-C", "..", "install", "DESTDIR="+dest, "PREFIX=/opt/ro")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	want := map[string]os.FileMode{
		"/opt/ro/bin/rollover":                                  0o755,
		"/opt/ro/share/bash-completion/completions/rollover":    0o644,
		"/opt/ro/share/zsh/site-functions/_rollover":            0o644,
		"/opt/ro/share/fish/vendor_completions.d/rollover.fish": 0o644,
	}
	for p, mode := range want {
		fi, err := os.Stat(filepath.Join(dest, p))
		if err != nil {
			t.Errorf("make install did not make %s: %v", p, err)
			continue
		}
		if fi.Mode().Perm() != mode || fi.Size() == 0 {
			t.Errorf("%s: mode %v, size %d; want %v, not empty", p, fi.Mode().Perm(), fi.Size(), mode)
		}
	}
	out, err := exec.Command(filepath.Join(dest, "/opt/ro/bin/rollover"), "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "rollover ") {
		t.Errorf("installed rollover version: %v %q", err, out)
	}
	bashComp, _ := os.ReadFile(filepath.Join(dest, "/opt/ro/share/bash-completion/completions/rollover"))
	if !strings.Contains(string(bashComp), "__start_rollover") {
		t.Errorf("the installed bash completion is not rollover's")
	}
}

// logLines splits a coordinator's JSON log into objects, failing on a line
// that is not JSON.
func logLines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Errorf("log line is not JSON: %q", sc.Text())
			continue
		}
		lines = append(lines, m)
	}
	return lines
}

// A rollover started from the CLI is logged in full by the coordinator,
// with gen and pid fields, and durations in JSON are seconds (keys ending
// in _s), not nanoseconds.
func TestCLIRolloverLogs(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			out := &syncBuffer{}
			svc := startLoggedService(t, out, "--log-format", format)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			r, err := svc.Next(ctx, "v2", true)
			if err != nil {
				t.Fatal(err)
			}
			if err := svc.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			log := out.String()
			if format == "text" {
				for _, want := range []string{
					fmt.Sprintf(`msg="started gen 2 (pid %d)" phase=started gen=2 pid=%d`, r.PID, r.PID),
					`msg="ready after `, `msg="gen 2 active" phase=active gen=2`,
					`msg="draining gen 1: `, `msg="gen 1 left the port"`,
					`msg="generation drained" gen=1 pid=`, `msg="draining 1 generation (max 10s; Ctrl-C again to force)" generations=1 drain_timeout=10s`,
				} {
					if !strings.Contains(log, want) {
						t.Errorf("text log lacks %q:\n%s", want, log)
					}
				}
				if !regexp.MustCompile(`msg="generation drained" gen=1 pid=\d+ after=\d+ms`).MatchString(log) {
					t.Errorf("text log has no `after=…ms` on the drain:\n%s", log)
				}
				return
			}
			lines := logLines(t, log)
			find := func(msg string) map[string]any {
				for _, l := range lines {
					if s, _ := l["msg"].(string); strings.HasPrefix(s, msg) {
						return l
					}
				}
				t.Errorf("JSON log has no %q line:\n%s", msg, log)
				return map[string]any{}
			}
			started := find("started gen 2 (pid")
			if started["gen"] != 2.0 || started["pid"] != float64(r.PID) {
				t.Errorf("started line %v: want gen 2, pid %d", started, r.PID)
			}
			if l := find("gen 2 active"); l["gen"] != 2.0 {
				t.Errorf("active line %v: want gen 2", l)
			}
			drained := find("generation drained")
			if s, ok := drained["after_s"].(float64); !ok || s <= 0 || s > 10 {
				t.Errorf("drained line %v: want after_s in seconds", drained)
			}
			if s, ok := find("draining 1 generation")["drain_timeout_s"].(float64); !ok || s != 10 {
				t.Errorf("draining line: drain_timeout_s %v, want 10", s)
			}
			for _, l := range lines {
				for k, v := range l {
					if f, ok := v.(float64); ok && f >= 1e6 && k != "pid" {
						t.Errorf("log field %s=%v looks like nanoseconds: %v", k, f, l)
					}
					if k == "after" || k == "drain_timeout" || k == "delay" || k == "uptime" || k == "up_to" {
						t.Errorf("duration field %q without its unit in the key: %v", k, l)
					}
				}
			}
		})
	}
}

// startLoggedService is startService with extra start flags and the
// coordinator's output kept in out.
func startLoggedService(t *testing.T, out *syncBuffer, flags ...string) *harness.Service {
	t.Helper()
	return startServiceLog(t, harness.Config{StartFlags: flags}, out, false)
}

// holdConns opens n keep-alive connections to addr, each after one
// request, and keeps them open until closed: during a drain they count as
// the old generation's connections.
func holdConns(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for range n {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		conns = append(conns, c)
	}
	return conns
}

// Stopping by signal: the first SIGINT logs the drain at once and waits;
// the second forces it (SIGTERM to the generations); the coordinator then
// exits 1, since a generation was killed, and leaves nothing behind.
func TestSecondSignalForcesStop(t *testing.T) {
	out := &syncBuffer{}
	svc := startLoggedService(t, out, "--drain-timeout", "1m")
	holdConns(t, svc.Addr, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := svc.Status(ctx); err != nil { // record the pids
		t.Fatal(err)
	}
	if err := svc.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	testproc.WaitFor(t, 5*time.Second, "the draining line", func() bool {
		return strings.Contains(out.String(), "draining 1 generation (max 1m0s; Ctrl-C again to force)")
	})
	select {
	case <-svc.Exited():
		t.Fatalf("coordinator exited before the held connection closed:\n%s", out.String())
	default:
	}
	if left := harness.Alive(svc.PIDs()); len(left) != 1 {
		t.Fatalf("generation gone before the second signal: %v", left)
	}
	if err := svc.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-svc.Exited():
	case <-time.After(20 * time.Second):
		t.Fatalf("coordinator still running 20s after the second SIGINT:\n%s", out.String())
	}
	if code := svc.ExitCode(); code != 1 {
		t.Errorf("exit code %d after a forced stop, want 1", code)
	}
	if left := harness.WaitGone(svc.PIDs(), 5*time.Second); len(left) > 0 {
		t.Errorf("generations left: %v", left)
	}
	if !strings.Contains(out.String(), "forcing the stop") {
		t.Errorf("no `forcing the stop` line in the log:\n%s", out.String())
	}
}

// A generation that ignores SIGTERM survives the second signal, and the
// third SIGKILLs it at once (well before --kill-grace).
func TestThirdSignalKills(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := testproc.FreeAddr(t)
	out := &syncBuffer{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	co, err := startForeignCoordinator(ctx, filepath.Join(bin, "rollover"), testproc.ShortDir(t),
		[]string{"--ready=listen", "--addr", addr, "--drain-timeout", "1m", "--kill-grace", "1m"},
		[]string{"/usr/bin/env", "ROLLOVER_TEST_BIN=" + bin, "IGNORE_TERM_HELPER_ADDR=" + addr, exe, "-test.run=^TestIgnoreTermHelper$", "-test.count=1"}, out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	var gens []int
	t.Cleanup(func() {
		co.kill()
		// The helper ignores SIGTERM: a test that failed before the third
		// signal would leave it behind.
		for _, pid := range harness.Alive(gens) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("cleanup: killed the generation (pid %d)", pid)
		}
		checkOutput(t, "coordinator", out.String())
		if t.Failed() {
			t.Logf("coordinator log:\n%s", tailLines(out.String(), 60))
		}
	})
	gens = co.pids()
	if len(gens) != 1 {
		t.Fatalf("generations %v, want 1", gens)
	}
	testproc.WaitFor(t, 10*time.Second, "the helper to ignore SIGTERM", func() bool { return ignoresTerm(gens[0]) })
	steps := []struct {
		log  string
		gone bool
	}{
		{"draining 1 generation", false},
		{"forcing the stop: SIGTERM", false},
		{"forcing the stop: SIGKILL", true},
	}
	for i, s := range steps {
		if err := co.cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		testproc.WaitFor(t, 10*time.Second, fmt.Sprintf("%q after SIGINT %d", s.log, i+1), func() bool { return strings.Contains(out.String(), s.log) })
		if s.gone {
			break
		}
		select {
		case <-co.exited:
			t.Fatalf("coordinator exited after SIGINT %d", i+1)
		default:
		}
		if len(harness.Alive(gens)) != 1 {
			t.Fatalf("the generation is gone after SIGINT %d", i+1)
		}
	}
	select {
	case <-co.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("coordinator still running 20s after the third SIGINT")
	}
	var ee *exec.ExitError
	if !errors.As(co.exitErr, &ee) || ee.ExitCode() != 1 {
		t.Errorf("coordinator exit %v, want exit status 1", co.exitErr)
	}
	if left := harness.WaitGone(gens, 5*time.Second); len(left) > 0 {
		t.Errorf("generations left: %v", left)
	}
}

// ignoresTerm reports whether pid ignores SIGTERM (SigIgn in its status).
func ignoresTerm(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<(uint(syscall.SIGTERM)-1)) != 0
		}
	}
	return false
}

// TestIgnoreTermHelper is a generation for TestThirdSignalKills: it ignores
// SIGTERM and listens on $IGNORE_TERM_HELPER_ADDR (--ready=listen) until
// killed.
func TestIgnoreTermHelper(t *testing.T) {
	addr := os.Getenv("IGNORE_TERM_HELPER_ADDR")
	if addr == "" {
		t.Skip("helper for TestThirdSignalKills")
	}
	signal.Ignore(syscall.SIGTERM)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
}

// A second coordinator whose metrics address is taken fails with one line
// naming --metrics-addr, and leaves no socket (nor state file) behind.
func TestFailedStartLeavesNoSocket(t *testing.T) {
	svc := startService(t, harness.Config{Metrics: true})
	dir := testproc.ShortDir(t)
	sock := filepath.Join(dir, "two.sock")
	port := freePort(t)
	_, stderr, code := rolloverCLI(t, nil, "start", "--socket", sock, "--metrics-addr", svc.MetricsAddr, "--",
		filepath.Join(bin, "demoapp"), "-addr", "127.0.0.1:"+strconv.Itoa(port))
	if code != 1 || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "rollover: metrics: listen on "+svc.MetricsAddr) || !strings.Contains(stderr, "--metrics-addr") {
		t.Errorf("second start on a taken metrics address: exit %d, stderr %q; want exit 1, one line naming --metrics-addr", code, stderr)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("the failed start left %s behind", e.Name())
	}
	if _, stderr, code := rolloverCLI(t, nil, "status", "--socket", sock); code != 3 || !strings.Contains(stderr, "no such file or directory") {
		t.Errorf("status on the failed start's socket: exit %d, %q; want exit 3, no such file", code, stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// Two coordinators side by side, as the README and deploy/ set them up:
// distinct --name (so distinct sockets under $XDG_RUNTIME_DIR/rollover)
// and distinct --metrics-addr; each CLI command reaches its own by name.
func TestTwoCoordinatorsByName(t *testing.T) {
	runtimeDir := testproc.ShortDir(t)
	env := []string{"XDG_RUNTIME_DIR=" + runtimeDir}
	type coord struct {
		name, addr, metrics string
		cmd                 *exec.Cmd
		out                 *syncBuffer
		exited              chan struct{}
	}
	var coords []*coord
	for _, name := range []string{"one", "two"} {
		p1 := freePort(t)
		p2 := freePort(t)
		c := &coord{name: name, addr: "127.0.0.1:" + strconv.Itoa(p1), metrics: "127.0.0.1:" + strconv.Itoa(p2), out: &syncBuffer{}, exited: make(chan struct{})}
		c.cmd = exec.Command(filepath.Join(bin, "rollover"), "--name", name, "start", "--metrics-addr", c.metrics,
			"--drain-grace", "100ms", "--", filepath.Join(bin, "demoapp"), "-addr", c.addr, "-version", name)
		c.cmd.Env = append(os.Environ(), env...)
		c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
		if err := c.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = c.cmd.Wait(); close(c.exited) }()
		var gens []int
		t.Cleanup(func() {
			select {
			case <-c.exited:
			default:
				_ = c.cmd.Process.Kill()
				<-c.exited
				for _, p := range gens {
					_ = syscall.Kill(p, syscall.SIGKILL)
				}
			}
			if left := harness.WaitGone(append(gens, c.cmd.Process.Pid), 5*time.Second); len(left) > 0 {
				t.Errorf("processes left behind: %v", left)
			}
			checkOutput(t, "coordinator "+c.name, c.out.String())
			if t.Failed() {
				t.Logf("coordinator %s:\n%s", c.name, tailLines(c.out.String(), 40))
			}
		})
		testproc.WaitFor(t, 20*time.Second, "coordinator "+name, func() bool {
			out, _, code := rolloverCLI(t, env, "status", "--json", "--name", name)
			var st struct {
				Socket      string `json:"socket"`
				Active      int    `json:"active"`
				Generations []struct {
					PID int `json:"pid"`
				} `json:"generations"`
			}
			if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Active == 0 {
				return false
			}
			for _, g := range st.Generations {
				gens = append(gens, g.PID)
			}
			if want := filepath.Join(runtimeDir, "rollover", name+".sock"); st.Socket != want {
				t.Errorf("coordinator %s on %s, want %s", name, st.Socket, want)
			}
			return true
		})
		coords = append(coords, c)
	}
	for _, c := range coords {
		resp, err := http.Get("http://" + c.metrics + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), `rollover_active_generation 1`) {
			t.Errorf("metrics of %s lack rollover_active_generation 1", c.name)
		}
		if out, stderr, code := rolloverCLI(t, env, "--name", c.name, "next", "--wait", "--", filepath.Join(bin, "demoapp"), "-addr", c.addr, "-version", c.name+"2"); code != 0 || !strings.Contains(out, "gen 2 active") {
			t.Errorf("next --name %s: exit %d: %s %s", c.name, code, out, stderr)
		}
	}
	for _, c := range coords {
		if _, stderr, code := rolloverCLI(t, env, "stop", "--name", c.name); code != 0 {
			t.Errorf("stop --name %s: exit %d %s", c.name, code, stderr)
		}
		<-c.exited
		if _, err := os.Stat(filepath.Join(runtimeDir, "rollover", c.name+".sock")); !os.IsNotExist(err) {
			t.Errorf("socket of %s left after stop: %v", c.name, err)
		}
	}
}

// Another user gets exit 1 and "permission denied: uid …", the README's
// line, even though the 0600 socket in its 0700 directory refuses the
// connection before the coordinator can say it.
func TestOtherUserPermissionDenied(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the CLI as another user")
	}
	svc := startService(t, harness.Config{})
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"status"}, {"next"}, {"stop"}} {
		cmd := exec.Command(filepath.Join(bin, "rollover"), append(args, "--socket", svc.Socket)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.HasPrefix(string(out), "rollover: permission denied: uid 65534 is not the coordinator's uid 0") {
			t.Errorf("%s as uid 65534: %v: %q; want exit 1, permission denied", args[0], err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if st, err := svc.Status(ctx); err != nil || st.Active != 1 {
		t.Fatalf("status %+v %v", st, err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}
