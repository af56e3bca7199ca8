//go:build linux

package reuse

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNoDup: the listening socket of another process could not be taken
// (pidfd_getfd refused), so its group cannot be steered from outside. The
// wrapped errno says why: EPERM (a non-dumpable process or one with file
// capabilities, unless the caller is root; a seccomp profile), ENOSYS
// (before Linux 5.6).
var ErrNoDup = errors.New("cannot take the socket")

// SteerRemote attaches "ret index" to the reuseport group of the listening
// socket that process pid holds as fd: through a duplicate taken with
// pidfd_getfd(2), closed at once (a duplicate held open would keep the
// socket in the group after the process closes it).
func SteerRemote(pid, fd, index int) error {
	prog, err := retProgram(index)
	if err != nil {
		return err
	}
	return attachRemote(pid, fd, prog)
}

// SteerWeightedRemote attaches the canary program of SteerWeighted (index
// 1 with probability weight/100, else index 0; a weight below 0 or above
// 100 is an error) through pid's fd.
func SteerWeightedRemote(pid, fd, weight int) error {
	prog, err := weightedProgram(weight)
	if err != nil {
		return err
	}
	return attachRemote(pid, fd, prog)
}

// DetachRemote removes the program of the reuseport group of pid's fd, so
// the kernel hashes again (a group the coordinator cannot steer must not
// keep a program that points at one member).
func DetachRemote(pid, fd int) error {
	return withRemote(pid, fd, func(dup int) error {
		err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("reuse: detach reuseport bpf through fd %d of pid %d: %w", fd, pid, err)
		}
		return nil
	})
}

func attachRemote(pid, fd int, prog []unix.SockFilter) error {
	return withRemote(pid, fd, func(dup int) error {
		fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
		if err := unix.SetsockoptSockFprog(dup, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog); err != nil {
			return fmt.Errorf("reuse: attach reuseport bpf through fd %d of pid %d: %w", fd, pid, err)
		}
		return nil
	})
}

// withRemote runs f on a duplicate of pid's fd, closed right after.
func withRemote(pid, fd int, f func(dup int) error) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("%w: pidfd_open %d: %w", ErrNoDup, pid, err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return fmt.Errorf("%w: pidfd_getfd %d of pid %d: %w", ErrNoDup, fd, pid, err)
	}
	defer unix.Close(dup)
	return f(dup)
}
