package coordinator

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"iter"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
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

// tcpSocket is one line of /proc/net/tcp{,6}.
type tcpSocket struct {
	state     uint64
	localAddr net.IP
	localPort uint64
	rxQueue   uint64 // for a listening socket: its accept queue
	inode     uint64
}

// tcpSockets reads dir's net/tcp and net/tcp6 (dir: /proc, or /proc/PID
// for that process's network namespace), keeping the sockets in one of
// states (none: all); ok is false when neither reads. It parses only the
// lines it keeps: a busy host has tens of thousands of sockets in
// TIME_WAIT, which procfs would parse one by one (170ms for 18,000 here).
//
// Listeners alone come from sock_diag when dir shows this process's network
// namespace (see diagListening), from net/tcp{,6} otherwise.
func tcpSockets(dir string, states ...uint64) (out []tcpSocket, ok bool) {
	if len(states) == 1 && states[0] == tcpListen && sameNetns(dir) {
		if out, err := diagListening(); err == nil {
			return out, true
		}
	}
	return readTCPSockets(dir, states...)
}

// readTCPSockets is tcpSockets from dir's net/tcp and net/tcp6.
func readTCPSockets(dir string, states ...uint64) (out []tcpSocket, ok bool) {
	var want []string
	for _, st := range states {
		want = append(want, fmt.Sprintf("%02X", st))
	}
	for _, name := range []string{"net/tcp", "net/tcp6"} {
		b, err := os.ReadFile(dir + "/" + name)
		if err != nil {
			continue // no IPv6, say
		}
		ok = true
		for _, line := range bytes.Split(b, []byte("\n"))[1:] {
			f := bytes.Fields(line)
			if len(f) < 10 || (len(want) > 0 && !slices.Contains(want, string(f[3]))) {
				continue
			}
			if sock, err := parseTCPLine(f); err == nil {
				out = append(out, sock)
			}
		}
	}
	return out, ok
}

// parseTCPLine reads the fields of a /proc/net/tcp line.
func parseTCPLine(f [][]byte) (tcpSocket, error) {
	var s tcpSocket
	host, port, ok := bytes.Cut(f[1], []byte(":"))
	if !ok {
		return s, errors.New("bad local address")
	}
	ip, err := hex.DecodeString(string(host))
	if err != nil || (len(ip) != 4 && len(ip) != 16) {
		return s, errors.New("bad local address")
	}
	// The kernel prints each 32-bit word in host order (little-endian here).
	for i := 0; i+4 <= len(ip); i += 4 {
		ip[i], ip[i+1], ip[i+2], ip[i+3] = ip[i+3], ip[i+2], ip[i+1], ip[i]
	}
	s.localAddr = net.IP(ip)
	if s.localPort, err = strconv.ParseUint(string(port), 16, 64); err != nil {
		return s, err
	}
	if s.state, err = strconv.ParseUint(string(f[3]), 16, 64); err != nil {
		return s, err
	}
	if _, rx, ok := bytes.Cut(f[4], []byte(":")); ok {
		s.rxQueue, _ = strconv.ParseUint(string(rx), 16, 64)
	}
	s.inode, err = strconv.ParseUint(string(f[9]), 10, 64)
	return s, err
}

// tcpEstablished is TCP_ESTABLISHED, as /proc/net/tcp shows it.
const tcpEstablished = 0x01

// establishedConns counts the established TCP connections on port that
// pid holds open (its fds, and the kernel's sockets from sock_diag, or
// /proc/PID/net/tcp{,6} where sock_diag is missing); ok is false when the
// kernel cannot tell. It is quick however many connections the host has:
// it runs just before a hung generation is killed.
func establishedConns(pid, port int) (int64, bool) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return 0, false
	}
	mine, err := socketInodes(p)
	if err != nil {
		return 0, false
	}
	var n int64
	count := func(s tcpSocket) {
		if mine[s.inode] {
			n++
		}
	}
	failed := 0
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		if err := diagSockets(family, tcpEstablished, uint16(port), count); err != nil {
			failed++
		}
	}
	if failed < 2 {
		return n, true
	}
	n = 0
	socks, ok := tcpSockets("/proc/"+strconv.Itoa(pid), tcpEstablished)
	for _, s := range socks {
		if port == 0 || int(s.localPort) == port {
			count(s)
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
	sockets := map[uint64]string{} // inode → local address
	for port, ips := range want {
		listening, err := listenSockets(port)
		if err != nil {
			return nil, err
		}
		for _, l := range listening {
			if slices.ContainsFunc(ips, func(ip net.IP) bool { return overlaps(ip, l.localAddr) }) {
				sockets[l.inode] = net.JoinHostPort(l.localAddr.String(), strconv.FormatUint(l.localPort, 10))
			}
		}
	}
	if len(sockets) == 0 {
		return nil, nil
	}
	// The usual case, cheaply: every one of them belongs to a generation
	// (read after the sockets, so that a new one is either there or not
	// listening yet). Only an unknown socket takes a scan of every process.
	// It stops at the first process that accounts for the last of them
	// (the active generation's, read first): it runs beside the new
	// generation's start, and every /proc read here takes CPU from it.
	mine := map[int]bool{}
	for _, pid := range ours {
		for p := range family(fs, pid) {
			mine[p.PID] = true
			if inodes, err := socketInodes(p); err == nil {
				for inode := range inodes {
					delete(sockets, inode)
				}
			}
			if len(sockets) == 0 {
				return nil, nil
			}
		}
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

// family is pid and its descendants, from /proc/PID/task/*/children, pid
// first. A process's children are read only once the loop goes on past it:
// a caller that finds what it looks for in pid itself reads no more.
func family(fs procfs.FS, pid int) iter.Seq[procfs.Proc] {
	return func(yield func(procfs.Proc) bool) {
		seen := map[int]bool{}
		next := []int{pid}
		for len(next) > 0 && len(seen) < 4096 {
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
			if !yield(proc) {
				return
			}
			next = append(next, children(p)...)
		}
	}
}

// children are the pids of p's child processes.
func children(p int) []int {
	var out []int
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", p))
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", p, t.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}
