package coordinator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rollover-sh/rollover/metrics"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// This file is one rollout, top to bottom. A rollout is one value: it runs
// as a script on a goroutine of its own (rollout.run), from the spawn of
// the new generation to its loss report. It never touches the machine's
// state: every change (ready, steered, active, baking, rolled back,
// draining, done) is an event to the owner goroutine, and what the script
// needs to know about a generation comes back in a reply (genView), or as
// a verdict the machine sends (promote, abort, stop, the new generation's
// exit or failed health). The decisions are small pure functions at the
// end of the file (decide, takeBack, cause.outcome), which the table tests
// cover without processes.

// phase is where a rollout stands; status shows it.
type phase uint8

const (
	phaseSpawned    phase = iota + 1 // the new generation was started
	phaseReady                       // it serves, dark
	phaseCanary                      // it gets a share of new connections
	phaseSteered                     // it gets every new connection and is active
	phaseBaking                      // the old one keeps its listener, ready to take the port back
	phaseDraining                    // the old one hands its port over and finishes
	phaseDone                        // the old one left the port; the new one is pinned
	phaseRolledBack                  // the old one took the port back; the new one drains
)

func (p phase) String() string {
	switch p {
	case phaseSpawned:
		return "spawned"
	case phaseReady:
		return "ready"
	case phaseCanary:
		return "canary"
	case phaseSteered:
		return "steered"
	case phaseBaking:
		return "baking"
	case phaseDraining:
		return "draining"
	case phaseDone:
		return "done"
	case phaseRolledBack:
		return "rolled-back"
	}
	return "unknown"
}

// outcome is how a rollover ended; rollover_rollovers_total counts each
// rollover once, under its outcome.
type outcome uint8

const (
	outcomeOK         outcome = iota + 1 // the new generation became active and stayed
	outcomeFailed                        // it never became active
	outcomeRolledBack                    // rolled back automatically in its bake or canary
	outcomeAborted                       // rollover abort, or a stop, ended its canary
)

// outcomes lists every outcome: the label values of rollover_rollovers_total.
var outcomes = []outcome{outcomeOK, outcomeFailed, outcomeRolledBack, outcomeAborted}

func (o outcome) String() string {
	switch o {
	case outcomeOK:
		return "ok"
	case outcomeFailed:
		return "failed"
	case outcomeRolledBack:
		return "rolled_back"
	case outcomeAborted:
		return "aborted"
	}
	return "unknown"
}

// cause is why a canary step or a bake ended.
type cause uint8

const (
	causeElapsed   cause = iota + 1 // its time ran out
	causePromote                    // rollover promote
	causeAbort                      // rollover abort
	causeStop                       // the coordinator stops
	causeExited                     // the new generation exited
	causeHealth                     // it broke the health rule
	causeHealthURL                  // the --health-url probe failed
)

// rollbackCauses are the causes that roll back, one per reason label of
// rollover_rollbacks_total (a stop counts as an abort).
var rollbackCauses = []cause{causeExited, causeHealth, causeHealthURL, causeAbort}

// reason is the label of rollover_rollbacks_total.
func (c cause) reason() string {
	switch c {
	case causeExited:
		return "exited"
	case causeHealth:
		return "health"
	case causeHealthURL:
		return "health-url"
	case causeAbort, causeStop:
		return "abort"
	}
	return "unknown"
}

// outcome is what a rollback for c counts as.
func (c cause) outcome() outcome {
	if c == causeAbort || c == causeStop {
		return outcomeAborted
	}
	return outcomeRolledBack
}

// verdict is what ended a wait, as the machine or the health probe saw it.
type verdict struct {
	cause  cause
	detail string
}

// rollout is one rollover in progress. Only its own goroutine (run) writes
// it; settled and done publish err and report to whoever waits.
type rollout struct {
	c    *Coordinator
	req  rolloverReq
	out  func(wire.Event) // whoever asked (nil: nobody), until settled unless req.wait
	g    *gen
	prev *gen           // nil for generation 1 or a restart
	was  genView        // prev when the rollover began
	hear <-chan verdict // promote, abort, stop, and g's exit and health, from the machine
	note string
	rel  bool // a rollover of a started service (sd_notify RELOADING)

	start   time.Time
	kernel  map[string]uint64
	ready   genView // the new generation, as it was when ready
	steered bool    // the new generation takes every new connection by steering
	left    bool    // the old generation left the port
	drained *gen    // the generation that drains because of this rollover
	why     string
	outcome outcome

	err     error         // the result; set before settled is closed
	settled chan struct{} // active and baked, or failed: what `next` waits for
	partial *wire.Report  // set before settled is closed
	report  *wire.Report  // complete; set before done is closed
	done    chan struct{}
}

// begin asks the machine for a rollover and, unless it refuses, runs it on
// a goroutine of its own. emit, when set, gets every event until the
// rollover settles (with req.wait, until its report). Refusals (one in
// progress, stopping, not the expected generation, a bad address) return
// an error and no rollout.
func (c *Coordinator) begin(req rolloverReq, emit func(wire.Event)) (*rollout, error) {
	if err := req.launch.checkAddr(); err != nil {
		return nil, err // refused before it began: not a failed rollover
	}
	// The report's kernel counters as the rollover begins, read while the
	// owner spawns the new generation, not after it: /proc/net takes CPU
	// that the new generation's start needs.
	counters := make(chan map[string]uint64, 1)
	go func() { counters <- kernelCounters() }()
	b, ok := request(c, func(r chan began) event { return evBegin{req: req, reply: r} })
	kernel := <-counters
	if !ok {
		return nil, ErrStopping // the owner loop is gone: Run returned
	}
	if b.err != nil {
		return nil, b.err
	}
	r := &rollout{c: c, req: req, out: emit, g: b.g, prev: b.prev, was: b.was, hear: b.hear, note: b.note, rel: b.reloading,
		start: time.Now(), kernel: kernel, settled: make(chan struct{}), done: make(chan struct{})}
	c.tasks.Go(r.run)
	return r, nil
}

// run is the whole rollover: ready, steered (through the canary's steps),
// active, baked, then the old generation drained off the port and the new
// one re-pinned, and the loss report once the generation that drains
// because of it is gone. Until the new generation is active every failure
// ends it and leaves the old one serving untouched; during the canary and
// the bake a failure gives the port back to the old one.
func (r *rollout) run(ctx context.Context) {
	err := r.roll(ctx)
	if err != nil && !errors.Is(err, ErrCommand) && !errors.Is(err, ErrStopping) && !errors.Is(err, ErrUsage) {
		err = fmt.Errorf("%w: %v", ErrRollover, err)
	}
	if r.outcome == 0 {
		r.outcome = outcomeOK
		if err != nil {
			r.outcome = outcomeFailed
		}
	}
	if err == nil && r.prev != nil {
		r.handOver()
	}
	r.c.finish(r.g, r.outcome, err)
	if !isDone(r.settled) {
		r.settle(err)
	}
	r.closeWindow(ctx)
}

// handOver drains the old generation off the port (bounded), then re-pins
// the new one at index 0 of the group. `next` returns once the old one
// left, or, when the new one is steered every new connection anyway, once
// the grace is well over: a hung old generation must not hold it until its
// kill.
func (r *rollout) handOver() {
	c := r.c
	r.drainOld()
	long := c.cfg.DrainTimeout + c.cfg.KillGrace + time.Second
	soon := long
	if r.steered && r.ready.remote == nil {
		soon = c.cfg.DrainGrace + time.Second // the library leaves right after the grace
	}
	if !r.awaitLeft(soon) {
		r.emit(wire.Event{Phase: wire.PhaseInfo, Generation: r.prev.n, Text: fmt.Sprintf("gen %d has not left the port after %v; it drains on (rollover status shows it)", r.prev.n, soon)})
		r.settle(nil)
		r.awaitLeft(long - soon)
	}
	if r.steered {
		c.pinTo(r.g, r.ready) // at index 0 of the group now
	}
}

// roll takes the new generation as far as it goes: active and baked (nil),
// or failed or rolled back (why).
func (r *rollout) roll(ctx context.Context) error {
	c, g, prev := r.c, r.g, r.prev
	r.emit(wire.Event{Phase: wire.PhaseStarted, Generation: g.n, PID: g.pid})
	if r.note != "" {
		r.emit(wire.Event{Phase: wire.PhaseInfo, Generation: g.n, Text: r.note})
	}
	if r.rel {
		c.notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=rolling over to generation %d", monotonicUsec(), g.n))
	}
	// The stray-process check reads all of /proc: for a rollover it runs
	// beside the new generation's start, on the ports the active one serves.
	scan := r.scanStrays(r.was.addrs)
	ready, err := r.awaitReady(ctx)
	if err != nil {
		return err
	}
	r.emit(wire.Event{Phase: wire.PhaseReady, Generation: g.n, Millis: ready.readyIn.Milliseconds()})
	if g.launch.Ready != ReadyLibrary || g.launch.supervised() || r.was.remote != nil {
		// An app without the library, or instances, or what follows a
		// generation steered from outside (the library's steer assumes
		// one socket before its own): the coordinator steers it, if it can.
		ready = c.discover(g, prev == nil)
		if ready.remote == nil {
			c.log.Warn("the coordinator cannot steer this generation; its hand-over relies on net.ipv4.tcp_migrate_req", "gen", g.n, "reason", ready.steerErr)
		}
	}
	r.ready = ready
	if scan == nil {
		scan = r.scanStrays(ready.addrs) // generation 1: its ports are known now
	}
	if err := r.refuseStrays(scan); err != nil {
		c.post(evDrain{g: g})
		return err
	}
	if prev == nil {
		// Generation 1 (or a restart): pinned at ready, alone on the port.
		return r.activate(true)
	}
	plan, err := r.plan(ready)
	if err != nil {
		c.post(evDrain{g: g})
		return err
	}
	if plan.judge {
		c.post(evWatch{g: g, rule: plan.rule})
		if url := cmp.Or(r.req.healthURL, c.cfg.HealthURL); url != "" {
			probe, stop := c.probeHealth(url)
			defer stop()
			plan.probe = probe
		}
	}
	if err := r.canary(plan); err != nil {
		return err
	}
	if err := r.steer(plan); err != nil {
		return err
	}
	r.steered = plan.steer
	if plan.judge && plan.bake == 0 {
		c.post(evWatch{g: g}) // judged through its canary; active now
	}
	if plan.bake > 0 {
		return r.bake(plan)
	}
	return nil
}

// scanStrays looks, beside the rollover, for processes that are no
// generation and listen on the ports of addrs (nil when there is nothing to
// look for, or the check is off).
func (r *rollout) scanStrays(addrs []string) <-chan []stray {
	c := r.c
	if l := r.g.launch.Addr; l != "" && !slices.Contains(addrs, l) {
		addrs = append(slices.Clone(addrs), l)
	}
	if c.cfg.AllowForeign || len(addrs) == 0 {
		return nil
	}
	// The serving generations first, the new one last: its listeners come
	// later, so the check can stop before it (see strays).
	var ours []int
	if st, ok := request(c, func(ch chan wire.Status) event { return qStatus{reply: ch} }); ok {
		for _, g := range st.Generations {
			if g.PID != r.g.pid {
				ours = append(ours, g.PID)
			}
		}
	}
	ours = append(ours, r.g.pid)
	out := make(chan []stray, 1)
	c.tasks.Go(func(context.Context) {
		found, err := strays(addrs, ours)
		if err != nil {
			c.log.Warn("could not look for other processes on the port", "err", err)
		}
		out <- found
	})
	return out
}

// refuseStrays refuses a generation whose port another process shares:
// that process would take a share of new connections and never be rolled
// over.
func (r *rollout) refuseStrays(scan <-chan []stray) error {
	if scan == nil {
		return nil
	}
	found := <-scan
	if len(found) == 0 {
		return nil
	}
	var who []string
	for _, s := range found {
		who = append(who, s.String())
	}
	keeps := "nothing is served"
	if r.prev != nil {
		keeps = fmt.Sprintf("gen %d keeps serving", r.prev.n)
	}
	return fmt.Errorf("%w: the port is shared with %s, which is no generation of this coordinator: it takes a share of new connections and would never be rolled over; stop it (kill %d), or start the coordinator with --allow-foreign if it is meant to share the port; %s",
		ErrForeign, strings.Join(who, ", "), found[0].pid, keeps)
}

// plan is how a rollover steers and judges the new generation.
type plan struct {
	steer bool          // the new generation can be steered (it links the library)
	steps []int         // the canary's weights below 100%
	bake  time.Duration // the bake after activation
	judge bool          // a canary or a bake judges its health
	rule  *wire.Health
	probe <-chan verdict // the --health-url probe's failure
}

// plan checks that the new generation can take over as asked.
func (r *rollout) plan(ready genView) (plan, error) {
	c, g, prev := r.c, r.g, r.prev
	if err := sameAddrs(prev.n, r.was.addrs, g.n, ready.addrs); err != nil {
		return plan{}, err
	}
	p := plan{steer: ready.steerable, bake: c.cfg.Bake, rule: &wire.Health{MinRequests: c.cfg.HealthMinRequests, MaxErrorRatio: c.cfg.HealthMaxErrorRatio}}
	if r.req.bake != nil {
		p.bake = *r.req.bake
	}
	for _, w := range r.req.canary {
		if w < 100 {
			p.steps = append(p.steps, w)
		}
	}
	if !p.steer {
		if ready.remote == nil && g.launch.Ready == ReadyLibrary {
			c.log.Warn("generation cannot be steered; the hand-over relies on net.ipv4.tcp_migrate_req", "gen", g.n, "reason", ready.steerErr)
		}
		if len(r.req.canary) > 0 {
			return plan{}, fmt.Errorf("%w: --canary needs a generation that can be steered, and gen %d cannot (%s); gen %d keeps serving", ErrUsage, g.n, ready.steerErr, prev.n)
		}
	}
	p.judge = p.bake > 0 || len(r.req.canary) > 0
	return p, nil
}

// canary steers a share of new connections to the new generation at each
// step and judges it there, until the last step passes or a promote.
func (r *rollout) canary(p plan) error {
	c, g, prev := r.c, r.g, r.prev
	for i, w := range p.steps {
		if err := c.steerTo(g, r.ready, w, p.rule); err != nil {
			c.pinTo(prev, r.was)
			c.post(evDrain{g: g})
			return fmt.Errorf("gen %d failed the canary steering at %d%%: %v", g.n, w, err)
		}
		var until time.Time // zero: the step waits for a promote or an abort
		if r.req.step > 0 {
			until = time.Now().Add(r.req.step)
		}
		c.post(evPhase{phase: phaseCanary, weight: w, step: i + 1, steps: len(p.steps), until: until})
		r.emit(wire.Event{Phase: wire.PhaseCanary, Generation: g.n, Weight: w})
		if r.req.step == 0 {
			r.emit(wire.Event{Phase: wire.PhaseInfo, Generation: g.n, Text: fmt.Sprintf("canary waits at %d%%: rollover promote, or rollover abort", w)})
		}
		began := time.Now()
		v := r.wait(r.req.step, p.probe)
		switch decide(stageCanary, v.cause) {
		case goOn:
			continue
		case revert:
			return r.revert(v, fmt.Sprintf("%s into its %d%% canary step", since(began), w), false)
		}
		return nil // promoted
	}
	return nil
}

// steer sends every new connection to the new generation and makes it the
// active one.
func (r *rollout) steer(p plan) error {
	c, g, prev := r.c, r.g, r.prev
	if p.steer {
		if err := c.steerTo(g, r.ready, 0, p.rule); err != nil {
			// The group may already point at N+1: point it back at N, then
			// let N+1 hand over what it queued rather than reset it.
			c.pinTo(prev, r.was)
			c.post(evDrain{g: g})
			return fmt.Errorf("gen %d failed the steering verification: %v", g.n, err)
		}
		if len(r.req.canary) > 0 {
			c.post(evPhase{phase: phaseCanary, weight: 100})
			r.emit(wire.Event{Phase: wire.PhaseCanary, Generation: g.n, Weight: 100})
		}
	}
	if err := r.activate(false); err != nil {
		if p.steer {
			c.pinTo(prev, r.was)
		}
		return err
	}
	return nil
}

// activate makes the new generation the active one. last: there is no old
// generation to hand over from.
func (r *rollout) activate(last bool) error {
	err, ok := request(r.c, func(ch chan error) event { return evActivate{g: r.g, last: last, reply: ch} })
	if !ok {
		return ErrStopping
	}
	if err == nil {
		r.emit(wire.Event{Phase: wire.PhaseActive, Generation: r.g.n, PID: r.g.pid})
	}
	return err
}

// bake keeps the old generation's listener, steered away, while its
// keep-alive clients move on; it takes the port back if the new one fails.
func (r *rollout) bake(p plan) error {
	c, g, prev := r.c, r.g, r.prev
	released := make(chan struct{})
	c.tasks.Go(func(context.Context) {
		defer close(released)
		if r.was.remote != nil {
			return // steered from outside: it keeps its listener, steered away
		}
		if err := c.command(prev, wire.Msg{Type: wire.TypeRelease}); err != nil && r.was.steerable {
			c.log.Warn("release of the old generation failed", "gen", prev.n, "err", err)
		}
	})
	c.post(evRelease{g: prev, until: time.Now().Add(p.bake)})
	r.emit(wire.Event{Phase: wire.PhaseBaking, Generation: g.n, Millis: p.bake.Milliseconds()})
	began := time.Now()
	v := r.wait(p.bake, p.probe)
	if decide(stageBake, v.cause) == proceed {
		// Baked: from now on an exit is a crash to restart, unless it
		// exited just before the bake ended (its verdict is on its way).
		baked, _ := request(c, func(ch chan bool) event { return evBaked{g: g, reply: ch} })
		if baked {
			return nil
		}
		v = r.exitVerdict()
	}
	<-released // resume after release, never before
	return r.revert(v, fmt.Sprintf("%s after activation (during the %v bake)", since(began), p.bake), true)
}

// wait waits for the end of a canary step or a bake: d passing (0: never),
// or a verdict from the machine or the probe.
func (r *rollout) wait(d time.Duration, probe <-chan verdict) verdict {
	var elapsed <-chan time.Time
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		elapsed = t.C
	}
	select {
	case <-elapsed:
		return verdict{cause: causeElapsed}
	case v := <-r.hear:
		return v
	case v := <-probe:
		return v
	}
}

// exitVerdict takes the verdict of the new generation's exit, which the
// machine sent when it exited in its bake.
func (r *rollout) exitVerdict() verdict {
	for {
		select {
		case v := <-r.hear:
			if v.cause == causeExited {
				return v
			}
		default:
			return verdict{cause: causeExited, detail: r.c.view(r.g).exit}
		}
	}
}

// revert gives the port back to the old generation and drains the new one.
// released: the old one was in the new one's bake (it resumes); otherwise
// it never stopped being active (a canary) and only re-pins.
func (r *rollout) revert(v verdict, when string, released bool) error {
	c, g, prev := r.c, r.g, r.prev
	if r.was.remote != nil {
		c.pinTo(prev, r.was) // steered from outside: back to index 0
	} else if cmd, ok := takeBack(r.was.steerable, released); ok {
		if err := c.command(prev, wire.Msg{Type: cmd}); err != nil {
			c.log.Warn("the old generation did not take the port back", "gen", prev.n, "err", err)
		}
	}
	c.do(func(ch chan struct{}) event { return evRollback{g: g, prev: prev, cause: v.cause, reply: ch} })
	r.drained, r.outcome = g, v.cause.outcome()
	r.why = rollbackText(g.n, v, when)
	r.emit(wire.Event{Phase: wire.PhaseRolledBack, Generation: prev.n, Text: r.why})
	err := fmt.Errorf("%s: rolled back to gen %d", r.why, prev.n)
	if v.cause == causeExited {
		err = fmt.Errorf("%w; last stderr: %s", err, g.tail.String())
	}
	return err
}

func rollbackText(n int, v verdict, when string) string {
	switch v.cause {
	case causeExited:
		return fmt.Sprintf("gen %d exited (%s) %s", n, v.detail, when)
	case causeHealth:
		return fmt.Sprintf("gen %d failed its health %s: %s", n, when, v.detail)
	case causeHealthURL:
		return fmt.Sprintf("gen %d failed the health probe %s: %s", n, when, v.detail)
	}
	return fmt.Sprintf("gen %d was aborted (%s) %s", n, v.detail, when)
}

// settle publishes the rollover's result: `next` without --wait returns
// here, once the new generation is active and baked (or failed).
func (r *rollout) settle(err error) {
	r.err = err
	r.partial = r.compute()
	close(r.settled)
}

// drainOld orders the old generation to hand its port over and drain.
func (r *rollout) drainOld() {
	st, _ := request(r.c, func(ch chan wire.Stats) event { return evDrain{g: r.prev, reply: ch} })
	r.drained = r.prev
	r.emit(wire.Event{Phase: wire.PhaseDraining, Generation: r.prev.n, Stats: &st})
}

// awaitLeft waits, at most d, until the old generation left the port, and
// says so once.
func (r *rollout) awaitLeft(d time.Duration) bool {
	if r.left {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.prev.left:
		r.left = true
		r.emit(wire.Event{Phase: wire.PhaseLeft, Generation: r.prev.n})
	case <-t.C:
	}
	return r.left
}

// closeWindow completes the loss report once the generation that drains
// because of the rollover is gone (bounded), logs it and keeps it for
// status. With --wait the caller sees that drain.
func (r *rollout) closeWindow(ctx context.Context) {
	defer close(r.done)
	if r.prev == nil {
		r.report = r.partial // generation 1, or a restart: nothing was handed over
		return
	}
	if r.partial.RolledBack || r.err == nil {
		r.showDrain(ctx)
	}
	r.report = r.compute()
	c := r.c
	if r.report.Lost() {
		c.log.Warn(r.report.String(), "gen", r.g.n, "forced_connections", r.report.ForcedConnections, "forced_requests", r.report.ForcedRequests)
	} else {
		c.log.Info(r.report.String(), "gen", r.g.n)
	}
	c.post(evReport{r: r.report})
	if r.req.wait {
		r.emit(wire.Event{Phase: wire.PhaseReport, Report: r.report})
	}
}

// showDrain reports the drain of the generation that drains because of the
// rollover until it exits, at most until its drain deadline and the kill.
func (r *rollout) showDrain(ctx context.Context) {
	d := r.drained
	if d == nil {
		return
	}
	c := r.c
	limit := time.NewTimer(c.cfg.DrainTimeout + 2*c.cfg.KillGrace + time.Second)
	defer limit.Stop()
	tick := time.NewTicker(wire.StatsInterval)
	defer tick.Stop()
	var last wire.Stats
	for {
		select {
		case <-d.gone:
			r.emit(wire.Event{Phase: wire.PhaseDrained, Generation: d.n, Millis: c.view(d).drainedIn.Milliseconds()})
			return
		case <-tick.C:
			if st := c.view(d).stats; st != last {
				last = st
				r.emit(wire.Event{Phase: wire.PhaseDraining, Generation: d.n, Stats: &st})
			}
		case <-limit.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// emit logs e and passes it on to whoever asked, until the rollover
// settled (with --wait, until its report).
func (r *rollout) emit(e wire.Event) {
	r.c.logEvent(e)
	if r.out != nil && (r.req.wait || !isDone(r.settled)) {
		r.out(e)
	}
}

// awaitReady waits for the new generation's ready, its exit, the ready
// timeout or a stop.
func (r *rollout) awaitReady(ctx context.Context) (genView, error) {
	c, g := r.c, r.g
	c.watchReady(g)
	t := time.NewTimer(c.cfg.ReadyTimeout)
	defer t.Stop()
	for {
		select {
		case <-g.ready:
			return c.view(g), nil
		case <-g.gone:
			return genView{}, fmt.Errorf("gen %d exited before it was ready (%s); last stderr: %s", g.n, c.view(g).exit, g.tail.String())
		case <-t.C:
			c.kill(g)
			<-g.gone
			return genView{}, fmt.Errorf("gen %d was not ready within %v (--ready-timeout; %s); last stderr: %s", g.n, c.cfg.ReadyTimeout, readyHint(g.launch), g.tail.String())
		case <-c.halt.Done(): // generation 1's start waits here before any evStop
			c.kill(g)
			<-g.gone
			return genView{}, ErrStopping
		case v := <-r.hear:
			if v.cause != causeStop {
				continue // a promote or abort before the canary: nothing to act on yet
			}
			c.kill(g)
			<-g.gone
			return genView{}, ErrStopping
		case <-ctx.Done():
			return genView{}, ErrStopping
		}
	}
}

// compute builds the report from what is known now.
func (r *rollout) compute() *wire.Report {
	rep := &wire.Report{Generation: r.g.n, RolledBack: r.outcome == outcomeRolledBack || r.outcome == outcomeAborted, Reason: r.why,
		Millis: time.Since(r.start).Milliseconds(), Errors: []wire.GenErrors{}}
	udp := false
	for _, g := range []*gen{r.prev, r.g} {
		if g == nil {
			continue
		}
		v := r.c.view(g)
		var base wire.Stats
		if g == r.prev {
			rep.Previous, base = g.n, r.was.stats
		}
		rep.ForcedConnections += v.forcedConns
		rep.ForcedRequests += v.forcedReqs
		if v.killed {
			rep.Killed = append(rep.Killed, wire.Killed{Generation: g.n, StatsAgeMS: v.statsAge.Milliseconds()})
		}
		rep.Errors = append(rep.Errors, wire.GenErrors{Generation: g.n, R5xx: v.stats.R5xx - min(base.R5xx, v.stats.R5xx), Panics: v.stats.Panics - min(base.Panics, v.stats.Panics),
			FailedAnswers: v.stats.FailedAnswers - min(base.FailedAnswers, v.stats.FailedAnswers)})
		rep.DatagramsLost += v.stats.DatagramsLost - min(base.DatagramsLost, v.stats.DatagramsLost)
		udp = udp || v.stats.Datagrams > 0 || slices.ContainsFunc(v.addrs, func(a string) bool { return strings.HasPrefix(a, wire.UDPAddr) })
	}
	if now := kernelCounters(); r.kernel != nil && now != nil {
		rep.Kernel = map[string]uint64{}
		for k, v := range now {
			if !udp && strings.HasPrefix(k, "Udp") {
				continue // a TCP service: the namespace's UDP drops are not its own
			}
			rep.Kernel[k] = v - min(r.kernel[k], v)
		}
	}
	rep.UDP = udp
	return rep
}

// The decisions.

// stage is where a rollout waits for a verdict.
type stage uint8

const (
	stageCanary stage = iota + 1 // a canary step
	stageBake                    // the bake after activation
)

// step is what a rollout does after a wait.
type step uint8

const (
	goOn    step = iota + 1 // the next canary step
	proceed                 // promoted, or baked: on to the drain of the old generation
	revert                  // give the port back to the old generation
)

// decide is what follows a verdict at a stage. A stop during the bake
// proceeds: the new generation serves and the stop drains both; during a
// canary the old one is still the active one, so it keeps the port.
func decide(s stage, c cause) step {
	switch {
	case c == causeElapsed && s == stageCanary:
		return goOn
	case c == causeElapsed, c == causePromote, c == causeStop && s == stageBake:
		return proceed
	}
	return revert
}

// takeBack is the command that gives the port back to the old generation
// in a rollback, if it can be steered: resume after a release (the bake),
// pin otherwise (a canary: it never stopped being active).
func takeBack(steerable, released bool) (string, bool) {
	switch {
	case !steerable:
		return "", false // the kernel sends it everything once the new one's socket leaves
	case released:
		return wire.TypeResume, true
	}
	return wire.TypePin, true
}

// sameAddrs refuses a new generation that does not listen on every address
// the active one serves: clients of the missing ones would be refused once
// the old one leaves. Apps without the library report no addresses.
func sameAddrs(prevN int, prev []string, n int, addrs []string) error {
	if len(prev) == 0 || len(addrs) == 0 {
		return nil
	}
	for _, a := range prev {
		if !slices.Contains(addrs, a) {
			return fmt.Errorf("gen %d listens on %s, not on every address gen %d serves (%s): refused, gen %d keeps serving",
				n, strings.Join(addrs, ", "), prevN, strings.Join(prev, ", "), prevN)
		}
	}
	return nil
}

// since is the time since t as a person reads it: milliseconds below a
// second ("7ms", not "0s"), tenths of a second above.
func since(t time.Time) string { return humanDuration(time.Since(t)) }

func humanDuration(d time.Duration) string {
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// probeHealth GETs url every 250ms on a new connection each time (so the
// kernel's steering picks the generation); two failures in a row send a
// verdict. stop ends the probe and waits for it.
func (c *Coordinator) probeHealth(url string) (<-chan verdict, func()) {
	out := make(chan verdict, 1)
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan struct{})
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	c.tasks.Go(func(run context.Context) {
		defer close(ended)
		defer client.CloseIdleConnections()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		fails := 0
		for {
			if why := probeOnce(ctx, client, url); why == "" {
				fails = 0
			} else if fails++; fails == 2 {
				out <- verdict{cause: causeHealthURL, detail: why}
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-run.Done():
				return
			case <-t.C:
			}
		}
	})
	return out, func() { cancel(); <-ended }
}

// probeOnce GETs url and says why it failed ("" when it did not).
func probeOnce(ctx context.Context, client *http.Client, url string) string {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err.Error()
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ""
		}
		return err.Error()
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if resp.StatusCode >= 400 {
		return fmt.Sprintf("GET %s: %s", url, resp.Status)
	}
	return ""
}

// kernelCounters reads the TcpExt counters of the report from
// /proc/net/netstat (nil when unreadable; procfs parses this file too, but
// without TCPMigrateReq*), and the Udp receive errors from /proc/net/snmp
// as UdpInErrors and UdpRcvbufErrors.
func kernelCounters() map[string]uint64 {
	out := tcpCounters()
	if u, err := metrics.ReadUDPErrors(); err == nil && out != nil {
		out["UdpInErrors"], out["UdpRcvbufErrors"] = u.InErrors, u.RcvbufErrors
	}
	return out
}

func tcpCounters() map[string]uint64 {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return nil
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(values) != len(names) {
			continue
		}
		out := map[string]uint64{}
		for j, name := range names[1:] {
			switch name {
			case "ListenOverflows", "ListenDrops", "TCPAbortOnClose", "TCPMigrateReqSuccess", "TCPMigrateReqFailure":
				if v, err := strconv.ParseUint(values[j+1], 10, 64); err == nil {
					out[name] = v
				}
			}
		}
		return out
	}
	return nil
}
