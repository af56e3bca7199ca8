package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// firstMessageTimeout bounds how long a peer may take to say what it is, so a
// silent or slow client cannot pin a goroutine.
const firstMessageTimeout = 5 * time.Second

// listenControl opens the control socket the way tailscale's safesocket does:
// a live socket is left alone (another coordinator owns it), a dead one is
// replaced, and the new one is private (0600 in a directory that is not
// world-writable).
func listenControl(path string) (*net.UnixListener, error) {
	// sun_path holds 108 bytes with the terminating NUL.
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("%w: %s is %d bytes, over the %d-byte limit of a Unix socket path; pass a shorter --socket", ErrSocket, path, len(path), maxSocketPath)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: create %s: %v; %s", ErrSocket, dir, unwrapPath(err), socketHint(dir))
	}
	di, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSocket, err)
	}
	if di.Mode().Perm()&0o002 != 0 {
		return nil, fmt.Errorf("%w: directory %s is world-writable; put the socket in a private directory", ErrSocket, dir)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%w: %s exists and is not a socket", ErrSocket, path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%w: another coordinator is running on %s", ErrSocket, path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("%w: remove stale %s: %v", ErrSocket, path, err)
		}
	}
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EROFS) {
		return nil, fmt.Errorf("%w: bind %s: %v; %s", ErrSocket, path, unwrapPath(err), socketHint(dir))
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSocket, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%w: %v", ErrSocket, err)
	}
	return ln, nil
}

// maxSocketPath is the longest path a Unix socket can bind.
const maxSocketPath = 107

// socketHint names the ways out of a socket directory we may not write.
func socketHint(dir string) string {
	if os.Getenv("XDG_RUNTIME_DIR") == "" && os.Geteuid() != 0 {
		return fmt.Sprintf("pass --socket PATH in a directory you own, or set XDG_RUNTIME_DIR (a non-root user cannot write %s)", dir)
	}
	return fmt.Sprintf("pass --socket PATH in a directory you own, or make %s writable by uid %d", dir, os.Geteuid())
}

// unwrapPath drops the operation and path from an *os.PathError or
// *net.OpError, which the message names already.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, credErr
}

// accept serves the control socket until it is closed (Run's end).
func (c *Coordinator) accept(ctx context.Context) {
	for {
		conn, err := c.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors, say: back off a little.
			t := time.NewTimer(10 * time.Millisecond)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		if !c.peers.add(conn) {
			conn.Close() // Run is ending
			continue
		}
		c.tasks.Go(func(context.Context) {
			defer c.peers.remove(conn)
			c.handle(conn)
		})
	}
}

// peers are the open control connections; Run closes what is left of them
// when it ends, so that no connection's reader outlives it.
type peers struct {
	mu     sync.Mutex
	closed bool
	conns  map[*net.UnixConn]bool
}

func (p *peers) add(c *net.UnixConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	if p.conns == nil {
		p.conns = map[*net.UnixConn]bool{}
	}
	p.conns[c] = true
	return true
}

func (p *peers) remove(c *net.UnixConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
}

func (p *peers) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
}

// peerConn is the coordinator's side of a peer's control connection: a
// generation's, whose commands it pairs with their acknowledgements, or a
// CLI's.
type peerConn struct {
	mu      sync.Mutex
	conn    net.Conn
	pending map[uint64]chan wire.Msg
	// welcomed is closed once the generation was sent its welcome; no
	// command may precede it.
	welcomed chan struct{}
}

func newPeerConn(conn net.Conn) *peerConn {
	return &peerConn{conn: conn, pending: map[uint64]chan wire.Msg{}, welcomed: make(chan struct{})}
}

func (p *peerConn) send(m wire.Msg) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, err := p.conn.Write(wire.Encode(m))
	return err
}

// deliver hands an acknowledgement to the command waiting for it.
func (p *peerConn) deliver(a wire.Msg) {
	p.mu.Lock()
	ch := p.pending[a.ID]
	delete(p.pending, a.ID)
	p.mu.Unlock()
	if ch != nil {
		ch <- a // buffered: one answer per command
	}
}

func (c *Coordinator) handle(conn *net.UnixConn) {
	defer conn.Close()
	out := newPeerConn(conn)
	cred, err := peerCred(conn)
	if err != nil {
		c.log.Warn("control: no peer credentials", "err", err)
		return
	}
	r := wire.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(firstMessageTimeout))
	m, err := r.Read()
	if err != nil {
		c.log.Warn("control: bad first message", "peer_pid", cred.Pid, "err", err)
		_ = out.send(wire.Msg{Type: wire.TypeResult, Error: err.Error(), Code: wire.ExitUsage})
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	switch m.Type {
	case wire.TypeHello:
		c.handleGen(out, r, m, cred)
	case wire.TypeNext, wire.TypeRollback, wire.TypeStatus, wire.TypeStop, wire.TypePromote, wire.TypeAbort:
		if uid := uint32(os.Geteuid()); cred.Uid != uid && cred.Uid != 0 {
			c.log.Warn("control: refused request from another user", "uid", cred.Uid, "pid", cred.Pid)
			_ = out.send(wire.Msg{Type: wire.TypeResult, Error: fmt.Sprintf("permission denied: uid %d is not the coordinator's uid %d", cred.Uid, uid), Code: wire.ExitFailed})
			return
		}
		c.cliStarted()
		defer c.cliDone()
		c.handleCLI(out, m)
	default:
		_ = out.send(wire.Msg{Type: wire.TypeResult, Error: fmt.Sprintf("unexpected first message %q", m.Type), Code: wire.ExitUsage})
	}
}

func (c *Coordinator) handleGen(out *peerConn, r *wire.Reader, hello wire.Msg, cred *unix.Ucred) {
	w, ok := request(c, func(reply chan welcome) event {
		return evHello{hello: hello, pid: int(cred.Pid), conn: out, reply: reply}
	})
	if !ok {
		w.reason = "coordinator is stopping"
	}
	if w.reason != "" {
		c.log.Warn("control: refused hello", "reason", w.reason, "peer_pid", cred.Pid)
		_ = out.send(wire.Msg{Type: wire.TypeWelcome, Error: w.reason})
		return
	}
	g := w.g
	err := out.send(wire.Msg{Type: wire.TypeWelcome, OK: true})
	close(out.welcomed)
	if err != nil {
		c.post(evDisconnected{g: g, conn: out})
		return
	}
	for {
		m, err := r.Read()
		if err != nil {
			c.post(evDisconnected{g: g, conn: out})
			return
		}
		switch m.Type {
		case wire.TypeReady:
			c.post(evReady{g: g, lib: true, steerable: m.Steerable, steerErr: m.SteerError, addrs: m.Addrs})
		case wire.TypeStats, wire.TypeDone:
			if m.Stats != nil {
				c.post(evStats{g: g, stats: *m.Stats})
			}
		case wire.TypeAck:
			out.deliver(m)
		case wire.TypeClosed:
			c.post(evClosedListener{g: g})
		default:
			c.log.Warn("control: unexpected message from generation", "gen", g.n, "type", m.Type)
		}
	}
}

// command sends m to g and waits for its acknowledgement.
func (c *Coordinator) command(g *gen, m wire.Msg) error {
	_, err := c.commandWithin(g, m, commandTimeout)
	return err
}

// commandWithin sends m to g and returns its acknowledgement.
func (c *Coordinator) commandWithin(g *gen, m wire.Msg, timeout time.Duration) (wire.Msg, error) {
	out, ok := request(c, func(reply chan *peerConn) event { return qConn{g: g, reply: reply} })
	if !ok || out == nil {
		return wire.Msg{}, fmt.Errorf("gen %d has no control connection", g.n)
	}
	return out.roundTrip(g, c.cmdID.Add(1), m, timeout)
}

// roundTrip sends m, numbered id, to generation g and waits for its
// acknowledgement.
func (p *peerConn) roundTrip(g *gen, id uint64, m wire.Msg, timeout time.Duration) (wire.Msg, error) {
	m.ID = id
	ch := make(chan wire.Msg, 1)
	p.mu.Lock()
	p.pending[m.ID] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pending, m.ID)
		p.mu.Unlock()
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.welcomed:
	case <-t.C:
		return wire.Msg{}, fmt.Errorf("gen %d was not welcomed within %v", g.n, timeout)
	}
	if err := p.send(m); err != nil {
		return wire.Msg{}, fmt.Errorf("gen %d: send %s: %w", g.n, m.Type, err)
	}
	select {
	case a := <-ch:
		if a.Error != "" {
			return a, errors.New(a.Error)
		}
		return a, nil
	case <-g.gone:
		return wire.Msg{}, fmt.Errorf("gen %d exited before it answered %s", g.n, m.Type)
	case <-t.C:
		return wire.Msg{}, fmt.Errorf("gen %d did not answer %s within %v", g.n, m.Type, timeout)
	}
}

func (c *Coordinator) handleCLI(out *peerConn, m wire.Msg) {
	emit := func(e wire.Event) { _ = out.send(wire.Msg{Type: wire.TypeEvent, Event: &e}) }
	var err error
	switch m.Type {
	case wire.TypeStatus:
		st := c.status()
		_ = out.send(wire.Msg{Type: wire.TypeResult, OK: true, Status: &st})
		return
	case wire.TypeStop:
		c.haltNow()
		<-c.over
		err = c.overErr
	case wire.TypePromote, wire.TypeAbort:
		what := causePromote
		if m.Type == wire.TypeAbort {
			what = causeAbort
		}
		var ok bool
		if err, ok = request(c, func(r chan error) event { return evControl{what: what, reply: r} }); !ok {
			err = ErrStopping
		}
	case wire.TypeNext, wire.TypeRollback:
		err = c.handleRollover(m, emit)
	}
	res := wire.Msg{Type: wire.TypeResult, OK: err == nil}
	if err != nil {
		res.Error, res.Code = err.Error(), exitCode(err)
	}
	_ = out.send(res)
}

// handleRollover runs a `next` or `rollback` for the CLI: its events go to
// emit until the rollover settles, or, with --wait, until its report.
func (c *Coordinator) handleRollover(m wire.Msg, emit func(wire.Event)) error {
	req, err := cliRequest(m)
	if err != nil {
		return err
	}
	r, err := c.begin(req, emit)
	if err != nil {
		c.log.Warn("rollover refused", "err", err)
		return err
	}
	<-r.settled
	if r.err != nil {
		c.log.Warn("rollover failed", "err", r.err)
	}
	if r.err != nil && !r.partial.RolledBack {
		return r.err // failed before activation: nothing to report
	}
	if !m.Wait {
		emit(wire.Event{Phase: wire.PhaseReport, Report: r.partial})
		return r.err
	}
	<-r.done
	if r.err == nil && r.report.Lost() {
		return &lossError{r.report}
	}
	return r.err
}

// exitCode is the CLI's exit code for a request that failed with err.
func exitCode(err error) wire.ExitCode {
	var le *lossError
	switch {
	case err == nil:
		return wire.ExitOK
	case errors.Is(err, ErrUsage):
		return wire.ExitUsage
	case errors.As(err, &le):
		return wire.ExitLost
	}
	return wire.ExitFailed
}

// lossError says what a rollover cut.
type lossError struct{ r *wire.Report }

func (e *lossError) Error() string {
	return fmt.Sprintf("the rollover cut %d connections and %d requests at a drain deadline (--drain-timeout): %s", e.r.ForcedConnections, e.r.ForcedRequests, e.r)
}

// cliRequest reads a next or rollback request.
func cliRequest(m wire.Msg) (rolloverReq, error) {
	req := rolloverReq{launch: Launch{Argv: m.Argv, Ready: m.Ready, Addr: m.Addr, DrainSignal: syscall.Signal(m.DrainSignal), Instances: m.Instances},
		expect: m.ExpectGeneration, rollback: m.Type == wire.TypeRollback, healthURL: m.HealthURL, wait: m.Wait}
	if m.Bake != "" {
		d, err := time.ParseDuration(m.Bake)
		if err != nil || d < 0 {
			return req, fmt.Errorf("%w: --bake %q is not a duration of 0 or more (say 5s)", ErrUsage, m.Bake)
		}
		req.bake = &d
	}
	for i, w := range m.Canary {
		if w < 1 || w > 100 || (i > 0 && w <= m.Canary[i-1]) {
			return req, fmt.Errorf("%w: --canary %v: give rising percentages from 1 to 100 (say 5%%,25%%,100%%)", ErrUsage, m.Canary)
		}
	}
	req.canary = m.Canary
	if m.StepMS < 0 {
		return req, fmt.Errorf("%w: --step must not be negative", ErrUsage)
	}
	req.step = time.Duration(m.StepMS) * time.Millisecond
	return req, nil
}
