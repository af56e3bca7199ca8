package coordinator

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"
)

// Readiness modes: how a generation says it serves.
const (
	// ReadyLibrary: the app links the rollover library, which reports ready
	// over the control socket, and takes the steered hand-over.
	ReadyLibrary = "library"
	// ReadyNotify: the app speaks systemd's notify protocol; the coordinator
	// gives each generation its own NOTIFY_SOCKET and waits for READY=1.
	ReadyNotify = "notify"
	// ReadyListen: the generation is ready when its process tree (its
	// process and their descendants) owns a listening socket on
	// Launch.Addr, as /proc shows it.
	ReadyListen = "listen"
)

// Launch says how a generation runs: its command line, how it reports ready,
// and, for apps without the library, which signal makes it drain.
type Launch struct {
	Argv        []string
	Ready       string         // ReadyLibrary (default), ReadyNotify or ReadyListen
	Addr        string         // host:port the app listens on; required for ReadyListen
	DrainSignal syscall.Signal // for apps without the library; default SIGTERM
	// Instances is how many processes the generation runs, each binding
	// the port on its own (default 1; see Supervise).
	Instances int `json:",omitempty"`
}

// withDefaults fills l's empty fields from base.
func (l Launch) withDefaults(base Launch) Launch {
	if len(l.Argv) == 0 {
		l.Argv = base.Argv
	}
	if l.Ready == "" {
		l.Ready = base.Ready
	}
	if l.Addr == "" {
		l.Addr = base.Addr
	}
	if l.DrainSignal == 0 {
		l.DrainSignal = base.DrainSignal
	}
	if l.Instances == 0 {
		l.Instances = base.Instances
	}
	if l.Instances == 0 {
		l.Instances = 1
	}
	if l.Ready == "" {
		l.Ready = ReadyLibrary
	}
	if l.DrainSignal == 0 {
		l.DrainSignal = syscall.SIGTERM
	}
	return l
}

func (l Launch) check() error {
	if err := l.checkMode(); err != nil {
		return err
	}
	return l.checkAddr()
}

// checkMode checks the command and the readiness mode; it never blocks (no
// name resolution), so the machine can call it.
func (l Launch) checkMode() error {
	if err := checkCommand(l.Argv); err != nil {
		return err
	}
	switch l.Ready {
	case ReadyLibrary, ReadyNotify, ReadyListen:
	default:
		return fmt.Errorf("%w: --ready must be library, notify or listen, not %q", ErrUsage, l.Ready)
	}
	if l.Ready == ReadyListen && l.Addr == "" {
		return fmt.Errorf("%w: --ready=listen needs --addr host:port, the address the app listens on", ErrUsage)
	}
	switch {
	case l.Instances < 0 || l.Instances > maxGroup:
		return fmt.Errorf("%w: --instances must be 1 to %d, not %d", ErrUsage, maxGroup, l.Instances)
	}
	return nil
}

// supervised reports whether l runs under a supervisor of its instances.
func (l Launch) supervised() bool { return l.Instances > 1 }

// checkAddr checks --addr, resolving its host.
func (l Launch) checkAddr() error {
	if l.Addr != "" {
		if _, _, err := parseAddr(l.Addr); err != nil {
			return fmt.Errorf("%w: --addr %q: %v", ErrUsage, l.Addr, err)
		}
	}
	return nil
}

// ParseSignal reads "SIGQUIT", "QUIT", "quit" or "3".
func ParseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil && n > 0 && n < 65 {
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(strings.TrimPrefix(strings.ToUpper(s), "SIG"))
	if sig := unix.SignalNum("SIG" + name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("%w: unknown signal %q (try SIGTERM, SIGQUIT, SIGINT)", ErrUsage, s)
}

// notifySocket is a generation's own NOTIFY_SOCKET.
type notifySocket struct {
	path string
	conn *net.UnixConn
}

func openNotify(dir string, n int) (*notifySocket, error) {
	return openNotifyAt(filepath.Join(dir, fmt.Sprintf("gen%d.notify", n)))
}

func openNotifyAt(path string) (*notifySocket, error) {
	_ = os.Remove(path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	_ = os.Chmod(path, 0o600)
	return &notifySocket{path: path, conn: conn}, nil
}

func (s *notifySocket) close() {
	s.conn.Close()
	os.Remove(s.path)
}

// readNotify delivers each notify datagram's assignments until the socket
// is closed.
func (s *notifySocket) read(on func(map[string]string)) {
	buf := make([]byte, 4096)
	for {
		n, err := s.conn.Read(buf)
		if err != nil {
			return
		}
		kv := map[string]string{}
		sc := bufio.NewScanner(bytes.NewReader(buf[:n]))
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), "="); ok {
				kv[k] = v
			}
		}
		on(kv)
	}
}

// parseAddr splits host:port; an empty or unspecified host matches any.
func parseAddr(addr string) (net.IP, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil || p <= 0 || p > 65535 {
		return nil, 0, fmt.Errorf("bad port %q", port)
	}
	if host == "" {
		return nil, p, nil
	}
	ip := net.ParseIP(host)
	if ip == nil {
		ips, err := net.LookupIP(host)
		if err != nil || len(ips) == 0 {
			return nil, 0, fmt.Errorf("cannot resolve %q", host)
		}
		ip = ips[0]
	}
	return ip, p, nil
}

// listening reports whether pid or one of its descendants (nginx's
// workers, say, are children of its master) owns a TCP socket that listens
// on ip:port: the listeners of pid's network namespace (see tcpSockets),
// their owners from the tree's fds. It reads only the generation's own
// processes, never all of /proc.
func listening(fs procfs.FS, pid int, ip net.IP, port int) bool {
	socks, _ := tcpSockets("/proc/"+strconv.Itoa(pid), tcpListen)
	want := map[uint64]bool{}
	for _, s := range socks {
		if int(s.localPort) == port && overlaps(ip, s.localAddr) {
			want[s.inode] = true
		}
	}
	if len(want) == 0 {
		return false
	}
	for p := range family(fs, pid) {
		inodes, err := socketInodes(p)
		if err != nil {
			continue
		}
		for inode := range inodes {
			if want[inode] {
				return true
			}
		}
	}
	return false
}

// tcpListen is TCP_LISTEN, the state of a listening socket in /proc/net/tcp.
const tcpListen = 0x0A

// waitListening looks every 25ms until pid's process tree owns a listener
// on addr (want true) or owns none (want false), or until stop is closed or
// d passes. /proc has no event to wait for.
func waitListening(pid int, addr string, want bool, d time.Duration, stop <-chan struct{}) bool {
	ip, port, err := parseAddr(addr) // once: a host name is resolved here
	if err != nil {
		return false
	}
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return false
	}
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		if listening(fs, pid, ip, port) == want {
			return true
		}
		select {
		case <-stop:
			return false
		case <-deadline.C:
			return false
		case <-tick.C:
		}
	}
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, as sd_notify's
// MONOTONIC_USEC wants it.
func monotonicUsec() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Sec*1e6 + ts.Nsec/1e3
}
