package coordinator

import (
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"
)

// TestListeningTree: --ready=listen sees a listener that a grandchild of
// the generation's process owns (a shell that runs the app, nginx's
// workers), and not one of another tree; once the tree is gone, it sees none.
func TestListeningTree(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
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

	ip, p, err := parseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the shell's child to listen on "+addr, func() bool { return listening(sh.Process.Pid, ip, p) })
	if kids := tree(sh.Process.Pid); len(kids) < 2 || kids[0] != sh.Process.Pid {
		t.Errorf("tree(%d) = %v, want the shell and its child", sh.Process.Pid, kids)
	}
	if !slices.Contains(tree(os.Getpid()), sh.Process.Pid) {
		t.Errorf("tree(%d) = %v, want the test's own child %d in it", os.Getpid(), tree(os.Getpid()), sh.Process.Pid)
	}
	if listening(other.Process.Pid, ip, p) {
		t.Errorf("pid %d (sleep) is said to listen on %s", other.Process.Pid, addr)
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

// TestListenInodes: sock_diag finds a listener by its port and address, as
// /proc/PID/net/tcp{,6} (the fallback) does, and only in LISTEN state.
func TestListenInodes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
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
	// A connection on the same port is not a listener.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	fs, err := procfs.NewFS("/proc/self")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ip         net.IP
		want, proc bool // proc: compare with /proc too (about 10ms of kernel time per read)
	}{{nil, true, true}, {net.IPv4zero, true, false}, {net.IPv4(127, 0, 0, 1), true, false}, {net.IPv4(127, 0, 0, 2), false, true}} {
		got, err := listenInodes(tc.ip, port)
		if err != nil {
			t.Fatal(err)
		}
		if got[st.Ino] != tc.want || len(got) != map[bool]int{true: 1, false: 0}[tc.want] {
			t.Errorf("listenInodes(%v, %d) = %v, want inode %d: %v", tc.ip, port, got, st.Ino, tc.want)
		}
		if !tc.proc {
			continue
		}
		if proc := listeningInodes(fs, tc.ip, port); !maps.Equal(proc, got) {
			t.Errorf("/proc/self/net/tcp says %v for %v:%d, sock_diag %v", proc, tc.ip, port, got)
		}
	}
}
