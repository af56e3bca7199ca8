//go:build linux

package reuse_test

import (
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/reuse"
)

// fdOf is ln's file descriptor in this process.
func fdOf(t *testing.T, ln net.Listener) int {
	t.Helper()
	raw, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := raw.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatal(err)
	}
	return fd
}

// group listens n times on one fresh port: listener i at index i. Each
// accepted connection gets one byte and is named on got (when got is read).
func group(t *testing.T, n int) ([]net.Listener, chan string) {
	return groupOn(t, "127.0.0.1:0", n)
}

func groupOn(t *testing.T, addr string, n int) ([]net.Listener, chan string) {
	t.Helper()
	lns := []net.Listener{listen(t, addr)}
	for len(lns) < n {
		lns = append(lns, listen(t, lns[0].Addr().String()))
	}
	got := make(chan string, 64)
	var wg sync.WaitGroup
	for i, ln := range lns {
		wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte{1})
				c.Close()
				got <- fmt.Sprint("L", i)
			}
		})
	}
	t.Cleanup(func() {
		for _, ln := range lns {
			ln.Close()
		}
		wg.Wait()
		close(got)
	})
	return lns, got
}

func TestSpreadRemote(t *testing.T) {
	lns, got := group(t, 5)
	addr, fd := lns[0].Addr().String(), fdOf(t, lns[0])
	// Contiguous slots: ld random; mod; add.
	if err := reuse.SpreadRemote(os.Getpid(), fd, reuse.Range(1, 4)); err != nil {
		t.Fatal(err)
	}
	const n = 4000
	counts := dialN(t, addr, n, got)
	// Each of 4 sockets gets 25% of n connections, within 3 sigma.
	sigma := math.Sqrt(n * 0.25 * 0.75)
	for _, name := range []string{"L1", "L2", "L3", "L4"} {
		if d := math.Abs(float64(counts[name]) - n/4); d > 3*sigma {
			t.Errorf("%s took %d of %d connections; want %d ± %.0f", name, counts[name], n, n/4, 3*sigma)
		}
	}
	if counts["L0"] != 0 {
		t.Errorf("L0, outside the slots, took %d", counts["L0"])
	}
	// A jeq table for slots that are not contiguous.
	if err := reuse.SpreadRemote(os.Getpid(), fd, []int{4, 0, 2}); err != nil {
		t.Fatal(err)
	}
	counts = dialN(t, addr, 300, got)
	if counts["L0"] == 0 || counts["L2"] == 0 || counts["L4"] == 0 || counts["L0"]+counts["L2"]+counts["L4"] != 300 {
		t.Errorf("slots 4, 0, 2: accepts %v", counts)
	}
	// The canary split: 30% over slots 3 and 4, the rest over 0 and 1.
	if err := reuse.SplitRemote(os.Getpid(), fd, 30, []int{0, 1}, []int{3, 4}); err != nil {
		t.Fatal(err)
	}
	counts = dialN(t, addr, 1000, got)
	next := counts["L3"] + counts["L4"]
	if sigma := math.Sqrt(1000 * 0.3 * 0.7); math.Abs(float64(next)-300) > 3*sigma || counts["L2"] != 0 || counts["L0"] == 0 || counts["L1"] == 0 || counts["L3"] == 0 || counts["L4"] == 0 {
		t.Errorf("30%% split: accepts %v", counts)
	}
	if err := reuse.SpreadRemote(os.Getpid(), fd, nil); err == nil {
		t.Error("no slots: no error")
	}
}

// TestLeave holds the three old sockets of a group of five (L0, L1 and L4)
// after their owner closed them, and takes them out while a client
// connects without a pause: no connection may meet a closing socket, and
// the new sockets' slots (L2, L3) must be tracked through the moves. L4,
// last, must go first: closing another one would move it.
func TestLeave(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		t.Run(addr, func(t *testing.T) {
			if ln, err := net.Listen("tcp", addr); err != nil {
				t.Skipf("no %s here: %v", addr, err)
			} else {
				ln.Close()
			}
			testLeave(t, addr)
		})
	}
}

func testLeave(t *testing.T, on string) {
	lns, got := groupOn(t, on, 5)
	addr := lns[0].Addr().String()
	target := netip.MustParseAddrPort(addr)
	pid := os.Getpid()
	if err := reuse.SpreadRemote(pid, fdOf(t, lns[2]), []int{2, 3}); err != nil {
		t.Fatal(err)
	}
	var held []*reuse.Held
	for _, ln := range []net.Listener{lns[0], lns[1], lns[4]} {
		h, err := reuse.HoldRemote(pid, fdOf(t, ln))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, h)
		ln.Close() // the owner closes it; the duplicate keeps it in the group
	}
	var mu sync.Mutex
	counts := map[string]int{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for name := range got {
			mu.Lock()
			counts[name]++
			mu.Unlock()
		}
	}()
	// A client that connects all the time, until Leave is done.
	var failed, ok atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", addr, time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(time.Second))
					_, err = io.ReadFull(c, make([]byte, 1))
					c.Close()
				}
				if err != nil {
					failed.Add(1)
				} else {
					ok.Add(1)
				}
			}
		})
	}
	for ok.Load() < 50 {
		time.Sleep(time.Millisecond)
	}
	keep, err := reuse.Leave(held, 5, target, []int{2, 3})
	for n := ok.Load(); ok.Load() < n+50; {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if failed.Load() != 0 {
		t.Errorf("%d of %d connections failed while the old sockets left", failed.Load(), failed.Load()+ok.Load())
	}
	// L4 left without a move, then L3 moved into slot 1, then L2 into 0.
	if len(keep) != 2 || keep[0] != 0 || keep[1] != 1 {
		t.Fatalf("keep = %v, want [0 1] (L2 at 0, L3 at 1)", keep)
	}
	for i, want := range []string{"L2", "L3"} {
		if err := reuse.SpreadRemote(pid, fdOf(t, lns[2]), keep[i:i+1]); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		clear(counts)
		mu.Unlock()
		for range 20 {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(time.Second))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
		for deadline := time.Now().Add(2 * time.Second); ; {
			mu.Lock()
			c := maps.Clone(counts)
			mu.Unlock()
			if c["L2"]+c["L3"] >= 20 || time.Now().After(deadline) {
				if c[want] != 20 {
					t.Errorf("slot %d: accepts %v, want all 20 on %s", keep[i], c, want)
				}
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	lns[2].Close()
	lns[3].Close()
}
