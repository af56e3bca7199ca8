package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// This file steers apps that do not link the library: the coordinator
// finds a generation's listening sockets through procfs, takes a duplicate
// of each with pidfd_getfd(2), attaches the group's classic-BPF program
// through it and closes it at once. The invariant is the library's: the
// active generation first in each group (index 0, or 0 to k-1 for k
// sockets, nginx's workers with reuseport), a new one after it. An app
// whose sockets cannot be taken is left to tcp_migrate_req (the reason is
// logged once and shown in status), and so is one with several UDP
// sockets per address.

// remoteSocket is a listening socket, or a bound UDP socket, of a
// generation's process tree.
type remoteSocket struct {
	pid, fd int    // a process that holds it, and its fd there
	inode   uint64 // the socket
	addr    string // local address, host:port
	udp     bool
}

// group names the reuseport group of s: its protocol and address.
func (s remoteSocket) group() string {
	if s.udp {
		return wire.UDPAddr + s.addr
	}
	return s.addr
}

// listenersOf returns the listening TCP sockets and the bound UDP sockets
// held by pid's process tree, on port (0: any), one entry per socket.
func listenersOf(pid, port int) ([]remoteSocket, error) {
	// Generations share the coordinator's network namespace.
	lines, err := listenSockets(port)
	if err != nil {
		return nil, err
	}
	type bound struct {
		addr string
		udp  bool
	}
	listening := map[uint64]bound{}
	for _, l := range lines {
		listening[l.inode] = bound{addr: net.JoinHostPort(l.localAddr.String(), strconv.FormatUint(l.localPort, 10))}
	}
	if port != 0 { // a UDP server binds the service's port (--addr); without one, TCP alone
		udp, err := udpSockets(port)
		if err != nil {
			return nil, err
		}
		for _, u := range udp {
			listening[u.inode] = bound{addr: net.JoinHostPort(u.localAddr.String(), strconv.FormatUint(u.localPort, 10)), udp: true}
		}
	}
	root, err := procfs.NewDefaultFS()
	if err != nil {
		return nil, err
	}
	var out []remoteSocket
	seen := map[uint64]bool{}
	for p := range family(root, pid) {
		dir := fmt.Sprintf("/proc/%d/fd", p.PID)
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("%w: cannot read %s: permission denied", reuse.ErrNoDup, dir)
		}
		if err != nil {
			continue
		}
		for _, e := range ents {
			link, err := os.Readlink(dir + "/" + e.Name())
			if errors.Is(err, os.ErrPermission) {
				return nil, fmt.Errorf("%w: cannot read %s: permission denied", reuse.ErrNoDup, dir)
			}
			if err != nil {
				continue
			}
			s, ok := strings.CutPrefix(link, "socket:[")
			if !ok {
				continue
			}
			inode, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64)
			b, listens := listening[inode]
			if err != nil || !listens || seen[inode] {
				continue
			}
			fd, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			seen[inode] = true
			out = append(out, remoteSocket{pid: p.PID, fd: fd, inode: inode, addr: b.addr, udp: b.udp})
		}
	}
	return out, nil
}

// remotePlan says whether the coordinator can steer socks: TCP groups of
// any size (nginx's workers with reuseport each have their own socket), one
// socket per UDP group.
func remotePlan(socks []remoteSocket) error {
	if len(socks) == 0 {
		return errors.New("it has no listening socket the coordinator can see")
	}
	for addr, group := range byGroup(socks) {
		switch n := len(group); {
		case n > 1 && group[0].udp:
			return fmt.Errorf("it has %d UDP sockets on %s; the coordinator steers one per UDP address", n, addr)
		case n > maxGroup:
			return fmt.Errorf("it has %d listening sockets on %s; the coordinator steers at most %d per address", n, addr, maxGroup)
		}
	}
	return nil
}

// maxGroup bounds the sockets of one generation in one group (the
// programs' jump tables).
const maxGroup = 64

// byGroup splits socks by their group.
func byGroup(socks []remoteSocket) map[string][]remoteSocket {
	out := map[string][]remoteSocket{}
	for _, s := range socks {
		out[s.group()] = append(out[s.group()], s)
	}
	return out
}

// groupSize counts the members of s's group in this network namespace:
// the listening TCP sockets, or the bound UDP sockets, on its address.
func groupSize(s remoteSocket) (int, error) {
	_, p, err := net.SplitHostPort(s.addr)
	if err != nil {
		return 0, err
	}
	port, _ := strconv.Atoi(p)
	lines, err := listenSockets(port)
	if s.udp {
		lines, err = udpSockets(port)
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for _, l := range lines {
		if net.JoinHostPort(l.localAddr.String(), strconv.FormatUint(l.localPort, 10)) == s.addr {
			n++
		}
	}
	return n, nil
}

// attach runs steer on every socket and joins the errors.
func attach(socks []remoteSocket, steer func(s remoteSocket) error) error {
	var errs []error
	for _, s := range socks {
		if err := steer(s); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// pinRemote spreads new connections over the sockets of socks, once they
// are the first members of their groups (alone in them, or the longest
// serving): slots 0 to k-1 for k sockets.
func pinRemote(socks []remoteSocket) error {
	var errs []error
	for _, group := range byGroup(socks) {
		s := group[0]
		if err := reuse.SpreadRemote(s.pid, s.fd, reuse.Range(0, len(group))); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// steerRemote sends new connections to the generation that owns socks, the
// last to join each group: weight percent of them (0: all), spread over
// its sockets; the rest stay spread over the sockets before them.
func steerRemote(socks []remoteSocket, weight int) error {
	var errs []error
	for _, group := range byGroup(socks) {
		s, m := group[0], len(group)
		n, err := groupSize(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		first := max(n-m, 0)
		if weight > 0 && weight < 100 {
			err = reuse.SplitRemote(s.pid, s.fd, weight, reuse.Range(0, first), reuse.Range(first, m))
		} else {
			err = reuse.SpreadRemote(s.pid, s.fd, reuse.Range(first, m))
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// discover finds g's listening sockets once it is ready and, if the
// coordinator can steer them, pins them when g is alone (generation 1):
// the group then points at it before any successor listens. It returns
// g's view with the steering it gets.
func (c *Coordinator) discover(g *gen, alone bool) genView {
	socks, err := look(g)
	if err == nil {
		err = remotePlan(socks)
		if err != nil && len(socks) > 0 {
			// Several UDP sockets per address: the group must not keep a
			// program that sends everything to one member; the kernel
			// hashes over all of them again.
			if derr := reuse.DetachRemote(socks[0].pid, socks[0].fd); derr != nil {
				c.log.Warn("could not take the program off the group", "gen", g.n, "err", derr)
			}
		}
	}
	if err == nil && alone {
		err = pinRemote(socks)
	} else if err == nil {
		// Prove every socket can be taken now, before the rollover relies
		// on it, without touching the group's program.
		err = attach(socks, func(s remoteSocket) error {
			h, err := reuse.HoldRemote(s.pid, s.fd)
			if err == nil {
				h.Close()
			}
			return err
		})
	}
	why := ""
	if err != nil {
		why = "the coordinator cannot steer it: " + err.Error()
		if errors.Is(err, reuse.ErrNoDup) {
			why += " (pidfd_getfd needs the same uid and a dumpable process without file capabilities, or root; Docker's default seccomp profile refuses it without CAP_SYS_PTRACE; Linux >= 5.6)"
		}
		socks = nil
	}
	c.post(evSockets{g: g, socks: socks, why: why})
	return c.view(g)
}

// look finds g's listening sockets. Ready may come a moment before the
// listen (notify), and with --ready=listen the first of several workers'
// sockets makes it ready: it looks until two looks 20ms apart agree
// (bounded).
func look(g *gen) ([]remoteSocket, error) {
	port := 0
	if g.launch.Addr != "" {
		_, port, _ = parseAddr(g.launch.Addr)
	}
	for deadline, seen := time.Now().Add(time.Second), -1; ; {
		socks, err := listenersOf(g.pid, port)
		if err != nil || time.Now().After(deadline) || (len(socks) > 0 && len(socks) == seen) {
			return socks, err
		}
		if len(socks) > 0 {
			seen = len(socks)
			time.Sleep(20 * time.Millisecond)
			continue
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// repin finds the active generation's sockets again after one of its
// instances exited or came back (its groups lost or gained a member), and
// spreads new connections over them: it is alone in its groups. What it
// cannot do leaves the steering as it was, and says so.
func (c *Coordinator) repin(g *gen) {
	socks, err := look(g)
	if err == nil && len(socks) == 0 {
		err = errors.New("no listening socket left")
	}
	if err == nil {
		err = remotePlan(socks)
	}
	if err == nil {
		err = pinRemote(socks)
	}
	if err != nil {
		c.log.Warn("could not spread new connections over the instances left", "gen", g.n, "err", err)
		return
	}
	c.post(evSockets{g: g, socks: socks})
}

// orderRemote hands the port of a generation steered from outside over,
// then sends it its drain signal: the steer is done, so it keeps accepting
// for the grace, then until its accept queue reads empty twice (bounded),
// and only then is told to drain; closing a listener resets its queue.
//
// succ are the sockets of the generation it hands over to, when the
// coordinator steers that one too. A group where g has several sockets
// must not move them behind the program's back as g closes them (each
// close moves the group's last socket, one of succ's, into the freed
// slot): the coordinator holds a duplicate of each, so that g's closes
// leave them in the group, steered away, and takes them out itself once g
// no longer holds them, in an order that never moves a socket the program
// sends to (reuse.Leave).
func (c *Coordinator) orderRemote(ctx context.Context, g *gen, conn *peerConn, socks, succ []remoteSocket) {
	held := c.hold(g, socks, succ)
	if held != nil {
		c.post(evHeld{g: g}) // before the drain signal, so before its exit
	}
	defer func() {
		for _, hs := range held {
			for _, h := range hs {
				h.Close()
			}
		}
		c.post(evClosedListener{g: g})
	}()
	t := time.NewTimer(c.cfg.DrainGrace)
	select {
	case <-t.C:
	case <-g.gone:
	case <-ctx.Done():
	}
	t.Stop()
	empty := 0
	for deadline := time.Now().Add(time.Second); empty < 2 && time.Now().Before(deadline); {
		if queued(g.pid, socks) == 0 {
			empty++
		} else {
			empty = 0
		}
		time.Sleep(time.Millisecond)
	}
	if conn != nil {
		// Instances that link the library: the drain command, through
		// their supervisor; the grace is over already.
		m := wire.Msg{Type: wire.TypeDrain, TimeoutMS: c.cfg.DrainTimeout.Milliseconds()}
		if _, err := conn.roundTrip(g, c.cmdID.Add(1), m, commandTimeout); err != nil {
			c.log.Warn("drain command failed; sending SIGTERM", "gen", g.n, "err", err)
			_ = g.proc.Signal(syscall.SIGTERM)
		}
	} else {
		c.log.Info("draining by signal", "gen", g.n, "pid", g.pid, "signal", g.launch.DrainSignal)
		_ = g.proc.Signal(g.launch.DrainSignal)
	}
	// It has left the port once none of its sockets listens, or, with
	// the sockets held, once none of its processes holds them.
	left := func() bool { return queued(g.pid, socks) < 0 }
	if held != nil {
		left = func() bool { return !treeHolds(g.pid, socks) }
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !left() {
		select {
		case <-g.gone:
		case <-ctx.Done():
			return
		case <-tick.C:
			continue
		}
		break
	}
	for addr, hs := range held {
		c.leave(g, addr, hs, succ)
	}
}

// hold takes a duplicate of each of g's sockets in the TCP groups where it
// has several, when the coordinator steers its successor (nil: nothing to
// hold, or a socket could not be taken; the hand-over is then as for one
// socket).
func (c *Coordinator) hold(g *gen, socks, succ []remoteSocket) map[string][]*reuse.Held {
	if succ == nil {
		return nil
	}
	held := map[string][]*reuse.Held{}
	for addr, group := range byGroup(socks) {
		if len(group) < 2 || group[0].udp {
			continue
		}
		for _, s := range group {
			h, err := reuse.HoldRemote(s.pid, s.fd)
			if err != nil {
				c.log.Warn("could not hold the old generation's sockets; its workers' closes move the new generation's sockets in the group", "gen", g.n, "err", err)
				for _, hs := range held {
					for _, h := range hs {
						h.Close()
					}
				}
				return nil
			}
			held[addr] = append(held[addr], h)
		}
	}
	if len(held) == 0 {
		return nil
	}
	return held
}

// leave takes g's held sockets of the group at addr out of it, keeping
// the program on succ's sockets there, the last to join, and spreads new
// connections over all of them where they are now. The held sockets are
// closed whatever happens (the caller closes them too).
func (c *Coordinator) leave(g *gen, addr string, held []*reuse.Held, succ []remoteSocket) {
	mine := byGroup(succ)[addr]
	if len(mine) == 0 {
		c.log.Warn("the new generation has no socket where the old one held several", "gen", g.n, "addr", addr)
		return
	}
	n, err := groupSize(mine[0])
	if err == nil {
		var target netip.AddrPort
		if target, err = probeTarget(addr); err == nil {
			var keep []int
			if keep, err = reuse.Leave(held, n, target, reuse.Range(n-len(mine), len(mine))); err == nil {
				err = reuse.SpreadRemote(mine[0].pid, mine[0].fd, keep)
			}
		}
	}
	if err != nil {
		c.log.Warn("the old generation's sockets left the group out of order; connections may meet a closing socket", "gen", g.n, "addr", addr, "err", err)
	}
}

// probeTarget is where a probe reaches the group at addr: addr, or
// loopback for a wildcard.
func probeTarget(addr string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return ap, err
	}
	ip := ap.Addr().Unmap()
	if ip.IsUnspecified() {
		ip = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if ap.Addr().Is6() && !ap.Addr().Is4In6() {
			ip = netip.IPv6Loopback()
		}
	}
	return netip.AddrPortFrom(ip, ap.Port()), nil
}

// treeHolds reports whether pid's process tree still holds one of socks.
func treeHolds(pid int, socks []remoteSocket) bool {
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil || len(socks) == 0 {
		return false
	}
	port := 0
	if _, p, err := net.SplitHostPort(socks[0].addr); err == nil {
		port, _ = strconv.Atoi(p)
	}
	now, err := listenersOf(pid, port)
	if err != nil {
		return true // cannot tell yet: the drain deadline bounds it
	}
	return slices.ContainsFunc(now, func(a remoteSocket) bool {
		return slices.ContainsFunc(socks, func(b remoteSocket) bool { return a.inode == b.inode })
	})
}

// queued is how many connections wait in the accept queues of socks, plus
// the bytes of datagrams queued on their UDP sockets, or -1 when none of
// them listens (or is bound) any more.
func queued(pid int, socks []remoteSocket) int {
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil || len(socks) == 0 {
		return -1 // gone
	}
	port := 0
	if _, p, err := net.SplitHostPort(socks[0].addr); err == nil {
		port, _ = strconv.Atoi(p)
	}
	lines, err := listenSockets(port)
	if err != nil {
		return -1
	}
	if slices.ContainsFunc(socks, func(s remoteSocket) bool { return s.udp }) {
		udp, err := udpSockets(port)
		if err != nil {
			return -1
		}
		lines = append(lines, udp...)
	}
	n, found := 0, false
	for _, l := range lines {
		for _, s := range socks {
			if s.inode == l.inode {
				n += int(l.rxQueue)
				found = true
			}
		}
	}
	if !found {
		return -1
	}
	return n
}

// steerTo sends new connections to g, weight percent of them (0: all):
// the library's command, or the program attached from outside.
func (c *Coordinator) steerTo(g *gen, v genView, weight int, rule *wire.Health) error {
	if v.remote != nil {
		return steerRemote(v.remote, weight)
	}
	return c.command(g, wire.Msg{Type: wire.TypeSteer, Weight: weight, Health: rule})
}

// pinTo points g's groups at index 0 (g, once alone or the longest
// serving): the library's command, or from outside.
func (c *Coordinator) pinTo(g *gen, v genView) {
	var err error
	if v.remote != nil {
		err = pinRemote(v.remote)
	} else {
		err = c.command(g, wire.Msg{Type: wire.TypePin})
	}
	if err != nil {
		c.log.Warn("re-pin failed", "gen", g.n, "err", err)
	}
}
