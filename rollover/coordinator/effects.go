package coordinator

import (
	"context"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// This file is what the machine's effects and the rollout do to the world:
// orders and commands to generations, signals, and the watchers of
// readiness for apps without the library. Each goroutine runs as a task,
// which Run waits for.

// commandTimeout bounds a generation's answer to a command.
const commandTimeout = 5 * time.Second

// order sends g its drain order: the library's drain command, or, for an
// app without the library, its drain signal. It returns at once.
func (c *Coordinator) order(g *gen, conn *peerConn, remote, succ []remoteSocket) {
	if remote != nil && (conn == nil || g.launch.supervised()) {
		c.tasks.Go(func(ctx context.Context) { c.orderRemote(ctx, g, conn, remote, succ) })
		return
	}
	if conn == nil {
		// The app leaves the port when its listener is gone (if we know its
		// address) or, as far as we can tell, at once.
		c.log.Info("draining by signal", "gen", g.n, "pid", g.pid, "signal", g.launch.DrainSignal)
		_ = g.proc.Signal(g.launch.DrainSignal)
		c.tasks.Go(func(context.Context) { // bounded by the drain timeout and the exit
			if g.launch.Addr != "" {
				waitListening(g.pid, g.launch.Addr, false, c.cfg.DrainTimeout, g.gone)
			}
			c.post(evClosedListener{g: g})
		})
		return
	}
	c.tasks.Go(func(context.Context) {
		m := wire.Msg{Type: wire.TypeDrain, GraceMS: c.cfg.DrainGrace.Milliseconds(), TimeoutMS: c.cfg.DrainTimeout.Milliseconds()}
		if _, err := conn.roundTrip(g, c.cmdID.Add(1), m, commandTimeout); err != nil {
			c.log.Warn("drain command failed; sending SIGTERM", "gen", g.n, "err", err)
			// Signal fails safely once the process is reaped; a bare pid
			// might by then belong to someone else.
			_ = g.proc.Signal(syscall.SIGTERM)
		}
	})
}

// kill ends g without blocking: SIGTERM to its process group, SIGKILL
// after the kill grace.
func (c *Coordinator) kill(g *gen) {
	if g.end != nil {
		g.end() // exec.Cmd's Cancel, then its WaitDelay
		return
	}
	// Adopted: not our child.
	g.signal(syscall.SIGTERM)
	c.tasks.Go(func(ctx context.Context) {
		t := time.NewTimer(c.cfg.KillGrace)
		defer t.Stop()
		select {
		case <-g.gone:
		case <-ctx.Done():
		case <-t.C:
			g.signal(syscall.SIGKILL)
		}
	})
}

// cut counts the TCP connections g still holds, as the kernel sees them,
// then kills it: a hung generation reports no stats of its own.
func (c *Coordinator) cut(g *gen, port int) {
	c.tasks.Go(func(context.Context) {
		if n, ok := establishedConns(g.pid, port); ok {
			c.post(evCounted{g: g, conns: n})
		}
		c.kill(g)
	})
}

// after posts ev once d has passed, unless Run ends first.
func (c *Coordinator) after(d time.Duration, ev event) {
	c.tasks.Go(func(ctx context.Context) {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			c.post(ev)
		case <-ctx.Done():
		}
	})
}

// processEnded reports the end of g's process: what is left of its group
// is killed, then the machine learns of it.
func (c *Coordinator) processEnded(g *gen, err error) {
	g.signal(syscall.SIGKILL)
	if g.notify != nil {
		g.notify.close()
	}
	c.post(evExited{g: g, err: err})
}

// restart rolls over to the last active command line.
func (c *Coordinator) restart() { c.rollAgain("restart") }

// watchReady makes g ready the way its launch says; the library's ready
// message arrives on the control socket instead.
func (c *Coordinator) watchReady(g *gen) {
	switch {
	case g.launch.Ready == ReadyNotify || g.launch.supervised():
		c.tasks.Go(func(context.Context) {
			g.notify.read(func(kv map[string]string) {
				if st, ok := kv["STATUS"]; ok {
					c.post(evNotifyStatus{g: g, text: st})
				}
				if n, ok := instanceCount(kv); ok {
					c.post(evInstances{g: g, serving: n, exited: kv[notifyExited]})
				}
				if kv["READY"] == "1" {
					c.post(evReady{g: g})
				}
			})
		})
	case g.launch.Ready == ReadyListen:
		c.tasks.Go(func(context.Context) { // bounded by the ready timeout and the exit
			if waitListening(g.pid, g.launch.Addr, true, c.cfg.ReadyTimeout, g.gone) {
				c.post(evReady{g: g})
			}
		})
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

// logEvent logs a rollover's event, with its generation and pid as fields.
func (c *Coordinator) logEvent(e wire.Event) {
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
}
