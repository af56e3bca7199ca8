//go:build linux

package reuse_test

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/reuse"
	"golang.org/x/sys/unix"
)

// protocol returns SO_PROTOCOL of the listener, to tell TCP from MPTCP.
func protocol(t *testing.T, ln net.Listener) int {
	t.Helper()
	rc, err := ln.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var proto int
	var perr error
	if err := rc.Control(func(fd uintptr) {
		proto, perr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
	}); err != nil {
		t.Fatal(err)
	}
	if perr != nil {
		t.Fatal(perr)
	}
	return proto
}

func TestListenIsPlainTCP(t *testing.T) {
	if p := protocol(t, listen(t, "127.0.0.1:0")); p != unix.IPPROTO_TCP {
		t.Fatalf("SO_PROTOCOL = %d, want IPPROTO_TCP", p)
	}
}

// acceptLoop accepts on ln until it is closed, closing each connection and
// reporting name on got.
func acceptLoop(ln net.Listener, name string, got chan<- string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
		got <- name
	}
}

// dialN dials addr n times, waits for each connection to be accepted and
// returns how many each listener accepted.
func dialN(t *testing.T, addr string, n int, got <-chan string) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case name := <-got:
			counts[name]++
		case <-time.After(2 * time.Second):
			t.Fatal("connection not accepted within 2s")
		}
		c.Close()
	}
	return counts
}

// pair listens twice on one fresh port, A at index 0 and B at index 1, and
// names on got the listener that accepts each connection.
func pair(t *testing.T) (a, b net.Listener, got chan string) {
	a = listen(t, "127.0.0.1:0")
	b = listen(t, a.Addr().String())
	got = make(chan string)
	go acceptLoop(a, "A", got)
	go acceptLoop(b, "B", got)
	return a, b, got
}

func TestSteer(t *testing.T) {
	a, b, got := pair(t)
	addr := a.Addr().String()

	step := func(desc, want string) {
		t.Helper()
		counts := dialN(t, addr, 50, got)
		if counts[want] != 50 {
			t.Fatalf("%s: accepts %v, want all 50 on %s", desc, counts, want)
		}
	}
	// steer attaches "ret index" through ln and checks where connections go.
	steer := func(ln net.Listener, index int, desc, want string) {
		t.Helper()
		if err := reuse.Steer(ln, index); err != nil {
			t.Fatal(err)
		}
		step(desc, want)
	}

	steer(a, 0, "ret 0", "A")
	// Either member may attach: the program belongs to the group.
	steer(b, 1, "ret 1", "B")
	// The kernel moves B into A's slot; ret 1 is out of range and hashes.
	a.Close()
	step("ret 1 after A left", "B")
	steer(b, 0, "ret 0 after A left", "B")
	if err := reuse.Detach(b); err != nil {
		t.Fatal(err)
	}
	step("detached", "B")
	// Detaching again finds no program.
	if err := reuse.Detach(b); err != nil {
		t.Fatalf("second Detach: %v", err)
	}

	// B took A's slot, so the next generation joins at index 1.
	c := listen(t, addr)
	go acceptLoop(c, "C", got)
	steer(c, 0, "ret 0 after C joined", "B")
	steer(c, 1, "ret 1 after C joined", "C")
}

// An index or a weight out of range is an error that names it; the ends of
// the ranges are valid.
func TestSteerRange(t *testing.T) {
	ln := listen(t, "127.0.0.1:0")
	for _, tc := range []struct {
		what string
		err  error
	}{
		{"index -1", reuse.Steer(ln, -1)},
		{"index 2^32", reuse.Steer(ln, 1<<32)},
		{"weight -1", reuse.SteerWeighted(ln, -1)},
		{"weight 101", reuse.SteerWeighted(ln, 101)},
		{"remote index -1", reuse.SteerRemote(os.Getpid(), 0, -1)},
		{"remote weight 101", reuse.SteerWeightedRemote(os.Getpid(), 0, 101)},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), "out of range") {
			t.Errorf("%s: %v, want an out-of-range error", tc.what, tc.err)
		}
	}
	for _, i := range []int{0, 1<<32 - 1} {
		if err := reuse.Steer(ln, i); err != nil {
			t.Errorf("Steer(%d): %v", i, err)
		}
	}
}

// A canary weight sends its share of new connections to index 1: 10% of
// 3,000 is 300, and a binomial spread of ±3 standard deviations (about ±49)
// bounds it; 0% and 100% send all of them one way.
func TestSteerWeighted(t *testing.T) {
	a, b, got := pair(t)
	addr := a.Addr().String()
	if err := reuse.SteerWeighted(b, 10); err != nil {
		t.Fatal(err)
	}
	const n = 3000
	counts := dialN(t, addr, n, got)
	if counts["B"] < 300-49 || counts["B"] > 300+49 || counts["A"]+counts["B"] != n {
		t.Errorf("weight 10%%: accepts %v of %d, want about 300 on B", counts, n)
	}
	for _, tc := range []struct {
		weight int
		want   string
	}{{0, "A"}, {100, "B"}} {
		if err := reuse.SteerWeighted(a, tc.weight); err != nil {
			t.Fatal(err)
		}
		if counts := dialN(t, addr, 100, got); counts[tc.want] != 100 {
			t.Errorf("weight %d%%: accepts %v, want all 100 on %s", tc.weight, counts, tc.want)
		}
	}
	// After B leaves, index 1 is out of range: everything hashes to A.
	if err := reuse.SteerWeighted(a, 50); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if counts := dialN(t, addr, 100, got); counts["A"] != 100 {
		t.Errorf("weight 50%% with B gone: accepts %v, want all 100 on A", counts)
	}
}

type wrapper struct{ net.Listener }

func (w wrapper) NetListener() net.Listener { return w.Listener }

type fake struct{ net.Listener }

func TestSteerListenerKinds(t *testing.T) {
	ln := listen(t, "127.0.0.1:0")
	if err := reuse.Steer(wrapper{ln}, 0); err != nil {
		t.Fatalf("Steer through NetListener: %v", err)
	}
	if _, err := reuse.QueueLen(wrapper{wrapper{ln}}); err != nil {
		t.Fatalf("QueueLen through two wrappers: %v", err)
	}
	if err := reuse.Steer(fake{ln}, 0); err == nil {
		t.Fatal("Steer on a listener without a file descriptor succeeded")
	}

	var lc net.ListenConfig
	lc.SetMultipathTCP(false) // Go's default MPTCP would fail for another reason
	plain, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	err = reuse.Steer(plain, 0)
	t.Logf("Steer on a listener without SO_REUSEPORT: %v", err)
	if err == nil {
		t.Fatal("Steer on a listener without SO_REUSEPORT succeeded")
	}

	ln.Close()
	if err := reuse.Steer(ln, 0); err == nil {
		t.Fatal("Steer on a closed listener succeeded")
	}
}

func TestSteerMPTCP(t *testing.T) {
	lc := net.ListenConfig{Control: reuse.Control}
	lc.SetMultipathTCP(true)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("MPTCP listen: %v", err)
	}
	defer ln.Close()
	err = reuse.Steer(ln, 0)
	if protocol(t, ln) != unix.IPPROTO_MPTCP {
		t.Logf("kernel fell back to TCP; Steer: %v", err)
		return
	}
	_, qerr := reuse.QueueLen(ln)
	t.Logf("MPTCP listener; Steer: %v; QueueLen: %v", err, qerr)
	if err == nil {
		t.Fatal("Steer on an MPTCP listener succeeded")
	}
	if !errors.Is(err, unix.EOPNOTSUPP) {
		t.Logf("expected EOPNOTSUPP, got %v", err)
	}
}

func TestQueueLen(t *testing.T) {
	ln := listen(t, "127.0.0.1:0")
	const n = 5
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	// Loopback completes the handshake, but the server side lands in the
	// queue asynchronously.
	deadline := time.Now().Add(2 * time.Second)
	for {
		q, err := reuse.QueueLen(ln)
		if err != nil {
			t.Fatal(err)
		}
		if q == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("QueueLen = %d, want %d", q, n)
		}
		time.Sleep(time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := reuse.DrainQueue(ctx, ln, 0)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "5") {
		t.Fatalf("DrainQueue with queued connections: %v", err)
	}

	for range n {
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	ctx, cancel = context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	if err := reuse.DrainQueue(ctx, ln, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("DrainQueue on an empty queue took %v", d)
	}
}

func TestMigrateReq(t *testing.T) {
	on, err := reuse.MigrateReq()
	b, ferr := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if ferr != nil {
		if !errors.Is(err, reuse.ErrUnsupported) || !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("file unreadable (%v) but MigrateReq = %v, %v", ferr, on, err)
		}
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.TrimSpace(string(b)) != "0"; on != want {
		t.Fatalf("MigrateReq = %v, file says %q", on, b)
	}
	t.Logf("tcp_migrate_req = %v", on)
}

// SteerRemote attaches through a duplicate of a socket another process
// holds; here this process stands in for it (pidfd_getfd of itself).
func TestSteerRemote(t *testing.T) {
	a := listen(t, "127.0.0.1:0") // index 0
	addr := a.Addr().String()
	b := listen(t, addr) // index 1
	got := make(chan string)
	go acceptLoop(a, "A", got)
	go acceptLoop(b, "B", got)
	fd := fdOf(t, b)
	for _, want := range []struct {
		index int
		name  string
	}{{1, "B"}, {0, "A"}} {
		if err := reuse.SteerRemote(os.Getpid(), fd, want.index); err != nil {
			t.Fatal(err)
		}
		if counts := dialN(t, addr, 20, got); counts[want.name] != 20 {
			t.Fatalf("ret %d through a duplicate: accepts %v, want all 20 on %s", want.index, counts, want.name)
		}
	}
	if err := reuse.SteerWeightedRemote(os.Getpid(), fd, 100); err != nil {
		t.Fatal(err)
	}
	if counts := dialN(t, addr, 20, got); counts["B"] != 20 {
		t.Fatalf("weight 100 through a duplicate: %v", counts)
	}
	if err := reuse.SteerRemote(os.Getpid(), 1<<20, 0); !errors.Is(err, reuse.ErrNoDup) {
		t.Errorf("a bad fd: %v, want ErrNoDup", err)
	}
}
