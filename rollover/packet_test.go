package rollover

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// echo answers every datagram read on pc with the same bytes, after delay,
// each in its own goroutine as dns.Server does, until a read fails; it
// returns that error once every answer is out.
func echo(pc net.PacketConn, delay time.Duration) <-chan error { return echoPaced(pc, 0, delay) }

// echoPaced is echo that waits pace before each read, so that datagrams
// queue up.
func echoPaced(pc net.PacketConn, pace, delay time.Duration) <-chan error {
	out := make(chan error, 1)
	go func() {
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			time.Sleep(pace)
			buf := make([]byte, 64)
			n, addr, err := pc.ReadFrom(buf)
			if err != nil {
				wg.Wait()
				out <- err
				return
			}
			wg.Go(func() {
				time.Sleep(delay)
				_, _ = pc.WriteTo(buf[:n], addr)
			})
		}
	}()
	return out
}

// rawActive binds a plain reuseport UDP socket on a fresh loopback port and
// pins the group to it (index 0), as an active generation would.
func rawActive(t *testing.T) net.PacketConn {
	t.Helper()
	pc, err := reuse.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	if err := reuse.SteerPacket(pc, 0); err != nil {
		t.Fatal(err)
	}
	return pc
}

// udpClient sends numbered datagrams to addr and counts the answers by
// number.
type udpClient struct {
	c       net.Conn
	mu      sync.Mutex
	sent    int
	answers map[uint32]int
	done    chan struct{}
}

func newUDPClient(t *testing.T, addr string) *udpClient {
	t.Helper()
	c, err := net.Dial("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &udpClient{c: c, answers: map[uint32]int{}, done: make(chan struct{})}
	go func() {
		defer close(u.done)
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if n >= 4 {
				u.mu.Lock()
				u.answers[binary.BigEndian.Uint32(buf)]++
				u.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-u.done })
	return u
}

func (u *udpClient) send(t *testing.T, n int) {
	t.Helper()
	for range n {
		u.mu.Lock()
		id := uint32(u.sent)
		u.sent++
		u.mu.Unlock()
		if _, err := u.c.Write(binary.BigEndian.AppendUint32(nil, id)); err != nil {
			t.Fatal(err)
		}
	}
}

// missing returns the numbers sent that have no answer, and the numbers
// answered more than once.
func (u *udpClient) missing() (none, twice []uint32) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i := range uint32(u.sent) {
		switch u.answers[i] {
		case 0:
			none = append(none, i)
		case 1:
		default:
			twice = append(twice, i)
		}
	}
	return none, twice
}

// A UDP socket from ListenPacket gets no datagram until it is steered to,
// and the steer is verified with a probe datagram that the app never sees.
func TestPacketDarkLaunchAndSteer(t *testing.T) {
	old := rawActive(t)
	addr := old.LocalAddr().String()
	f := listenCoordinator(t, 2, "s", wire.Msg{OK: true})
	a := newTestAgent(t, 0)
	pc, err := reuse.ListenPacket(context.Background(), "udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	p := a.registerPacket(pc, "udp4")
	served := echo(p, 0)
	coord := within(t, f, "hello")
	if err := a.ready(); err != nil {
		t.Fatal(err)
	}
	ready := coord.expect(wire.TypeReady)
	if !ready.Steerable || !slices.Equal(ready.Addrs, []string{"udp:" + addr}) {
		t.Fatalf("ready %+v, want steerable on udp:%s", ready, addr)
	}
	u := newUDPClient(t, addr)
	u.send(t, 20)
	oldGot := echo(old, 0)
	testproc.WaitFor(t, 5*time.Second, "the old socket to answer all 20", func() bool { none, _ := u.missing(); return len(none) == 0 })
	if s := a.counter.Snapshot(); s.Datagrams != 0 {
		t.Fatalf("the dark generation read %d datagrams before its steer", s.Datagrams)
	}

	coord.command(wire.Msg{Type: wire.TypeSteer, ID: 1})
	u.send(t, 20)
	testproc.WaitFor(t, 5*time.Second, "the new socket to answer 20", func() bool { return a.counter.Snapshot().DatagramsSent == 20 })
	if none, twice := u.missing(); len(none)+len(twice) > 0 {
		t.Fatalf("unanswered %v, answered twice %v", none, twice)
	}
	if s := a.counter.Snapshot(); s.Datagrams != 20 {
		t.Fatalf("the app read %d datagrams, want 20 (the probe is the library's)", s.Datagrams)
	}
	old.Close()
	p.stopReading()
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after stop: %v, want net.ErrClosed", err)
	}
	<-oldGot
}

// A drain reads the queue out, ends reads with net.ErrClosed only after
// Draining, lets the replies to datagrams already read go out, and only
// then closes the socket and says closed.
func TestPacketDrainAnswersInflight(t *testing.T) {
	f := listenCoordinator(t, 1, "s", wire.Msg{OK: true})
	a := newTestAgent(t, 5*time.Second)
	pc, err := reuse.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := a.registerPacket(pc, "udp4")
	addr := p.LocalAddr().String()
	// Slow reads keep datagrams queued when the drain comes; slow answers
	// keep them in flight after the reads end.
	served := echoPaced(p, 500*time.Microsecond, 50*time.Millisecond)
	coord := within(t, f, "hello")
	if err := a.ready(); err != nil {
		t.Fatal(err)
	}
	coord.expect(wire.TypeReady)
	next, err := reuse.ListenPacket(context.Background(), "udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { next.Close() })
	nextGot := echo(next, 0)

	u := newUDPClient(t, addr)
	u.send(t, 200)
	testproc.WaitFor(t, 5*time.Second, "datagrams queued", func() bool { n, _ := reuse.PacketQueueLen(p); return n > 0 })
	if err := reuse.SteerPacket(next, 1); err != nil {
		t.Fatal(err)
	}
	coord.command(wire.Msg{Type: wire.TypeDrain, ID: 2, TimeoutMS: 5000})
	u.send(t, 200) // to the successor
	testproc.WaitFor(t, 5*time.Second, "Draining() to close", func() bool { return isClosed(a.draining) })
	coord.expect(wire.TypeClosed)
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after the drain: %v, want net.ErrClosed", err)
	}
	testproc.WaitFor(t, 5*time.Second, "every datagram answered", func() bool { none, _ := u.missing(); return len(none) == 0 })
	if _, twice := u.missing(); len(twice) > 0 {
		t.Fatalf("answered twice: %v", twice)
	}
	s := a.counter.Snapshot()
	if s.Datagrams != 200 || s.DatagramsSent != 200 || s.InflightPackets != 0 || s.DatagramsLost != 0 {
		t.Fatalf("stats %+v, want 200 read, 200 sent, 0 in flight, 0 lost", s)
	}
	if _, err := p.WriteTo([]byte("x"), u.c.LocalAddr()); err == nil {
		t.Fatal("WriteTo works after the socket closed")
	}
	next.Close()
	<-nextGot
}

// An app that closes its socket as soon as the drain is ordered, before
// the grace is over, does not end its reads early: Close waits for the
// hand-over, so that what the group routed here during the grace is read
// and answered.
func TestPacketCloseDuringGrace(t *testing.T) {
	f := listenCoordinator(t, 1, "s", wire.Msg{OK: true})
	a := newTestAgent(t, 5*time.Second)
	pc, err := reuse.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := a.registerPacket(pc, "udp4")
	served := echo(p, 0)
	coord := within(t, f, "hello")
	if err := a.ready(); err != nil {
		t.Fatal(err)
	}
	coord.expect(wire.TypeReady)
	u := newUDPClient(t, p.LocalAddr().String())
	// A grace long enough that the datagrams below are sent within it on
	// a loaded machine (go test runs packages side by side).
	coord.command(wire.Msg{Type: wire.TypeDrain, ID: 1, GraceMS: 2000, TimeoutMS: 5000})
	// The app closes once the drain is ordered: wait for the agent to
	// have the order (a Close before it is a plain close, which ends the
	// reads at once).
	testproc.WaitFor(t, 5*time.Second, "the drain order", func() bool { return isClosed(a.ordered) })
	closed := make(chan struct{})
	go func() { _ = p.Close(); close(closed) }()
	u.send(t, 50) // during the grace: still routed here (no successor)
	testproc.WaitFor(t, 5*time.Second, "50 answers during the grace", func() bool { none, _ := u.missing(); return len(none) == 0 })
	if isClosed(closed) || isClosed(a.draining) {
		t.Fatalf("Close returned %v, Draining closed %v, before the grace was over", isClosed(closed), isClosed(a.draining))
	}
	<-closed
	if !isClosed(a.draining) {
		t.Fatal("Close returned before Draining")
	}
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after the drain: %v, want net.ErrClosed", err)
	}
	coord.expect(wire.TypeClosed)
}
