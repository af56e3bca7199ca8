// Package testproc holds what the tests of the library, the coordinator and
// the end-to-end suite share about processes and time: a test that runs
// alone in a child process of the test binary (the helper-process pattern
// of os/exec's tests), a wait for a condition with a deadline, a check that
// a process is gone, a free loopback port and a short directory for Unix
// sockets.
//
// It lives under tests/ so that every test package of the module can import
// it (an internal package under rollover/ would be out of reach of tests/).
// It imports the standard library only.
package testproc

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Poll is how often WaitFor checks its condition.
const Poll = 10 * time.Millisecond

// WaitFor polls cond every Poll until it holds, and fails t once timeout has
// passed without it. what says what the test waited for.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(Poll)
	}
}

// FreeAddr returns 127.0.0.1:port with a port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// ShortDir returns a private directory with a short path (Unix socket paths
// are limited to 108 bytes), removed at cleanup.
func ShortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ro")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Gone reports whether no process (zombies included) has pid.
func Gone(pid int) bool { return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }

// EnvChild names the one test that a child test process runs.
const EnvChild = "ROLLOVER_TEST_CHILD"

// IsChild reports whether this process is the child test process that runs
// t.
func IsChild(t *testing.T) bool { return os.Getenv(EnvChild) == t.Name() }

// Child says how InChild runs the child test process; the zero value runs it
// with this process's environment.
type Child struct {
	Env   []string // KEY=VALUE pairs added to the child's environment
	Unset []string // variables of this process that the child does not get
}

// childTimeout bounds a child test process; its own -test.timeout is
// shorter, so that it reports its stacks first.
const childTimeout = 60 * time.Second

// InChild reports whether this process is the child that runs t. In the
// parent it runs t alone in a child test process (this test binary, with
// -test.run matching t only), fails t if the child fails, does not run t,
// or reports a data race or a panic, and returns false. A TestMain with
// goleak.VerifyTestMain checks the child for leaked goroutines too: a leak
// fails the child and so t.
func InChild(t *testing.T, c Child) bool {
	t.Helper()
	if IsChild(t) {
		return true
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), childTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, "-test.run=^"+regexp.QuoteMeta(t.Name())+"$", "-test.count=1", "-test.v",
		"-test.timeout="+(childTimeout-10*time.Second).String())
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k != EnvChild && !slices.Contains(c.Unset, k) {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(append(cmd.Env, c.Env...), EnvChild+"="+t.Name())
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	switch {
	case err != nil:
		t.Fatalf("child test process: %v\n%s", err, out.Bytes())
	case !strings.Contains(out.String(), "--- PASS: "+t.Name()+" "):
		t.Fatalf("child test process did not run %s:\n%s", t.Name(), out.Bytes())
	case strings.Contains(out.String(), "DATA RACE"), hasLinePrefix(out.String(), "panic:"):
		t.Fatalf("child test process:\n%s", out.Bytes())
	}
	if testing.Verbose() {
		t.Logf("child test process:\n%s", out.Bytes())
	}
	return false
}

// hasLinePrefix reports whether a line of s starts with prefix, as the
// runtime's report of a panic does.
func hasLinePrefix(s, prefix string) bool {
	return strings.HasPrefix(s, prefix) || strings.Contains(s, "\n"+prefix)
}
