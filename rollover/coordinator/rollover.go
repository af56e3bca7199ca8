package coordinator

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// commandTimeout bounds a generation's answer to steer and pin.
const commandTimeout = 5 * time.Second

// rolled is what a rollover leaves behind: the generations it involved and
// its loss report, which is complete (done closed) once the generation that
// drains because of it (the old one, or the new one after a rollback) is
// gone.
type rolled struct {
	g, prev    *gen
	drained    *gen // set by roll when a generation drains because of it
	start      time.Time
	kernel     map[string]uint64
	base       wire.Stats // prev's counters when the rollover began
	rolledBack bool
	reason     string
	partial    *wire.Report // at the end of the rollover
	report     *wire.Report // complete; set before done is closed
	done       chan struct{}
}

// tryRollover runs one rollover unless the machine refuses it (one is in
// progress, the coordinator stops, the active generation is not the one
// expected). Every event is logged, whoever asked; emit, when set, also
// gets it. Once the rollover began it returns what it left, error or not.
func (c *Coordinator) tryRollover(req rolloverReq, emit func(wire.Event)) (*rolled, error) {
	emit = c.logged(emit)
	if err := req.launch.checkAddr(); err != nil {
		return nil, err // refused before it began: not a failed rollover
	}
	b, ok := ask(c, func(r chan began) event { return evBegin{req: req, reply: r} })
	if !ok {
		return nil, ErrStopping // the owner loop is gone: Run returned
	}
	if b.err != nil {
		return nil, b.err
	}
	r := &rolled{g: b.g, prev: b.prev, start: time.Now(), kernel: kernelCounters(), done: make(chan struct{})}
	if b.prev != nil {
		r.base = c.numbers(b.prev).stats
	}
	err := c.roll(b, req, r, emit)
	if err != nil && !errors.Is(err, ErrCommand) && !errors.Is(err, ErrStopping) && !errors.Is(err, ErrUsage) {
		err = fmt.Errorf("%w: %v", ErrRollover, err)
	}
	c.done(func(ch chan struct{}) event { return evFinish{g: b.g, err: err, reply: ch} })
	r.partial = c.compute(r)
	if b.prev == nil {
		// Generation 1, or a restart: nothing was handed over.
		r.report = r.partial
		close(r.done)
		return r, err
	}
	go c.closeWindow(r)
	return r, err
}

// roll takes a spawned generation through the rollover: ready, steered
// (through the canary's steps, if any), active, baked, then the old
// generation drained off the port and the new one re-pinned. Until the new
// generation is active, every failure ends it and leaves the old one
// serving untouched; during the canary and the bake, a failure gives the
// port back to the old one (a rollback).
func (c *Coordinator) roll(b began, req rolloverReq, r *rolled, emit func(wire.Event)) error {
	g, prev := b.g, b.prev
	emit(wire.Event{Phase: wire.PhaseStarted, Generation: g.n, PID: g.pid})
	if b.note != "" {
		emit(wire.Event{Phase: wire.PhaseInfo, Generation: g.n, Text: b.note})
	}
	if b.reloading {
		c.notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=rolling over to generation %d", monotonicUsec(), g.n))
	}
	c.watchReady(g)
	if err := c.awaitReady(g); err != nil {
		return err
	}
	emit(wire.Event{Phase: wire.PhaseReady, Generation: g.n, Millis: g.readyAt.Sub(g.start).Milliseconds()})
	if prev == nil {
		// Generation 1 (or a restart): pinned at ready, alone on the port.
		activated, ok := ask(c, func(ch chan error) event { return evActivate{g: g, last: true, reply: ch} })
		if !ok {
			return ErrStopping
		}
		if activated == nil {
			emit(wire.Event{Phase: wire.PhaseActive, Generation: g.n, PID: g.pid})
		}
		return activated
	}

	if err := sameAddrs(prev, g); err != nil {
		c.post(evDrain{g: g})
		return err
	}
	steer := g.steerable
	if !steer {
		c.log.Warn("generation cannot be steered; the hand-over relies on net.ipv4.tcp_migrate_req", "gen", g.n, "reason", g.steerErr)
		if len(req.canary) > 0 {
			c.post(evDrain{g: g})
			return fmt.Errorf("%w: --canary needs a generation that links the rollover library, and gen %d cannot be steered (%s); gen %d keeps serving", ErrUsage, g.n, g.steerErr, prev.n)
		}
	}
	bake := c.cfg.Bake
	if req.bake != nil {
		bake = *req.bake
	}
	rule := &wire.Health{MinRequests: c.cfg.HealthMinRequests, MaxErrorRatio: c.cfg.HealthMaxErrorRatio}
	judge := bake > 0 || len(req.canary) > 0
	var probe <-chan string
	if judge {
		c.post(evWatch{g: g, rule: rule})
		if url := cmp.Or(req.healthURL, c.cfg.HealthURL); url != "" {
			stop := make(chan struct{})
			defer close(stop)
			probe = probeHealth(url, stop)
		}
	}

	// The canary: a share of new connections per step, judged at each.
	var stepStart time.Time
	for _, w := range req.canary {
		if w >= 100 {
			break
		}
		if err := c.command(g, wire.Msg{Type: wire.TypeSteer, Weight: w, Health: rule}, commandTimeout); err != nil {
			c.pin(prev)
			c.post(evDrain{g: g})
			return fmt.Errorf("gen %d failed the canary steering at %d%%: %v", g.n, w, err)
		}
		c.post(evCanary{weight: w})
		emit(wire.Event{Phase: wire.PhaseCanary, Generation: g.n, Weight: w})
		stepStart = time.Now()
		var step <-chan time.Time
		if req.step > 0 {
			t := time.NewTimer(req.step)
			defer t.Stop()
			step = t.C
		} else {
			emit(wire.Event{Phase: wire.PhaseInfo, Generation: g.n, Text: fmt.Sprintf("canary waits at %d%%: rollover promote, or rollover abort", w)})
		}
		why, detail := c.await(g, b.ctl, probe, step)
		switch why {
		case "":
			continue
		case wire.TypePromote:
		case "stop":
			return c.rollBack(r, g, prev, "abort", "the coordinator is stopping", fmt.Sprintf("%v into its %d%% canary step", time.Since(stepStart).Round(100*time.Millisecond), w), false, emit)
		default:
			return c.rollBack(r, g, prev, why, detail, fmt.Sprintf("%v into its %d%% canary step", time.Since(stepStart).Round(100*time.Millisecond), w), false, emit)
		}
		break // promoted
	}

	if steer {
		if err := c.command(g, wire.Msg{Type: wire.TypeSteer, Health: rule}, commandTimeout); err != nil {
			// The group may already point at N+1: point it back at N, then
			// let N+1 hand over what it queued rather than reset it.
			c.pin(prev)
			c.post(evDrain{g: g})
			return fmt.Errorf("gen %d failed the steering verification: %v", g.n, err)
		}
		if len(req.canary) > 0 {
			c.post(evCanary{weight: 100})
			emit(wire.Event{Phase: wire.PhaseCanary, Generation: g.n, Weight: 100})
		}
	}
	activated, ok := ask(c, func(ch chan error) event { return evActivate{g: g, reply: ch} })
	if !ok {
		return ErrStopping
	}
	if activated != nil {
		if steer {
			c.pin(prev)
		}
		return activated
	}
	emit(wire.Event{Phase: wire.PhaseActive, Generation: g.n, PID: g.pid})
	if judge && bake == 0 {
		c.post(evWatch{g: g}) // judged through its canary; active now
	}

	if bake > 0 {
		// prev keeps its listener, steered away, and moves its keep-alive
		// clients on; it takes the port back if g fails.
		released := make(chan struct{})
		go func() {
			defer close(released)
			if err := c.command(prev, wire.Msg{Type: wire.TypeRelease}, commandTimeout); err != nil && prev.steerable {
				c.log.Warn("release of the old generation failed", "gen", prev.n, "err", err)
			}
		}()
		c.post(evRelease{g: prev})
		emit(wire.Event{Phase: wire.PhaseBaking, Generation: g.n, Millis: bake.Milliseconds()})
		t := time.NewTimer(bake)
		defer t.Stop()
		activeAt := time.Now()
		why, detail := c.await(g, b.ctl, probe, t.C)
		switch why {
		case "", wire.TypePromote, "stop":
			c.post(evWatch{g: g}) // baked: from now on an exit is a crash to restart
		default:
			<-released // resume after release, never before
			return c.rollBack(r, g, prev, why, detail, fmt.Sprintf("%v after activation (during the %v bake)", time.Since(activeAt).Round(100*time.Millisecond), bake), true, emit)
		}
	}

	st, _ := ask(c, func(ch chan wire.Stats) event { return evDrain{g: prev, reply: ch} })
	r.drained = prev
	emit(wire.Event{Phase: wire.PhaseDraining, Generation: prev.n, Stats: &st})
	t := time.NewTimer(c.cfg.DrainTimeout + c.cfg.KillGrace + time.Second)
	defer t.Stop()
	select {
	case <-prev.left:
	case <-t.C:
	}
	emit(wire.Event{Phase: wire.PhaseLeft, Generation: prev.n})
	if g.steerable {
		c.pin(g)
	}
	return nil
}

// await waits for the end of a canary step or a bake: "" when timer fires,
// a promote or abort by hand, "stop", or why g failed (exited, health,
// health-url) with the detail.
func (c *Coordinator) await(g *gen, ctl <-chan string, probe <-chan string, timer <-chan time.Time) (why, detail string) {
	select {
	case <-timer:
		return "", ""
	case w := <-ctl:
		return w, "by hand"
	case <-g.exited:
		return "exited", exitText(g.exitErr)
	case <-g.unhealthy:
		return "health", g.unhealthyWhy
	case d := <-probe:
		return "health-url", d
	case <-c.stopCh:
		return "stop", ""
	}
}

// rollBack gives the port back to prev and drains g. released: prev was in
// g's bake (it resumes); otherwise it never stopped being active (a canary)
// and only re-pins.
func (c *Coordinator) rollBack(r *rolled, g, prev *gen, why, detail, when string, released bool, emit func(wire.Event)) error {
	if prev.steerable {
		cmd := wire.TypePin
		if released {
			cmd = wire.TypeResume
		}
		if err := c.command(prev, wire.Msg{Type: cmd}, commandTimeout); err != nil {
			c.log.Warn("the old generation did not take the port back", "gen", prev.n, "err", err)
		}
	}
	c.done(func(ch chan struct{}) event { return evRollback{g: g, prev: prev, reason: why, reply: ch} })
	r.drained, r.rolledBack = g, true
	var what string
	switch why {
	case "exited":
		what = fmt.Sprintf("gen %d exited (%s) %s", g.n, detail, when)
	case "health":
		what = fmt.Sprintf("gen %d failed its health %s: %s", g.n, when, detail)
	case "health-url":
		what = fmt.Sprintf("gen %d failed the health probe %s: %s", g.n, when, detail)
	default:
		what = fmt.Sprintf("gen %d was aborted (%s) %s", g.n, detail, when)
	}
	r.reason = what
	emit(wire.Event{Phase: wire.PhaseRolledBack, Generation: prev.n, Text: what})
	err := fmt.Errorf("%s: rolled back to gen %d", what, prev.n)
	if why == "exited" {
		err = fmt.Errorf("%w; last stderr: %s", err, g.tail.String())
	}
	return err
}

// sameAddrs refuses a new generation that does not listen on every address
// the active one serves: clients of the missing ones would be refused once
// the old one leaves. Apps without the library report no addresses.
func sameAddrs(prev, g *gen) error {
	if len(prev.addrs) == 0 || len(g.addrs) == 0 {
		return nil
	}
	for _, a := range prev.addrs {
		if !slices.Contains(g.addrs, a) {
			return fmt.Errorf("gen %d listens on %s, not on every address gen %d serves (%s): refused, gen %d keeps serving",
				g.n, strings.Join(g.addrs, ", "), prev.n, strings.Join(prev.addrs, ", "), prev.n)
		}
	}
	return nil
}

// probeHealth GETs url every 250ms on a new connection each time (so the
// kernel's steering picks the generation) until stop; two failures in a row
// send why on the returned channel.
func probeHealth(url string, stop <-chan struct{}) <-chan string {
	out := make(chan string, 1)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	go func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		fails := 0
		for {
			why := ""
			resp, err := client.Get(url)
			switch {
			case err != nil:
				why = err.Error()
			case resp.StatusCode >= 400:
				why = fmt.Sprintf("GET %s: %s", url, resp.Status)
			}
			if resp != nil {
				_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
				resp.Body.Close()
			}
			if why == "" {
				fails = 0
			} else if fails++; fails == 2 {
				out <- why
				return
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// numbers are a generation's counters and what its drain deadline cut.
type numbers struct {
	stats                   wire.Stats
	forcedConns, forcedReqs int64
}

func (c *Coordinator) numbers(g *gen) numbers {
	n, _ := ask(c, func(ch chan numbers) event { return qNumbers{g: g, reply: ch} })
	return n
}

// compute builds r's report from what is known now.
func (c *Coordinator) compute(r *rolled) *wire.Report {
	rep := &wire.Report{Generation: r.g.n, RolledBack: r.rolledBack, Reason: r.reason, Millis: time.Since(r.start).Milliseconds(), Errors: []wire.GenErrors{}}
	for _, g := range []*gen{r.prev, r.g} {
		if g == nil {
			continue
		}
		n := c.numbers(g)
		var base wire.Stats
		if g == r.prev {
			rep.Previous, base = g.n, r.base
		}
		rep.ForcedConnections += n.forcedConns
		rep.ForcedRequests += n.forcedReqs
		rep.Errors = append(rep.Errors, wire.GenErrors{Generation: g.n, R5xx: n.stats.R5xx - min(base.R5xx, n.stats.R5xx), Panics: n.stats.Panics - min(base.Panics, n.stats.Panics)})
	}
	if now := kernelCounters(); r.kernel != nil && now != nil {
		rep.Kernel = map[string]uint64{}
		for k, v := range now {
			rep.Kernel[k] = v - min(r.kernel[k], v)
		}
	}
	return rep
}

// closeWindow completes r's report once the generation that drains because
// of it is gone (bounded), logs it, and keeps it for status.
func (c *Coordinator) closeWindow(r *rolled) {
	if d := r.drained; d != nil {
		t := time.NewTimer(c.cfg.DrainTimeout + 2*c.cfg.KillGrace + time.Second)
		select {
		case <-d.exited:
		case <-t.C:
		}
		t.Stop()
	}
	r.report = c.compute(r)
	close(r.done)
	if r.report.Lost() {
		c.log.Warn(r.report.String(), "gen", r.g.n, "forced_connections", r.report.ForcedConnections, "forced_requests", r.report.ForcedRequests)
	} else {
		c.log.Info(r.report.String(), "gen", r.g.n)
	}
	c.post(evReport{r: r.report})
}

// waitReport shows the drain of the generation r drains, then r's report.
func (c *Coordinator) waitReport(r *rolled, emit func(wire.Event)) {
	c.waitDrain(r.drained, emit)
	<-r.done
	emit(wire.Event{Phase: wire.PhaseReport, Report: r.report})
}

// kernelCounters reads the TcpExt counters of the report from
// /proc/net/netstat (nil when unreadable). procfs parses this file too, but
// without TCPMigrateReq*.
func kernelCounters() map[string]uint64 {
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

// logged returns emit that also logs each event, with its generation and
// pid as fields.
func (c *Coordinator) logged(emit func(wire.Event)) func(wire.Event) {
	return func(e wire.Event) {
		attrs := []any{"phase", e.Phase}
		if e.Generation != 0 {
			attrs = append(attrs, "gen", e.Generation)
		}
		if e.PID != 0 {
			attrs = append(attrs, "pid", e.PID)
		}
		if e.Millis != 0 {
			attrs = append(attrs, "ms", e.Millis)
		}
		if e.Stats != nil {
			attrs = append(attrs, "inflight", e.Stats.Inflight, "connections", e.Stats.Connections)
		}
		c.log.Info(e.String(), attrs...)
		if emit != nil {
			emit(e)
		}
	}
}

// awaitReady waits for g's ready, its exit, the ready timeout or a stop.
func (c *Coordinator) awaitReady(g *gen) error {
	t := time.NewTimer(c.cfg.ReadyTimeout)
	defer t.Stop()
	select {
	case <-g.ready:
		return nil
	case <-g.exited:
		return fmt.Errorf("gen %d exited before it was ready (%s); last stderr: %s", g.n, exitText(g.exitErr), g.tail.String())
	case <-t.C:
		g.kill(c.cfg.KillGrace)
		<-g.exited
		return fmt.Errorf("gen %d was not ready within %v (--ready-timeout; %s); last stderr: %s", g.n, c.cfg.ReadyTimeout, readyHint(g.launch), g.tail.String())
	case <-c.stopCh:
		g.kill(c.cfg.KillGrace)
		<-g.exited
		return ErrStopping
	}
}

// pin points g's reuseport groups at index 0 (the longest-serving member).
func (c *Coordinator) pin(g *gen) {
	if err := c.command(g, wire.Msg{Type: wire.TypePin}, commandTimeout); err != nil {
		c.log.Warn("re-pin failed", "gen", g.n, "err", err)
	}
}

// order sends g its drain order: the library's drain command, or, for an
// app without the library, its drain signal. It returns at once.
func (c *Coordinator) order(g *gen, conn *genConn) {
	if conn == nil {
		// The app leaves the port when its listener is gone (if we know its
		// address) or, as far as we can tell, at once.
		c.log.Info("draining by signal", "gen", g.n, "pid", g.pid, "signal", g.launch.DrainSignal)
		_ = g.proc.Signal(g.launch.DrainSignal)
		go func() {
			if g.launch.Addr != "" {
				waitListening(g.pid, g.launch.Addr, false, c.cfg.DrainTimeout, g.exited)
			}
			c.post(evClosedListener{g: g})
		}()
		return
	}
	go func() {
		m := wire.Msg{Type: wire.TypeDrain, GraceMS: c.cfg.DrainGrace.Milliseconds(), TimeoutMS: c.cfg.DrainTimeout.Milliseconds()}
		if _, err := conn.ask(g, c.cmdID.Add(1), m, commandTimeout); err != nil {
			c.log.Warn("drain command failed; sending SIGTERM", "gen", g.n, "err", err)
			// Signal fails safely once the process is reaped; a bare pid
			// might by then belong to someone else.
			_ = g.proc.Signal(syscall.SIGTERM)
		}
	}()
}

// waitDrain reports g's drain until it exits.
func (c *Coordinator) waitDrain(g *gen, emit func(wire.Event)) {
	if g == nil {
		return
	}
	t := time.NewTicker(wire.StatsInterval)
	defer t.Stop()
	var last wire.Stats
	for {
		select {
		case <-g.exited:
			var ms int64 // 0: it exited before it was told to drain (a rollback)
			if !g.drainStart.IsZero() {
				ms = time.Since(g.drainStart).Milliseconds()
			}
			emit(wire.Event{Phase: wire.PhaseDrained, Generation: g.n, Millis: ms})
			return
		case <-t.C:
			st, ok := ask(c, func(r chan wire.Stats) event { return qStats{g: g, reply: r} })
			if ok && st != last {
				last = st
				emit(wire.Event{Phase: wire.PhaseDraining, Generation: g.n, Stats: &st})
			}
		}
	}
}

// exited reports the end of g's process: what is left of its group is
// killed, then the machine learns of it.
func (c *Coordinator) exited(g *gen, err error) {
	g.signal(syscall.SIGKILL)
	if g.notify != nil {
		g.notify.close()
	}
	c.post(evExited{g: g, err: err})
}

// restart rolls over to the last active command line.
func (c *Coordinator) restart() {
	go func() {
		if _, err := c.tryRollover(rolloverReq{}, nil); err != nil {
			c.log.Error("restart failed", "err", err)
		}
	}()
}

// watchReady makes g ready the way its launch says; the library's ready
// message arrives on the control socket instead.
func (c *Coordinator) watchReady(g *gen) {
	switch g.launch.Ready {
	case ReadyNotify:
		go g.notify.read(func(kv map[string]string) {
			if st, ok := kv["STATUS"]; ok {
				c.post(evNotifyStatus{g: g, text: st})
			}
			if kv["READY"] == "1" {
				c.post(evReady{g: g})
			}
		})
	case ReadyListen:
		go func() {
			if waitListening(g.pid, g.launch.Addr, true, c.cfg.ReadyTimeout, g.exited) {
				c.post(evReady{g: g})
			}
		}()
	}
}

func readyHint(l Launch) string {
	switch l.Ready {
	case ReadyNotify:
		return "it never sent READY=1 to $NOTIFY_SOCKET"
	case ReadyListen:
		return "nothing in its process group listened on " + l.Addr
	default:
		return "does it serve through the rollover library? apps without it need --ready=notify or --ready=listen"
	}
}
