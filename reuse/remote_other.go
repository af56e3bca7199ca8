//go:build !linux

package reuse

import (
	"errors"
	"net/netip"
)

// ErrNoDup: the listening socket of another process could not be taken.
var ErrNoDup = errors.New("cannot take the socket")

// SteerRemote returns an error wrapping ErrUnsupported.
func SteerRemote(pid, fd, index int) error { return unsupported("pidfd_getfd") }

// SteerWeightedRemote returns an error wrapping ErrUnsupported.
func SteerWeightedRemote(pid, fd, weight int) error { return unsupported("pidfd_getfd") }

// DetachRemote returns an error wrapping ErrUnsupported.
func DetachRemote(pid, fd int) error { return unsupported("pidfd_getfd") }

// SpreadRemote returns an error wrapping ErrUnsupported.
func SpreadRemote(pid, fd int, slots []int) error { return unsupported("pidfd_getfd") }

// SplitRemote returns an error wrapping ErrUnsupported.
func SplitRemote(pid, fd, weight int, from, to []int) error { return unsupported("pidfd_getfd") }

// Held is a duplicate of another process's listening socket.
type Held struct{}

// HoldRemote returns an error wrapping ErrUnsupported.
func HoldRemote(pid, fd int) (*Held, error) { return nil, unsupported("pidfd_getfd") }

// Close does nothing.
func (h *Held) Close() error { return nil }

// Leave returns keep and an error wrapping ErrUnsupported.
func Leave(held []*Held, n int, target netip.AddrPort, keep []int) ([]int, error) {
	return keep, unsupported("pidfd_getfd")
}
