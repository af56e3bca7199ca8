// Package tests holds the end-to-end tests: the real rollover, demoapp and
// rollover-stress binaries, built once per run, real processes, real load on
// loopback, real rollovers, every failed request counted.
package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// bin holds the binaries built for this run.
var bin string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	// A test re-running this binary as a helper passes the binaries it built.
	if b := os.Getenv("ROLLOVER_TEST_BIN"); b != "" {
		bin = b
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "rollover-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	args := []string{"build", "-o", dir + "/"}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "../cmd/rollover", "../cmd/demoapp", "../cmd/demodns", "../cmd/rollover-stress", "./protoapp")
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "build binaries: %v\n", err)
		return 1
	}
	bin = dir
	// Race-enabled binaries otherwise sleep a second at exit, which would
	// count as rollover time.
	os.Setenv("GORACE", "atexit_sleep_ms=0")
	return m.Run()
}

// inCI reports whether the suite runs in CI, where missing tools fail tests
// instead of skipping them.
func inCI() bool { return os.Getenv("CI") != "" }

// needTool skips (outside CI) or fails (in CI) when a tool is missing.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if inCI() {
			t.Fatalf("%s is required in CI (install it in .ci/run): %v", name, err)
		}
		t.Skipf("skipping: %s not installed", name)
	}
	return p
}

// helperCommand is the command that runs this test binary's helper test
// name, bounded by timeout, under prefix (the command that makes its
// network namespace, see unshareArgs), with ROLLOVER_TEST_BIN (the binaries
// of this run, so that the helper need not build them again) and env. The
// helper cleans up on SIGTERM, which it gets when ctx ends, and is killed
// 30s later. Its output goes to out.
func helperCommand(t *testing.T, ctx context.Context, prefix []string, name string, timeout time.Duration, env ...string) (cmd *exec.Cmd, out *syncBuffer) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := append(slices.Clone(prefix[1:]), exe, "-test.run=^"+name+"$", "-test.count=1", "-test.v", "-test.timeout="+timeout.String())
	cmd = exec.CommandContext(ctx, prefix[0], args...)
	cmd.Env = append(append(os.Environ(), "ROLLOVER_TEST_BIN="+bin), env...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	out = &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	return cmd, out
}

// unshareArgs returns the command prefix that runs a program in a fresh
// network namespace, or skips/fails when namespaces are unavailable.
func unshareArgs(t *testing.T) []string {
	t.Helper()
	needTool(t, "ip")
	unshare := needTool(t, "unshare")
	prefix := []string{unshare, "-n", "--"}
	if os.Geteuid() != 0 {
		prefix = []string{unshare, "-Urn", "--"}
	}
	if out, err := exec.Command(prefix[0], append(prefix[1:], "true")...).CombinedOutput(); err != nil {
		if inCI() {
			t.Fatalf("network namespaces are unavailable in CI: %v: %s", err, out)
		}
		t.Skipf("skipping: cannot create a network namespace (%v: %s)", err, bytes.TrimSpace(out))
	}
	return prefix
}

// helperScenario decodes into sc the scenario that the test which made
// this helper's network namespace put in the variable env; without it, the
// helper is not a test of its own, and skips, saying which tests run it.
func helperScenario(t *testing.T, env, runBy string, sc any) {
	t.Helper()
	raw := os.Getenv(env)
	if raw == "" {
		t.Skip("helper: runs only inside the network namespace that " + runBy + " create")
	}
	if err := json.Unmarshal([]byte(raw), sc); err != nil {
		t.Fatal(err)
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	p, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// syncBuffer collects a process's output for the race and panic check.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// checkOutput fails on a data race or panic in a child's output.
func checkOutput(t *testing.T, what, out string) {
	t.Helper()
	for _, bad := range []string{"DATA RACE", "panic:"} {
		if strings.Contains(out, bad) {
			t.Errorf("%s output contains %q:\n%s", what, bad, tailLines(out, 60))
		}
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// startService starts a coordinator with demoapp v1 (or cfg.App) and registers cleanup
// that kills whatever is left and checks that nothing survives.
func startService(t *testing.T, cfg harness.Config) *harness.Service {
	t.Helper()
	return startServiceLog(t, cfg, &syncBuffer{}, true)
}

// startServiceLog is startService with the coordinator's output kept in
// out; stopped: cleanup fails the test if the coordinator still runs.
func startServiceLog(t *testing.T, cfg harness.Config, out *syncBuffer, stopped bool) *harness.Service {
	t.Helper()
	cfg.Rollover = filepath.Join(bin, "rollover")
	if cfg.App == "" {
		cfg.App = filepath.Join(bin, "demoapp")
	}
	cfg.Dir = testproc.ShortDir(t)
	cfg.Log = out
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	svc, err := harness.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start: %v\n%s", err, out.String())
	}
	t.Cleanup(func() {
		select {
		case <-svc.Exited():
		default:
			if stopped {
				t.Errorf("coordinator still running at cleanup; killing it")
			}
		}
		svc.Kill()
		if left := harness.WaitGone(append(svc.PIDs(), svc.PID()), 5*time.Second); len(left) > 0 {
			t.Errorf("processes left behind: %v", left)
		}
		checkOutput(t, "coordinator", out.String())
		if t.Failed() {
			t.Logf("coordinator log:\n%s", tailLines(out.String(), 80))
		}
	})
	return svc
}
