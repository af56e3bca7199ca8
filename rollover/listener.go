package rollover

import (
	"net"
	"sync"
)

// listener is a net.Listener whose connections the agent counts until each
// is closed, hijacked ones included, and whose accepts a steering probe
// watches for its own connection.
type listener struct {
	net.Listener
	a *agent
}

// NetListener returns the wrapped listener, for socket options.
func (l *listener) NetListener() net.Listener { return l.Listener }

// Accept accepts and counts a connection.
func (l *listener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.a.counter.OpenConn()
	if l.a.probing.Load() != 0 {
		l.a.accepted(conn)
	}
	// Keep *net.TCPConn's methods (ReadFrom for sendfile, CloseWrite) visible.
	if tc, ok := conn.(*net.TCPConn); ok {
		return &tcpConn{TCPConn: tc, a: l.a}, nil
	}
	return &countedConn{Conn: conn, a: l.a}, nil
}

type tcpConn struct {
	*net.TCPConn
	a    *agent
	once sync.Once
}

func (t *tcpConn) Close() error {
	t.once.Do(t.a.connClosed)
	return t.TCPConn.Close()
}

type countedConn struct {
	net.Conn
	a    *agent
	once sync.Once
}

func (t *countedConn) Close() error {
	t.once.Do(t.a.connClosed)
	return t.Conn.Close()
}

// connClosed uncounts a connection and, once the last one is gone during a
// drain, wakes those waiting for it.
func (a *agent) connClosed() {
	if a.counter.CloseConn() == 0 && a.closing.Load() {
		a.idle.fire()
	}
}

// register adds ln to the listeners that are counted, steered and handed
// over, and returns what to serve. A listener that already wraps one of this
// agent's (an app's own wrapper around one from Listen) is served as it is,
// so that its connections are counted and its socket steered once.
func (a *agent) register(ln net.Listener) net.Listener {
	if a.owns(ln) {
		return ln
	}
	l := &listener{Listener: ln, a: a}
	a.mu.Lock()
	a.listeners = append(a.listeners, l)
	a.mu.Unlock()
	return l
}

// owns reports whether ln is, or wraps, a listener of this agent. It looks
// through wrappers the way the socket options do (NetListener).
func (a *agent) owns(ln net.Listener) bool {
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
