package coordinator

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/testproc"
)

// startStray runs a standalone copy of a generation (no coordinator) on
// the rig's address (or addr), as a leftover process would, and waits until
// it listens. Cleanup kills it.
func (r *rig) startStray(addr ...string) int {
	r.t.Helper()
	argv := r.argv("ready")
	for _, a := range addr {
		argv = append(argv, envAddr+"="+a)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ROLLOVER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	r.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	pid := cmd.Process.Pid
	r.waitFor(10*time.Second, "the stray process to listen", func() bool {
		found, _ := strays([]string{r.addr}, nil)
		return slices.ContainsFunc(found, func(s stray) bool { return s.pid == pid })
	})
	return pid
}

// A process that is no generation and shares the port is refused at every
// rollover, named with its pid and command line; the active generation keeps
// serving. --allow-foreign lets it be.
func TestStrayRefusedAtRollover(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")
	pid := r.startStray()
	_, res := r.next(r.argv("ready"))
	want := "the port is shared with pid " + strconv.Itoa(pid) + " ("
	if res.OK || !strings.Contains(res.Error, want) || !strings.Contains(res.Error, "--allow-foreign") || !strings.Contains(res.Error, "gen 1 keeps serving") {
		t.Fatalf("next with a stray on the port: %+v, want refused naming %q", res, want)
	}
	if res.Code != 1 {
		t.Errorf("exit code %d, want 1", res.Code)
	}
	r.waitFor(5*time.Second, "the refused generation to be gone", func() bool { return len(r.status().Generations) == 1 })
	if st := r.status(); st.Active != 1 || st.InProgress {
		t.Fatalf("after the refusal: %+v", st)
	}
	if testproc.Gone(pid1) {
		t.Fatal("gen 1 is gone")
	}
}

// Generation 1 is refused too: the start fails with the same line.
func TestStrayRefusedAtStart(t *testing.T) {
	r := newRig(t, "ready", Config{})
	pid := r.startStray()
	r.run()
	err := r.wait(15 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "the port is shared with pid "+strconv.Itoa(pid)) || !strings.Contains(err.Error(), "nothing is served") {
		t.Fatalf("Run with a stray on the port: %v", err)
	}
	for _, rec := range r.logs.records() {
		if strings.Contains(rec.msg, "draining") {
			t.Errorf("a failed start logged %q", rec.msg)
		}
	}
	for _, p := range r.pids() {
		if !testproc.Gone(p) {
			t.Errorf("generation pid %d is still there", p)
		}
	}
}

// --allow-foreign lets a process share the port. Here it listens on the
// wildcard address of the port, a reuseport group of its own, so the
// generations' group (127.0.0.1) still steers.
func TestStrayAllowed(t *testing.T) {
	r := startRig(t, "ready", Config{AllowForeign: true})
	_, port, _ := strings.Cut(r.addr, ":")
	r.startStray("0.0.0.0:" + port)
	if _, res := r.next(r.argv("ready")); !res.OK {
		t.Fatalf("next with --allow-foreign: %s", res.Error)
	}
}
