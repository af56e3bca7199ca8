package coordinator

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// commandTimeout bounds a generation's answer to steer and pin.
const commandTimeout = 5 * time.Second

// tryRollover runs one rollover unless the machine refuses it (one is in
// progress, the coordinator stops, the active generation is not the one
// expected). It returns the generation that was active before, which is
// now draining.
// Every event is logged, whoever asked; emit, when set, also gets it.
func (c *Coordinator) tryRollover(req rolloverReq, emit func(wire.Event)) (*gen, error) {
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
	err := c.roll(b, emit)
	if err != nil && !errors.Is(err, ErrCommand) && !errors.Is(err, ErrStopping) && !errors.Is(err, ErrUsage) {
		err = fmt.Errorf("%w: %v", ErrRollover, err)
	}
	c.done(func(r chan struct{}) event { return evFinish{g: b.g, err: err, reply: r} })
	if err != nil {
		return nil, err
	}
	return b.prev, nil
}

// roll takes a spawned generation through the rollover: ready, steered,
// active, then the old generation drained off the port and the new one
// re-pinned. Until the new generation is active, every failure ends it and
// leaves the old one serving untouched.
func (c *Coordinator) roll(b began, emit func(wire.Event)) error {
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

	steer := prev != nil && g.steerable
	if prev != nil && !g.steerable {
		c.log.Warn("generation cannot be steered; the hand-over relies on net.ipv4.tcp_migrate_req", "gen", g.n, "reason", g.steerErr)
	}
	if steer {
		if err := c.command(g, wire.Msg{Type: wire.TypeSteer}, commandTimeout); err != nil {
			// The group may already point at N+1: point it back at N, then
			// let N+1 hand over what it queued rather than reset it.
			c.pin(prev)
			c.post(evDrain{g: g})
			return fmt.Errorf("gen %d failed the steering verification: %v", g.n, err)
		}
	}
	activated, ok := ask(c, func(r chan error) event { return evActivate{g: g, last: prev == nil, reply: r} })
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
	if prev == nil {
		return nil // generation 1 (or a restart): pinned at ready, alone on the port
	}
	st, _ := ask(c, func(r chan wire.Stats) event { return evDrain{g: prev, reply: r} })
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
			emit(wire.Event{Phase: wire.PhaseDrained, Generation: g.n, Millis: time.Since(g.drainStart).Milliseconds()})
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
