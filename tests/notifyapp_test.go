package tests

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// notifyApp copies testdata/notifyapp.py into dir, so that dir is in its
// command line, and returns the command line of version v on addr and the
// address. It runs the interpreter itself, not a wrapper script (pyenv's
// shims), so that the pid the coordinator spawns is the server's.
func notifyApp(t *testing.T, dir string) (argv func(version string) []string, addr string) {
	t.Helper()
	python, script := copyPython(t, dir, "notifyapp.py")
	port := freePort(t)
	return func(v string) []string {
		return []string{python, script, "127.0.0.1", strconv.Itoa(port), v, strconv.FormatFloat(notifyWarmUp.Seconds(), 'f', -1, 64)}
	}, "127.0.0.1:" + strconv.Itoa(port)
}

// notifyWarmUp is how long each generation of the Python app listens
// before it says READY=1: a connection routed to it then would wait that
// long in its accept queue.
const notifyWarmUp = 500 * time.Millisecond

// notifyWorkers is how many worker processes each generation of
// TestNotifyAppRollover forks, each with its own socket in the group.
const notifyWorkers = 4

// TestNotifyAppRollover rolls a Python app that speaks systemd's notify
// protocol over between two versions, under a new connection per request,
// with tcp_migrate_req=0: --ready=notify, drained by SIGTERM. Each
// generation is a pre-forking server of notifyWorkers workers, each binding
// the port on its own and closing its listener at its own time on SIGTERM.
// The coordinator steers their sockets from outside (pidfd_getfd): no
// connection reaches a generation before its READY=1 (none waits out a
// warm-up), none is reset on the hand-over, and every client request
// succeeds.
func TestNotifyAppRollover(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	app, addr := notifyApp(t, dir)
	argv := func(v string) []string { return append(app(v), "dumpable", strconv.Itoa(notifyWorkers)) }
	sc := foreignScenario{
		Name: "notifyapp", Dir: dir, Addr: addr,
		// --addr tells the coordinator when the old generation has left the port.
		StartFlags: []string{"--ready=notify", "--addr", addr},
		Argv:       [2][]string{argv("v1"), argv("v2")},
		Rollovers:  10, Interval: 500 * time.Millisecond, Clients: 8, MigrateReq: 0,
		VersionHeader: "X-Notifyapp-Version", Body: "notifyapp {v} pid ",
		Spread: 4000,
	}
	rep := runForeignInNetns(t, sc)
	// The last generation's workers share new connections evenly: each
	// takes a quarter of them, within 3 sigma (binomial).
	checkSpread(t, "after the rollovers", rep.Spread, rep.SpreadErrs, sc.Spread, notifyWorkers)
	t.Logf("the last generation's workers, by new connections: %v", rep.Spread)
	g1 := foreignGen(t, rep.Start, 1)
	if want := "serving v1 on " + addr; g1.Ready != "notify" || g1.Notify != want || !g1.Steerable || g1.Sockets != notifyWorkers {
		t.Errorf("gen 1: ready %q, notify_status %q, steerable %v (%s), %d sockets; want notify, %q, steered by the coordinator, %d sockets", g1.Ready, g1.Notify, g1.Steerable, g1.SteerError, g1.Sockets, want, notifyWorkers)
	}
	if len(rep.End.Generations) > 0 {
		g := rep.End.Generations[len(rep.End.Generations)-1]
		if want := "serving v1 on " + addr; g.Ready != "notify" || g.Notify != want { // 10 rollovers: back on v1
			t.Errorf("last generation %d: ready %q, notify_status %q; want notify, %q", g.Generation, g.Ready, g.Notify, want)
		}
	}
	rep.check(t, sc, 0)
	// Each generation says how many connections waited in its accept queue
	// when its warm-up ended; one that waited out a whole warm-up would
	// also show in the slowest request.
	if log, err := os.ReadFile(sc.logPath()); err != nil {
		t.Error(err)
	} else if n := strings.Count(string(log), "were queued before READY=1"); n > 0 {
		t.Errorf("%d generations had connections queued before their READY=1:\n%s", n, tailLines(string(log), 30))
	}
	if rep.Load.Max >= notifyWarmUp {
		t.Errorf("the slowest request took %v, against a warm-up of %v: a connection waited for a generation to be ready", rep.Load.Max, notifyWarmUp)
	}
	t.Logf("load: %s; slowest %v (warm-up %v)", rep.Load, rep.Load.Max, notifyWarmUp)
	// The app names its generation: clients were moved to each new one.
	if n := len(rep.Load.ByGeneration); n < sc.Rollovers/2 {
		t.Errorf("only %d generations answered the load (%v): clients were not moved to new code", n, rep.Load.ByGeneration)
	}
}

// startForeign is startForeignCoordinator for a test outside a namespace:
// it fails t when the coordinator does not start, and at cleanup kills
// what is left and checks the coordinator's output.
func startForeign(t *testing.T, ctx context.Context, rolloverBin, dir string, flags, argv []string) (*foreignCoordinator, *syncBuffer) {
	t.Helper()
	out := &syncBuffer{}
	co, err := startForeignCoordinator(ctx, rolloverBin, dir, flags, argv, out)
	if err != nil {
		t.Fatalf("start: %v\n%s", err, out.String())
	}
	t.Cleanup(func() {
		co.kill()
		checkOutput(t, "coordinator", out.String())
		if t.Failed() {
			t.Logf("coordinator log:\n%s", tailLines(out.String(), 60))
		}
	})
	return co, out
}

// TestNotifyAppReadyListen runs the same Python app with --ready=listen, no
// namespace and no load: the coordinator sees it listen, and a rollover
// moves new connections to the new version.
func TestNotifyAppReadyListen(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	argv, addr := notifyApp(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	co, _ := startForeign(t, ctx, filepath.Join(bin, "rollover"), dir, []string{"--ready=listen", "--addr", addr}, argv("v1"))
	sc := foreignScenario{VersionHeader: "X-Notifyapp-Version", Body: "notifyapp {v} pid "}
	url := "http://" + addr + "/"

	g1 := foreignGen(t, co.started, 1)
	if g1.Ready != "listen" || g1.State != "active" || g1.Notify != "" {
		t.Errorf("gen 1: ready %q, state %q, notify_status %q; want listen, active, none", g1.Ready, g1.State, g1.Notify)
	}
	if err := sc.probe(ctx, url, "v1"); err != nil {
		t.Fatalf("gen 1: %v", err)
	}
	took, err := co.next(ctx, argv("v2"))
	if err != nil {
		t.Fatalf("next: %v", err)
	}
	// `next` returns once gen 1 has left the port: every new connection
	// reaches v2 from now on.
	for i := range 20 {
		if err := sc.probe(ctx, url, "v2"); err != nil {
			t.Fatalf("request %d after next: %v", i, err)
		}
	}
	st, err := co.status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g2 := foreignGen(t, st, 2); st.Active != 2 || g2.Ready != "listen" || g2.State != "active" {
		t.Errorf("after next: active gen %d, gen 2 ready %q state %q; want 2, listen, active", st.Active, g2.Ready, g2.State)
	}
	if err := co.stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if left := harness.WaitGone(append(co.pids(), co.pid()), 5*time.Second); len(left) > 0 {
		t.Errorf("pids alive after stop: %v", left)
	}
	t.Logf("listen-mode rollover took %v; generation pids %v", took.Round(time.Millisecond), co.pids())
}

// The refusal path: a non-dumpable app under a coordinator without
// CAP_SYS_PTRACE (root with an empty bounding set here, as an unprivileged
// coordinator would be) cannot have its socket taken. The coordinator says
// so once per generation, status shows steerable=false with the reason,
// and the rollover still works, its hand-over left to tcp_migrate_req.
func TestNotifyAppNotSteerable(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	argv, addr := notifyApp(t, dir)
	nondumpable := func(v string) []string { return append(argv(v), "nondumpable") }
	rolloverBin := filepath.Join(bin, "rollover")
	if os.Geteuid() == 0 {
		setpriv := needTool(t, "setpriv")
		wrapper := filepath.Join(dir, "rollover-nocaps")
		script := "#!/bin/sh\nexec " + setpriv + " --bounding-set=-all --inh-caps=-all -- " + rolloverBin + " \"$@\"\n"
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		rolloverBin = wrapper
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	co, out := startForeign(t, ctx, rolloverBin, dir, []string{"--ready=notify", "--addr", addr}, nondumpable("v1"))
	g1 := foreignGen(t, co.started, 1)
	// The kernel refuses a non-dumpable process's fds, in /proc as to
	// pidfd_getfd: the reason names it and what would allow it.
	if why := g1.SteerError; g1.Steerable || g1.Sockets != 0 || !strings.Contains(why, "permission denied") || !strings.Contains(why, "dumpable") || !strings.Contains(why, "CAP_SYS_PTRACE") {
		t.Errorf("gen 1: steerable %v, %d sockets, reason %q; want not steerable, refused (permission denied), with what allows it", g1.Steerable, g1.Sockets, why)
	}
	if _, err := co.next(ctx, nondumpable("v2")); err != nil {
		t.Fatalf("next: %v", err)
	}
	sc := foreignScenario{VersionHeader: "X-Notifyapp-Version", Body: "notifyapp {v} pid "}
	if err := sc.probe(ctx, "http://"+addr+"/", "v2"); err != nil {
		t.Fatalf("after next: %v", err)
	}
	if err := co.stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	log := out.String()
	if n := strings.Count(log, "the coordinator cannot steer this generation"); n != 2 {
		t.Errorf("%d lines say the coordinator cannot steer, want one per generation (2):\n%s", n, log)
	}
}

// TestNotifyAppWorkersCanary holds a canary at 30% between two
// generations of the 4-worker Python app: new connections split 30/70
// (± 3 sigma) between the generations, and within each generation over all
// four workers. Then promote finishes the rollover.
func TestNotifyAppWorkersCanary(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	app, addr := notifyApp(t, dir)
	argv := func(v string) []string { return append(app(v), "dumpable", strconv.Itoa(notifyWorkers)) }
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	co, _ := startForeign(t, ctx, filepath.Join(bin, "rollover"), dir, []string{"--ready=notify", "--addr", addr}, argv("v1"))
	if g1 := foreignGen(t, co.started, 1); !g1.Steerable || g1.Sockets != notifyWorkers {
		t.Fatalf("gen 1: steerable %v (%s), %d sockets; want steered, %d", g1.Steerable, g1.SteerError, g1.Sockets, notifyWorkers)
	}
	next := make(chan error, 1)
	go func() {
		_, _, err := co.cli(ctx, append([]string{"next", "--canary", "30%", "--bake", "0s", "--"}, argv("v2")...)...)
		next <- err
	}()
	testproc.WaitFor(t, 30*time.Second, "the canary waiting at 30%", func() bool {
		st, err := co.status(ctx)
		return err == nil && st.Rollout != nil && st.Rollout.Phase == "canary" && st.Rollout.Weight == 30 && st.Rollout.Waiting
	})
	const n = 2000
	sc := foreignScenario{VersionHeader: "X-Notifyapp-Version", Body: "notifyapp {v} pid ", Spread: n}
	byPID, errs := sc.spread(ctx, "http://"+addr+"/")
	if errs > 0 {
		t.Errorf("%d of %d requests failed during the canary", errs, n)
	}
	answers, workers := map[string]int{}, map[string]int{}
	for key, c := range byPID {
		v, _, _ := strings.Cut(key, " ")
		answers[v] += c
		workers[v]++
	}
	sigma := math.Sqrt(n * 0.3 * 0.7)
	if d := math.Abs(float64(answers["v2"]) - 0.3*n); d > 3*sigma || answers["v1"]+answers["v2"] != n-errs {
		t.Errorf("during the 30%% canary: answers by version %v of %d; want v2 %.0f ± %.0f", answers, n, 0.3*n, 3*sigma)
	}
	if workers["v1"] != notifyWorkers || workers["v2"] != notifyWorkers {
		t.Errorf("during the canary, %v workers answered per version (%v); want all %d of each", workers, byPID, notifyWorkers)
	}
	t.Logf("30%% canary over two generations of %d workers: %v", notifyWorkers, byPID)
	if _, _, err := co.cli(ctx, "promote"); err != nil {
		t.Fatal(err)
	}
	if err := <-next; err != nil {
		t.Fatalf("next after promote: %v", err)
	}
	if err := co.stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
}
