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
		if !found || !s.localAddr.Equal(w.localAddr) || s.localPort != w.localPort || s.rxQueue != w.rxQueue || s.state != tcpListen {
			t.Errorf("socket %d: %+v, procfs %+v", s.inode, s, w)
		}
	}
}
