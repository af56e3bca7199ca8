package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// This file steers apps that do not link the library: the coordinator
// finds a generation's listening sockets through procfs, takes a duplicate
// of each with pidfd_getfd(2), attaches the group's classic-BPF program
// through it and closes it at once. The group's program invariant is the
// library's: "ret 0", the active generation at index 0. A generation is
// steered this way when it has one listening socket per group (address);
// several (nginx's workers with reuseport) are left to tcp_migrate_req for
// now, and so is an app whose sockets cannot be taken (the reason is
// logged once and shown in status).

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

// remotePlan says whether the coordinator can steer socks, one per group.
func remotePlan(socks []remoteSocket) error {
	if len(socks) == 0 {
		return errors.New("it has no listening socket the coordinator can see")
	}
	per := map[string]int{}
	for _, s := range socks {
		per[s.group()]++
	}
	for addr, n := range per {
		if n > 1 {
			return fmt.Errorf("it has %d listening sockets on %s (one per worker); the coordinator steers one per address", n, addr)
		}
	}
	return nil
}

// attach runs steer on every socket, the first error aside.
func attach(socks []remoteSocket, steer func(s remoteSocket) error) error {
	var errs []error
	for _, s := range socks {
		if err := steer(s); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// pinRemote points the groups of socks at index 0 (their owner, alone in
// them or the longest serving).
func pinRemote(socks []remoteSocket) error {
	return attach(socks, func(s remoteSocket) error { return reuse.SteerRemote(s.pid, s.fd, 0) })
}

// steerRemote sends new connections to the generation that owns socks, the
// second member of each group: weight percent of them (0: all).
func steerRemote(socks []remoteSocket, weight int) error {
	return attach(socks, func(s remoteSocket) error {
		if weight > 0 && weight < 100 {
			return reuse.SteerWeightedRemote(s.pid, s.fd, weight)
		}
		return reuse.SteerRemote(s.pid, s.fd, 1)
	})
}

// discover finds g's listening sockets once it is ready and, if the
// coordinator can steer them, pins them when g is alone (generation 1):
// the group then points at it before any successor listens. It returns
// g's view with the steering it gets.
func (c *Coordinator) discover(g *gen, alone bool) genView {
	port := 0
	if g.launch.Addr != "" {
		_, port, _ = parseAddr(g.launch.Addr)
	}
	var socks []remoteSocket
	var err error
	// Ready may come a moment before the listen (notify): look briefly.
	for deadline := time.Now().Add(time.Second); ; {
		if socks, err = listenersOf(g.pid, port); err != nil || len(socks) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err == nil {
		err = remotePlan(socks)
		if err != nil && len(socks) > 0 {
			// Several sockets per address: the group must not keep a
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
		// Prove it can be taken now, before the rollover relies on it.
		err = attach(socks[:1], func(s remoteSocket) error { return reuse.SteerRemote(s.pid, s.fd, 0) })
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

// orderRemote hands the port of a generation steered from outside over,
// then sends it its drain signal: the steer is done, so it keeps accepting
// for the grace, then until its accept queue reads empty twice (bounded),
// and only then is told to drain; closing a listener resets its queue.
func (c *Coordinator) orderRemote(ctx context.Context, g *gen, socks []remoteSocket) {
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
	c.log.Info("draining by signal", "gen", g.n, "pid", g.pid, "signal", g.launch.DrainSignal)
	_ = g.proc.Signal(g.launch.DrainSignal)
	// It has left the port once none of its sockets listens.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for queued(g.pid, socks) >= 0 {
		select {
		case <-g.gone:
			c.post(evClosedListener{g: g})
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
	c.post(evClosedListener{g: g})
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
