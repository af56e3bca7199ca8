package coordinator

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// A new generation that dies during its bake is rolled back: the old one
// takes the port back, next fails with one line that says what happened
// and when, and the old generation serves on.
func TestBakeRollsBackAnExit(t *testing.T) {
	r := startRig(t, "ready", Config{Bake: 3 * time.Second})
	_, pid1 := r.mustGet("/")
	start := time.Now()
	events, res := r.next(r.argv("crash-after-ready"))
	if res.OK {
		t.Fatalf("next succeeded with a generation that died in its bake: %v", phases(events))
	}
	if took := time.Since(start); took > 2500*time.Millisecond {
		t.Errorf("the rollback took %v: it waited for the bake instead of the exit", took)
	}
	for _, want := range []string{"gen 2 exited (exit status 1)", "after activation (during the 3s bake): rolled back to gen 1", "crashing on purpose"} {
		if !strings.Contains(res.Error, want) {
			t.Errorf("next error %q lacks %q", res.Error, want)
		}
	}
	if e := eventOf(events, wire.PhaseRolledBack); e == nil || e.Generation != 1 {
		t.Errorf("events %v: no rolled-back event naming gen 1", phases(events))
	}
	if rep := eventOf(events, wire.PhaseReport); rep == nil || !rep.Report.RolledBack || rep.Report.Generation != 2 || rep.Report.Previous != 1 {
		t.Errorf("report event %+v, want a rolled-back report of gen 2 replacing gen 1", rep)
	}
	r.activeIs(1, pid1)
	countedOnce(t, r.c, "exited", "rolled_back")
	// Gen 1 serves keep-alive again and a clean rollover still works.
	events, res = r.next(r.argv("ready"))
	if !res.OK {
		t.Fatalf("next after the rollback: %s", res.Error)
	}
	if e := eventOf(events, wire.PhaseBaking); e == nil || e.Millis != 3000 {
		t.Errorf("events %v: no 3s bake", phases(events))
	}
	r.activeIs(eventOf(events, wire.PhaseStarted).Generation, eventOf(events, wire.PhaseStarted).PID)
}

// A new generation whose handlers all panic fails its health under traffic
// and is rolled back long before its bake ends; few requests fail.
func TestBakeRollsBackOnHealth(t *testing.T) {
	r := startRig(t, "ready", Config{Bake: 20 * time.Second, HealthMinRequests: 10})
	_, pid1 := r.mustGet("/")
	var (
		mu         sync.Mutex
		ok, failed int
		stop       = make(chan struct{})
		wg         sync.WaitGroup
	)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
				select {
				case <-stop:
					return
				default:
				}
				_, _, err := r.get("/")
				mu.Lock()
				if err != nil {
					failed++
				} else {
					ok++
				}
				mu.Unlock()
			}
		}()
	}
	start := time.Now()
	events, res := r.next(r.argv("panics"))
	close(stop)
	wg.Wait()
	if res.OK {
		t.Fatalf("next succeeded with panicking handlers: %v", phases(events))
	}
	if !strings.Contains(res.Error, "gen 2 failed its health") || !strings.Contains(res.Error, "rolled back to gen 1") {
		t.Errorf("next error %q, want a failed health and a rollback to gen 1", res.Error)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the rollback took %v of a 20s bake", took)
	}
	r.activeIs(1, pid1)
	t.Logf("requests during the rollover: %d ok, %d failed (answered by the panicking generation before its health failed)", ok, failed)
	if failed == 0 || failed > 200 {
		t.Errorf("%d requests failed: want some (gen 2 took traffic) and few", failed)
	}
	countedOnce(t, r.c, "health", "rolled_back")
}

// A canary takes its share of new connections, waits, and goes to 100% on
// promote; an abort gives everything back to the old generation.
func TestCanaryPromoteAndAbort(t *testing.T) {
	r := startRig(t, "ready", Config{})
	type result struct {
		events []wire.Event
		res    wire.Msg
		err    error
	}
	start := func() <-chan result {
		done := make(chan result, 1)
		go func() {
			ev, res, err := call(r.sock, wire.Msg{Type: wire.TypeNext, Argv: r.argv("ready"), Canary: []int{10}}, 60*time.Second)
			done <- result{ev, res, err}
		}()
		r.waitFor(10*time.Second, "the canary at 10%", func() bool { return r.status().CanaryWeight == 10 })
		return done
	}
	share := func(n int) (int, int) {
		counts := map[int]int{}
		for range n {
			gen, _ := r.mustGet("/")
			counts[gen]++
		}
		active := r.status().Active
		return counts[active], n - counts[active]
	}

	done := start()
	old, canary := share(1000)
	t.Logf("canary at 10%%: %d of 1000 new connections (old generation %d)", canary, old)
	if canary < 100-30 || canary > 100+30 {
		t.Errorf("canary at 10%%: %d of 1000 new connections, want about 100 (old generation got %d)", canary, old)
	}
	if _, res, err := call(r.sock, wire.Msg{Type: wire.TypePromote}, 5*time.Second); err != nil || !res.OK {
		t.Fatalf("promote: %v %+v", err, res)
	}
	got := <-done
	if got.err != nil || !got.res.OK {
		t.Fatalf("next after promote: %v %+v", got.err, got.res)
	}
	gen2 := eventOf(got.events, wire.PhaseStarted).Generation
	if st := r.status(); st.Active != gen2 || st.CanaryWeight != 0 {
		t.Fatalf("after promote: active %d, canary %d%%; want gen %d, no canary", st.Active, st.CanaryWeight, gen2)
	}

	done = start()
	if _, res, err := call(r.sock, wire.Msg{Type: wire.TypeAbort}, 5*time.Second); err != nil || !res.OK {
		t.Fatalf("abort: %v %+v", err, res)
	}
	got = <-done
	if got.res.OK || !strings.Contains(got.res.Error, "aborted") {
		t.Fatalf("next after abort: %+v, want a failure saying aborted", got.res)
	}
	if st := r.status(); st.Active != gen2 {
		t.Fatalf("after abort: active %d, want gen %d", st.Active, gen2)
	}
	if _, canary := share(200); canary != 0 {
		t.Errorf("after abort, %d of 200 new connections reached the aborted canary", canary)
	}
	countedOnce(t, r.c, "abort", "aborted")
}

// countedOnce checks that the one rollback of a rollover is counted once:
// in rollbacks{reason} and in rollovers{result}, and not as failed.
func countedOnce(t *testing.T, c *Coordinator, reason, result string) {
	t.Helper()
	if got := testutil.ToFloat64(c.metrics.Rollbacks.WithLabelValues(reason)); got != 1 {
		t.Errorf("rollbacks{%s} = %v, want 1", reason, got)
	}
	if got := rollovers(t, c, result); got != 1 {
		t.Errorf("rollovers{result=%q} = %v, want 1", result, got)
	}
	if got := rollovers(t, c, "failed"); got != 0 {
		t.Errorf("rollovers{result=\"failed\"} = %v, want 0: a rollback counts once, as %s", got, result)
	}
}
