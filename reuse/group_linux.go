//go:build linux

package reuse

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// A reuseport group is an array of sockets in join order (listen() for
// TCP). A program returns an index into it; an index past the end falls
// back to the kernel's hash. A socket that leaves moves the group's last
// socket into its slot, and nothing reports the order, so whoever steers a
// group with several sockets per generation tracks it: the programs below
// take the slots to send to, and Leave closes held sockets in an order that
// never moves a socket the program sends to.

// maxSlots bounds a program's slot list: its jump offsets are 8 bits.
const maxSlots = 100

// spreadProgram sends each new connection to one of slots, evenly at
// random: "ld random; mod n; add first; ret a" for contiguous slots, a jeq
// table otherwise. A load that faults returns 0, index 0.
func spreadProgram(slots []int) ([]unix.SockFilter, error) {
	switch {
	case len(slots) == 0:
		return nil, errors.New("reuse: steer: no slot to send to")
	case len(slots) > maxSlots:
		return nil, fmt.Errorf("reuse: steer: %d slots, at most %d", len(slots), maxSlots)
	case len(slots) == 1:
		return retProgram(slots[0])
	}
	for _, s := range slots {
		if _, err := retProgram(s); err != nil {
			return nil, err
		}
	}
	n := uint32(len(slots))
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: skfAdRandomK},
		{Code: unix.BPF_ALU | unix.BPF_MOD | unix.BPF_K, K: n},
	}
	sorted := slices.Sorted(slices.Values(slots))
	if sorted[len(sorted)-1]-sorted[0] == len(sorted)-1 && !hasDup(sorted) {
		return append(prog,
			unix.SockFilter{Code: unix.BPF_ALU | unix.BPF_ADD | unix.BPF_K, K: uint32(sorted[0])},
			unix.SockFilter{Code: unix.BPF_RET | unix.BPF_A},
		), nil
	}
	for i, s := range slots[:len(slots)-1] {
		prog = append(prog,
			unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(i), Jt: 0, Jf: 1},
			unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: uint32(s)},
		)
	}
	return append(prog, unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: uint32(slots[len(slots)-1])}), nil
}

func hasDup(sorted []int) bool {
	for i := 1; i < len(sorted); i++ {
		if sorted[i] == sorted[i-1] {
			return true
		}
	}
	return false
}

// splitProgram sends weight percent of new connections over to and the
// rest over from, each spread evenly: the canary program for generations of
// several sockets.
func splitProgram(weight int, from, to []int) ([]unix.SockFilter, error) {
	switch {
	case weight < 0 || weight > 100:
		return nil, fmt.Errorf("reuse: steer: weight %d%% is out of range (0 to 100)", weight)
	case weight == 0:
		return spreadProgram(from)
	case weight == 100:
		return spreadProgram(to)
	}
	old, err := spreadProgram(from)
	if err != nil {
		return nil, err
	}
	next, err := spreadProgram(to)
	if err != nil {
		return nil, err
	}
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: skfAdRandomK},
		{Code: unix.BPF_ALU | unix.BPF_MOD | unix.BPF_K, K: 100},
		// below weight: the new generation's program, right after; else
		// skip it to the old one's.
		{Code: unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K, K: uint32(weight), Jt: uint8(len(next)), Jf: 0},
	}
	return append(append(prog, next...), old...), nil
}

// skfNetOff is SKF_NET_OFF: loads relative to the network header.
const skfNetOff = uint32(1<<32 - 0x100000)

// probeProgram sends a connection from loopback port port (127.0.0.1 or
// ::1) to index, and every other one as rest does. The network header is
// IPv4 (20 bytes, no options: loopback) or IPv6 (40), told apart by its
// version; the source address is checked too, so that a client elsewhere
// with the same port goes where rest sends it.
func probeProgram(port uint16, index int, rest []unix.SockFilter) []unix.SockFilter {
	const restAt = 18 // the first instruction of rest
	ld := func(size uint16, off uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_LD | size | unix.BPF_ABS, K: skfNetOff + off}
	}
	// jeq k, else to rest; pc is the jump's own index.
	jeq := func(pc int, k uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: k, Jt: 0, Jf: uint8(restAt - pc - 1)}
	}
	return append([]unix.SockFilter{
		0: ld(unix.BPF_B, 0),
		1: {Code: unix.BPF_ALU | unix.BPF_RSH | unix.BPF_K, K: 4},
		2: {Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: 6, Jt: 4, Jf: 0}, // IPv6 at 7
		// IPv4: source 127.0.0.1, source port at 20.
		3: ld(unix.BPF_W, 12),
		4: jeq(4, 0x7f000001),
		5: ld(unix.BPF_H, 20),
		6: {Code: unix.BPF_JMP | unix.BPF_JA, K: 9}, // to 16
		// IPv6: source ::1, source port at 40.
		7:  ld(unix.BPF_W, 8),
		8:  jeq(8, 0),
		9:  ld(unix.BPF_W, 12),
		10: jeq(10, 0),
		11: ld(unix.BPF_W, 16),
		12: jeq(12, 0),
		13: ld(unix.BPF_W, 20),
		14: jeq(14, 1),
		15: ld(unix.BPF_H, 40),
		16: jeq(16, uint32(port)),
		17: {Code: unix.BPF_RET | unix.BPF_K, K: uint32(index)},
	}, rest...)
}

// SpreadRemote attaches, through pid's fd, a program that spreads new
// connections evenly over slots (indices in the group; see Range).
func SpreadRemote(pid, fd int, slots []int) error {
	prog, err := spreadProgram(slots)
	if err != nil {
		return err
	}
	return attachRemote(pid, fd, prog)
}

// SplitRemote attaches, through pid's fd, the canary program for
// generations of several sockets: weight percent of new connections spread
// over to, the rest over from.
func SplitRemote(pid, fd, weight int, from, to []int) error {
	prog, err := splitProgram(weight, from, to)
	if err != nil {
		return err
	}
	return attachRemote(pid, fd, prog)
}

// Held is a duplicate of another process's listening socket, kept open so
// that the socket stays in its group, at its index, after its owner closes
// it; Leave then takes it out of the group in a safe order.
type Held struct {
	fd   int
	addr string // the socket's address, for errors
}

// HoldRemote takes a duplicate of the listening socket pid holds as fd and
// keeps it. Its owner's close then leaves the socket in its group, where
// the program must send nothing; Leave closes it.
func HoldRemote(pid, fd int) (*Held, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: pidfd_open %d: %w", ErrNoDup, pid, err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: pidfd_getfd %d of pid %d: %w", ErrNoDup, fd, pid, err)
	}
	h := &Held{fd: dup}
	if sa, err := unix.Getsockname(dup); err == nil {
		h.addr = sockaddrString(sa)
	}
	return h, nil
}

// Close closes the duplicate: when its owner has closed the socket too, it
// leaves its group and resets what waits in its accept queue.
func (h *Held) Close() error {
	if h.fd < 0 {
		return nil
	}
	err := unix.Close(h.fd)
	h.fd = -1
	return err
}

func (h *Held) attach(prog []unix.SockFilter) error {
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.SetsockoptSockFprog(h.fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog); err != nil {
		return fmt.Errorf("reuse: attach reuseport bpf through %s: %w", h.addr, err)
	}
	return nil
}

// takeProbe waits up to d for the probe from port to wait in one of held,
// accepts it and says which; anything else accepted on the way (an older
// probe) is closed.
func takeProbe(held []*Held, port uint16, d time.Duration) (int, bool) {
	fds := make([]unix.PollFd, len(held))
	for i, h := range held {
		fds[i] = unix.PollFd{Fd: int32(h.fd), Events: unix.POLLIN}
	}
	for deadline := time.Now().Add(d); time.Now().Before(deadline); {
		for i := range fds {
			fds[i].Revents = 0
		}
		n, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds())+1)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return 0, false
		}
		if n <= 0 {
			continue
		}
		for i, f := range fds {
			if f.Revents&unix.POLLIN == 0 {
				continue
			}
			nfd, sa, err := unix.Accept4(held[i].fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			if err != nil {
				continue
			}
			unix.Close(nfd)
			if sockaddrPort(sa) == port {
				return i, true
			}
		}
	}
	return 0, false
}

func sockaddrPort(sa unix.Sockaddr) uint16 {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return uint16(a.Port)
	case *unix.SockaddrInet6:
		return uint16(a.Port)
	}
	return 0
}

// indices finds the index of each held socket in its group of n sockets,
// whose program otherwise sends to keep: for i from 0, a program sends
// connections from one source port to index i, and a connection from that
// port to target shows which held socket (if any) is at i. It stops once
// every held socket is found. On loopback the handshake is done when
// connect returns, so the connection waits in its queue by then.
func indices(held []*Held, n int, target netip.AddrPort, keep []int) ([]int, error) {
	rest, err := spreadProgram(keep)
	if err != nil {
		return nil, err
	}
	at := make([]int, len(held))
	for i := range at {
		at[i] = -1
	}
	found := 0
	for i := 0; i < n && found < len(held); i++ {
		if slices.Contains(keep, i) {
			continue
		}
		port, err := probeDial(target, func(port uint16) error {
			return held[0].attach(probeProgram(port, i, rest))
		})
		if err != nil {
			return at, err
		}
		// Every slot outside keep is held, so the probe waits in one of
		// them: under load the handshake may end a moment after connect.
		j, ok := takeProbe(held, port, 200*time.Millisecond)
		if !ok {
			return at, fmt.Errorf("reuse: probe: no held socket took the probe for slot %d", i)
		}
		if at[j] >= 0 {
			return at, fmt.Errorf("reuse: probe: the held socket at slot %d took the probe for slot %d too", at[j], i)
		}
		at[j] = i
		found++
	}
	if found < len(held) {
		return at, fmt.Errorf("reuse: probe: found %d of %d held sockets in a group of %d", found, len(held), n)
	}
	return at, nil
}

// probeDial connects to target from a loopback port of its own, once
// before has seen that port, closes the connection and returns the port.
func probeDial(target netip.AddrPort, before func(port uint16) error) (uint16, error) {
	family := unix.AF_INET
	src := unix.Sockaddr(&unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
	var dst unix.Sockaddr
	if a := target.Addr(); a.Is4() || a.Is4In6() {
		dst = &unix.SockaddrInet4{Addr: a.Unmap().As4(), Port: int(target.Port())}
	} else {
		family, src = unix.AF_INET6, &unix.SockaddrInet6{Addr: netip.IPv6Loopback().As16()}
		dst = &unix.SockaddrInet6{Addr: a.As16(), Port: int(target.Port())}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("reuse: probe: %w", err)
	}
	defer unix.Close(fd)
	// A connect that hangs (a full queue) gives up after a second.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 1})
	if err := unix.Bind(fd, src); err != nil {
		return 0, fmt.Errorf("reuse: probe: bind: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, fmt.Errorf("reuse: probe: %w", err)
	}
	port := sockaddrPort(sa)
	if err := before(port); err != nil {
		return 0, err
	}
	if err := unix.Connect(fd, dst); err != nil {
		return 0, fmt.Errorf("reuse: probe: connect to %s: %w", target, err)
	}
	return port, nil
}

// Leave takes held out of their group of n sockets, once their owners
// have closed them, without a new connection ever meeting a closing
// socket. keep are the slots of the group's other sockets, where the
// program sends every new connection; together they are the whole group.
// target is an address the group accepts on (loopback for a wildcard).
//
// It probes the held sockets' indices, then closes them highest first.
// A close moves the group's last socket into the closed slot: before it,
// the program leaves the last socket out; after it, the program sends to
// its new slot. (When keep is one socket there is nothing else to send
// to, and a connection may meet the moment of the move; the kernel's hash
// then picks among what is left.) It returns where keep's sockets are
// now. On an error it closes every held socket all the same.
func Leave(held []*Held, n int, target netip.AddrPort, keep []int) ([]int, error) {
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	keep = slices.Clone(keep)
	if len(held) == 0 {
		return keep, nil
	}
	if n != len(held)+len(keep) || slices.ContainsFunc(keep, func(s int) bool { return s < 0 || s >= n }) {
		return keep, fmt.Errorf("reuse: leave: %d held and %d kept sockets (%v) are not the group of %d", len(held), len(keep), keep, n)
	}
	at, err := indices(held, n, target, keep)
	if err != nil {
		return keep, err
	}
	order := Range(0, len(held))
	slices.SortFunc(order, func(a, b int) int { return at[b] - at[a] })
	live := n
	for k, j := range order {
		h, i := held[j], at[j]
		last := live - 1
		moves := i != last
		if moves && !slices.Contains(keep, last) {
			return keep, fmt.Errorf("reuse: leave: slot %d, last in the group, is neither held nor kept", last)
		}
		if moves {
			tgt := slices.DeleteFunc(slices.Clone(keep), func(s int) bool { return s == last })
			if len(tgt) == 0 {
				tgt = keep
			}
			if err := attachSpread(h, tgt); err != nil {
				return keep, err
			}
		}
		h.Close()
		live--
		if moves {
			keep[slices.Index(keep, last)] = i
		}
		if k+1 < len(order) {
			if err := attachSpread(held[order[k+1]], keep); err != nil {
				return keep, err
			}
		}
	}
	return keep, nil
}

func attachSpread(h *Held, slots []int) error {
	prog, err := spreadProgram(slots)
	if err != nil {
		return err
	}
	return h.attach(prog)
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	}
	return "?"
}
