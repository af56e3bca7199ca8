package coordinator

import (
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

func (c *Coordinator) accept() {
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
			case <-c.dead:
				t.Stop()
				return
			}
			continue
		}
		go c.handle(conn)
	}
}

// genConn is the coordinator's side of a peer's control connection. For a
// generation it pairs commands with their acknowledgements.
type genConn struct {
	mu      sync.Mutex
	conn    net.Conn
	pending map[uint64]chan wire.Msg
	// welcomed is closed once the generation was sent its welcome; no
	// command may precede it.
	welcomed chan struct{}
}

func newGenConn(conn net.Conn) *genConn {
	return &genConn{conn: conn, pending: map[uint64]chan wire.Msg{}, welcomed: make(chan struct{})}
}

func (g *genConn) send(m wire.Msg) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	_ = g.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, err := g.conn.Write(wire.Encode(m))
	return err
}

// deliver hands an acknowledgement to the command waiting for it.
func (g *genConn) deliver(a wire.Msg) {
	g.mu.Lock()
	ch := g.pending[a.ID]
	delete(g.pending, a.ID)
	g.mu.Unlock()
	if ch != nil {
		ch <- a // buffered: one answer per command
	}
}

func (c *Coordinator) handle(conn *net.UnixConn) {
	defer conn.Close()
	out := newGenConn(conn)
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
		_ = out.send(wire.Msg{Type: wire.TypeResult, Error: err.Error(), Code: 2})
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	switch m.Type {
	case wire.TypeHello:
		c.handleGen(out, r, m, cred)
	case wire.TypeNext, wire.TypeRollback, wire.TypeStatus, wire.TypeStop, wire.TypePromote, wire.TypeAbort:
		if uid := uint32(os.Geteuid()); cred.Uid != uid && cred.Uid != 0 {
			c.log.Warn("control: refused request from another user", "uid", cred.Uid, "pid", cred.Pid)
			_ = out.send(wire.Msg{Type: wire.TypeResult, Error: fmt.Sprintf("permission denied: uid %d is not the coordinator's uid %d", cred.Uid, uid), Code: 1})
			return
		}
		c.cliStarted()
		defer c.cliDone()
		c.handleCLI(out, m)
	default:
		_ = out.send(wire.Msg{Type: wire.TypeResult, Error: fmt.Sprintf("unexpected first message %q", m.Type), Code: 2})
	}
}

func (c *Coordinator) handleGen(out *genConn, r *wire.Reader, hello wire.Msg, cred *unix.Ucred) {
	w, ok := ask(c, func(reply chan welcome) event {
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
func (c *Coordinator) command(g *gen, m wire.Msg, timeout time.Duration) error {
	_, err := c.ask(g, m, timeout)
	return err
}

// ask sends m to g and returns its acknowledgement.
func (c *Coordinator) ask(g *gen, m wire.Msg, timeout time.Duration) (wire.Msg, error) {
	out, ok := ask(c, func(reply chan *genConn) event { return qConn{g: g, reply: reply} })
	if !ok || out == nil {
		return wire.Msg{}, fmt.Errorf("gen %d has no control connection", g.n)
	}
	return out.ask(g, c.cmdID.Add(1), m, timeout)
}

func (out *genConn) ask(g *gen, id uint64, m wire.Msg, timeout time.Duration) (wire.Msg, error) {
	m.ID = id
	ch := make(chan wire.Msg, 1)
	out.mu.Lock()
	out.pending[m.ID] = ch
	out.mu.Unlock()
	defer func() {
		out.mu.Lock()
		delete(out.pending, m.ID)
		out.mu.Unlock()
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-out.welcomed:
	case <-t.C:
		return wire.Msg{}, fmt.Errorf("gen %d was not welcomed within %v", g.n, timeout)
	}
	if err := out.send(m); err != nil {
		return wire.Msg{}, fmt.Errorf("gen %d: send %s: %w", g.n, m.Type, err)
	}
	select {
	case a := <-ch:
		if a.Error != "" {
			return a, errors.New(a.Error)
		}
		return a, nil
	case <-g.exited:
		return wire.Msg{}, fmt.Errorf("gen %d exited (%s)", g.n, exitText(g.exitErr))
	case <-t.C:
		return wire.Msg{}, fmt.Errorf("gen %d did not answer %s within %v", g.n, m.Type, timeout)
	}
}

func (c *Coordinator) handleCLI(out *genConn, m wire.Msg) {
	emit := func(e wire.Event) { _ = out.send(wire.Msg{Type: wire.TypeEvent, Event: &e}) }
	result := func(err error) {
		res := wire.Msg{Type: wire.TypeResult, OK: err == nil}
		if err != nil {
			res.Error, res.Code = err.Error(), 1
			if errors.Is(err, ErrUsage) {
				res.Code = 2
			}
		}
		_ = out.send(res)
	}
	switch m.Type {
	case wire.TypeStatus:
		st := c.status()
		_ = out.send(wire.Msg{Type: wire.TypeResult, OK: true, Status: &st})
	case wire.TypeStop:
		c.requestStop()
		<-c.stopped
		result(c.stopErr)
	case wire.TypePromote, wire.TypeAbort:
		err, ok := ask(c, func(r chan error) event { return evControl{what: m.Type, reply: r} })
		if !ok {
			err = ErrStopping
		}
		result(err)
	case wire.TypeNext, wire.TypeRollback:
		req, err := cliRequest(m)
		if err != nil {
			result(err)
			return
		}
		rep, err := c.tryRollover(req, emit)
		if err != nil {
			c.log.Warn("rollover failed", "err", err)
		}
		switch {
		case rep == nil || (err != nil && !rep.rolledBack):
			// refused, or failed before activation: nothing to report
		case m.Wait:
			c.waitReport(rep, emit)
			if err == nil && rep.report.Lost() {
				err = &lossError{rep.report}
			}
		default:
			emit(wire.Event{Phase: wire.PhaseReport, Report: rep.partial})
		}
		res := wire.Msg{Type: wire.TypeResult, OK: err == nil}
		if err != nil {
			res.Error, res.Code = err.Error(), 1
			var le *lossError
			switch {
			case errors.Is(err, ErrUsage):
				res.Code = 2
			case errors.As(err, &le):
				res.Code = ExitLost
			}
		}
		_ = out.send(res)
	}
}

// ExitLost is the exit code of `next --wait` when the rollover cut a
// connection or a request at a drain deadline.
const ExitLost = 4

// lossError says what a rollover cut.
type lossError struct{ r *wire.Report }

func (e *lossError) Error() string {
	return fmt.Sprintf("the rollover cut %d connections and %d requests at a drain deadline (--drain-timeout): %s", e.r.ForcedConnections, e.r.ForcedRequests, e.r)
}

// cliRequest reads a next or rollback request.
func cliRequest(m wire.Msg) (rolloverReq, error) {
	req := rolloverReq{launch: Launch{Argv: m.Argv, Ready: m.Ready, Addr: m.Addr}, expect: m.ExpectGeneration, rollback: m.Type == wire.TypeRollback, healthURL: m.HealthURL}
	if m.DrainSignal != "" {
		sig, err := ParseSignal(m.DrainSignal)
		if err != nil {
			return req, err
		}
		req.launch.DrainSignal = sig
	}
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
