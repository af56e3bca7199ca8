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

// tryRollover starts a rollover to l unless one is running (or, with
// expect, unless the active generation is no longer expect); l's empty
// fields are the active generation's (or, when none, the last active one's
// or generation 1's). It returns the generation that was active before,
// which is now draining.
func (c *Coordinator) tryRollover(l Launch, expect int, emit func(wire.Event)) (*gen, error) {
	var busy, stopping bool
	active := 0
	base := c.launch
	alive := c.do(func() {
		busy, stopping = c.s.busy, c.s.stopping
		if c.s.active != nil {
			active = c.s.active.n
		}
		if expect != 0 && expect != active {
			return
		}
		if !busy && !stopping {
			c.s.busy = true
			switch {
			case c.s.active != nil:
				base = c.s.active.launch
			case c.s.lastLaunch != nil:
				base = *c.s.lastLaunch
			}
		}
	})
	switch {
	case stopping, !alive:
		return nil, ErrStopping
	case expect != 0 && expect != active:
		return nil, fmt.Errorf("%w: the active generation is %d, not %d (--expect-generation)", ErrStale, active, expect)
	case busy:
		return nil, fmt.Errorf("%w: wait for it to finish and try again", ErrInProgress)
	}
	return c.rollover(l.withDefaults(base), emit)
}

// rollover runs the state machine of DESIGN.md: spawn N+1, wait for ready,
// steer, activate, drain N, re-pin. The caller has set busy; rollover clears
// it once N has left the port, so the next rollover can start while N is
// still finishing its connections. Until N+1 is active, every failure kills
// N+1 and leaves N alone.
func (c *Coordinator) rollover(l Launch, emit func(wire.Event)) (prev *gen, err error) {
	reloading := false
	defer func() {
		result := "ok"
		if err != nil {
			result = "failed"
			if !errors.Is(err, ErrCommand) && !errors.Is(err, ErrStopping) && !errors.Is(err, ErrUsage) {
				err = fmt.Errorf("%w: %v", ErrRollover, err)
			}
		}
		c.metrics.Rollovers.WithLabelValues(result).Inc()
		c.do(func() {
			c.s.busy = false
			if err == nil {
				c.s.started = true
			}
			if c.s.active == nil && c.s.started && !c.s.stopping {
				c.scheduleRestart()
			}
		})
		if reloading {
			failure := ""
			if err != nil {
				failure = err.Error()
			}
			c.notifyReady(failure)
		}
	}()
	if len(l.Argv) == 0 {
		return nil, fmt.Errorf("%w: no command line to roll to; pass one: rollover next -- CMD [ARGS...]", ErrUsage)
	}
	if err := l.check(); err != nil {
		return nil, err
	}
	l.Argv = append([]string(nil), l.Argv...)
	g := newGen(l)
	if l.Ready != ReadyLibrary {
		g.steerErr = "the app does not link the rollover library (--ready=" + l.Ready + ")"
	}
	// Spawn on the owner goroutine, so the generation is known (number and
	// pid) before its hello can arrive.
	var spawnErr error
	if !c.do(func() {
		c.s.next++
		g.n = c.s.next
		if spawnErr = spawnProcess(g, c.cfg.Socket, c.cfg.AdoptTimeout, c.log); spawnErr == nil {
			c.s.gens[g.n] = g
		}
	}) {
		return nil, ErrStopping // the owner loop is gone: Run returned
	}
	if spawnErr != nil {
		return nil, fmt.Errorf("start gen %d: %w", g.n, spawnErr)
	}
	go c.wait(g)
	c.persist()
	emit(wire.Event{Phase: wire.PhaseStarted, Generation: g.n, PID: g.pid})
	if c.isStarted() {
		reloading = true
		c.notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=rolling over to generation %d", monotonicUsec(), g.n))
	}
	c.watchReady(g)

	timer := time.NewTimer(c.cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case <-g.ready:
	case <-g.exited:
		return nil, fmt.Errorf("gen %d exited before it was ready (%s); last stderr: %s", g.n, exitText(g.exitErr), g.stderrTail())
	case <-timer.C:
		g.kill(c.cfg.KillGrace)
		return nil, fmt.Errorf("gen %d was not ready within %v (--ready-timeout; %s); last stderr: %s", g.n, c.cfg.ReadyTimeout, readyHint(l), g.stderrTail())
	case <-c.stopCh:
		g.kill(c.cfg.KillGrace)
		return nil, ErrStopping
	}
	readyIn := time.Since(g.start)
	c.metrics.Ready.Observe(readyIn.Seconds())
	emit(wire.Event{Phase: wire.PhaseReady, Generation: g.n, Millis: readyIn.Milliseconds()})

	var steerable bool
	var steerErr string
	c.do(func() { prev, steerable, steerErr = c.s.active, g.steerable, g.steerErr })
	if !steerable && prev != nil {
		c.log.Warn("generation cannot be steered; the hand-over relies on net.ipv4.tcp_migrate_req", "gen", g.n, "reason", steerErr)
	}
	if prev != nil && steerable {
		if err := c.command(g, wire.Msg{Type: wire.TypeSteer}, commandTimeout); err != nil {
			// The group may already point at N+1: point it back at N, then
			// let N+1 hand over what it queued rather than reset it.
			if perr := c.command(prev, wire.Msg{Type: wire.TypePin}, commandTimeout); perr != nil {
				c.log.Warn("re-pin of the active generation failed", "gen", prev.n, "err", perr)
			}
			c.drain(g)
			return nil, fmt.Errorf("gen %d failed the steering verification: %v", g.n, err)
		}
	}
	exited := false
	c.do(func() {
		select {
		case <-g.exited:
			// wait() already ran and saw no active generation to restart.
			exited = true
			return
		default:
		}
		c.s.active = g
		g.state = stateActive
		g.activeAt = time.Now()
		if prev != nil {
			pl := prev.launch
			c.s.previous = &pl
		}
	})
	if exited {
		if prev != nil && steerable {
			if perr := c.command(prev, wire.Msg{Type: wire.TypePin}, commandTimeout); perr != nil {
				c.log.Warn("re-pin of the active generation failed", "gen", prev.n, "err", perr)
			}
		}
		return nil, fmt.Errorf("gen %d exited right after it was ready (%s); last stderr: %s", g.n, exitText(g.exitErr), g.stderrTail())
	}
	c.persist()
	emit(wire.Event{Phase: wire.PhaseActive, Generation: g.n, PID: g.pid})

	if prev != nil {
		c.drain(prev)
		emit(wire.Event{Phase: wire.PhaseDraining, Generation: prev.n, Stats: c.statsOf(prev)})
		select {
		case <-prev.left:
		case <-time.After(c.cfg.DrainTimeout + c.cfg.KillGrace + time.Second):
		}
		emit(wire.Event{Phase: wire.PhaseLeft, Generation: prev.n})
	}
	if steerable {
		if err := c.command(g, wire.Msg{Type: wire.TypePin}, commandTimeout); err != nil {
			c.log.Warn("re-pin failed", "gen", g.n, "err", err)
		}
	}
	return prev, nil
}

func (c *Coordinator) statsOf(g *gen) *wire.Stats {
	var st wire.Stats
	c.do(func() { st = g.stats })
	return &st
}

// drain tells g to hand its port over and finish its connections, once. Past
// the drain timeout it is killed and counted as a forced drain.
func (c *Coordinator) drain(g *gen) {
	first := false
	c.do(func() {
		if g.drainStart.IsZero() {
			first = true
			g.drainStart = time.Now()
			g.state = stateDraining
		}
	})
	if !first {
		return
	}
	var connected bool
	c.do(func() { connected = g.conn != nil })
	if !connected {
		// An app without the library drains on its signal; it leaves the
		// port when its listener is gone (if we know its address) or, as
		// far as we can tell, at once.
		c.log.Info("draining by signal", "gen", g.n, "pid", g.pid, "signal", g.launch.DrainSignal)
		_ = g.proc.Signal(g.launch.DrainSignal)
		go func() {
			if g.launch.Addr != "" {
				waitListening(g.pid, g.launch.Addr, false, c.cfg.DrainTimeout, g.exited)
			}
			c.do(func() { closeOnce(g.left) })
		}()
	} else if err := c.command(g, wire.Msg{Type: wire.TypeDrain, GraceMS: c.cfg.DrainGrace.Milliseconds(), TimeoutMS: c.cfg.DrainTimeout.Milliseconds()}, commandTimeout); err != nil {
		c.log.Warn("drain command failed; sending SIGTERM", "gen", g.n, "err", err)
		// Signal fails safely once the process is reaped; a bare pid might
		// by then belong to someone else.
		_ = g.proc.Signal(syscall.SIGTERM)
	}
	go c.watchDrain(g)
}

// watchDrain kills g if it is still draining past the drain timeout.
func (c *Coordinator) watchDrain(g *gen) {
	select {
	case <-g.exited:
	case <-time.After(c.cfg.DrainTimeout):
		c.metrics.ForcedDrains.Inc()
		c.log.Warn("drain timed out; killing", "gen", g.n, "pid", g.pid, "drain_timeout", c.cfg.DrainTimeout)
		g.kill(c.cfg.KillGrace)
	}
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
			var start time.Time
			c.do(func() { start = g.drainStart })
			emit(wire.Event{Phase: wire.PhaseDrained, Generation: g.n, Millis: time.Since(start).Milliseconds()})
			return
		case <-t.C:
			if st := c.statsOf(g); *st != last {
				last = *st
				emit(wire.Event{Phase: wire.PhaseDraining, Generation: g.n, Stats: st})
			}
		}
	}
}

// wait reaps g and updates the state when it exits.
func (c *Coordinator) wait(g *gen) {
	ps, err := g.proc.Wait()
	if err == nil && !ps.Success() {
		err = errors.New(ps.String())
	}
	c.gone(g, err)
}

// gone records that g's process has exited with err.
func (c *Coordinator) gone(g *gen, err error) {
	// Leave no process of the generation's group behind.
	g.signal(syscall.SIGKILL)
	if g.notify != nil {
		g.notify.close()
	}
	c.do(func() {
		g.exitErr = err
		delete(c.s.gens, g.n)
		closeOnce(g.left)
		close(g.exited)
		switch {
		case !g.drainStart.IsZero():
			d := time.Since(g.drainStart)
			c.metrics.Drain.Observe(d.Seconds())
			c.log.Info("generation drained", "gen", g.n, "pid", g.pid, "after", d.Round(time.Millisecond), "exit", exitText(err))
		case c.s.active == g:
			c.s.active = nil
			c.s.activeExits++
			c.metrics.Crashes.Inc()
			gl := g.launch
			c.s.lastLaunch = &gl
			c.log.Error("ACTIVE GENERATION EXITED ON ITS OWN; restarting its command", "gen", g.n, "pid", g.pid, "exit", exitText(err), "uptime", time.Since(g.start).Round(time.Millisecond))
			if time.Since(g.activeAt) > time.Minute {
				c.s.crashes = 0
			}
			if !c.s.busy && !c.s.stopping {
				c.scheduleRestart()
			}
		}
	})
	c.persist()
}

// scheduleRestart starts the last active command line again after an
// exponential backoff. Owner only.
func (c *Coordinator) scheduleRestart() {
	if c.s.restartPending || c.s.lastLaunch == nil {
		return
	}
	delay := min(MaxRestartDelay, 500*time.Millisecond<<min(c.s.crashes, 10))
	c.s.crashes++
	c.s.restartPending = true
	c.log.Warn("restarting after backoff", "delay", delay, "attempt", c.s.crashes)
	time.AfterFunc(delay, func() {
		stale := false
		c.do(func() {
			c.s.restartPending = false
			stale = c.s.active != nil // someone rolled over meanwhile
		})
		if stale {
			return
		}
		if _, err := c.tryRollover(Launch{}, 0, func(e wire.Event) { c.log.Info(e.String()) }); err != nil {
			c.log.Error("restart failed", "err", err)
		}
	})
}

func (c *Coordinator) isStarted() bool {
	var started bool
	c.do(func() { started = c.s.started })
	return started
}

// watchReady makes g's ready channel close the way its launch says; the
// library's ready message arrives on the control socket (see genMsg).
func (c *Coordinator) watchReady(g *gen) {
	markReady := func() {
		c.do(func() {
			if g.state == stateStarting {
				g.state = stateReady
			}
			closeOnce(g.ready)
		})
	}
	switch g.launch.Ready {
	case ReadyNotify:
		go g.notify.read(func(kv map[string]string) {
			if st, ok := kv["STATUS"]; ok {
				c.do(func() { g.notifyStatus = st })
			}
			if kv["READY"] == "1" {
				markReady()
			}
		})
	case ReadyListen:
		go func() {
			if waitListening(g.pid, g.launch.Addr, true, c.cfg.ReadyTimeout, g.exited) {
				markReady()
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
