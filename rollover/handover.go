package rollover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// ready pins the reuseport groups to the active generation (index 0; this
// process when it is alone) and tells the coordinator it serves.
func (a *agent) ready() error {
	a.readyOnce.Do(func() {
		m := wire.Msg{Type: wire.TypeReady, Steerable: true}
		lns := a.snapshotListeners()
		if a.cfg.naive {
			lns = nil
			m.Steerable, m.SteerError = false, EnvHandover+"=naive"
		}
		if len(lns) == 0 && !a.cfg.naive {
			m.Steerable, m.SteerError = false, "no listener from rollover.Listen or rollover.Serve"
		}
		for _, l := range lns {
			m.Addrs = append(m.Addrs, l.Addr().String())
			if !a.supervised() {
				continue // standalone: nothing to hand over to
			}
			if err := reuse.Steer(l, 0); err != nil && m.Steerable {
				m.Steerable, m.SteerError = false, err.Error()
			}
		}
		a.mu.Lock()
		a.readyMsg = m
		a.mu.Unlock()
		a.readyErr = a.send(m)
	})
	return a.readyErr
}

func (a *agent) pin() error {
	for _, l := range a.snapshotListeners() {
		if err := reuse.Steer(l, 0); err != nil {
			return err
		}
	}
	return nil
}

// steer makes every listener's group send new connections to this process
// (index 1, behind the old generation at 0) and proves it with a probe
// connection per listener.
func (a *agent) steer() error {
	for _, l := range a.snapshotListeners() {
		if err := reuse.Steer(l, 1); err != nil {
			return err
		}
		if err := a.probe(l); err != nil {
			return err
		}
	}
	return nil
}

// accepted tells a waiting probe that its connection arrived here.
func (a *agent) accepted(c net.Conn) {
	key := c.RemoteAddr().String()
	a.mu.Lock()
	defer a.mu.Unlock()
	if ch := a.probes[key]; ch != nil {
		close(ch)
		delete(a.probes, key)
		return
	}
	// Loopback accepts can beat the prober to registering its address.
	a.early[key] = true
}

// probe dials the listener and waits until this process accepted that very
// connection.
func (a *agent) probe(l *listener) error {
	addr, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return fmt.Errorf("rollover: steer verify: %s is not a TCP address", l.Addr())
	}
	target := *addr
	if target.IP.IsUnspecified() {
		if target.IP.To4() != nil {
			target.IP = net.IPv4(127, 0, 0, 1)
		} else {
			target.IP = net.IPv6loopback
		}
	}
	a.probing.Add(1)
	defer a.probing.Add(-1)
	d := net.Dialer{Timeout: probeTimeout}
	c, err := d.Dial("tcp", target.String())
	if err != nil {
		return fmt.Errorf("rollover: steer verify: %w", err)
	}
	defer c.Close()
	ch := make(chan struct{})
	key := c.LocalAddr().String()
	a.mu.Lock()
	if a.early[key] {
		close(ch)
	} else {
		a.probes[key] = ch
	}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.probes, key)
		clear(a.early)
		a.mu.Unlock()
	}()
	select {
	case <-ch:
		return nil
	case <-time.After(probeTimeout):
		return fmt.Errorf("rollover: steer verify: probe to %s was not accepted by this generation within %v", target.String(), probeTimeout)
	}
}

// drain starts the hand-over once: answer with Connection: close from now
// on, keep accepting for the grace (clients whose handshake the old program
// still routed here), wait for the accept queues to empty, then close.
func (a *agent) drain(o drainOrder) {
	a.drainOnce.Do(func() {
		if o.timeout <= 0 {
			o.timeout = a.drainTimeout()
		}
		a.order = o
		a.closing.Store(true)
		close(a.draining)
		go a.handOver(o)
	})
}

func (a *agent) handOver(o drainOrder) {
	if !a.cfg.naive && o.grace > 0 {
		// The grace is a span of time, not a condition: nothing observable
		// says that the last handshake routed here has completed.
		<-time.After(o.grace)
	}
	for _, l := range a.snapshotListeners() {
		if !a.cfg.naive {
			drainQueue(l)
		}
		l.Close()
	}
	// Tell the coordinator before Serve may go on to report done: closed
	// comes first on the wire.
	_ = a.send(wire.Msg{Type: wire.TypeClosed})
	close(a.closed)
}

// drainQueue waits, bounded by DefaultQueueDrain, until the accept queue of
// l reads empty, so that closing it resets no connection.
func drainQueue(l net.Listener) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultQueueDrain)
	defer cancel()
	if err := reuse.DrainQueue(ctx, l, time.Millisecond); err != nil && !errors.Is(err, errors.ErrUnsupported) {
		fmt.Fprintf(os.Stderr, "rollover: %v\n", err)
	}
}

// awaitConnections waits until the connections are gone, bounded by the
// drain timeout less a margin, so that the coordinator sees this generation
// exit before it forces it. A naive hand-over does not wait.
func (a *agent) awaitConnections() {
	if a.cfg.naive {
		return
	}
	o := a.order
	bound := time.NewTimer(o.timeout - min(2*time.Second, o.timeout/10))
	defer bound.Stop()
	for {
		gone := a.idle.wait()
		if a.counter.Snapshot().Connections == 0 {
			return
		}
		select {
		case <-gone:
		case <-bound.C:
			return
		}
	}
}
