package coordinator

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// listenSockets returns the TCP sockets that listen on port (0: any) in
// this network namespace, from sock_diag, or from /proc/net/tcp{,6} where
// sock_diag is missing.
func listenSockets(port int) ([]tcpSocket, error) {
	var out []tcpSocket
	var errs []error
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagListeners(family, uint16(port), func(s tcpSocket) { out = append(out, s) }); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) < 2 {
		return out, nil // IPv6 may be off
	}
	socks, ok := readTCPSockets("/proc", tcpListen)
	if !ok {
		return nil, fmt.Errorf("listening sockets: %v; no /proc/net/tcp", errs[0])
	}
	out = out[:0]
	for _, s := range socks {
		if port == 0 || int(s.localPort) == port {
			out = append(out, s)
		}
	}
	return out, nil
}

// Sizes and offsets of struct inet_diag_req_v2 and struct inet_diag_msg
// (linux/inet_diag.h).
const (
	sizeofDiagReq = 56
	sizeofDiagMsg = 72
	diagMsgSport  = 4  // idiag_sport, big-endian
	diagMsgSrc    = 8  // idiag_src[4], big-endian words
	diagMsgRqueue = 56 // idiag_rqueue: a listener's accept queue
	diagMsgInode  = 68 // idiag_inode
)

// diagListeners calls each with every TCP socket of family that listens on
// port (0: any): its local address and port, accept queue and inode.
func diagListeners(family uint8, port uint16, each func(s tcpSocket)) error {
	return diagSockets(family, tcpListen, port, each)
}

// udpClose is the state of a UDP socket that is bound and not connected: a
// server's.
const udpClose = 7

// udpSockets returns the unconnected UDP sockets bound to port (0: any) in
// this network namespace, from sock_diag: their local address, the bytes
// queued on them (idiag_rqueue) and inode.
func udpSockets(port int) ([]tcpSocket, error) {
	var out []tcpSocket
	var errs []error
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagProto(family, unix.IPPROTO_UDP, udpClose, uint16(port), func(s tcpSocket) { out = append(out, s) }); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 2 {
		return nil, fmt.Errorf("udp sockets: %w", errs[0])
	}
	return out, nil
}

// diagSockets calls each with every TCP socket of family in state whose
// local port is port (0: any).
func diagSockets(family uint8, state uint64, port uint16, each func(s tcpSocket)) error {
	return diagProto(family, unix.IPPROTO_TCP, state, port, each)
}

// diagProto is diagSockets for protocol proto (TCP or UDP).
func diagProto(family, proto uint8, state uint64, port uint16, each func(s tcpSocket)) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return fmt.Errorf("sock_diag: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(time.Second.Nanoseconds()) // the kernel answers at once; never hang on it
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("sock_diag: %w", err)
	}
	req := make([]byte, unix.NLMSG_HDRLEN+sizeofDiagReq)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	r := req[unix.NLMSG_HDRLEN:]
	r[0], r[1] = family, proto
	binary.NativeEndian.PutUint32(r[4:], 1<<state) // idiag_states
	binary.BigEndian.PutUint16(r[8:], port)        // id.idiag_sport: the kernel skips other ports
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag: %w", err)
	}
	buf := make([]byte, 32<<10)
	for range 1 << 16 { // bounded: each reply carries dozens of sockets, then NLMSG_DONE
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("sock_diag: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("sock_diag: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(binary.NativeEndian.Uint32(m.Data)); e < 0 {
						return fmt.Errorf("sock_diag: %w", syscall.Errno(-e))
					}
				}
				return fmt.Errorf("sock_diag: error reply")
			}
			d := m.Data
			if len(d) < sizeofDiagMsg || (port != 0 && binary.BigEndian.Uint16(d[diagMsgSport:]) != port) {
				continue
			}
			local := net.IP(slices.Clone(d[diagMsgSrc : diagMsgSrc+16]))
			if family == unix.AF_INET {
				local = net.IP(slices.Clone(d[diagMsgSrc : diagMsgSrc+4]))
			}
			each(tcpSocket{state: state, localAddr: local, localPort: uint64(binary.BigEndian.Uint16(d[diagMsgSport:])),
				rxQueue: uint64(binary.NativeEndian.Uint32(d[diagMsgRqueue:])), inode: uint64(binary.NativeEndian.Uint32(d[diagMsgInode:]))})
		}
	}
	return fmt.Errorf("sock_diag: no end of the dump")
}

// diagListening returns the TCP sockets in LISTEN state of this process's
// network namespace, IPv4 and IPv6 (where there is IPv6), with their
// accept queues.
func diagListening() ([]tcpSocket, error) {
	var out []tcpSocket
	var errs []error
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagSockets(family, tcpListen, 0, func(s tcpSocket) { out = append(out, s) }); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 2 {
		return nil, errs[0]
	}
	return out, nil
}

// sameNetns reports whether dir (/proc, or /proc/PID) shows this process's
// network namespace, so that sock_diag sees what dir's net/tcp would.
func sameNetns(dir string) bool {
	if dir == "/proc" {
		return true
	}
	theirs, err := os.Readlink(dir + "/ns/net")
	if err != nil {
		return false
	}
	ours, err := os.Readlink("/proc/self/ns/net")
	return err == nil && theirs == ours
}
