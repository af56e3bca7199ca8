package coordinator

import (
	"encoding/binary"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// listenInodes asks the kernel (sock_diag) for the TCP sockets that listen
// on port, IPv4 and IPv6, and returns the inodes of those whose local
// address matches ip (any when ip is nil or unspecified). The kernel walks
// only its listening hash for this. Reading /proc/net/tcp instead walks every
// bucket of the established hash, however few sockets it holds: about 8ms of
// kernel time per read on a host with 262,144 buckets, every 25ms.
func listenInodes(ip net.IP, port int) (map[uint64]bool, error) {
	out := map[uint64]bool{}
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagListeners(family, uint16(port), func(local net.IP, inode uint64) {
			if ip == nil || ip.IsUnspecified() || local.IsUnspecified() || local.Equal(ip) {
				out[inode] = true
			}
		}); err != nil {
			return nil, err
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
	diagMsgInode  = 68 // idiag_inode
)

// diagListeners calls each with the local address and inode of every TCP
// socket of family that listens on port.
func diagListeners(family uint8, port uint16, each func(local net.IP, inode uint64)) error {
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
	r[0], r[1] = family, unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], 1<<tcpListen) // idiag_states
	binary.BigEndian.PutUint16(r[8:], port)            // id.idiag_sport: the kernel skips other ports
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
			if len(d) < sizeofDiagMsg || binary.BigEndian.Uint16(d[diagMsgSport:]) != port {
				continue
			}
			local := net.IP(d[diagMsgSrc : diagMsgSrc+16])
			if family == unix.AF_INET {
				local = net.IP(d[diagMsgSrc : diagMsgSrc+4])
			}
			each(local, uint64(binary.NativeEndian.Uint32(d[diagMsgInode:])))
		}
	}
	return fmt.Errorf("sock_diag: no end of the dump")
}
