//go:build !linux

package reuse

import "errors"

// ErrNoDup: the listening socket of another process could not be taken.
var ErrNoDup = errors.New("cannot take the socket")

// SteerRemote returns an error wrapping ErrUnsupported.
func SteerRemote(pid, fd, index int) error { return unsupported("pidfd_getfd") }

// SteerWeightedRemote returns an error wrapping ErrUnsupported.
func SteerWeightedRemote(pid, fd, weight int) error { return unsupported("pidfd_getfd") }

// DetachRemote returns an error wrapping ErrUnsupported.
func DetachRemote(pid, fd int) error { return unsupported("pidfd_getfd") }
