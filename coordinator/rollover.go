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

// tryRollover starts a rollover to argv (nil: the active command line) unless
// one is running. It returns the generation that was active before, which
// is now draining.
func (c *Coordinator) tryRollover(argv []string, emit func(wire.Event)) (*gen, error) {
	var busy, stopping bool
	var active []string
	alive := c.do(func() {
		busy, stopping = c.s.busy, c.s.stopping
		if !busy && !stopping {
			c.s.busy = true
			if c.s.active != nil {
				active = c.s.active.argv
			} else {
				active = c.s.lastArgv
			}
		}
	})
	switch {
	case stopping, !alive:
		return nil, ErrStopping
	case busy:
		return nil, fmt.Errorf("%w: wait for it to finish and try again", ErrInProgress)
	}
	if len(argv) == 0 {
		argv = active
	}
	return c.rollover(argv, emit)
}

// rollover runs the state machine of DESIGN.md: spawn N+1, wait for ready,
// steer, activate, drain N, re-pin. The caller has set busy; rollover clears
// it once N has left the port, so the next rollover can start while N is
// still finishing its connections. Until N+1 is active, every failure kills
// N+1 and leaves N alone.
func (c *Coordinator) rollover(argv []string, emit func(wire.Event)) (prev *gen, err error) {
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
	}()
	if len(argv) == 0 {
		return nil, fmt.Errorf("%w: no command line to roll to; pass one: rollover next -- CMD [ARGS...]", ErrUsage)
	}
	if err := checkCommand(argv); err != nil {
		return nil, err
	}
	g := &gen{
		argv:    append([]string(nil), argv...),
		secret:  newSecret(),
		tail:    newTail(10),
		state:   stateStarting,
		pending: map[uint64]chan wire.Msg{},
		hello:   make(chan struct{}),
		ready:   make(chan struct{}),
		left:    make(chan struct{}),
		exited:  make(chan struct{}),
	}
	// Spawn on the owner goroutine, so the generation is known (number and
	// pid) before its hello can arrive.
	var spawnErr error
	if !c.do(func() {
		c.s.next++
		g.n = c.s.next
		if spawnErr = spawnProcess(g, c.cfg.Socket, c.log); spawnErr == nil {
			c.s.gens[g.n] = g
		}
	}) {
		return nil, ErrStopping // the owner loop is gone: Run returned
	}
	if spawnErr != nil {
		return nil, fmt.Errorf("start gen %d: %w", g.n, spawnErr)
	}
	go c.wait(g)
	emit(wire.Event{Phase: wire.PhaseStarted, Generation: g.n, PID: g.pid})

	timer := time.NewTimer(c.cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case <-g.ready:
	case <-g.exited:
		return nil, fmt.Errorf("gen %d exited before it was ready (%s); last stderr: %s", g.n, exitText(g.exitErr), g.stderrTail())
	case <-timer.C:
		g.kill(c.cfg.KillGrace)
		return nil, fmt.Errorf("gen %d was not ready within %v (--ready-timeout; does it serve through the rollover library?); last stderr: %s", g.n, c.cfg.ReadyTimeout, g.stderrTail())
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
			c.s.previous = prev.argv
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
	msg := wire.Msg{Type: wire.TypeDrain, GraceMS: c.cfg.DrainGrace.Milliseconds(), TimeoutMS: c.cfg.DrainTimeout.Milliseconds()}
	if err := c.command(g, msg, commandTimeout); err != nil {
		c.log.Warn("drain command failed; sending SIGTERM", "gen", g.n, "err", err)
		// Signal fails safely once the process is reaped; a bare pid might
		// by then belong to someone else.
		_ = g.proc.Signal(syscall.SIGTERM)
	}
	go func() {
		select {
		case <-g.exited:
		case <-time.After(c.cfg.DrainTimeout):
			c.metrics.ForcedDrains.Inc()
			c.log.Warn("drain timed out; killing", "gen", g.n, "pid", g.pid, "drain_timeout", c.cfg.DrainTimeout)
			g.kill(c.cfg.KillGrace)
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
	// Leave no process of the generation's group behind.
	g.signal(syscall.SIGKILL)
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
			c.s.lastArgv = g.argv
			c.log.Error("ACTIVE GENERATION EXITED ON ITS OWN; restarting its command", "gen", g.n, "pid", g.pid, "exit", exitText(err), "uptime", time.Since(g.start).Round(time.Millisecond))
			if time.Since(g.activeAt) > time.Minute {
				c.s.crashes = 0
			}
			if !c.s.busy && !c.s.stopping {
				c.scheduleRestart()
			}
		}
	})
}

// scheduleRestart starts the last active command line again after an
// exponential backoff. Owner only.
func (c *Coordinator) scheduleRestart() {
	if c.s.restartPending || len(c.s.lastArgv) == 0 {
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
		if _, err := c.tryRollover(nil, func(e wire.Event) { c.log.Info(e.String()) }); err != nil {
			c.log.Error("restart failed", "err", err)
		}
	})
}
