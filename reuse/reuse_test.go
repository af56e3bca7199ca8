package reuse_test

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"

	"go.uber.org/goleak"

	"github.com/rollover-sh/rollover/reuse"
)

// TestMain fails the run if a test leaves a goroutine behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// listen opens a reuse listener on addr and skips the test where the
// platform has no SO_REUSEPORT support.
func listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := reuse.Listen(context.Background(), "tcp", addr)
	if errors.Is(err, reuse.ErrUnsupported) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func TestListenSharesPort(t *testing.T) {
	a := listen(t, "127.0.0.1:0")
	b := listen(t, a.Addr().String())
	if a.Addr().String() != b.Addr().String() {
		t.Fatalf("addresses differ: %v, %v", a.Addr(), b.Addr())
	}
	if ln, err := net.Listen("tcp", a.Addr().String()); err == nil {
		ln.Close()
		t.Fatal("plain net.Listen joined a reuseport group")
	}
}

func TestListenNetwork(t *testing.T) {
	for _, network := range []string{"udp", "unix", "ip4:tcp", ""} {
		if ln, err := reuse.Listen(context.Background(), network, "127.0.0.1:0"); err == nil {
			ln.Close()
			t.Errorf("Listen(%q) succeeded", network)
		}
	}
}

func TestConfigWrapsControl(t *testing.T) {
	errMine := errors.New("mine")
	called := 0
	lc := &net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		called++
		return errMine
	}}
	ln, err := reuse.Config(lc).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err == nil {
		ln.Close()
	}
	if called != 1 || !errors.Is(err, errMine) {
		t.Fatalf("called %d times, err %v; want 1, %v", called, err, errMine)
	}
	lc.SetMultipathTCP(true)
	if reuse.Config(lc).MultipathTCP() || !lc.MultipathTCP() {
		t.Fatal("Config left MPTCP on or changed its argument")
	}

	called = 0
	lc.Control = func(string, string, syscall.RawConn) error { called++; return nil }
	ln, err = reuse.Config(lc).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if errors.Is(err, reuse.ErrUnsupported) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The wrapped Control must still set SO_REUSEPORT.
	listen(t, ln.Addr().String())
	if called != 1 {
		t.Fatalf("caller's Control called %d times, want 1", called)
	}
}

func TestConfigNil(t *testing.T) {
	lc := reuse.Config(nil)
	if lc.Control == nil || lc.MultipathTCP() {
		t.Fatalf("Config(nil) = %+v, want Control set and MPTCP off", lc)
	}
}
