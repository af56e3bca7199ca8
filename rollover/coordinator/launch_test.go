package coordinator

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// TestListeningTree: --ready=listen sees a listener that a grandchild of
// the generation's process owns (a shell that runs the app, nginx's
// workers), and not one of another tree; once the tree is gone, it sees none.
func TestListeningTree(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := testproc.FreeAddr(t)
	// The shell waits for the app rather than exec it: the app is its child.
	sh := exec.Command("sh", "-c", `"$@"; exit $?`, "sh", exe, genArg, envMode+"=ready", envAddr+"="+addr)
	sh.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = sh.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-sh.Process.Pid, syscall.SIGKILL) // the group this test made
		<-exited
	})
	other := exec.Command("sleep", "30")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })

	fs, err := procfs.NewDefaultFS()
	if err != nil {
		t.Fatal(err)
	}
	ip, port, err := parseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	testproc.WaitFor(t, 10*time.Second, "the shell's child to listen on "+addr, func() bool { return listening(fs, sh.Process.Pid, ip, port) })
	if kids := slices.Collect(family(fs, sh.Process.Pid)); len(kids) < 2 {
		t.Errorf("family(%d) = %v, want the shell and its child", sh.Process.Pid, kids)
	}
	if listening(fs, other.Process.Pid, ip, port) {
		t.Errorf("pid %d (sleep) is said to listen on %s", other.Process.Pid, addr)
	}
	if listening(fs, sh.Process.Pid, net.IPv4(127, 0, 0, 2), port) {
		t.Errorf("the tree is said to listen on 127.0.0.2:%d", port)
	}
	if !waitListening(sh.Process.Pid, addr, true, time.Second, nil) {
		t.Errorf("waitListening(%s, true) = false while the tree listens", addr)
	}

	_ = syscall.Kill(-sh.Process.Pid, syscall.SIGKILL)
	<-exited
	if !waitListening(sh.Process.Pid, addr, false, 10*time.Second, nil) {
		t.Errorf("waitListening(%s, false) = false after the tree was killed", addr)
	}
}

// TestDiagListening: sock_diag reports a listener as net/tcp does, its
// accept queue included, and no connection on its port.
func TestDiagListening(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	err = syscall.Fstat(int(f.Fd()), &st)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	// Two connections wait in its accept queue.
	for range 2 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	want := tcpSocket{state: tcpListen, localAddr: net.IPv4(127, 0, 0, 1).To4(), localPort: uint64(ln.Addr().(*net.TCPAddr).Port), rxQueue: 2, inode: st.Ino}
	find := func(what string, socks []tcpSocket) {
		t.Helper()
		n := 0
		for _, s := range socks {
			if s.localPort != want.localPort {
				continue
			}
			n++
			if s.inode != want.inode || s.state != want.state || !s.localAddr.Equal(want.localAddr) || s.rxQueue != want.rxQueue {
				t.Errorf("%s: %+v, want %+v", what, s, want)
			}
		}
		if n != 1 {
			t.Errorf("%s: %d sockets on port %d, want the listener alone", what, n, want.localPort)
		}
	}
	diag, err := diagListening()
	if err != nil {
		t.Fatal(err)
	}
	find("sock_diag", diag)
	proc, ok := readTCPSockets("/proc/self", tcpListen)
	if !ok {
		t.Fatal("no /proc/self/net/tcp")
	}
	find("/proc/self/net/tcp", proc)
	if !sameNetns("/proc/self") || !sameNetns(fmt.Sprintf("/proc/%d", os.Getppid())) {
		t.Error("sameNetns: this process and its parent are in other network namespaces")
	}
}

// TestInstancesArgs: the supervisor's command line reads back as it was
// rendered, and what a launch of several instances may not be is refused
// in one line.
func TestInstancesArgs(t *testing.T) {
	a := instancesArgs{n: 4, ready: ReadyListen, addr: "127.0.0.1:8080", drain: syscall.SIGQUIT, argv: []string{"/usr/sbin/app", "-x", "--", "y"}}
	got, err := parseInstancesArgs(a.args()[1:])
	if err != nil || got.n != a.n || got.ready != a.ready || got.addr != a.addr || got.drain != a.drain || !slices.Equal(got.argv, a.argv) {
		t.Fatalf("parse(%q) = %+v, %v; want %+v", a.args(), got, err, a)
	}
	for _, bad := range [][]string{{"-n", "0", "--", "app"}, {"-n", "2", "-ready", "sometimes", "--", "app"}, {"-n", "2", "-ready", "listen", "--", "app"}, {"-n", "2", "--"}} {
		if _, err := parseInstancesArgs(bad); err == nil {
			t.Errorf("parse(%q): no error", bad)
		}
	}
	for _, tc := range []struct {
		l    Launch
		want string
	}{
		{Launch{Argv: []string{"true"}, Ready: ReadyNotify, Instances: 65}, "--instances must be 1 to 64, not 65"},
		{Launch{Argv: []string{"true"}, Ready: ReadyLibrary, Instances: -1}, "--instances must be 1 to 64, not -1"},
		{Launch{Argv: []string{"true"}, Ready: ReadyNotify, Instances: 4}, ""},
	} {
		err := tc.l.checkMode()
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.l, err, tc.want)
		}
	}
	if l := (Launch{Argv: []string{"true"}}).withDefaults(Launch{Instances: 3}); l.Instances != 3 {
		t.Errorf("instances default to the active generation's: got %d, want 3", l.Instances)
	}
	if l := (Launch{Argv: []string{"true"}}).withDefaults(Launch{}); l.Instances != 1 || l.supervised() {
		t.Errorf("instances default to 1: got %d", l.Instances)
	}
}

// TestRelayMerge: the instances' metrics come out as one exposition, each
// family described once and every sample labeled with its instance; their
// counters add up, their gauges are the live instances' only.
func TestRelayMerge(t *testing.T) {
	a := "# HELP x_total X.\n# TYPE x_total counter\nx_total{path=\"/\"} 3\nup 1\n"
	b := "# HELP x_total X.\n# TYPE x_total counter\nx_total{path=\"/\"} 4\nup 1\n"
	want := "# HELP x_total X.\n# TYPE x_total counter\nx_total{rollover_instance=\"0\",path=\"/\"} 3\nup{rollover_instance=\"0\"} 1\n" +
		"x_total{rollover_instance=\"1\",path=\"/\"} 4\nup{rollover_instance=\"1\"} 1\n"
	if got := mergeMetrics([]string{a, b}); got != want {
		t.Errorf("merged:\n%s\nwant:\n%s", got, want)
	}
	r := &relay{peers: map[int]*relayPeer{
		1: {stats: wire.Stats{Inflight: 2, Connections: 3, Requests: 10, R2xx: 9, R5xx: 1}},
		2: {stats: wire.Stats{Inflight: 1, Connections: 1, Requests: 5, R2xx: 5}},
	}}
	r.retired = wire.Stats{Requests: 7, R2xx: 7}
	if s := r.sum(); s.Inflight != 3 || s.Connections != 4 || s.Requests != 22 || s.R2xx != 21 || s.R5xx != 1 {
		t.Errorf("sum = %+v", s)
	}
}
