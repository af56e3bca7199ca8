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
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
)

// stressRun is one rollover-stress run inside a network namespace of its
// own, where the test sets net.ipv4.tcp_migrate_req.
type stressRun struct {
	migrateReq int
	keepAlive  bool
	naive      bool
	rollovers  int
	slow       int
	drainTO    time.Duration
}

func (s stressRun) name() string {
	mode := "new-connection"
	if s.keepAlive {
		mode = "keep-alive"
	}
	return fmt.Sprintf("%s/tcp_migrate_req=%d", mode, s.migrateReq)
}

func (s stressRun) run(t *testing.T) harness.Report {
	t.Helper()
	prefix := unshareArgs(t)
	if s.drainTO == 0 {
		s.drainTO = 5 * time.Second
	}
	args := append(prefix[1:], filepath.Join(bin, "rollover-stress"),
		"-netns-setup", "-migrate-req", strconv.Itoa(s.migrateReq),
		"-rollovers", strconv.Itoa(s.rollovers), "-interval", "300ms",
		"-clients", "32", "-drain-grace", "100ms", "-drain-timeout", s.drainTO.String(),
		"-slow", strconv.Itoa(s.slow), "-json", "-v")
	if s.keepAlive {
		args = append(args, "-keepalive")
	}
	if s.naive {
		args = append(args, "-naive")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.rollovers)*time.Second+2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, prefix[0], args...)
	// rollover-stress cleans up after itself on SIGTERM.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	var stdout bytes.Buffer
	stderr := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = &stdout, stderr
	start := time.Now()
	err := cmd.Run()
	checkOutput(t, "rollover-stress", stderr.String())
	var rep harness.Report
	if jerr := json.Unmarshal(stdout.Bytes(), &rep); jerr != nil {
		t.Fatalf("rollover-stress: %v (report unreadable: %v)\nstdout:\n%s\nstderr:\n%s", err, jerr, stdout.String(), tailLines(stderr.String(), 60))
	}
	t.Logf("%s: %d rollovers in %v, %s; slow %d/%d ok; next took p50 %v; lingering %d",
		s.name(), rep.Rollovers, time.Since(start).Round(time.Second), rep.Load.String(),
		rep.Slow.OK, rep.Slow.Requests, median(rep.Took), rep.Lingering)
	if err != nil && !s.naive {
		t.Errorf("rollover-stress: %v\n%s", err, tailLines(stderr.String(), 40))
	}
	return rep
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// The promise: a hundred rollovers under saturating load, with clients that
// open a connection per request and with keep-alive clients, with and without
// the kernel's tcp_migrate_req safety net, and not one failed request. The
// hand-over steers and does not need the safety net, so `make test` gives
// the runs with it on 40 rollovers each; `make soak` (ROLLOVER_SOAK=1) gives
// every run its hundred.
func TestZeroDrop(t *testing.T) {
	withNet := 40
	if os.Getenv("ROLLOVER_SOAK") != "" {
		withNet = 100
	}
	for _, s := range []stressRun{
		{migrateReq: 0, rollovers: 100, slow: 4},
		{migrateReq: 1, rollovers: withNet, slow: 4},
		{migrateReq: 0, keepAlive: true, rollovers: 100, slow: 4},
		{migrateReq: 1, keepAlive: true, rollovers: withNet, slow: 4},
	} {
		t.Run(s.name(), func(t *testing.T) {
			rep := s.run(t)
			if rep.Rollovers != s.rollovers || rep.Failed != 0 {
				t.Errorf("%d of %d rollovers succeeded, %d failed: %v", rep.Rollovers, s.rollovers, rep.Failed, rep.Errors)
			}
			if rep.Load.OK == 0 || rep.Load.Failures != 0 {
				t.Errorf("%d requests failed (%v), %d ok: %v", rep.Load.Failures, rep.Load.ByKind, rep.Load.OK, rep.Load.Samples)
			}
			if rep.Slow.OK == 0 || rep.Slow.Failures != 0 {
				t.Errorf("long requests across rollovers: %d ok, %d failed: %v", rep.Slow.OK, rep.Slow.Failures, rep.Slow.Samples)
			}
			// Clients must be moved to new generations, not kept on old ones
			// until the drain timeout ends them.
			if rep.Lingering != 0 {
				t.Errorf("%d old generations still alive after the load stopped", rep.Lingering)
			}
			if len(rep.Load.ByGeneration) < s.rollovers/2 {
				t.Errorf("only %d generations answered: clients were not moved to new code", len(rep.Load.ByGeneration))
			}
		})
	}
}

// The same load with the naive hand-over (close the listener, Shutdown) does
// drop requests, so the test above can tell the two apart.
func TestNaiveHandoverDrops(t *testing.T) {
	rep := stressRun{migrateReq: 0, naive: true, rollovers: 20}.run(t)
	if rep.Load.Failures == 0 {
		t.Fatalf("the naive hand-over dropped nothing in %d rollovers (%s): the zero-drop test cannot tell it apart", rep.Rollovers, rep.Load.String())
	}
	t.Logf("naive hand-over: %d failed requests in %d rollovers (%.1f per rollover), %v",
		rep.Load.Failures, rep.Rollovers, float64(rep.Load.Failures)/float64(max(rep.Rollovers, 1)), rep.Load.ByKind)
}
