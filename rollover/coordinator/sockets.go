package coordinator

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/prometheus/procfs"
)

// This file reads sockets and their owners through procfs: which processes
// hold the listening sockets of a port (the stray-process check) and how
// many connections a process holds (what a drain deadline cut).

// socketInodes returns the inodes of the sockets among p's open files.
func socketInodes(p procfs.Proc) (map[uint64]bool, error) {
	targets, err := p.FileDescriptorTargets()
	if err != nil {
		return nil, err
	}
	out := map[uint64]bool{}
	for _, t := range targets {
		if inode, ok := strings.CutPrefix(t, "socket:["); ok {
			if n, err := strconv.ParseUint(strings.TrimSuffix(inode, "]"), 10, 64); err == nil {
				out[n] = true
			}
		}
	}
	return out, nil
}

// tcpLines reads fs's net/tcp and net/tcp6; ok is false when neither reads.
func tcpLines(fs procfs.FS) (lines procfs.NetTCP, ok bool) {
	for _, read := range []func() (procfs.NetTCP, error){fs.NetTCP, fs.NetTCP6} {
		ls, err := read()
		if err != nil {
			continue // no IPv6, say
		}
		ok = true
		lines = append(lines, ls...)
	}
	return lines, ok
}

// tcpEstablished is TCP_ESTABLISHED, as /proc/net/tcp shows it.
const tcpEstablished = 0x01

// establishedConns counts the established TCP connections that pid holds
// open, from its fds and its own /proc/PID/net/tcp{,6}; ok is false when
// /proc cannot tell.
func establishedConns(pid int) (int64, bool) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return 0, false
	}
	mine, err := socketInodes(p)
	if err != nil {
		return 0, false
	}
	fs, err := procfs.NewFS("/proc/" + strconv.Itoa(pid))
	if err != nil {
		return 0, false
	}
	lines, ok := tcpLines(fs)
	var n int64
	for _, l := range lines {
		if l.St == tcpEstablished && mine[l.Inode] {
			n++
		}
	}
	return n, ok
}

// stray is a process that listens on a port a generation serves and is no
// generation.
type stray struct {
	pid  int
	argv []string
	addr string // the address it listens on
}

func (s stray) String() string {
	cmd := strings.Join(s.argv, " ")
	if cmd == "" {
		cmd = "?"
	}
	return fmt.Sprintf("pid %d (%s) on %s", s.pid, cmd, s.addr)
}

// strays lists the processes, other than this one and the process groups
// in ours, that hold a listening TCP socket that shares a port with one of
// addrs (host:port): a wildcard address overlaps every address of its
// family's port, as the kernel's lookup does.
func strays(addrs []string, ours []int) ([]stray, error) {
	want := map[int][]net.IP{}
	for _, a := range addrs {
		ip, port, err := parseAddr(a)
		if err != nil {
			continue
		}
		want[port] = append(want[port], ip)
	}
	if len(want) == 0 {
		return nil, nil
	}
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return nil, err
	}
	lines, _ := tcpLines(fs)
	sockets := map[uint64]string{} // inode → local address
	for _, l := range lines {
		ips, ok := want[int(l.LocalPort)]
		if l.St != tcpListen || !ok || !slices.ContainsFunc(ips, func(ip net.IP) bool { return overlaps(ip, l.LocalAddr) }) {
			continue
		}
		sockets[l.Inode] = net.JoinHostPort(l.LocalAddr.String(), strconv.FormatUint(l.LocalPort, 10))
	}
	if len(sockets) == 0 {
		return nil, nil
	}
	// The usual case, cheaply: every one of them belongs to a generation
	// (read after the sockets, so that a new one is either there or not
	// listening yet). Only an unknown socket takes a scan of every process.
	mine := map[int]bool{}
	for _, pid := range ours {
		for _, p := range family(fs, pid) {
			mine[p.PID] = true
			if inodes, err := socketInodes(p); err == nil {
				for inode := range inodes {
					delete(sockets, inode)
				}
			}
		}
	}
	if len(sockets) == 0 {
		return nil, nil
	}
	procs, err := fs.AllProcs()
	if err != nil {
		return nil, err
	}
	var out []stray
	for _, p := range procs {
		if p.PID == os.Getpid() || mine[p.PID] {
			continue
		}
		st, err := p.Stat()
		if err != nil || slices.Contains(ours, st.PGRP) {
			continue // in a generation's process group
		}
		inodes, err := socketInodes(p)
		if err != nil {
			continue // gone, or not ours to read
		}
		for inode := range inodes {
			if addr, ok := sockets[inode]; ok {
				argv, _ := p.CmdLine()
				out = append(out, stray{pid: p.PID, argv: argv, addr: addr})
				break
			}
		}
	}
	return out, nil
}

// overlaps reports whether a listener on b takes connections meant for a:
// the same address, or either one unspecified (nil: any).
func overlaps(a, b net.IP) bool {
	return a == nil || a.IsUnspecified() || b.IsUnspecified() || a.Equal(b)
}

// family is pid and its descendants, from /proc/PID/task/*/children.
func family(fs procfs.FS, pid int) []procfs.Proc {
	var out []procfs.Proc
	seen := map[int]bool{}
	next := []int{pid}
	for len(next) > 0 && len(out) < 4096 {
		p := next[0]
		next = next[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		proc, err := fs.Proc(p)
		if err != nil {
			continue
		}
		out = append(out, proc)
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", p))
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", p, t.Name()))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					next = append(next, c)
				}
			}
		}
	}
	return out
}
