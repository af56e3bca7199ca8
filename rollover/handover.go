package rollover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// groupSocket is a listener or a UDP socket of this agent: both sit in a
// reuseport group, and are pinned, steered and probed alike.
type groupSocket interface {
	addr() string // as ready reports it
	gone() bool   // closed: out of its group
	steer(index int) error
	steerWeighted(weight int) error
	probe() error // proves that the group routes to this process
}

func (l *listener) addr() string                { return l.Addr().String() }
func (l *listener) gone() bool                  { return l.sockClosed.Load() }
func (l *listener) steer(index int) error       { return reuse.Steer(l, index) }
func (l *listener) steerWeighted(w int) error   { return reuse.SteerWeighted(l, w) }
func (l *listener) probe() error                { return l.a.probe(l) }
func (p *packetConn) addr() string              { return wire.UDPAddr + p.LocalAddr().String() }
func (p *packetConn) gone() bool                { return p.closed.Load() }
func (p *packetConn) steer(index int) error     { return reuse.SteerPacket(p, index) }
func (p *packetConn) steerWeighted(w int) error { return reuse.SteerWeightedPacket(p, w) }
func (p *packetConn) probe() error              { return p.a.probePacket(p) }

// sockets returns the listeners, then the UDP sockets.
func (a *agent) sockets() []groupSocket {
	var out []groupSocket
	for _, l := range a.snapshotListeners() {
		out = append(out, l)
	}
	for _, p := range a.snapshotPackets() {
		out = append(out, p)
	}
	return out
}

// ready pins the reuseport groups to the active generation (index 0; this
// process when it is alone) and tells the coordinator it serves, with the
// address of every listener and UDP socket.
func (a *agent) ready() error {
	a.readyOnce.Do(func() {
		m := wire.Msg{Type: wire.TypeReady, Steerable: true}
		socks := a.sockets()
		switch {
		case a.cfg.naive:
			socks = nil
			m.Steerable, m.SteerError = false, envHandover+"=naive"
		case len(socks) == 0:
			m.Steerable, m.SteerError = false, "no listener from rollover.Listen, rollover.ListenPacket or rollover.Serve"
		}
		if a.cfg.instance && m.Steerable {
			m.Steerable, m.SteerError = false, "one of several instances: the coordinator steers the generation's sockets"
		}
		for _, s := range socks {
			m.Addrs = append(m.Addrs, s.addr())
			if !a.supervised() || a.cfg.instance {
				continue // standalone: nothing to hand over to; an instance: the coordinator steers
			}
			if err := s.steer(0); err != nil && m.Steerable {
				m.Steerable, m.SteerError = false, err.Error()
			}
		}
		a.mu.Lock()
		a.readyMsg = m
		a.mu.Unlock()
		// Right behind the hello (send waits for it): the coordinator
		// reads it once it has welcomed this generation, and drops it
		// with the connection if it refused it.
		a.readyErr = a.send(m)
		if err := a.welcome(); err != nil {
			a.readyErr = err
		}
	})
	return a.readyErr
}

// pin points every group at index 0.
func (a *agent) pin() error {
	if a.cfg.instance {
		return nil // the coordinator steers
	}
	for _, s := range a.sockets() {
		if s.gone() {
			continue
		}
		if err := s.steer(0); err != nil {
			return err
		}
	}
	return nil
}

// steer makes every group send new connections and datagrams to this
// process (index 1, behind the old generation at 0): all of them, proven
// with a probe per socket, or, for a canary weight of 1–99, that share at
// random. One probe cannot prove a random split, so a canary step is
// verified by the kernel's acceptance of the program on every socket; the
// split itself is the kernel's. health, when set, is the rule this
// generation's counts are judged by from now on (see checkHealth).
func (a *agent) steer(weight int, health *wire.Health) error {
	a.setHealth(health)
	if a.cfg.instance {
		return nil // the coordinator steers
	}
	for _, s := range a.sockets() {
		if weight > 0 && weight < 100 {
			if err := s.steerWeighted(weight); err != nil {
				return err
			}
			continue
		}
		if err := s.steer(1); err != nil {
			return err
		}
		if err := s.probe(); err != nil {
			return err
		}
	}
	return nil
}

// release starts the bake: the listeners stay open and in their groups (the
// coordinator steered new connections away), while keep-alive clients are
// moved on: every HTTP/1.1 response says Connection: close and HTTP/2
// connections get GOAWAY. Draining does not fire: the generation may be
// asked to take the port back (resume).
func (a *agent) release() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if isClosed(a.ordered) {
		return nil // draining already: there is nothing left to release
	}
	a.released.Store(true)
	a.closing.Store(true)
	a.goAwayH2(h2GoAwayDelay)
	return nil
}

// resume undoes a release: the groups point at this generation again
// (index 0) and keep-alive is back.
func (a *agent) resume() error {
	a.mu.Lock()
	if isClosed(a.ordered) {
		a.mu.Unlock()
		return errors.New("rollover: resume: the generation is already draining")
	}
	a.released.Store(false)
	a.closing.Store(false)
	a.mu.Unlock()
	return a.pin()
}

// accepted tells a waiting probe that its connection arrived here, on l.
func (a *agent) accepted(l *listener, c net.Conn) {
	key := c.RemoteAddr().String()
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := a.probes[key]; ok && p.l == l {
		close(p.ch)
		delete(a.probes, key)
		return
	}
	// Loopback accepts can beat the prober to registering its address.
	a.early[key] = l
}

// probeTargets returns the addresses that reach l from this host, best
// first (see loopbackTargets).
func probeTargets(l *listener) ([]string, error) {
	addr, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("rollover: steer verify: %s is not a TCP address", l.Addr())
	}
	return loopbackTargets(addr.IP, addr.Port, l.network == "tcp6"), nil
}

// loopbackTargets returns the addresses that reach a socket bound to ip and
// port from this host, best first. A wildcard socket is reached through a
// loopback address: for a dual-stack [::] socket 127.0.0.1 first, since
// ::1 is missing where IPv6 is off (the Docker default); for a v6-only one
// ::1.
func loopbackTargets(ip net.IP, port int, v6only bool) []string {
	join := func(ip net.IP) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }
	v4, v6 := net.IPv4(127, 0, 0, 1), net.IPv6loopback
	switch {
	case !ip.IsUnspecified():
		return []string{join(ip)}
	case ip.To4() != nil:
		return []string{join(v4)}
	case v6only:
		return []string{join(v6)}
	default:
		return []string{join(v4), join(v6)}
	}
}

// probe dials the listener and waits until this process accepted that very
// connection on it.
func (a *agent) probe(l *listener) error {
	targets, err := probeTargets(l)
	if err != nil {
		return err
	}
	a.probing.Add(1)
	defer a.probing.Add(-1)
	d := net.Dialer{Timeout: probeTimeout}
	var c net.Conn
	var target string
	for _, target = range targets {
		if c, err = d.Dial("tcp", target); err == nil {
			break
		}
		// Try the next loopback only when this one does not exist here.
		if !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.ENETUNREACH) && !errors.Is(err, syscall.EAFNOSUPPORT) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("rollover: steer verify: %w", err)
	}
	defer c.Close()
	ch := make(chan struct{})
	key := c.LocalAddr().String()
	a.mu.Lock()
	if a.early[key] == l {
		close(ch)
	} else {
		a.probes[key] = probeWait{l: l, ch: ch}
	}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.probes, key)
		clear(a.early)
		a.mu.Unlock()
	}()
	t := time.NewTimer(probeTimeout)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
		return fmt.Errorf("rollover: steer verify: probe to %s was not accepted by this generation within %v", target, probeTimeout)
	}
}

// probeWait is a probe waiting for its connection on l.
type probeWait struct {
	l  *listener
	ch chan struct{}
}

// drain starts the hand-over once: answer with Connection: close from now
// on (HTTP/2: GOAWAY), keep accepting for the grace (clients whose
// handshake the old program still routed here), wait for the accept queues
// to empty, then close and fire Draining.
func (a *agent) drain(o drainOrder) {
	a.drainOnce.Do(func() {
		if o.timeout <= 0 {
			o.timeout = a.drainTimeout()
		}
		a.mu.Lock()
		a.order = o
		a.closing.Store(true)
		close(a.ordered)
		if !a.released.Load() {
			a.goAwayH2(max(o.grace, h2GoAwayDelay))
		}
		a.mu.Unlock()
		a.wg.Go(func() { a.handOver(o) })
		a.wg.Go(func() { a.deadline(o) })
	})
}

func (a *agent) handOver(o drainOrder) {
	if !a.cfg.naive && o.grace > 0 {
		// The grace is a span of time, not a condition: nothing observable
		// says that the last handshake routed here has completed. An agent
		// done meanwhile hands over at once.
		sleep(o.grace, a.finished)
	}
	for _, l := range a.snapshotListeners() {
		if l.sockClosed.Load() {
			continue // the app closed it while nothing was handed over
		}
		if !a.cfg.naive {
			drainQueue(l)
		}
		_ = l.closeSocket(true)
	}
	if pcs := a.snapshotPackets(); len(pcs) > 0 {
		a.handOverPackets(pcs) // closes Draining
		a.leave()
		return
	}
	// Tell the coordinator before Serve may go on to report done: closed
	// comes first on the wire.
	a.leave()
	close(a.draining)
}

// leave tells the coordinator once that this generation has left the port,
// with its counts first: an app that does not use Serve may exit before the
// next stats tick, and what its UDP sockets lost in closing is known now.
func (a *agent) leave() {
	a.leftOnce.Do(func() {
		_ = a.send(wire.Msg{Type: wire.TypeStats, Stats: a.stats()})
		_ = a.send(wire.Msg{Type: wire.TypeClosed})
	})
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

// cutAt is when a drain with timeout t cuts what is left: a margin before
// the coordinator's own deadline, so that it sees this generation exit
// before it forces it.
func cutAt(t time.Duration) time.Duration { return t - min(2*time.Second, t/10) }

// awaitConnections waits until the connections are gone; at the drain
// deadline (see deadline) they are cut. A naive hand-over does not wait.
func (a *agent) awaitConnections() {
	if a.cfg.naive {
		return
	}
	a.awaitIdle(a.cut, nil)
}

// awaitIdle waits until the generation holds no connection, or until stop
// or stop2 is closed (a nil one never is).
func (a *agent) awaitIdle(stop, stop2 <-chan struct{}) {
	for {
		gone := a.idle.wait()
		if a.counter.Snapshot().Connections == 0 {
			return
		}
		select {
		case <-gone:
		case <-stop:
			return
		case <-stop2:
			return
		}
	}
}

// sleep waits for d, or until stop is closed, and reports whether the whole
// d passed.
func sleep(d time.Duration, stop <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

// deadline cuts, at the drain's deadline, whatever connections (hijacked
// ones included) are still open, counts them and the requests in flight as
// forced, says so on stderr, and reports them at once.
func (a *agent) deadline(o drainOrder) {
	if a.cfg.naive {
		return
	}
	if !sleep(cutAt(o.timeout), a.finished) {
		return
	}
	defer close(a.cut)
	conns := a.openConns()
	st := a.counter.Snapshot()
	inflight := st.Inflight + st.InflightPackets
	if len(conns) == 0 && inflight == 0 {
		return
	}
	a.forcedConns.Store(int64(len(conns)))
	a.forcedReqs.Store(inflight)
	fmt.Fprintf(os.Stderr, "rollover: drain deadline (%v): force-closed %d connections with %d requests in flight\n", cutAt(o.timeout).Round(time.Millisecond), len(conns), inflight)
	for _, c := range conns {
		_ = c.Close()
	}
	_ = a.send(wire.Msg{Type: wire.TypeStats, Stats: a.stats()})
}

// setHealth sets the rule checkHealth judges by (nil: none).
func (a *agent) setHealth(h *wire.Health) {
	a.health.Store(h)
	a.unhealthy.Store(false)
}

// checkHealth reports the counters at once, rather than at the next stats
// tick, the moment they break the health rule, so that a bad generation
// is rolled back within milliseconds. It reports once per crossing.
func (a *agent) checkHealth(h *wire.Health) {
	failing := h.Failing(a.statsValue())
	if failing == a.unhealthy.Load() || !a.unhealthy.CompareAndSwap(!failing, failing) || !failing {
		return
	}
	select {
	case a.report <- struct{}{}: // statsLoop reports at once
	default: // a report is pending already
	}
}
