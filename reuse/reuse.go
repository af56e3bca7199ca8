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
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("reuse: listen: network %q is not tcp, tcp4 or tcp6", network)
	}
	if !supported {
		return nil, unsupported("listen")
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
	switch network {
	case "udp", "udp4", "udp6":
	default:
		return nil, fmt.Errorf("reuse: listen packet: network %q is not udp, udp4 or udp6", network)
	}
	if !supported {
		return nil, unsupported("listen packet")
	}
	pc, err := (&net.ListenConfig{Control: Control}).ListenPacket(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("reuse: %w", err)
	}
	return pc, nil
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
