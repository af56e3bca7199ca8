package tests

import (
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
)

// startLoad puts a bounded background load on svc and returns its runner.
func startLoad(t *testing.T, svc *harness.Service, keepAlive bool) *load.Runner {
	t.Helper()
	r, err := load.Start(context.Background(), load.Options{
		URL: "http://" + svc.Addr + "/", Clients: 8, KeepAlive: keepAlive, Duration: 2 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Stop() })
	return r
}

func requireNoFailures(t *testing.T, res load.Result) {
	t.Helper()
	t.Logf("load: %s", res)
	if res.OK == 0 || res.Failures != 0 {
		t.Fatalf("%d requests failed (%v), %d ok: %v", res.Failures, res.ByKind, res.OK, res.Samples)
	}
}

// SIGKILL of the coordinator costs no request: the generations keep
// serving, and a coordinator started again on the same socket adopts them.
func TestCoordinatorCrashAdoption(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	runner := startLoad(t, svc, false)
	r, err := svc.Next(ctx, "v2", true)
	if err != nil {
		t.Fatal(err)
	}
	oldCoordinator := svc.PID()
	svc.Crash()

	// Orphaned, generation 2 still serves.
	before := runner.Snapshot().OK
	deadline := time.Now().Add(5 * time.Second)
	for runner.Snapshot().OK < before+100 {
		if time.Now().After(deadline) {
			t.Fatalf("no requests served while the coordinator was down: %s", runner.Snapshot())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, _, code, _ := svc.CLI(ctx, "status"); code != 3 {
		t.Fatalf("status with the coordinator down: exit %d, want 3", code)
	}

	if err := svc.Restart(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if svc.PID() == oldCoordinator {
		t.Fatal("the coordinator was not restarted")
	}
	st, err := svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Active != r.Generation || len(st.Generations) != 1 || st.Generations[0].PID != r.PID {
		t.Fatalf("after restart: %+v; want gen %d (pid %d) adopted as active", st, r.Generation, r.PID)
	}
	// The adopted generation reports again, and hands over as usual.
	deadline = time.Now().Add(5 * time.Second)
	for {
		st, err = svc.Status(ctx)
		if err == nil && len(st.Generations) == 1 && st.Generations[0].Stats.Requests > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("adopted generation reports no stats: %+v %v", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	r3, err := svc.Next(ctx, "v1", true)
	if err != nil {
		t.Fatalf("rollover after adoption: %v", err)
	}
	if r3.Generation != r.Generation+1 || r3.Old != r.Generation {
		t.Fatalf("rollover after adoption started gen %d replacing %d; want %d replacing %d", r3.Generation, r3.Old, r.Generation+1, r.Generation)
	}
	if left := harness.WaitGone([]int{r.PID}, 10*time.Second); len(left) > 0 {
		t.Fatalf("the adopted generation %d is still running after its drain", r.PID)
	}
	requireNoFailures(t, runner.Stop())
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(svc.Socket + ".state"); !os.IsNotExist(err) {
		t.Errorf("state file left after a clean stop: %v", err)
	}
}

// SIGTERM during a rollover drains both generations and exits 0.
func TestSigtermDuringRollover(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	slow := make(chan error, 1)
	go func() {
		code, _, _, err := svc.Get(ctx, "/slow?d=2s")
		if err == nil && code != 200 {
			err = &exec.ExitError{}
		}
		slow <- err
	}()
	next := make(chan error, 1)
	go func() {
		_, err := svc.Next(ctx, "v2", false)
		next <- err
	}()
	// Wait until the new generation exists, then stop the coordinator.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := svc.Status(ctx)
		if err == nil && len(st.Generations) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rollover never started: %+v %v", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := svc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-svc.Exited():
	case <-ctx.Done():
		t.Fatal("coordinator did not exit after SIGTERM")
	}
	if err := <-slow; err != nil {
		t.Errorf("the slow request in flight: %v", err)
	}
	<-next
	if left := harness.WaitGone(svc.PIDs(), 5*time.Second); len(left) > 0 {
		t.Fatalf("generations left after SIGTERM: %v", left)
	}
}

// Random bytes thrown at the live control socket while rollovers run do
// not disturb the coordinator or the service.
func TestGarbageOnControlSocket(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	runner := startLoad(t, svc, true)
	stop := make(chan struct{})
	done := make(chan int)
	go func() {
		n := 0
		rng := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				done <- n
				return
			default:
			}
			conn, err := net.DialTimeout("unix", svc.Socket, time.Second)
			if err != nil {
				continue
			}
			buf := make([]byte, rng.IntN(4096)+1)
			for i := range buf {
				buf[i] = byte(rng.UintN(256))
			}
			if rng.IntN(4) == 0 {
				buf = append([]byte(`{"v":1,"type":"hello","generation":1,"pid":1,"secret":"x"`), buf...)
			}
			_ = conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
			_, _ = conn.Write(buf)
			_, _ = conn.Read(make([]byte, 512))
			conn.Close()
			n++
		}
	}()
	for i := range 5 {
		if _, err := svc.Next(ctx, []string{"v2", "v1"}[i%2], false); err != nil {
			t.Fatalf("rollover %d under garbage: %v", i+1, err)
		}
	}
	close(stop)
	n := <-done
	if n < 20 {
		t.Fatalf("only %d garbage connections were made", n)
	}
	requireNoFailures(t, runner.Stop())
	if _, err := svc.Status(ctx); err != nil {
		t.Fatalf("status after garbage: %v", err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// rollback rolls to the previous generation's command line; with none, a
// clear error.
func TestRollback(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, stderr, code, err := svc.CLI(ctx, "rollback")
	if err != nil || code != 1 || !strings.Contains(stderr, "no previous generation to roll back to") {
		t.Fatalf("rollback with no previous generation: exit %d, %q, %v", code, stderr, err)
	}
	if _, err := svc.Next(ctx, "v2", false); err != nil {
		t.Fatal(err)
	}
	out, stderr, code, err := svc.CLI(ctx, "rollback")
	if err != nil || code != 0 {
		t.Fatalf("rollback: exit %d: %s %v", code, stderr, err)
	}
	if !strings.Contains(out, "started gen 3") {
		t.Errorf("rollback output: %q", out)
	}
	_, gen, body, err := svc.Get(ctx, "/")
	if err != nil || gen != "3" || !strings.Contains(body, "demoapp v1 ") {
		t.Fatalf("after rollback: gen %q body %q (%v); want gen 3 running v1 again", gen, body, err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// next --expect-generation is a compare-and-swap: it refuses when the
// active generation is no longer the one the caller saw.
func TestExpectGeneration(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, stderr, code, err := svc.CLI(ctx, "next", "--expect-generation", "7")
	if err != nil || code != 1 || !strings.Contains(stderr, "the active generation is 1, not 7") {
		t.Fatalf("next --expect-generation 7 with gen 1 active: exit %d, %q, %v", code, stderr, err)
	}
	if _, stderr, code, err := svc.CLI(ctx, "next", "--expect-generation", "1"); err != nil || code != 0 {
		t.Fatalf("next --expect-generation 1: exit %d: %s %v", code, stderr, err)
	}
	st, err := svc.Status(ctx)
	if err != nil || st.Active != 2 {
		t.Fatalf("status %+v %v; want gen 2 active", st, err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// CLI requests from another user (not root) are refused.
func TestOtherUserRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the CLI as another user")
	}
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The socket is 0600 and its directory 0700: another user cannot even
	// connect. Open the directory and the socket so that the peer
	// credential check is what refuses it.
	if err := os.Chmod(filepath.Dir(svc.Socket), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(svc.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
	rolloverBin := filepath.Join(bin, "rollover")
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, rolloverBin, "next", "--socket", svc.Socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "permission denied: uid 65534") {
		t.Fatalf("next as uid 65534: %v: %s; want exit 1, permission denied", err, out)
	}
	st, err := svc.Status(ctx)
	if err != nil || st.Active != 1 {
		t.Fatalf("the refused request changed something: %+v %v", st, err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}
