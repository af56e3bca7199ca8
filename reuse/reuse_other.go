//go:build !linux

package reuse

import (
	"net"
	"syscall"
)

// Reuseport steering and the accept-queue length are Linux features, and a
// listener that shares a port without them would drop connections on
// hand-over, so every call fails rather than degrading.
const supported = false

// Control returns an error wrapping ErrUnsupported.
func Control(network, address string, c syscall.RawConn) error {
	return unsupported("SO_REUSEPORT")
}

// Steer returns an error wrapping ErrUnsupported.
func Steer(ln net.Listener, index int) error { return unsupported("reuseport bpf") }

// SteerWeighted returns an error wrapping ErrUnsupported.
func SteerWeighted(ln net.Listener, weight int) error { return unsupported("reuseport bpf") }

// Detach returns an error wrapping ErrUnsupported.
func Detach(ln net.Listener) error { return unsupported("reuseport bpf") }

// QueueLen returns an error wrapping ErrUnsupported.
func QueueLen(ln net.Listener) (int, error) { return 0, unsupported("accept queue length") }

// MigrateReq returns an error wrapping ErrUnsupported.
func MigrateReq() (bool, error) { return false, unsupported("tcp_migrate_req") }

// SteerPacket returns an error wrapping ErrUnsupported.
func SteerPacket(pc net.PacketConn, index int) error { return unsupported("reuseport bpf") }

// SteerWeightedPacket returns an error wrapping ErrUnsupported.
func SteerWeightedPacket(pc net.PacketConn, weight int) error { return unsupported("reuseport bpf") }

// PacketQueueLen returns an error wrapping ErrUnsupported.
func PacketQueueLen(pc net.PacketConn) (int, error) { return 0, unsupported("receive queue length") }
