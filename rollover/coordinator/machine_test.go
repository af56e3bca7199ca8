package coordinator

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rollover-sh/rollover/metrics"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// The machine without processes: each case is a sequence of events and
// what the machine must say and do after them. Effects are recorded.

type fakeWorld struct {
	t        *testing.T
	m        *machine
	now      time.Time
	pid      int
	spawnErr error
	did      []string // effects, in order: "spawn 1", "order 1", "cut 1", "kill 1", "after 30s evDrainTimeout 1", "restart", "save", "notify ..."
	timers   []event  // events posted by after, in order
}

func newWorld(t *testing.T) *fakeWorld {
	w := &fakeWorld{t: t, now: time.Unix(1_000_000, 0), pid: 100}
	fx := effects{
		log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		metrics: metrics.NewCoordinator(func() (metrics.Sample, bool) { return metrics.Sample{}, false }, metricLabels()),
		now:     func() time.Time { return w.now },
		spawn: func(g *gen) error {
			if w.spawnErr != nil {
				return w.spawnErr
			}
			w.pid++
			g.pid, g.start = w.pid, w.now
			w.did = append(w.did, fmt.Sprintf("spawn %d", g.n))
			return nil
		},
		order: func(g *gen, conn *peerConn, _, _ []remoteSocket) { w.did = append(w.did, fmt.Sprintf("order %d", g.n)) },
		cut:   func(g *gen, _ int) { w.did = append(w.did, fmt.Sprintf("cut %d", g.n)) },
		kill:  func(g *gen) { w.did = append(w.did, fmt.Sprintf("kill %d", g.n)) },
		signal: func(g *gen, sig syscall.Signal) {
			w.did = append(w.did, fmt.Sprintf("signal %d %v", g.n, sig))
		},
		after: func(d time.Duration, ev event) {
			w.did = append(w.did, fmt.Sprintf("after %v %T", d, ev))
			w.timers = append(w.timers, ev)
		},
		save:         func(*saved) {},
		restart:      func() { w.did = append(w.did, "restart") },
		repin:        func(g *gen) { w.did = append(w.did, fmt.Sprintf("repin %d", g.n)) },
		notify:       func(msg string) { w.did = append(w.did, "notify "+strings.ReplaceAll(msg, "\n", " ")) },
		drainTimeout: 30 * time.Second,
	}
	w.m = newMachine(Launch{Argv: []string{"/bin/true"}, Ready: ReadyLibrary}, fx)
	return w
}

// begin asks for a rollover and returns the answer.
func (w *fakeWorld) begin(req rolloverReq) began {
	reply := make(chan began, 1)
	w.m.step(evBegin{req: req, reply: reply})
	return <-reply
}

func (w *fakeWorld) activate(g *gen, last bool) error {
	reply := make(chan error, 1)
	w.m.step(evActivate{g: g, last: last, reply: reply})
	return <-reply
}

// outcomes checks rollover_rollovers_total: want by result, 0 for the
// others. Each rollover counts once, under one result.
func (w *fakeWorld) outcomes(t *testing.T, want map[string]float64) {
	t.Helper()
	for _, r := range metricLabels().Results {
		if got := testutil.ToFloat64(w.m.fx.metrics.Rollovers.WithLabelValues(r)); got != want[r] {
			t.Errorf("rollovers{result=%q} = %v, want %v", r, got, want[r])
		}
	}
}

func (w *fakeWorld) finish(g *gen, o outcome, err error) {
	w.m.step(evFinish{g: g, outcome: o, err: err, reply: make(chan struct{})})
}

// verdict takes what the machine told the rollover, if it told anything.
func verdictOf(b began) (verdict, bool) {
	select {
	case v := <-b.hear:
		return v, true
	default:
		return verdict{}, false
	}
}

func (w *fakeWorld) status() wire.Status {
	reply := make(chan wire.Status, 1)
	w.m.step(qStatus{reply: reply})
	return <-reply
}

// states renders every live generation as "N:state", in order.
func (w *fakeWorld) states() string {
	var out []string
	for _, g := range w.status().Generations {
		out = append(out, fmt.Sprintf("%d:%s", g.Generation, g.State))
	}
	return strings.Join(out, " ")
}

func (w *fakeWorld) didAny(effect string) bool { return slices.Contains(w.did, effect) }

// start takes generation 1 to active, as Run does.
func (w *fakeWorld) start() *gen {
	b := w.begin(rolloverReq{})
	if b.err != nil {
		w.t.Fatalf("begin: %v", b.err)
	}
	w.m.step(evReady{g: b.g, lib: true, steerable: true})
	if err := w.activate(b.g, true); err != nil {
		w.t.Fatalf("activate: %v", err)
	}
	return b.g
}

// baking begins a rollover and takes its new generation through ready to
// active, judged by the health rule.
func (w *fakeWorld) baking(rule *wire.Health) began {
	b := w.begin(rolloverReq{})
	if b.err != nil {
		w.t.Fatalf("begin: %v", b.err)
	}
	w.m.step(evReady{g: b.g, lib: true, steerable: true})
	w.m.step(evWatch{g: b.g, rule: rule})
	if err := w.activate(b.g, false); err != nil {
		w.t.Fatalf("activate: %v", err)
	}
	return b
}

func TestMachine(t *testing.T) {
	errBoom := errors.New("exit status 3")
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, w *fakeWorld)
	}{
		{"generation 1 starts, readies and becomes active in one transition", func(t *testing.T, w *fakeWorld) {
			b := w.begin(rolloverReq{})
			if b.err != nil || b.g.n != 1 || b.prev != nil || b.reloading {
				t.Fatalf("begin = %+v", b)
			}
			if got := w.states(); got != "1:starting" || !w.status().InProgress {
				t.Fatalf("after spawn: %q, in progress %v", got, w.status().InProgress)
			}
			w.m.step(evReady{g: b.g, lib: true, steerable: true})
			if !isDone(b.g.ready) || !b.g.steerable || w.states() != "1:ready" {
				t.Fatalf("after ready: %q steerable %v", w.states(), b.g.steerable)
			}
			if err := w.activate(b.g, true); err != nil {
				t.Fatal(err)
			}
			// The status that shows gen 1 active shows the rollover over:
			// no window in between (the flake of issue 9).
			if st := w.status(); st.Active != 1 || st.InProgress || w.states() != "1:active" {
				t.Fatalf("after activate: active %d in progress %v %q", st.Active, st.InProgress, w.states())
			}
			w.finish(b.g, outcomeOK, nil) // the rollover goroutine's finish is then a no-op
			if got := testutil.ToFloat64(w.m.fx.metrics.Rollovers.WithLabelValues("ok")); got != 1 {
				t.Errorf("rollovers ok = %v, want 1 (counted once)", got)
			}
		}},
		{"a generation whose sockets the coordinator holds leaves the port when they are let go, not at its exit", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evHeld{g: g1})
			w.m.step(evExited{g: g1})
			if !isDone(g1.gone) || isDone(g1.left) {
				t.Fatalf("after its exit: gone %v, left %v; want gone, not left while its sockets are held", isDone(g1.gone), isDone(g1.left))
			}
			w.m.step(evClosedListener{g: g1})
			if !isDone(g1.left) {
				t.Fatal("held sockets let go, but left is open")
			}
			g2 := newGen(2, Launch{Argv: []string{"/bin/true"}})
			w.m.gens[2] = g2
			w.m.step(evExited{g: g2})
			if !isDone(g2.left) {
				t.Fatal("a generation not held: its exit did not close left")
			}
		}},
		{"a rollover hands over and drains the old generation", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.begin(rolloverReq{launch: Launch{Argv: []string{"/bin/echo", "v2"}}})
			if b.err != nil || b.prev != g1 || !b.reloading || b.g.launch.Argv[0] != "/bin/echo" || b.g.launch.Ready != ReadyLibrary {
				t.Fatalf("begin = %+v (launch %+v)", b, b.g.launch)
			}
			w.m.step(evReady{g: b.g, lib: true, steerable: true})
			if err := w.activate(b.g, false); err != nil {
				t.Fatal(err)
			}
			if st := w.status(); st.Active != 2 || !st.InProgress {
				t.Fatalf("after activate: active %d, in progress %v; want 2, still in progress until gen 1 left", st.Active, st.InProgress)
			}
			w.m.step(evDrain{g: g1})
			w.m.step(evDrain{g: g1}) // once only
			if got := w.states(); got != "1:draining 2:active" {
				t.Fatalf("after drain: %q", got)
			}
			if n := strings.Count(strings.Join(w.did, ","), "order 1"); n != 1 {
				t.Errorf("gen 1 ordered to drain %d times, want 1: %v", n, w.did)
			}
			if !w.didAny("after 30s coordinator.evDrainTimeout") {
				t.Errorf("no drain clock started: %v", w.did)
			}
			w.m.step(evClosedListener{g: g1})
			if !isDone(g1.left) {
				t.Fatal("gen 1 left the port but left is open")
			}
			w.finish(b.g, outcomeOK, nil)
			if st := w.status(); st.InProgress {
				t.Fatal("still in progress after finish")
			}
			if !w.didAny("notify READY=1 STATUS=active generation 2 (pid 102)") {
				t.Errorf("no READY=1 to the service manager after the reload: %v", w.did)
			}
			w.m.step(evExited{g: g1})
			if got := w.states(); got != "2:active" || !isDone(g1.gone) {
				t.Fatalf("after gen 1 exited: %q", got)
			}
			w.m.step(evDrainTimeout{g: g1}) // fires late: nothing to kill
			if w.didAny("kill 1") || testutil.ToFloat64(w.m.fx.metrics.ForcedDrains) != 0 {
				t.Errorf("a drain timeout after the exit killed or counted: %v", w.did)
			}
		}},
		{"refusals: in progress, stale expectation, no previous, stopping", func(t *testing.T, w *fakeWorld) {
			w.start()
			if b := w.begin(rolloverReq{rollback: true}); b.err == nil || !strings.Contains(b.err.Error(), "no previous generation") {
				t.Errorf("rollback without a previous: %v", b.err)
			}
			if b := w.begin(rolloverReq{expect: 7}); !errors.Is(b.err, ErrStale) {
				t.Errorf("expect 7 with gen 1 active: %v, want ErrStale", b.err)
			}
			b := w.begin(rolloverReq{})
			if b.err != nil {
				t.Fatal(b.err)
			}
			if b2 := w.begin(rolloverReq{}); !errors.Is(b2.err, ErrInProgress) {
				t.Errorf("second rollover: %v, want ErrInProgress", b2.err)
			}
			w.m.step(evStop{})
			if b2 := w.begin(rolloverReq{}); !errors.Is(b2.err, ErrStopping) {
				t.Errorf("rollover while stopping: %v, want ErrStopping", b2.err)
			}
			if got := testutil.ToFloat64(w.m.fx.metrics.Rollovers.WithLabelValues("failed")); got != 0 {
				t.Errorf("refusals counted as failed rollovers: %v", got)
			}
		}},
		{"a failed spawn is a failed rollover and keeps the active generation", func(t *testing.T, w *fakeWorld) {
			w.start()
			w.spawnErr = fmt.Errorf("%w: ./api-v2: permission denied", ErrCommand)
			b := w.begin(rolloverReq{})
			if !errors.Is(b.err, ErrCommand) || !strings.Contains(b.err.Error(), "start gen 2") {
				t.Fatalf("begin = %v", b.err)
			}
			if st := w.status(); st.Active != 1 || st.InProgress || w.states() != "1:active" {
				t.Fatalf("after a failed spawn: active %d, in progress %v, %q", st.Active, st.InProgress, w.states())
			}
			if got := testutil.ToFloat64(w.m.fx.metrics.Rollovers.WithLabelValues("failed")); got != 1 {
				t.Errorf("failed rollovers = %v, want 1", got)
			}
			if b := w.begin(rolloverReq{launch: Launch{Argv: []string{"/no/such/binary"}}}); !errors.Is(b.err, ErrCommand) {
				t.Errorf("missing binary: %v, want ErrCommand", b.err)
			}
		}},
		{"a generation that exits before activation is never activated", func(t *testing.T, w *fakeWorld) {
			w.start()
			b := w.begin(rolloverReq{})
			w.m.step(evReady{g: b.g, lib: true, steerable: true})
			w.m.step(evExited{g: b.g, err: errBoom})
			if err := w.activate(b.g, false); err == nil || !strings.Contains(err.Error(), "exited right after it was ready (exit status 3)") {
				t.Fatalf("activate a dead generation: %v", err)
			}
			w.finish(b.g, outcomeFailed, errors.New("failed"))
			if st := w.status(); st.Active != 1 || st.InProgress || st.ActiveExits != 0 || w.didAny("restart") {
				t.Fatalf("after: %+v, did %v", st, w.did)
			}
		}},
		{"the active generation crashes: restart after backoff, not while a rollover runs", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evExited{g: g1, err: errBoom})
			st := w.status()
			if st.Active != 0 || st.ActiveExits != 1 || !st.RestartPending {
				t.Fatalf("after the crash: %+v", st)
			}
			if !w.didAny("after 500ms coordinator.evRestartDue") {
				t.Fatalf("no restart scheduled: %v", w.did)
			}
			w.m.step(evRestartDue{})
			if !w.didAny("restart") || w.status().RestartPending {
				t.Fatalf("restart did not run: %v", w.did)
			}
			// The restart (gen 2) and its own crash while active: the
			// backoff doubles.
			b := w.begin(rolloverReq{})
			if b.err != nil || b.g.launch.Argv[0] != "/bin/true" {
				t.Fatalf("restart begin: %+v", b)
			}
			w.m.step(evReady{g: b.g, lib: true})
			_ = w.activate(b.g, true)
			w.m.step(evExited{g: b.g, err: errBoom})
			if !w.didAny("after 1s coordinator.evRestartDue") {
				t.Fatalf("second backoff not 1s: %v", w.did)
			}
		}},
		{"a restart that comes due after someone rolled over by hand does nothing", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evExited{g: g1, err: errBoom})
			b := w.begin(rolloverReq{})
			w.m.step(evReady{g: b.g, lib: true})
			_ = w.activate(b.g, true)
			w.did = nil
			w.m.step(evRestartDue{})
			if w.didAny("restart") {
				t.Fatalf("a stale restart ran with gen %d active", w.status().Active)
			}
		}},
		{"the active generation crashes during a rollover: restart once the rollover ends", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.begin(rolloverReq{})
			w.m.step(evExited{g: g1, err: errBoom})
			if w.status().RestartPending {
				t.Fatal("restart scheduled while a rollover runs")
			}
			w.m.step(evExited{g: b.g, err: errBoom})
			w.finish(b.g, outcomeFailed, errors.New("gen 2 exited before it was ready"))
			if !w.status().RestartPending {
				t.Fatalf("no restart after the failed rollover left nothing active: %v", w.did)
			}
		}},
		{"a drain past its deadline is killed and counted", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evDrain{g: g1})
			w.m.step(w.timers[len(w.timers)-1])
			if !w.didAny("cut 1") || testutil.ToFloat64(w.m.fx.metrics.ForcedDrains) != 1 {
				t.Fatalf("forced drain: did %v, forced %v", w.did, testutil.ToFloat64(w.m.fx.metrics.ForcedDrains))
			}
		}},
		{"stop drains everything and goes idle when the last generation is gone", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.begin(rolloverReq{})
			w.m.step(evStop{})
			if w.didAny("order 1") {
				t.Fatal("stop drained while a rollover was in progress")
			}
			w.m.step(evExited{g: b.g}) // the rollover ends it (ErrStopping)
			w.finish(b.g, outcomeFailed, ErrStopping)
			if !w.didAny("order 1") {
				t.Fatalf("gen 1 not drained after the rollover ended: %v", w.did)
			}
			if isDone(w.m.idle) {
				t.Fatal("idle before gen 1 exited")
			}
			w.m.step(evExited{g: g1})
			if !isDone(w.m.idle) {
				t.Fatal("not idle with every generation gone")
			}
			if w.didAny("restart") || w.status().RestartPending {
				t.Fatal("a restart scheduled while stopping")
			}
		}},
		{"force: SIGTERM first, then SIGKILL, and the stop counts as forced", func(t *testing.T, w *fakeWorld) {
			w.start()
			reply := make(chan int, 1)
			w.m.step(evStop{reply: reply})
			if n := <-reply; n != 1 || !w.didAny("order 1") {
				t.Fatalf("stop: %d generations to drain, did %v", n, w.did)
			}
			if w.m.view().stopForced {
				t.Fatal("forced before anything was forced")
			}
			w.m.step(evForce{reply: reply})
			if n := <-reply; n != 1 || !w.didAny("kill 1") || !w.m.view().stopForced {
				t.Fatalf("first force: %d, did %v", n, w.did)
			}
			w.m.step(evForce{reply: reply})
			if n := <-reply; n != 2 || !w.didAny("signal 1 killed") {
				t.Fatalf("second force: %d, did %v", n, w.did)
			}
		}},
		{"the bake: health judged from stats, an exit is a rollback not a crash", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.begin(rolloverReq{})
			g2 := b.g
			w.m.step(evReady{g: g2, lib: true, steerable: true})
			rule := &wire.Health{MinRequests: 20, MaxErrorRatio: 0.1}
			w.m.step(evWatch{g: g2, rule: rule})
			if err := w.activate(g2, false); err != nil {
				t.Fatal(err)
			}
			w.m.step(evRelease{g: g1})
			if got, st := w.states(), w.status(); got != "1:draining 2:active" || st.Baking != 2 {
				t.Fatalf("in the bake: %q, baking %d", got, st.Baking)
			}
			w.m.step(evStats{g: g2, stats: wire.Stats{R2xx: 15, R5xx: 1}})
			if g2.unhealthy {
				t.Fatal("unhealthy on 1 error in 16 responses")
			}
			w.m.step(evStats{g: g2, stats: wire.Stats{R2xx: 17, R5xx: 2, Panics: 1}})
			if v, ok := verdictOf(b); !g2.unhealthy || !ok || v.cause != causeHealth || !strings.Contains(v.detail, "3 of 20 responses were 5xx or panics (15%") {
				t.Fatalf("not unhealthy at 3 of 20: %+v", v)
			}
			w.m.step(evExited{g: g2, err: errBoom})
			if st := w.status(); st.ActiveExits != 0 || st.RestartPending || st.Active != 1 {
				t.Fatalf("an exit during the bake: %+v, want gen 1 active again at once and no crash counted", st)
			}
			reply := make(chan struct{})
			w.m.step(evRollback{g: g2, prev: g1, cause: causeExited, reply: reply})
			w.finish(g2, outcomeRolledBack, errors.New("rolled back"))
			if got, st := w.states(), w.status(); got != "1:active" || st.Active != 1 || st.Baking != 0 || st.InProgress {
				t.Fatalf("after the rollback: %q, %+v", got, st)
			}
			if got := testutil.ToFloat64(w.m.fx.metrics.Rollbacks.WithLabelValues("exited")); got != 1 {
				t.Errorf("rollbacks{exited} = %v, want 1", got)
			}
			w.outcomes(t, map[string]float64{"ok": 1, "rolled_back": 1})
			if w.didAny("order 1") {
				t.Error("the old generation was told to drain: it must take the port back")
			}
		}},
		{"instances: one that exits in the bake rolls back; the active generation re-pins after one left or came back, not during a rollover", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			g1.launch.Instances, g1.launch.Ready = 4, ReadyNotify
			w.m.step(evSockets{g: g1, socks: []remoteSocket{{pid: 10, fd: 3}, {pid: 11, fd: 3}}})
			w.m.step(evInstances{g: g1, serving: 4})
			w.m.step(evInstances{g: g1, serving: 3, exited: "instance 1 of 4, pid 11: signal: killed"})
			if st := w.status(); st.Generations[0].Instances != 4 || st.Generations[0].Serving != 3 || st.Active != 1 || w.m.roll != nil {
				t.Fatalf("after an instance of the active generation exited: %+v", st.Generations[0])
			}
			if n := strings.Count(strings.Join(w.did, ","), "repin 1"); n != 2 {
				t.Fatalf("the active generation, alone, re-pinned %d times over 2 changes; did %v", n, w.did)
			}
			b := w.baking(&wire.Health{MinRequests: 20, MaxErrorRatio: 0.1})
			w.m.step(evRelease{g: g1})
			w.m.step(evInstances{g: g1, serving: 4}) // the old one's restart, during the rollover
			if n := strings.Count(strings.Join(w.did, ","), "repin"); n != 2 {
				t.Fatalf("re-pinned during a rollover; did %v", w.did)
			}
			if _, ok := verdictOf(b); ok {
				t.Fatal("a verdict before anything failed")
			}
			w.m.step(evInstances{g: b.g, serving: 3, exited: "instance 2 of 4, pid 20: signal: killed"})
			if v, ok := verdictOf(b); !ok || v.cause != causeExited || v.detail != "instance 2 of 4, pid 20: signal: killed" {
				t.Fatalf("an instance's exit in the bake: verdict %+v (%v), want exited", v, ok)
			}
		}},
		{"a rollback drains a live new generation; after the bake a crash restarts", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.baking(&wire.Health{MinRequests: 1, MaxErrorRatio: 0.5})
			w.m.step(evRelease{g: g1})
			w.m.step(evRollback{g: b.g, prev: g1, cause: causeHealth, reply: make(chan struct{})})
			if got := w.states(); got != "1:active 2:draining" || !w.didAny("order 2") {
				t.Fatalf("after a health rollback: %q, did %v", got, w.did)
			}
			w.finish(b.g, outcomeRolledBack, errors.New("rolled back"))
			w.outcomes(t, map[string]float64{"ok": 1, "rolled_back": 1})
			// A clean bake: judging stops, and the active one's exit is a
			// crash again.
			b3 := w.baking(&wire.Health{MinRequests: 1, MaxErrorRatio: 0.5})
			w.m.step(evWatch{g: b3.g})
			w.m.step(evExited{g: b3.g, err: errBoom})
			if st := w.status(); st.ActiveExits != 1 {
				t.Fatalf("a crash after the bake was not counted: %+v", st)
			}
		}},
		{"promote and abort reach only a rollover in progress", func(t *testing.T, w *fakeWorld) {
			w.start()
			reply := make(chan error, 1)
			w.m.step(evControl{what: causePromote, reply: reply})
			if err := <-reply; err == nil || !strings.Contains(err.Error(), "no canary or bake") {
				t.Fatalf("promote with no rollover: %v", err)
			}
			b := w.begin(rolloverReq{canary: []int{10, 50}, step: 5 * time.Second})
			w.m.step(evPhase{phase: phaseCanary, weight: 10, step: 1, steps: 2, until: w.now.Add(5 * time.Second)})
			w.now = w.now.Add(2 * time.Second)
			if st := w.status(); st.CanaryWeight != 10 || testutil.ToFloat64(w.m.fx.metrics.CanaryWeight) != 10 {
				t.Fatalf("canary weight: %+v", st)
			} else if r := st.Rollout; r == nil || r.Step != 1 || r.Steps != 2 || r.StepLeftMS != 3000 || r.Waiting {
				t.Fatalf("a stepping canary's status: %+v", r)
			}
			w.m.step(evControl{what: causeAbort, reply: reply})
			if err := <-reply; err != nil {
				t.Fatal(err)
			}
			if v, ok := verdictOf(b); !ok || v.cause != causeAbort {
				t.Fatalf("the rollover got %+v", v)
			}
			w.m.step(evRollback{g: b.g, prev: w.m.gens[1], cause: causeAbort, reply: make(chan struct{})})
			w.finish(b.g, outcomeAborted, errors.New("aborted"))
			w.outcomes(t, map[string]float64{"ok": 1, "aborted": 1})
			if st := w.status(); st.CanaryWeight != 0 || testutil.ToFloat64(w.m.fx.metrics.CanaryWeight) != 0 {
				t.Fatalf("canary weight after the rollover: %+v", st)
			}
		}},
		{"a hung generation is cut by the kernel's count, and its report says killed with stale stats", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evStats{g: g1, stats: wire.Stats{Connections: 2, Inflight: 1}})
			w.now = w.now.Add(4 * time.Second) // SIGSTOPped: no report since
			w.m.step(evDrain{g: g1})
			w.m.step(evDrainTimeout{g: g1})
			if !w.didAny("cut 1") {
				t.Fatalf("not cut: %v", w.did)
			}
			w.m.step(evCounted{g: g1, conns: 5})
			reply := make(chan genView, 1)
			w.m.step(qGen{g: g1, reply: reply})
			if v := <-reply; !v.killed || v.forcedConns != 5 || v.forcedReqs != 1 || v.statsAge != 4*time.Second {
				t.Fatalf("view of the killed generation: %+v", v)
			}
			w.m.step(evExited{g: g1})
			if c := testutil.ToFloat64(w.m.fx.metrics.ForcedConnections); c != 5 {
				t.Errorf("forced connections %v, want the kernel's 5", c)
			}
		}},
		{"a drain forced before the stop does not make the stop forced", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.begin(rolloverReq{})
			w.m.step(evReady{g: b.g, lib: true, steerable: true})
			_ = w.activate(b.g, false)
			w.m.step(evDrain{g: g1})
			w.m.step(evDrainTimeout{g: g1})
			w.m.step(evExited{g: g1})
			w.finish(b.g, outcomeOK, nil)
			w.m.step(evStop{})
			if w.m.view().stopForced {
				t.Fatal("a clean stop counts as forced because of an earlier forced drain")
			}
			w.m.step(evDrainTimeout{g: b.g})
			if !w.m.view().stopForced {
				t.Fatal("a drain the stop had to force does not count")
			}
		}},
		{"the bake ends only if the new generation is still there", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			b := w.baking(&wire.Health{MinRequests: 20, MaxErrorRatio: 0.1})
			w.m.step(evRelease{g: g1, until: w.now.Add(5 * time.Second)})
			w.now = w.now.Add(2 * time.Second)
			if st := w.status(); st.Rollout == nil || st.Rollout.Phase != "baking" || st.Rollout.BakeLeftMS != 3000 || st.Baking != 2 {
				t.Fatalf("status in the bake: %+v", st.Rollout)
			}
			w.m.step(evExited{g: b.g, err: errBoom}) // just as the bake timer fired
			baked := make(chan bool, 1)
			w.m.step(evBaked{g: b.g, reply: baked})
			if <-baked {
				t.Fatal("a bake whose generation exited ended as baked")
			}
			if v, ok := verdictOf(b); !ok || v.cause != causeExited {
				t.Fatalf("the rollout was not told of the exit: %+v", v)
			}
			if st := w.status(); st.Active != 1 {
				t.Fatalf("gen 1 not active again at once: %+v", st)
			}
		}},
		{"promote and abort only while a canary or bake waits", func(t *testing.T, w *fakeWorld) {
			w.start()
			b := w.begin(rolloverReq{canary: []int{10}})
			reply := make(chan error, 1)
			w.m.step(evControl{what: causePromote, reply: reply})
			if err := <-reply; err == nil {
				t.Fatal("promote accepted before the canary began")
			}
			w.m.step(evPhase{phase: phaseCanary, weight: 10, step: 1, steps: 1})
			if st := w.status(); st.Rollout == nil || st.Rollout.Phase != "canary" || st.Rollout.Weight != 10 || st.CanaryWeight != 10 ||
				!st.Rollout.Waiting || st.Rollout.StepLeftMS != 0 {
				t.Fatalf("status in the canary: %+v", st.Rollout)
			}
			w.m.step(evControl{what: causePromote, reply: reply})
			if err := <-reply; err != nil {
				t.Fatal(err)
			}
			w.m.step(evControl{what: causeAbort, reply: reply})
			if err := <-reply; err == nil || !strings.Contains(err.Error(), "already acting") {
				t.Fatalf("a second control: %v", err)
			}
			if v, ok := verdictOf(b); !ok || v.cause != causePromote {
				t.Fatalf("the rollout got %+v", v)
			}
		}},
		{"what a drain deadline cut is counted once, the library's count first", func(t *testing.T, w *fakeWorld) {
			g1 := w.start()
			w.m.step(evStats{g: g1, stats: wire.Stats{Connections: 7, Inflight: 2}})
			w.m.step(evDrain{g: g1})
			w.m.step(evStats{g: g1, stats: wire.Stats{Connections: 3, Inflight: 1, ForcedConnections: 3, ForcedRequests: 1}})
			w.m.step(evDrainTimeout{g: g1}) // killed with 3 still open
			w.m.step(evExited{g: g1})
			if c, r := testutil.ToFloat64(w.m.fx.metrics.ForcedConnections), testutil.ToFloat64(w.m.fx.metrics.ForcedRequests); c != 3 || r != 1 {
				t.Fatalf("forced connections %v requests %v, want 3 and 1", c, r)
			}
		}},
		{"hello: only the spawned pid with its secret, once", func(t *testing.T, w *fakeWorld) {
			b := w.begin(rolloverReq{})
			hello := func(m wire.Msg, pid int) welcome {
				reply := make(chan welcome, 1)
				w.m.step(evHello{hello: m, pid: pid, conn: &peerConn{}, reply: reply})
				return <-reply
			}
			good := wire.Msg{Generation: 1, PID: b.g.pid, Secret: b.g.secret}
			for _, tc := range []struct {
				m    wire.Msg
				pid  int
				want string
			}{
				{wire.Msg{Generation: 9, PID: b.g.pid, Secret: b.g.secret}, b.g.pid, "not one this coordinator spawned"},
				{wire.Msg{Generation: 1, PID: b.g.pid, Secret: "nope"}, b.g.pid, "wrong secret"},
				{good, b.g.pid + 1, "is not generation 1's pid"},
				{wire.Msg{Generation: 1, PID: b.g.pid, Secret: b.g.secret, Adopt: true}, b.g.pid, "not left by a previous coordinator"},
			} {
				if got := hello(tc.m, tc.pid); got.g != nil || !strings.Contains(got.reason, tc.want) {
					t.Errorf("hello %+v from pid %d: %+v, want refused: %s", tc.m, tc.pid, got, tc.want)
				}
			}
			if got := hello(good, b.g.pid); got.g != b.g || !isDone(b.g.hello) {
				t.Fatalf("good hello: %+v", got)
			}
			if got := hello(good, b.g.pid); !strings.Contains(got.reason, "already connected") {
				t.Errorf("second hello: %+v", got)
			}
		}},
		{"adoption: the predecessor's active generation is active again, the others drain", func(t *testing.T, w *fakeWorld) {
			mk := func(n int, active bool) *gen {
				g := newGen(n, Launch{Argv: []string{"/bin/true"}, Ready: ReadyLibrary})
				g.pid, g.adopting, g.wasActive = 200+n, true, active
				return g
			}
			g4, g5, g6 := mk(4, true), mk(5, false), mk(6, false)
			w.m.step(evAdoptLoad{s: saved{Next: 6, Active: 4}, gens: []*gen{g4, g5, g6}, reply: make(chan struct{})})
			if !w.status().InProgress {
				t.Fatal("rollovers allowed while adopting")
			}
			for _, hc := range []struct {
				g     *gen
				state string
			}{{g4, "ready"}, {g5, "starting"}} { // g6 never comes back
				reply := make(chan welcome, 1)
				w.m.step(evHello{hello: wire.Msg{Generation: hc.g.n, PID: hc.g.pid, Secret: hc.g.secret, Adopt: true, State: hc.state, Steerable: true}, pid: hc.g.pid, conn: &peerConn{}, reply: reply})
				if r := <-reply; r.reason != "" {
					t.Fatalf("adoption hello of gen %d refused: %s", hc.g.n, r.reason)
				}
			}
			reply := make(chan adoption, 1)
			w.m.step(evAdoptDecide{waiting: []*gen{g4, g5, g6}, reply: reply})
			a := <-reply
			if a.active != g4 || len(a.others) != 1 || a.others[0] != g5 {
				t.Fatalf("decide = %+v", a)
			}
			w.m.step(evAdoptEnd{others: a.others, reply: make(chan struct{})})
			if got, st := w.states(), w.status(); got != "4:active 5:draining" || st.InProgress || st.Active != 4 {
				t.Fatalf("after adoption: %q, %+v", got, st)
			}
			if b := w.begin(rolloverReq{}); b.err != nil || b.g.n != 7 {
				t.Fatalf("the next rollover after adoption: %+v", b)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, newWorld(t)) })
	}
}
