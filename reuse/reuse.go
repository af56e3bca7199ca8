package reuse

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"syscall"
	"time"
)

// ErrUnsupported is wrapped by errors from platforms or kernels that lack a
// feature. errors.Is(err, errors.ErrUnsupported) also holds.
var ErrUnsupported = fmt.Errorf("reuse: %w", errors.ErrUnsupported)

func unsupported(what string) error {
	return fmt.Errorf("%w: %s on %s", ErrUnsupported, what, runtime.GOOS)
}

// Wrap returns a Control func for net.ListenConfig that runs ctl first (when
// non-nil) and then Control. The first error wins. It extends a caller's
// Control instead of replacing it.
func Wrap(ctl func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	if ctl == nil {
		return Control
	}
	return func(network, address string, c syscall.RawConn) error {
		if err := ctl(network, address, c); err != nil {
			return err
		}
		return Control(network, address, c)
	}
}

// Config returns a copy of lc (nil means the zero value) that sets
// SO_REUSEADDR and SO_REUSEPORT after lc's own Control, with Multipath TCP
// off.
func Config(lc *net.ListenConfig) *net.ListenConfig {
	var c net.ListenConfig
	if lc != nil {
		c = *lc
	}
	c.Control = Wrap(c.Control)
	c.SetMultipathTCP(false)
	return &c
}

// Listen is Config(nil).Listen for the networks "tcp", "tcp4" and "tcp6".
func Listen(ctx context.Context, network, address string) (net.Listener, error) {
	if err := checkNetwork("listen", network, "tcp"); err != nil {
		return nil, err
	}
	ln, err := Config(nil).Listen(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("reuse: %w", err)
	}
	return ln, nil
}

// ListenPacket is net.ListenConfig.ListenPacket with SO_REUSEADDR and
// SO_REUSEPORT, for the networks "udp", "udp4" and "udp6". The socket joins
// its port's reuseport group at bind(), so a program the group has already
// decides at once whether it gets datagrams.
func ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	if err := checkNetwork("listen packet", network, "udp"); err != nil {
		return nil, err
	}
	pc, err := (&net.ListenConfig{Control: Control}).ListenPacket(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("reuse: %w", err)
	}
	return pc, nil
}

// checkNetwork refuses a network other than proto, proto4 and proto6, and
// a platform without SO_REUSEPORT.
func checkNetwork(op, network, proto string) error {
	switch network {
	case proto, proto + "4", proto + "6":
	default:
		return fmt.Errorf("reuse: %s: network %q is not %s, %[3]s4 or %[3]s6", op, network, proto)
	}
	if !supported {
		return unsupported(op)
	}
	return nil
}

// DrainPacketQueue polls PacketQueueLen every interval (<= 0 means 1ms)
// until the receive queue of pc reads empty twice in a row, while its
// reader goes on reading (a datagram the group routed here in between
// would be lost by the close that follows). It returns an error wrapping
// ctx.Err() if ctx ends first.
func DrainPacketQueue(ctx context.Context, pc net.PacketConn, interval time.Duration) error {
	return pollEmpty(ctx, interval, "datagram bytes", func() (int, error) { return PacketQueueLen(pc) })
}

// DrainQueue polls QueueLen every interval (<= 0 means 1ms) until the accept
// queue of ln reads empty twice in a row. Twice, because a handshake that
// completes between two polls would otherwise be reset by the close that
// follows. It returns an error wrapping ctx.Err() if ctx ends first.
func DrainQueue(ctx context.Context, ln net.Listener, interval time.Duration) error {
	return pollEmpty(ctx, interval, "connections", func() (int, error) { return QueueLen(ln) })
}

// pollEmpty polls size every interval until it reads 0 twice in a row.
func pollEmpty(ctx context.Context, interval time.Duration, what string, size func() (int, error)) error {
	if interval <= 0 {
		interval = time.Millisecond
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for zeros := 0; ; {
		n, err := size()
		if err != nil {
			return err
		}
		if n > 0 {
			zeros = 0
		} else if zeros++; zeros == 2 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("reuse: drain queue: %d %s still queued: %w", n, what, ctx.Err())
		case <-t.C:
		}
	}
}

// Range is the slots first, first+1, …, first+n-1 of a reuseport group,
// for SpreadRemote and SplitRemote.
func Range(first, n int) []int {
	s := make([]int, max(n, 0))
	for i := range s {
		s[i] = first + i
	}
	return s
}
