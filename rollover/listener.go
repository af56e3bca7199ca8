package rollover

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// listener is a net.Listener whose connections the agent counts until each
// is closed, hijacked ones included, and whose accepts a steering probe
// watches for its own connection.
//
// It is always safe to close. While the generation hands its port over to
// a successor (a drain or a release was ordered), the app's Close does not
// close the socket under the connections queued on it: it waits for the
// hand-over (grace, queue drain, close) instead. And once the hand-over has
// closed the socket, Accept does not fail at once, which would end the
// app's accept loop (and, with gRPC's canonical main, the process) before
// its connections are done: it waits until the app closes the listener, or
// until the generation holds no connection any more.
type listener struct {
	net.Listener // the socket
	a            *agent
	network      string // as given to Listen ("tcp" for a listener Serve registered)

	appOnce   sync.Once
	appClosed chan struct{} // closed by the app's Close

	sockOnce   sync.Once
	sockErr    error
	sockClosed atomic.Bool // the socket is closed (by the hand-over or the app)
	handedOver atomic.Bool // the hand-over closed the socket
}

func newListener(a *agent, ln net.Listener, network string) *listener {
	return &listener{Listener: ln, a: a, network: network, appClosed: make(chan struct{})}
}

// NetListener returns the wrapped listener, for socket options.
func (l *listener) NetListener() net.Listener { return l.Listener }

// Accept accepts and counts a connection.
func (l *listener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		if l.handedOver.Load() {
			l.a.holdAccept(l)
		}
		return nil, err
	}
	a := l.a
	a.counter.OpenConn()
	if a.probing.Load() != 0 {
		a.accepted(l, conn)
	}
	// Keep *net.TCPConn's methods (ReadFrom for sendfile, CloseWrite) visible.
	var c net.Conn
	if tc, ok := conn.(*net.TCPConn); ok {
		c = &tcpConn{TCPConn: tc, counted: counted{a: a}}
	} else {
		c = &countedConn{Conn: conn, counted: counted{a: a}}
	}
	a.track(c)
	return c, nil
}

// Close closes the listener for the app; see listener.
func (l *listener) Close() error {
	l.appOnce.Do(func() { close(l.appClosed) })
	a := l.a
	if isClosed(a.ordered) {
		<-a.draining // the hand-over closes the socket
		return nil
	}
	if a.released.Load() && !a.cfg.naive {
		// Steered away since the release: what the group routed here
		// before is queued. Empty the queue first.
		drainQueue(l)
	}
	return l.closeSocket(false)
}

// closeSocket closes the socket once; handOver tells Accept that the
// hand-over did it.
func (l *listener) closeSocket(handOver bool) error {
	l.sockOnce.Do(func() {
		if handOver {
			l.handedOver.Store(true)
		}
		l.sockClosed.Store(true)
		l.sockErr = l.Listener.Close()
	})
	return l.sockErr
}

// holdAccept keeps Accept from failing after the hand-over closed l's
// socket, until the app closes l, the generation holds no connection, or
// the agent is done.
func (a *agent) holdAccept(l *listener) { a.awaitIdle(l.appClosed, a.finished) }

// counted uncounts its connection at the first Close.
type counted struct {
	a      *agent
	closed atomic.Bool
}

func (u *counted) uncount(c io.Closer) {
	if u.closed.CompareAndSwap(false, true) {
		u.a.connClosed(c)
	}
}

type tcpConn struct {
	*net.TCPConn
	counted
}

func (t *tcpConn) Close() error { t.uncount(t); return t.TCPConn.Close() }

type countedConn struct {
	net.Conn
	counted
}

func (t *countedConn) Close() error { t.uncount(t); return t.Conn.Close() }

// track remembers an open connection, so that the drain deadline can close
// it.
func (a *agent) track(c io.Closer) {
	a.connMu.Lock()
	a.open[c] = struct{}{}
	a.connMu.Unlock()
}

// connClosed uncounts a connection and, once the last one is gone during a
// drain or a release, wakes those waiting for it.
func (a *agent) connClosed(c io.Closer) {
	a.connMu.Lock()
	delete(a.open, c)
	a.connMu.Unlock()
	if a.counter.CloseConn() == 0 && a.closing.Load() {
		a.idle.fire()
	}
}

// openConns returns the connections open now.
func (a *agent) openConns() []io.Closer {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	out := make([]io.Closer, 0, len(a.open))
	for c := range a.open {
		out = append(out, c)
	}
	return out
}

// register adds ln to the listeners that are counted, steered and handed
// over, and returns what to serve and whether it is a wrapper of the app's
// around one of this agent's listeners. Such a wrapper (tls.NewListener
// over a listener from Listen) is served as it is, so that its connections
// are counted and its socket steered once, underneath.
func (a *agent) register(ln net.Listener, network string) (net.Listener, bool) {
	if l, ok := ln.(*listener); ok && l.a == a {
		return l, false
	}
	if a.owns(ln) {
		return ln, true
	}
	l := newListener(a, ln, network)
	a.mu.Lock()
	a.listeners = append(a.listeners, l)
	a.mu.Unlock()
	return l, false
}

// owns reports whether ln wraps a listener of this agent: it looks through
// wrappers the way the socket options do (NetListener), and it recognizes a
// wrapper that hides what it wraps (tls.NewListener) by the address it
// reports, which is the very *net.TCPAddr of the socket underneath.
func (a *agent) owns(ln net.Listener) bool {
	addr, _ := ln.Addr().(*net.TCPAddr)
	if addr != nil {
		for _, l := range a.snapshotListeners() {
			if la, ok := l.Addr().(*net.TCPAddr); ok && la == addr {
				return true
			}
		}
	}
	for range 16 { // bounded: a wrapper could return itself
		if l, ok := ln.(*listener); ok {
			return l.a == a
		}
		w, ok := ln.(interface{ NetListener() net.Listener })
		if !ok {
			return false
		}
		ln = w.NetListener()
	}
	return false
}

func (a *agent) snapshotListeners() []*listener {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]*listener(nil), a.listeners...)
}

// broadcast wakes every waiter each time it fires. A waiter takes the channel
// before it checks its condition, so that a fire in between is not lost.
type broadcast struct {
	mu sync.Mutex
	ch chan struct{}
}

// wait returns a channel that the next fire closes.
func (b *broadcast) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

func (b *broadcast) fire() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
		b.ch = nil
	}
}

// isClosed reports whether ch is closed.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
