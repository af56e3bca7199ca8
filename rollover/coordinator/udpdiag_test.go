package coordinator

import (
	"net"
	"testing"
)

// udpSockets sees a bound UDP socket, with what is queued on it.
func TestUDPSockets(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	port := pc.LocalAddr().(*net.UDPAddr).Port
	c, err := net.Dial("udp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("queued")); err != nil {
		t.Fatal(err)
	}
	socks, err := udpSockets(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 1 || socks[0].localPort != uint64(port) || socks[0].inode == 0 || socks[0].rxQueue == 0 {
		t.Fatalf("udpSockets(%d) = %+v, want the one socket with a datagram queued", port, socks)
	}
}
