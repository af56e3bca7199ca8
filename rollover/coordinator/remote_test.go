package coordinator

import (
	"strings"
	"testing"
)

func TestRemotePlan(t *testing.T) {
	tcp := func(addr string, n int) []remoteSocket {
		var s []remoteSocket
		for i := range n {
			s = append(s, remoteSocket{pid: 1, fd: 3 + i, inode: uint64(100 + i), addr: addr})
		}
		return s
	}
	udp := tcp("127.0.0.1:53", 2)
	for i := range udp {
		udp[i].udp = true
	}
	for _, c := range []struct {
		name  string
		socks []remoteSocket
		want  string // "" for steerable
	}{
		{"none", nil, "no listening socket"},
		{"one", tcp("127.0.0.1:80", 1), ""},
		{"nginx's 4 workers", tcp("127.0.0.1:80", 4), ""},
		{"two addresses", append(tcp("127.0.0.1:80", 2), tcp("[::1]:80", 3)...), ""},
		{"too many", tcp("127.0.0.1:80", maxGroup+1), "at most 64"},
		{"two UDP sockets on one address", udp, "one per UDP address"},
	} {
		err := remotePlan(c.socks)
		if (err == nil) != (c.want == "") || (err != nil && !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

func TestProbeTarget(t *testing.T) {
	for in, want := range map[string]string{
		"0.0.0.0:80":   "127.0.0.1:80",
		"[::]:80":      "[::1]:80",
		"10.1.2.3:443": "10.1.2.3:443",
		"[::1]:8080":   "[::1]:8080",
	} {
		got, err := probeTarget(in)
		if err != nil || got.String() != want {
			t.Errorf("probeTarget(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	if _, err := probeTarget("nonsense"); err == nil {
		t.Error("probeTarget(nonsense): no error")
	}
}
