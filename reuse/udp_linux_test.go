//go:build linux

package reuse_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/reuse"
)

// udpPair binds two UDP sockets on one fresh loopback port: a at index 0 of
// the group, b at index 1.
func udpPair(t *testing.T) (a, b net.PacketConn) {
	t.Helper()
	ctx := context.Background()
	a, err := reuse.ListenPacket(ctx, "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b, err = reuse.ListenPacket(ctx, "udp4", a.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return a, b
}

// sendN sends n datagrams to addr from one client socket.
func sendN(t *testing.T, addr net.Addr, n int) {
	t.Helper()
	c, err := net.Dial("udp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
}

// queued waits until pc's receive queue holds what was sent to it, or 2s
// pass, and returns the queue length then.
func queued(t *testing.T, pc net.PacketConn) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		n, err := reuse.PacketQueueLen(pc)
		if err != nil {
			t.Fatal(err)
		}
		if n > 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond)
	}
}

// TestSteerPacket: a UDP group follows the program from the first datagram,
// and the queue length reads 0 only once every datagram has been read.
func TestSteerPacket(t *testing.T) {
	for _, index := range []int{0, 1} {
		a, b := udpPair(t)
		if err := reuse.SteerPacket(b, index); err != nil {
			t.Fatal(err)
		}
		to, other := a, b
		if index == 1 {
			to, other = b, a
		}
		sendN(t, a.LocalAddr(), 50)
		if n := queued(t, to); n == 0 {
			t.Fatalf("ret %d: nothing queued on the chosen socket", index)
		}
		got := 0
		buf := make([]byte, 16)
		_ = to.SetReadDeadline(time.Now().Add(2 * time.Second))
		for got < 50 {
			if _, _, err := to.ReadFrom(buf); err != nil {
				t.Fatalf("ret %d: read %d of 50: %v", index, got, err)
			}
			got++
		}
		if n, err := reuse.PacketQueueLen(to); err != nil || n != 0 {
			t.Fatalf("ret %d: queue after reading all = %d, %v; want 0", index, n, err)
		}
		if n, err := reuse.PacketQueueLen(other); err != nil || n != 0 {
			t.Fatalf("ret %d: the other socket has %d bytes queued (%v); want none", index, n, err)
		}
	}
}

// TestSteerWeightedPacket: a canary weight splits datagrams at random.
func TestSteerWeightedPacket(t *testing.T) {
	a, b := udpPair(t)
	if err := reuse.SteerWeightedPacket(a, 50); err != nil {
		t.Fatal(err)
	}
	sendN(t, a.LocalAddr(), 400)
	if queued(t, a) == 0 || queued(t, b) == 0 {
		t.Fatal("a 50% canary left one socket without datagrams")
	}
}

func TestDrainPacketQueue(t *testing.T) {
	a, _ := udpPair(t)
	if err := reuse.SteerPacket(a, 0); err != nil {
		t.Fatal(err)
	}
	sendN(t, a.LocalAddr(), 3)
	queued(t, a)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := reuse.DrainPacketQueue(ctx, a, time.Millisecond); err == nil {
		t.Fatal("DrainPacketQueue returned nil with 3 datagrams unread")
	}
	buf := make([]byte, 16)
	for range 3 {
		if _, _, err := a.ReadFrom(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := reuse.DrainPacketQueue(context.Background(), a, time.Millisecond); err != nil {
		t.Fatal(err)
	}
}

func TestListenPacketNetworks(t *testing.T) {
	if _, err := reuse.ListenPacket(context.Background(), "tcp", "127.0.0.1:0"); err == nil {
		t.Fatal("ListenPacket took network tcp")
	}
}
