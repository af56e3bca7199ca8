package coordinator

import (
	"net"
	"testing"

	"github.com/prometheus/procfs"
)

// tcpSockets reads what procfs reads, for the lines it keeps: listeners on
// IPv4 and, where there is IPv6, on IPv6 too. Only the test's own listeners
// are compared: the host's others may change between the two reads.
func TestTCPSocketsAgreeWithProcfs(t *testing.T) {
	ours := map[uint64]bool{} // ports
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Logf("%s: %v (no IPv6 here?)", addr, err)
			continue
		}
		defer ln.Close()
		ours[uint64(ln.Addr().(*net.TCPAddr).Port)] = true
	}
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint64]tcpSocket{}
	for _, read := range []func() (procfs.NetTCP, error){fs.NetTCP, fs.NetTCP6} {
		lines, err := read()
		if err != nil {
			continue
		}
		for _, l := range lines {
			if l.St == tcpListen && ours[l.LocalPort] {
				want[l.Inode] = tcpSocket{state: l.St, localAddr: l.LocalAddr, localPort: l.LocalPort, rxQueue: l.RxQueue, inode: l.Inode}
			}
		}
	}
	all, ok := tcpSockets("/proc", tcpListen)
	var got []tcpSocket
	for _, s := range all {
		if ours[s.localPort] {
			got = append(got, s)
		}
	}
	if !ok || len(got) == 0 || len(got) != len(want) {
		t.Fatalf("tcpSockets: %d listeners (ok %v), procfs %d", len(got), ok, len(want))
	}
	for _, s := range got {
		w, found := want[s.inode]
		// Other listeners' queues come and go between the two reads.
		if !found || !s.localAddr.Equal(w.localAddr) || s.localPort != w.localPort || s.state != tcpListen {
			t.Errorf("socket %d: %+v, procfs %+v", s.inode, s, w)
		}
	}
}

// listenSockets (sock_diag) and tcpSockets (/proc) see a listener and the
// connection waiting in its accept queue.
func TestListenSocketsQueue(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String()) // never accepted
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	for name, read := range map[string]func() []tcpSocket{
		"sock_diag": func() []tcpSocket { s, _ := listenSockets(port); return s },
		"/proc": func() []tcpSocket {
			s, _ := tcpSockets("/proc", tcpListen)
			return s
		},
	} {
		var got []tcpSocket
		for _, s := range read() {
			if int(s.localPort) == port {
				got = append(got, s)
			}
		}
		if len(got) != 1 || got[0].rxQueue != 1 || !got[0].localAddr.Equal(net.IPv4(127, 0, 0, 1)) || got[0].inode == 0 {
			t.Errorf("%s: %+v, want the one listener on 127.0.0.1:%d with 1 queued connection", name, got, port)
		}
	}
}
