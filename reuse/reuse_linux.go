//go:build linux

package reuse

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"github.com/libp2p/go-reuseport"
	"golang.org/x/sys/unix"
)

const supported = true

// Control sets SO_REUSEADDR and SO_REUSEPORT on the socket. It has the
// signature of net.ListenConfig.Control.
func Control(network, address string, c syscall.RawConn) error {
	if err := reuseport.Control(network, address, c); err != nil {
		return fmt.Errorf("reuse: set SO_REUSEADDR/SO_REUSEPORT: %w", err)
	}
	return nil
}

// Steer attaches the classic-BPF program "ret index" to the reuseport group
// of ln, replacing any program the group had. Call it only on a listening
// socket. An index below 0 or past a program's 32-bit operand is an error.
func Steer(ln net.Listener, index int) error { return steer(ln, index) }

// SteerPacket is Steer for the reuseport group of a UDP socket, which it
// joined at bind().
func SteerPacket(pc net.PacketConn, index int) error { return steer(pc, index) }

func steer(s any, index int) error {
	prog, err := retProgram(index)
	if err != nil {
		return err
	}
	if err := attach(s, prog); err != nil {
		return fmt.Errorf("reuse: attach reuseport bpf: %w", err)
	}
	return nil
}

// SteerWeighted attaches a canary program to the reuseport group of ln: each
// new connection goes to index 1 with probability weight/100 and to index 0
// otherwise. weight 0 is "ret 0" and 100 "ret 1", as Steer; a weight
// below 0 or above 100 is an error. It is classic BPF, so it needs no
// privilege:
//
//	ld [SKF_AD_OFF+SKF_AD_RANDOM]; mod #100; jge #weight → ret 0, else ret 1
func SteerWeighted(ln net.Listener, weight int) error { return steerWeighted(ln, weight) }

// SteerWeightedPacket is SteerWeighted for the group of a UDP socket: each
// datagram goes to index 1 with probability weight/100.
func SteerWeightedPacket(pc net.PacketConn, weight int) error { return steerWeighted(pc, weight) }

func steerWeighted(s any, weight int) error {
	prog, err := weightedProgram(weight)
	if err != nil {
		return err
	}
	if err := attach(s, prog); err != nil {
		return fmt.Errorf("reuse: attach reuseport canary bpf (weight %d%%): %w", weight, err)
	}
	return nil
}

// retProgram is "ret index", for Steer and SteerRemote.
func retProgram(index int) ([]unix.SockFilter, error) {
	if index < 0 || index > math.MaxUint32 {
		return nil, fmt.Errorf("reuse: steer: index %d is out of range (0 to %d)", index, uint32(math.MaxUint32))
	}
	return []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: uint32(index)}}, nil
}

// Ancillary load of a random 32-bit number (linux/filter.h), absent from
// golang.org/x/sys/unix.
// The offset is negative; as the program's uint32 operand it wraps.
const (
	skfAdOff     = -0x1000
	skfAdRandom  = 56
	skfAdRandomK = uint32(1<<32 + skfAdOff + skfAdRandom)
)

// weightedProgram is the canary program of SteerWeighted and
// SteerWeightedRemote.
func weightedProgram(weight int) ([]unix.SockFilter, error) {
	switch {
	case weight < 0 || weight > 100:
		return nil, fmt.Errorf("reuse: steer: weight %d%% is out of range (0 to 100)", weight)
	case weight == 0:
		return retProgram(0)
	case weight == 100:
		return retProgram(1)
	}
	return []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: skfAdRandomK},
		{Code: unix.BPF_ALU | unix.BPF_MOD | unix.BPF_K, K: 100},
		{Code: unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K, K: uint32(weight), Jt: 0, Jf: 1},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
		{Code: unix.BPF_RET | unix.BPF_K, K: 1},
	}, nil
}

// attach attaches prog to the reuseport group of s.
func attach(s any, prog []unix.SockFilter) error {
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	return withFD(s, func(fd int) error {
		return unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog)
	})
}

// Detach removes the program from the reuseport group of ln, so the kernel
// hashes again. Detaching from a group without a program is not an error.
func Detach(ln net.Listener) error {
	err := withFD(ln, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_REUSEPORT_BPF, 0)
	})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("reuse: detach reuseport bpf: %w", err)
	}
	return nil
}

// QueueLen returns the length of the accept queue of ln. For a listening
// socket the kernel reports it in tcpi_unacked.
func QueueLen(ln net.Listener) (int, error) {
	var n int
	err := withFD(ln, func(fd int) error {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return err
		}
		n = int(info.Unacked)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("reuse: tcp_info: %w", err)
	}
	return n, nil
}

// PacketQueueLen returns the bytes of memory that the datagrams queued on
// pc take (SO_MEMINFO's rmem_alloc, which counts a zero-length datagram too,
// where FIONREAD would read 0): 0 means its receive queue is empty.
func PacketQueueLen(pc net.PacketConn) (int, error) {
	var n int
	err := withFD(pc, func(fd int) error {
		var info [unix.SK_MEMINFO_VARS]uint32
		size := uint32(unsafe.Sizeof(info))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_MEMINFO,
			uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			return errno
		}
		n = int(info[unix.SK_MEMINFO_RMEM_ALLOC])
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("reuse: so_meminfo: %w", err)
	}
	return n, nil
}

const migrateReqPath = "/proc/sys/net/ipv4/tcp_migrate_req"

// MigrateReq reports whether net.ipv4.tcp_migrate_req is on in the network
// namespace of the calling process. Kernels before 5.14 lack it.
func MigrateReq() (bool, error) {
	b, err := os.ReadFile(migrateReqPath)
	if errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("%w: tcp_migrate_req needs linux >= 5.14: %w", ErrUnsupported, err)
	}
	if err != nil {
		return false, fmt.Errorf("reuse: %w", err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return false, fmt.Errorf("reuse: parse %s: %w", migrateReqPath, err)
	}
	return v != 0, nil
}

// withFD runs f on the file descriptor of s (a listener or a packet conn),
// looking through wrappers that expose what they wrap (NetListener,
// NetPacketConn). Wrappers that count connections usually hide SyscallConn.
func withFD(s any, f func(fd int) error) error {
	for range 16 { // bounded: a wrapper could return itself
		switch w := s.(type) {
		case interface{ NetListener() net.Listener }:
			s = w.NetListener()
			continue
		case interface{ NetPacketConn() net.PacketConn }:
			s = w.NetPacketConn()
			continue
		}
		break
	}
	sc, ok := s.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%T has no file descriptor", s)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}
