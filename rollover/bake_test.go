package rollover

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// An app that stops on its own the moment a drain is ordered (gRPC's
// GracefulStop, Shutdown) closes its listener early: Close waits for the
// hand-over, which keeps accepting for the grace, and the app's accept loop
// does not end before Draining; after Draining, the socket is closed.
func TestListenerSafeToClose(t *testing.T) {
	a := standaloneAgent(t, 5*time.Second)
	ln := listenLocal(t, a)
	addr := ln.Addr().String()
	accepted := make(chan net.Conn, 16)
	loopDone := make(chan error, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				loopDone <- err
				return
			}
			accepted <- c
		}
	}()
	if err := a.ready(); err != nil {
		t.Fatal(err)
	}
	a.drain(drainOrder{grace: 300 * time.Millisecond})
	closed := make(chan error, 1)
	go func() { closed <- ln.Close() }() // the app stops at once
	// During the grace a client still gets in and is accepted by the app.
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("dial during the grace: %v", err)
	}
	defer c.Close()
	within(t, accepted, "accept of the connection made during the grace").Close()
	if isClosed(a.draining) {
		t.Error("Draining closed before the hand-over")
	}
	if err := within(t, closed, "return of Close after the hand-over"); err != nil {
		t.Errorf("Close: %v", err)
	}
	if !isClosed(a.draining) {
		t.Error("Close returned before Draining")
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("the port still accepts after Draining")
	}
	if err := within(t, loopDone, "end of the accept loop after Close"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
	}
}

// After the hand-over closed the socket, Accept does not fail while the
// app still has connections (gRPC's canonical main would exit), and fails
// once they are gone.
func TestAcceptHoldsAfterHandOver(t *testing.T) {
	a := standaloneAgent(t, 5*time.Second)
	ln := listenLocal(t, a)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	loopDone := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		loopDone <- err
	}()
	a.drain(drainOrder{})
	<-a.draining
	select {
	case err := <-loopDone:
		t.Fatalf("Accept returned %v while a connection is open", err)
	case <-time.After(200 * time.Millisecond): // it must still block: a span, not a condition
	}
	sc.Close()
	if err := within(t, loopDone, "return of Accept once the last connection closed"); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept: %v, want net.ErrClosed", err)
	}
}

// release, resume, release again, then the drain: keep-alive stops and
// comes back, Draining fires only on the drain.
func TestAgentReleaseResume(t *testing.T) {
	g := serveSupervised(t, 5, "s", 5*time.Second, nil)
	a, addr, served, f := g.a, g.addr, g.served, g.f
	f.expect(wire.TypeReady)
	ka := dialKeepAlive(t, addr)
	ka.send(t, "/")
	if resp, _ := ka.read(t); resp.Close {
		t.Fatal("Connection: close before the release")
	}
	f.command(wire.Msg{Type: wire.TypeRelease, ID: 1})
	ka.send(t, "/")
	if resp, _ := ka.read(t); !resp.Close {
		t.Error("a response during the bake lacks Connection: close")
	}
	if isClosed(a.draining) || isClosed(a.ordered) {
		t.Error("the release started the drain")
	}
	getOK(t, addr, " during the bake (the listener must stay open)")
	f.command(wire.Msg{Type: wire.TypeResume, ID: 2})
	ka2 := dialKeepAlive(t, addr)
	ka2.send(t, "/")
	if resp, _ := ka2.read(t); resp.Close {
		t.Error("Connection: close after the resume")
	}
	f.command(wire.Msg{Type: wire.TypeRelease, ID: 3})
	f.command(wire.Msg{Type: wire.TypeDrain, ID: 4, GraceMS: 50, TimeoutMS: 5000})
	f.expect(wire.TypeClosed)
	ka2.send(t, "/")
	if resp, _ := ka2.read(t); !resp.Close {
		t.Error("a response during the drain lacks Connection: close")
	}
	done := f.expect(wire.TypeDone)
	if done.Stats == nil || done.Stats.R2xx != 5 || done.Stats.ForcedConnections != 0 {
		t.Errorf("done %+v, want 5 2xx, nothing forced", done.Stats)
	}
	expectServed(t, served)
}

// A canary weight attaches the split program; a health rule reports a
// crossing at once, not at the next stats tick.
func TestAgentWeightAndHealth(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/500", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "bad", 500) })
	mux.HandleFunc("/404", http.NotFound)
	mux.HandleFunc("/panic", func(http.ResponseWriter, *http.Request) { panic("boom") })
	mux.HandleFunc("/abort", func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	g := serveSupervised(t, 6, "s", 5*time.Second, srv)
	a, addr, served, f := g.a, g.addr, g.served, g.f
	f.expect(wire.TypeReady)
	f.command(wire.Msg{Type: wire.TypeSteer, ID: 1, Weight: 30})
	f.command(wire.Msg{Type: wire.TypeSteer, ID: 2, Health: &wire.Health{MinRequests: 4, MaxErrorRatio: 0.5}})
	for _, p := range []string{"/", "/404", "/abort"} {
		_, _ = getNew(addr, p)
	}
	if _, err := getNew(addr, "/panic"); err == nil {
		t.Error("a panicking handler answered")
	}
	// 4 responses (200, 404, 1 panic; the abort is not counted) -> 1 bad
	// of 3... one more 500 makes 2 of 4: failing.
	testproc.WaitFor(t, 5*time.Second, "4 requests done", func() bool { return counters(a).Requests == 4 && counters(a).Inflight == 0 })
	start := time.Now()
	_, _ = getNew(addr, "/500")
	deadline := time.After(5 * time.Second)
	for {
		m := f.next("stats with the 5xx", deadline)
		if m.Type == wire.TypeStats && m.Stats != nil && m.Stats.R5xx == 1 {
			if took := time.Since(start); took >= wire.StatsInterval {
				t.Errorf("the crossing was reported after %v, at a stats tick", took)
			}
			s := m.Stats
			if s.R2xx != 1 || s.R4xx != 1 || s.Panics != 1 || s.R5xx != 1 {
				t.Errorf("stats %+v, want 1 2xx, 1 4xx, 1 5xx, 1 panic (the abort is none)", s)
			}
			break
		}
	}
	f.command(wire.Msg{Type: wire.TypeDrain, ID: 3, TimeoutMS: 5000})
	f.expect(wire.TypeClosed)
	f.expect(wire.TypeDone)
	expectServed(t, served)
}

// What the app leaves open past the drain deadline (a hijacked connection
// here) is closed and reported as forced, with one line on stderr.
func TestDrainDeadlineForced(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, _ *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
		_ = brw.Flush()
		go func() { _, _ = io.Copy(io.Discard, c) }() // ignores the drain
	})
	g := serveSupervised(t, 8, "s", 5*time.Second, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second})
	a, served, f := g.a, g.served, g.f
	f.expect(wire.TypeReady)
	ka := hijackOn(t, a, g.addr)
	start := time.Now()
	f.command(wire.Msg{Type: wire.TypeDrain, ID: 1, TimeoutMS: 1000})
	f.expect(wire.TypeClosed)
	done := f.expect(wire.TypeDone)
	if took := time.Since(start); took < cutAt(time.Second)-50*time.Millisecond || took > 3*time.Second {
		t.Errorf("done %v after the drain, want about %v", took, cutAt(time.Second))
	}
	if done.Stats == nil || done.Stats.ForcedConnections != 1 || done.Stats.ForcedRequests != 0 || done.Stats.R1xx != 1 {
		t.Errorf("done %+v, want 1 forced connection, 0 forced requests, one 1xx", done.Stats)
	}
	if !ka.closedByServer() {
		t.Error("the hijacked connection was left open")
	}
	expectServed(t, served)
}

func TestProbeTargets(t *testing.T) {
	for _, tc := range []struct {
		network, addr string
		want          []string
	}{
		{"tcp", "127.0.0.1:80", []string{"127.0.0.1:80"}},
		{"tcp", "0.0.0.0:80", []string{"127.0.0.1:80"}},
		{"tcp", "[::]:80", []string{"127.0.0.1:80", "[::1]:80"}}, // dual-stack: works without ::1
		{"tcp6", "[::]:80", []string{"[::1]:80"}},
		{"tcp", "[::1]:80", []string{"[::1]:80"}},
	} {
		ap, _ := net.ResolveTCPAddr("tcp", tc.addr)
		l := &listener{Listener: fakeListener{ap}, network: tc.network}
		got, err := probeTargets(l)
		if err != nil || strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%s %s: %v %v, want %v", tc.network, tc.addr, got, err, tc.want)
		}
	}
}

type fakeListener struct{ addr net.Addr }

func (fakeListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (fakeListener) Close() error              { return nil }
func (f fakeListener) Addr() net.Addr          { return f.addr }

// The frame follower writes its GOAWAY only between frames, after the
// first, and never inside a header block, however the frames are split.
func TestH2ConnBoundaries(t *testing.T) {
	frame := func(typ, flags byte, n int) []byte {
		return append([]byte{byte(n >> 16), byte(n >> 8), byte(n), typ, flags, 0, 0, 0, 1}, make([]byte, n)...)
	}
	settings := frame(0x4, 0, 6)
	headersOpen := frame(0x1, 0, 10) // no END_HEADERS
	cont := frame(0x9, 0x4, 5)       // ends the block
	data := frame(0x0, 0, 100)
	stream := append(append(append(append([]byte{}, settings...), headersOpen...), cont...), data...)
	for _, split := range []int{1, 3, 9, 17, 64, len(stream)} {
		var out strings.Builder
		hc := &h2Conn{Conn: writerConn{&out}}
		hc.pending = true // asked before anything was written
		for i := 0; i < len(stream); i += split {
			if _, err := hc.Write(stream[i:min(i+split, len(stream))]); err != nil {
				t.Fatal(err)
			}
		}
		got := out.String()
		want := string(settings) + string(goAwayMax[:]) + string(headersOpen) + string(cont) + string(data)
		if got != want {
			t.Errorf("split %d: GOAWAY not right after SETTINGS (len %d, want %d)", split, len(got), len(want))
		}
	}
	// Asked inside a header block: after the CONTINUATION that ends it.
	var out strings.Builder
	hc := &h2Conn{Conn: writerConn{&out}}
	_, _ = hc.Write(append(append([]byte{}, settings...), headersOpen...))
	hc.mu.Lock()
	if hc.boundary() {
		t.Error("a boundary inside a header block")
	}
	hc.pending = true
	hc.mu.Unlock()
	_, _ = hc.Write(append(append([]byte{}, cont...), data...))
	want := string(settings) + string(headersOpen) + string(cont) + string(goAwayMax[:]) + string(data)
	if out.String() != want {
		t.Error("GOAWAY not right after the header block")
	}
}

type writerConn struct{ w io.Writer }

func (c writerConn) Read([]byte) (int, error)       { return 0, io.EOF }
func (c writerConn) Write(p []byte) (int, error)    { return c.w.Write(p) }
func (writerConn) Close() error                     { return nil }
func (writerConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (writerConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (writerConn) SetDeadline(time.Time) error      { return nil }
func (writerConn) SetReadDeadline(time.Time) error  { return nil }
func (writerConn) SetWriteDeadline(time.Time) error { return nil }

// A drain sends an HTTP/2 client GOAWAY with the last stream ID 2^31-1
// first, then the real one, and its stream in flight finishes; TLS through
// srv.TLSConfig negotiates h2 and counts one connection.
func TestServeTLSHTTP2GoAway(t *testing.T) {
	a := standaloneAgent(t, 5*time.Second)
	ln := listenLocal(t, a)
	ts := httptest.NewTLSServer(http.NotFoundHandler()) // for its certificate
	pool := x509.NewCertPool()
	pool.AddCert(ts.Certificate())
	certs := ts.TLS.Certificates
	ts.Close()
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto) })
	mux.HandleFunc("/wait", func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "waited")
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := serveOn(ctx, a, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, TLSConfig: &tls.Config{Certificates: certs}}, ln)

	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "example.com", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2", p)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, bufio.NewReader(c))
	_ = fr.WriteSettings()
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":path", "/wait"}, {":authority", "example.com"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	testproc.WaitFor(t, 5*time.Second, "the request in flight", func() bool { return counters(a).Inflight == 1 })
	if s := counters(a); s.Connections != 1 {
		t.Errorf("%d connections counted for one TLS connection", s.Connections)
	}
	cancel() // drain
	var goaways []uint32
	var gotData bool
	for len(goaways) < 2 || !gotData {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %d GOAWAYs (data %v): %v", len(goaways), gotData, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		case *http2.GoAwayFrame:
			if f.ErrCode != http2.ErrCodeNo {
				t.Errorf("GOAWAY %v", f.ErrCode)
			}
			goaways = append(goaways, f.LastStreamID)
			if len(goaways) == 1 {
				close(release) // the stream in flight finishes after the first
			}
		case *http2.DataFrame:
			gotData = true
		}
	}
	if goaways[0] != 1<<31-1 || goaways[1] != 1 {
		t.Errorf("GOAWAYs with last stream IDs %v, want [2147483647 1]", goaways)
	}
	c.Close()
	expectServed(t, served)
}
