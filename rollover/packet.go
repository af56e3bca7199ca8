package rollover

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// ListenPacket opens a UDP socket ("udp", "udp4" or "udp6") that shares its
// port with the other generations (SO_REUSEPORT). Its datagrams are
// counted, and the coordinator steers and hands it over as it does a
// listener from Listen.
//
// A UDP socket joins its port's reuseport group when it binds, so the group
// already points at the active generation: this one gets no datagram until
// it is ready and the coordinator steers the port to it. On a drain, the
// group is steered away first; the socket is read on for the grace and
// until its receive queue is empty, then Draining is closed and ReadFrom
// returns net.ErrClosed. Replies still go out: WriteTo works until every
// datagram read has been answered (or the drain deadline), and only then
// is the socket closed. An app that calls Close meanwhile (as dns.Server's
// Shutdown does) only ends its reads.
//
// Datagrams are steered one by one: each goes to whichever generation the
// group points at when it arrives. Request/response protocols (DNS, statsd,
// syslog, RADIUS) lose nothing. Protocols that keep state per client flow
// over UDP (connected UDP, QUIC) are moved to the new generation in the
// middle of their flows; rollover does not track flows.
//
// The returned value is not a *net.UDPConn; its replies use WriteTo. A
// wildcard socket on a host with several addresses may then answer from
// another address than the one asked: bind the service address.
func ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	a, err := std()
	if err != nil {
		return nil, err
	}
	pc, err := reuse.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return a.registerPacket(pc, network), nil
}

// Answer records one answer that the app gave outside net/http, such as a
// DNS reply over UDP, for the bake's health check: failed (a DNS SERVFAIL,
// say) counts as an HTTP 5xx does, and every answer counts towards the
// rule's minimum. Without a coordinator it only counts.
func Answer(failed bool) {
	a, err := std()
	if err != nil {
		return
	}
	a.counter.Answer(failed)
	if h := a.health.Load(); h != nil {
		a.checkHealth(h)
	}
}

// probeMagic starts a steering probe's datagram; a datagram that starts
// with it is the library's and never reaches the app.
var probeMagic = []byte("\x00rollover-steer-probe\x00")

// packetConn is a UDP socket whose datagrams the agent counts, and whose
// reads a hand-over ends while its writes go on.
type packetConn struct {
	net.PacketConn // the socket
	a              *agent
	network        string

	// dmu orders the app's read deadlines after stopReading's: once reads
	// are stopped, the socket's read deadline stays in the past.
	dmu     sync.Mutex
	stopped atomic.Bool // reads end with net.ErrClosed

	sockOnce sync.Once
	sockErr  error
	closed   atomic.Bool // the socket is closed
}

func (a *agent) registerPacket(pc net.PacketConn, network string) *packetConn {
	p := &packetConn{PacketConn: pc, a: a, network: network}
	a.mu.Lock()
	a.packets = append(a.packets, p)
	a.mu.Unlock()
	return p
}

// NetPacketConn returns the wrapped socket, for socket options.
func (p *packetConn) NetPacketConn() net.PacketConn { return p.PacketConn }

func (p *packetConn) closedErr(op string) error {
	return &net.OpError{Op: op, Net: p.network, Source: p.LocalAddr(), Err: net.ErrClosed}
}

// ReadFrom reads and counts a datagram; steering probes are taken out.
func (p *packetConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		if p.stopped.Load() {
			return 0, nil, p.closedErr("read")
		}
		n, addr, err := p.PacketConn.ReadFrom(b)
		if err != nil {
			if p.stopped.Load() {
				return 0, nil, p.closedErr("read")
			}
			return n, addr, err
		}
		if bytes.HasPrefix(b[:n], probeMagic) {
			p.a.probeArrived(p, b[:n])
			continue
		}
		p.a.counter.Datagram()
		return n, addr, nil
	}
}

// WriteTo sends and counts a datagram.
func (p *packetConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	n, err := p.PacketConn.WriteTo(b, addr)
	if err == nil {
		p.a.counter.DatagramSent()
		if p.stopped.Load() {
			p.a.answered.fire()
		}
	}
	return n, err
}

// SetReadDeadline is the socket's, until reads are stopped.
func (p *packetConn) SetReadDeadline(t time.Time) error {
	p.dmu.Lock()
	defer p.dmu.Unlock()
	if p.stopped.Load() {
		return nil
	}
	return p.PacketConn.SetReadDeadline(t)
}

// SetDeadline is the socket's; once reads are stopped, only for writes.
func (p *packetConn) SetDeadline(t time.Time) error {
	p.dmu.Lock()
	defer p.dmu.Unlock()
	if p.stopped.Load() {
		return p.PacketConn.SetWriteDeadline(t)
	}
	return p.PacketConn.SetDeadline(t)
}

// Close ends the app's reads. During a hand-over it waits, as a listener's
// Close does, until the queue has been read out (Draining), and the socket
// itself stays open for the replies still to go out: the hand-over closes
// it. Otherwise Close closes it.
func (p *packetConn) Close() error {
	if isClosed(p.a.ordered) && !p.a.cfg.naive {
		<-p.a.draining
		p.stopReading()
		return nil
	}
	return p.closeSocket()
}

// stopReading makes every read, the blocked ones too, end with
// net.ErrClosed.
func (p *packetConn) stopReading() {
	p.dmu.Lock()
	defer p.dmu.Unlock()
	if p.stopped.Swap(true) {
		return
	}
	_ = p.PacketConn.SetReadDeadline(time.Unix(1, 0))
	p.a.answered.fire()
}

// closeSocket closes the socket once. What is still queued on it was
// routed here and will never be read: it is counted as lost.
func (p *packetConn) closeSocket() error {
	p.sockOnce.Do(func() {
		p.stopReading()
		if n := discardQueue(p.PacketConn); n > 0 {
			p.a.counter.DatagramsLost(n)
			fmt.Fprintf(os.Stderr, "rollover: %d datagrams were still queued on udp %s when it closed: lost\n", n, p.LocalAddr())
		}
		p.closed.Store(true)
		p.sockErr = p.PacketConn.Close()
	})
	return p.sockErr
}

// discardQueue reads what is queued on pc without waiting, through its
// file descriptor (Control runs whatever the read deadline), and returns
// how many datagrams that was.
func discardQueue(pc net.PacketConn) uint64 {
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		return 0
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	buf := make([]byte, 64)
	_ = rc.Control(func(fd uintptr) {
		for range 1 << 20 { // bounded: a receive buffer holds far fewer
			if _, _, err := unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT|unix.MSG_TRUNC); err != nil {
				return
			}
			n++
		}
	})
	return n
}

func (a *agent) snapshotPackets() []*packetConn {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]*packetConn(nil), a.packets...)
}

// handOverPackets drains the receive queue of every UDP socket while the
// app reads on (the group was steered away), then closes Draining and
// ends the reads, waits until every datagram read has been answered (or
// the drain deadline, or the agent's end), and closes the sockets.
func (a *agent) handOverPackets(pcs []*packetConn) {
	for _, p := range pcs {
		if !a.cfg.naive && !p.closed.Load() {
			drainPacketQueue(p)
		}
	}
	// The counts first: an app that does not use Serve may exit as soon as
	// Draining has ended its servers, before leave reports them.
	_ = a.send(wire.Msg{Type: wire.TypeStats, Stats: a.stats()})
	close(a.draining)
	for _, p := range pcs {
		p.stopReading()
	}
	if !a.cfg.naive {
		a.awaitAnswers()
	}
	for _, p := range pcs {
		_ = p.closeSocket()
	}
}

// awaitAnswers waits until the app has answered every datagram it read,
// the drain deadline has passed or the agent is done.
func (a *agent) awaitAnswers() {
	for {
		answered := a.answered.wait()
		if a.counter.InflightPackets() == 0 {
			return
		}
		select {
		case <-answered:
		case <-a.cut:
			return
		case <-a.finished:
			return
		}
	}
}

// drainPacketQueue waits, bounded by DefaultQueueDrain, until the receive
// queue of p reads empty.
func drainPacketQueue(p *packetConn) {
	ctx, cancel := context.WithTimeout(context.Background(), DefaultQueueDrain)
	defer cancel()
	if err := reuse.DrainPacketQueue(ctx, p, time.Millisecond); err != nil && !errors.Is(err, errors.ErrUnsupported) {
		fmt.Fprintf(os.Stderr, "rollover: udp %s: %v\n", p.LocalAddr(), err)
	}
}

// probePacket sends datagrams to p's port until this process reads one on
// p: the group routes the port here.
func (a *agent) probePacket(p *packetConn) error {
	addr, ok := p.LocalAddr().(*net.UDPAddr)
	if !ok {
		return fmt.Errorf("rollover: steer verify: %s is not a UDP address", p.LocalAddr())
	}
	targets := loopbackTargets(addr.IP, addr.Port, p.network == "udp6")
	var c net.Conn
	var err error
	for _, target := range targets {
		if c, err = net.Dial("udp", target); err == nil {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("rollover: steer verify: %w", err)
	}
	defer c.Close()
	msg := append(append([]byte(nil), probeMagic...), rand.Text()...)
	ch := make(chan struct{})
	a.mu.Lock()
	a.packetProbe = packetProbe{p: p, msg: msg, ch: ch}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.packetProbe = packetProbe{}
		a.mu.Unlock()
	}()
	deadline := time.NewTimer(probeTimeout)
	defer deadline.Stop()
	resend := time.NewTicker(50 * time.Millisecond)
	defer resend.Stop()
	for {
		_, _ = c.Write(msg)
		select {
		case <-ch:
			return nil
		case <-deadline.C:
			return fmt.Errorf("rollover: steer verify: probe datagrams to %s were not read by this generation within %v (is the app reading its socket from rollover.ListenPacket?)", c.RemoteAddr(), probeTimeout)
		case <-resend.C:
		}
	}
}

// packetProbe is the probe datagram a steer waits for on p.
type packetProbe struct {
	p   *packetConn
	msg []byte
	ch  chan struct{}
}

// probeArrived tells a waiting probe that its datagram was read here, on p.
func (a *agent) probeArrived(p *packetConn, msg []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if w := a.packetProbe; w.p == p && bytes.Equal(w.msg, msg) {
		close(w.ch)
		a.packetProbe = packetProbe{}
	}
}
