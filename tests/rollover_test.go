package tests

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// Ten rollovers between v1 and v2 under load from clients that open a new
// connection per request: every request succeeds, and after each rollover
// fresh requests reach the new version and generation, and status agrees.
func TestRolloversUnderLoad(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	runner, err := load.Start(ctx, load.Options{URL: "http://" + svc.Addr + "/", Clients: 16, Duration: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer runner.Stop()

	prevPID := 0
	for i := 1; i <= 10; i++ {
		version := []string{"v1", "v2"}[i%2]
		r, err := svc.Next(ctx, version, false)
		if err != nil {
			t.Fatalf("rollover %d: %v", i, err)
		}
		wantGen := i + 1
		if r.Generation != wantGen {
			t.Fatalf("rollover %d: started generation %d, want %d", i, r.Generation, wantGen)
		}
		code, gen, body, err := svc.Get(ctx, "/")
		if err != nil || code != http.StatusOK {
			t.Fatalf("rollover %d: GET /: %d %v", i, code, err)
		}
		if gen != strconv.Itoa(wantGen) || !strings.Contains(body, "demoapp "+version+" ") {
			t.Fatalf("rollover %d: answered by gen %q with %q, want gen %d %s", i, gen, body, wantGen, version)
		}
		st, err := svc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Active != wantGen {
			t.Fatalf("rollover %d: status says active %d, want %d", i, st.Active, wantGen)
		}
		for _, g := range st.Generations {
			switch g.Generation {
			case wantGen:
				if g.PID != r.PID || g.State != "active" {
					t.Fatalf("rollover %d: status has gen %d pid %d state %s, want pid %d active", i, g.Generation, g.PID, g.State, r.PID)
				}
			case wantGen - 1:
				if g.State != "draining" {
					t.Fatalf("rollover %d: old gen %d is %s, want draining", i, g.Generation, g.State)
				}
			default:
				t.Fatalf("rollover %d: unexpected live generation %+v", i, g)
			}
		}
		if prevPID != 0 {
			if left := harness.WaitGone([]int{prevPID}, 10*time.Second); len(left) > 0 {
				t.Fatalf("rollover %d: gen %d (pid %d) still running", i, wantGen-2, prevPID)
			}
		}
		prevPID = r.PID
	}
	res := runner.Stop()
	t.Logf("load: %s", res)
	if res.OK == 0 || res.Failures != 0 {
		t.Fatalf("load: %d ok, %d failed (%v) %v", res.OK, res.Failures, res.ByKind, res.Samples)
	}
	if len(res.ByGeneration) < 10 {
		t.Errorf("load reached only %d generations: %v", len(res.ByGeneration), res.ByGeneration)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if left := harness.WaitGone(append(svc.PIDs(), svc.PID()), 5*time.Second); len(left) > 0 {
		t.Fatalf("stop left processes behind: %v", left)
	}
}

// slowRequests starts n requests for path (a /slow one) on svc and returns
// a wait that checks, once all are done, that each got 200 from generation
// gen.
func slowRequests(t *testing.T, ctx context.Context, svc *harness.Service, n int, path, gen string) (wait func()) {
	failures := make(chan string, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			code, g, _, err := svc.Get(ctx, path)
			if err != nil || code != http.StatusOK || g != gen {
				failures <- fmt.Sprintf("slow request: code %d gen %q err %v; want 200 from gen %s", code, g, err, gen)
			}
		})
	}
	return func() {
		t.Helper()
		wg.Wait()
		close(failures)
		for f := range failures {
			t.Error(f)
		}
	}
}

// unanswered starts a request for path (a /slow one that outlasts the
// drain) on svc; its error, or why an answer is one, arrives on the
// channel.
func unanswered(ctx context.Context, svc *harness.Service, path string) <-chan error {
	ch := make(chan error, 1)
	go func() {
		code, gen, _, err := svc.Get(ctx, path)
		if err == nil {
			err = fmt.Errorf("answered %d by gen %s", code, gen)
		}
		ch <- err
	}()
	return ch
}

// Twenty slow requests started just before a rollover all complete with 200
// from the old generation, which drains instead of dropping them.
func TestSlowRequestsSurviveRollover(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	slow := slowRequests(t, ctx, svc, 20, "/slow?d=2s", "1")
	// Roll over only once all twenty are in flight on generation 1.
	testproc.WaitFor(t, 10*time.Second, "the slow requests in flight on generation 1", func() bool {
		st, err := svc.Status(ctx)
		return err == nil && len(st.Generations) == 1 && st.Generations[0].Stats.Inflight == 20
	})
	r, err := svc.Next(ctx, "v2", true)
	if err != nil {
		t.Fatalf("next: %v", err)
	}
	slow()
	if r.Old != 1 || r.Drain <= 0 {
		t.Errorf("next --wait reported old gen %d drained in %v; want gen 1 and a drain time", r.Old, r.Drain)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// Bad input gets one clear line and the exit code the README documents.
func TestBadInput(t *testing.T) {
	dir := testproc.ShortDir(t)
	nosock := filepath.Join(dir, "none.sock")
	public := filepath.Join(dir, "pub")
	if err := os.Mkdir(public, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(public, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	rollover := filepath.Join(bin, "rollover")
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"start without a command", []string{"start", "--socket", nosock}, 2, "start needs a command"},
		{"start with a missing command", []string{"start", "--socket", nosock, "--metrics-addr", "", "--", filepath.Join(dir, "nope")}, 1, "does not exist"},
		{"start with a directory", []string{"start", "--socket", nosock, "--metrics-addr", "", "--", dir}, 1, "is a directory"},
		{"start with an unknown program", []string{"start", "--socket", nosock, "--metrics-addr", "", "--", "no-such-program-xyz"}, 1, "not found in PATH"},
		{"next without a coordinator", []string{"next", "--socket", nosock}, 3, "no coordinator at " + nosock},
		{"status without a coordinator", []string{"status", "--socket", nosock}, 3, "no coordinator at " + nosock},
		{"stop without a coordinator", []string{"stop", "--socket", nosock}, 3, "no coordinator at"},
		{"unknown flag", []string{"next", "--bogus"}, 2, "unknown flag: --bogus"},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"socket in a world-writable directory", []string{"start", "--socket", filepath.Join(public, "s.sock"), "--metrics-addr", "", "--", "true"}, 1, "is world-writable"},
		{"--ready=listen without --addr", []string{"start", "--socket", nosock, "--metrics-addr", "", "--ready", "listen", "--", "true"}, 2, "--ready=listen needs --addr"},
		{"unknown drain signal", []string{"next", "--socket", nosock, "--drain-signal", "SIGNOPE"}, 2, "unknown signal"},
		{"bad log format", []string{"start", "--socket", nosock, "--log-format", "xml", "--", "true"}, 2, "--log-format must be text or json"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, rollover, tc.args...)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			err := cmd.Run()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.code {
				t.Errorf("exit code %d, want %d; stderr: %s", code, tc.code, stderr.String())
			}
			first, _, _ := strings.Cut(stderr.String(), "\n")
			if !strings.Contains(first, tc.want) {
				t.Errorf("first stderr line %q does not say %q", first, tc.want)
			}
			if !strings.HasPrefix(first, "rollover: ") {
				t.Errorf("error line %q is not prefixed with rollover:", first)
			}
		})
	}
}

// A rollover to a command that does not exist fails clearly and leaves the
// active generation serving; the next good one succeeds.
func TestNextBadCommandKeepsServing(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, stderr, code, err := svc.CLI(ctx, "next", "--", "./no-such-binary")
	if err != nil {
		t.Fatal(err)
	}
	if code != 1 || !strings.Contains(stderr, "no-such-binary does not exist") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Fatalf("next with a missing binary: exit %d, stderr %q; want exit 1 and one line naming it", code, stderr)
	}
	if c, gen, _, err := svc.Get(ctx, "/"); err != nil || c != 200 || gen != "1" {
		t.Fatalf("gen 1 not serving after the failed rollover: %d %q %v", c, gen, err)
	}
	r, err := svc.Next(ctx, "v2", false)
	if err != nil {
		t.Fatalf("good rollover after a failed one: %v", err)
	}
	if c, gen, _, err := svc.Get(ctx, "/"); err != nil || c != 200 || gen != fmt.Sprint(r.Generation) {
		t.Fatalf("new gen not serving: %d %q %v", c, gen, err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}
