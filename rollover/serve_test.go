package rollover

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// childEnv is how a test of something process-wide (signals) runs alone in
// a child test process: without the coordinator's variables of the parent.
var childEnv = testproc.Child{Unset: []string{EnvSocket, EnvGeneration, EnvSecret}}

// TestMain checks that no test leaves a goroutine behind: every goroutine
// and timer of an agent has an owner that waits for it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// within returns what ch delivers, and fails t if nothing comes within 5s.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("no %s within 5s", what)
		panic("unreachable")
	}
}

// expectServed waits for serve's result, which must be nil.
func expectServed(t *testing.T, served <-chan error) {
	t.Helper()
	if err := within(t, served, "return of serve"); err != nil {
		t.Errorf("serve: %v", err)
	}
}

// testHandler answers "ok"; /slow?d=DURATION answers after d.
func testHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 || d > time.Minute {
			http.Error(w, "bad d", http.StatusBadRequest)
			return
		}
		time.Sleep(d) // a slow handler that does not watch the drain
		io.WriteString(w, "slow ok")
	})
	return mux
}

// clearEnv unsets, for the test, the variables a coordinator would set.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{EnvSocket, EnvGeneration, EnvSecret, EnvAdoptTimeout, envHandover} {
		t.Setenv(k, "")
	}
}

// newTestAgent makes an agent from the environment, as the default agent is
// made, but with the drain timeout the test wants.
func newTestAgent(t *testing.T, drainTimeout time.Duration) *agent {
	t.Helper()
	cfg, err := envConfig()
	if err != nil {
		t.Fatal(err)
	}
	cfg.drainTimeout = drainTimeout
	a, err := newAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Every goroutine of the agent ends with it: done waits for them.
	t.Cleanup(func() {
		finished := make(chan struct{})
		go func() { a.done(); close(finished) }()
		within(t, finished, "end of the agent's goroutines")
	})
	return a
}

// listenLocal returns a listener from a's listen on a fresh 127.0.0.1 port.
func listenLocal(t *testing.T, a *agent) net.Listener {
	t.Helper()
	ln, err := a.listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	return ln
}

// serveOn serves srv (testHandler when nil) through a's serve on ln. serve's
// result arrives on the channel.
func serveOn(ctx context.Context, a *agent, srv *http.Server, ln net.Listener) <-chan error {
	if srv == nil {
		srv = &http.Server{Handler: testHandler(), ReadHeaderTimeout: 5 * time.Second}
	}
	ch := make(chan error, 1)
	go func() { ch <- a.serve(ctx, srv, ln, nil) }()
	return ch
}

// standaloneAgent makes an agent as a process without a coordinator does,
// with the drain timeout the test wants.
func standaloneAgent(t *testing.T, drainTimeout time.Duration) *agent {
	t.Helper()
	clearEnv(t)
	return newTestAgent(t, drainTimeout)
}

// serve serves testHandler through a's serve on a fresh 127.0.0.1 listener
// from a's listen. serve's result arrives on the channel.
func serve(t *testing.T, a *agent, ctx context.Context) (addr string, served <-chan error) {
	t.Helper()
	ln := listenLocal(t, a)
	return ln.Addr().String(), serveOn(ctx, a, nil, ln)
}

func counters(a *agent) wire.Stats { return a.counter.Snapshot() }

// keepAlive is one HTTP/1.1 connection that the test controls, so that a
// request is known to reuse it.
type keepAlive struct {
	conn net.Conn
	br   *bufio.Reader
}

func dialKeepAlive(t *testing.T, addr string) *keepAlive {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return &keepAlive{conn: c, br: bufio.NewReader(c)}
}

func (k *keepAlive) send(t *testing.T, path string) {
	t.Helper()
	if _, err := fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
}

func (k *keepAlive) read(t *testing.T) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return resp, string(b)
}

// closedByServer reports whether the server closed the connection.
func (k *keepAlive) closedByServer() bool {
	_ = k.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := k.br.ReadByte()
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

// hijackOn asks a's /hijack on a connection of its own, which must switch
// protocols, and waits until a counts it as a connection with no request in
// flight.
func hijackOn(t *testing.T, a *agent, addr string) *keepAlive {
	t.Helper()
	ka := dialKeepAlive(t, addr)
	ka.send(t, "/hijack")
	if resp, _ := ka.read(t); resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("hijack: %s", resp.Status)
	}
	testproc.WaitFor(t, 5*time.Second, "the hijacked connection counted, its request finished", func() bool {
		s := counters(a)
		return s.Connections == 1 && s.Inflight == 0
	})
	return ka
}

// getOK requests / on a connection of its own, which must answer "ok".
func getOK(t *testing.T, addr, when string) {
	t.Helper()
	if body, err := getNew(addr, "/"); err != nil || body != "ok" {
		t.Fatalf("GET /%s: %q %v", when, body, err)
	}
}

// getNew requests path on a connection of its own.
func getNew(addr, path string) (string, error) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = errors.New(resp.Status)
	}
	return string(b), err
}

func TestServeStandalone(t *testing.T) {
	a := standaloneAgent(t, 10*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, served := serve(t, a, ctx)
	if Generation() != 0 {
		t.Errorf("Generation() = %d standalone, want 0", Generation())
	}

	ka := dialKeepAlive(t, addr)
	ka.send(t, "/")
	if resp, body := ka.read(t); resp.StatusCode != 200 || body != "ok" || resp.Close {
		t.Fatalf("before the drain: %s %q close=%v, want 200 ok on a kept-alive connection", resp.Status, body, resp.Close)
	}

	slow := make(chan error, 1)
	go func() {
		body, err := getNew(addr, "/slow?d=1s")
		if err == nil && body != "slow ok" {
			err = fmt.Errorf("body %q", body)
		}
		slow <- err
	}()
	testproc.WaitFor(t, 5*time.Second, "one request in flight on two connections", func() bool {
		s := counters(a)
		return s.Inflight == 1 && s.Connections == 2 && s.Requests == 2
	})

	cancel()
	within(t, a.draining, "drain after canceling ctx")
	testproc.WaitFor(t, 5*time.Second, "the listener to close", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	if s := counters(a); s.Inflight != 1 {
		t.Errorf("after the drain started, %d requests in flight, want the slow one", s.Inflight)
	}

	// A request on a kept-alive connection during the drain is served and
	// tells the client to leave.
	ka.send(t, "/")
	// (http.ReadResponse turns the Connection: close header into resp.Close.)
	if resp, body := ka.read(t); resp.StatusCode != 200 || body != "ok" || !resp.Close {
		t.Errorf("during the drain: %s %q close=%v, want 200 ok with Connection: close", resp.Status, body, resp.Close)
	}
	if !ka.closedByServer() {
		t.Error("the server kept the connection open after Connection: close")
	}

	select {
	case err := <-slow:
		if err != nil {
			t.Errorf("the request in flight when the drain started: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request did not complete")
	}
	expectServed(t, served)
	if s := counters(a); s.Inflight != 0 || s.Connections != 0 || s.Requests != 3 {
		t.Errorf("counters after the drain %+v, want 0 in flight, 0 connections, 3 requests", s)
	}
}

// A keep-alive client whose request is in flight when the drain starts must
// be told to leave too, or it holds the generation until the drain timeout.
func TestServeDrainClosesInflightKeepAlive(t *testing.T) {
	clearEnv(t)
	a := newTestAgent(t, 6*time.Second) // Serve gives up on connections after 5.4s
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, served := serve(t, a, ctx)

	ka := dialKeepAlive(t, addr)
	ka.send(t, "/slow?d=500ms")
	testproc.WaitFor(t, 5*time.Second, "the request in flight", func() bool { return counters(a).Inflight == 1 })
	cancel()
	<-a.draining
	resp, body := ka.read(t)
	answered := time.Now()
	if resp.StatusCode != 200 || body != "slow ok" {
		t.Errorf("in-flight request: %s %q, want 200", resp.Status, body)
	}
	if !resp.Close {
		t.Error("the response written during the drain lacks Connection: close; the client keeps its connection to the old generation")
	}
	// The client keeps its connection, as an idle keep-alive pool does.
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
		if took := time.Since(answered); took > 2*time.Second {
			t.Errorf("Serve returned %v after the last response: it waited for the drain timeout", took.Round(time.Millisecond))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
}

// Signals are process-wide, so this test runs in a child process of its own,
// through the package-level functions and the default agent.
func TestServeStandaloneSIGTERM(t *testing.T) {
	if !testproc.InChild(t, childEnv) {
		return
	}
	DefaultDrainTimeout = 10 * time.Second
	// Our own subscription keeps SIGTERM from killing the test process before
	// Serve subscribes.
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, syscall.SIGTERM)
	defer signal.Stop(sigc)
	ln, err := Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	addr := ln.Addr().String()
	served := make(chan error, 1)
	go func() {
		served <- Serve(context.Background(), &http.Server{Handler: testHandler(), ReadHeaderTimeout: 5 * time.Second}, ln)
	}()
	getOK(t, addr, "")
	// Serve subscribes to SIGTERM after it reports ready, which is not
	// observable: signal until the drain starts.
	testproc.WaitFor(t, 5*time.Second, "SIGTERM to start the drain", func() bool {
		_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		time.Sleep(20 * time.Millisecond)
		return isClosed(Draining())
	})
	expectServed(t, served)
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("the port still accepts connections after the drain")
	}
}

func TestServeCountsHijackedConnections(t *testing.T) {
	a := standaloneAgent(t, 0)
	ln := listenLocal(t, a)
	var hijacked sync.WaitGroup
	mux := http.NewServeMux()
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, _ *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		hijacked.Go(func() {
			defer c.Close()
			_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
			_, _ = io.Copy(io.Discard, brw) // until the client hangs up
		})
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := serveOn(ctx, a, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln)

	ka := hijackOn(t, a, ln.Addr().String())
	ka.conn.Close()
	hijacked.Wait()
	testproc.WaitFor(t, 5*time.Second, "the hijacked connection to be uncounted", func() bool { return counters(a).Connections == 0 })
	cancel()
	expectServed(t, served)
}

// --- with a coordinator ---

// fakeCoordinator is the coordinator's end of one generation's control
// connection.
type fakeCoordinator struct {
	t     *testing.T
	conn  net.Conn
	hello wire.Msg
	msgs  chan wire.Msg // everything the generation sends after hello
	err   chan error    // why msgs ended

	mu    sync.Mutex
	stats wire.Stats // last reported
}

// listenCoordinator sets the environment, for the test, up as generation gen
// of a fake coordinator that answers the hello with welcome.
func listenCoordinator(t *testing.T, gen int, secret string, welcome wire.Msg) <-chan *fakeCoordinator {
	t.Helper()
	sock := filepath.Join(testproc.ShortDir(t), "c.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	// The agent's side ends with the test: closing every connection ends
	// its reads.
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	t.Setenv(EnvSocket, sock)
	t.Setenv(EnvGeneration, fmt.Sprint(gen))
	t.Setenv(EnvSecret, secret)
	t.Setenv(envHandover, "")
	// Every connection the generation makes (a reconnect to be adopted
	// included) is delivered as its own fake.
	ch := make(chan *fakeCoordinator, 4)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			accept(t, conn, welcome, ch)
		}
	}()
	return ch
}

// supervised is an agent serving as generation gen of a fake coordinator.
type supervised struct {
	a      *agent
	addr   string
	served <-chan error
	f      *fakeCoordinator        // the connection that said hello first
	coord  <-chan *fakeCoordinator // every later one
}

// serveSupervised serves srv (testHandler when nil) through a new agent
// with drainTimeout that is generation gen of a fake coordinator, and
// returns once the generation said hello.
func serveSupervised(t *testing.T, gen int, secret string, drainTimeout time.Duration, srv *http.Server) *supervised {
	t.Helper()
	coord := listenCoordinator(t, gen, secret, wire.Msg{OK: true})
	a := newTestAgent(t, drainTimeout)
	ln := listenLocal(t, a)
	served := serveOn(context.Background(), a, srv, ln)
	return &supervised{a: a, addr: ln.Addr().String(), served: served, f: within(t, coord, "hello"), coord: coord}
}

// accept answers the hello on conn with welcome and delivers the fake.
func accept(t *testing.T, conn net.Conn, welcome wire.Msg, ch chan<- *fakeCoordinator) {
	f := &fakeCoordinator{t: t, conn: conn, msgs: make(chan wire.Msg, 100), err: make(chan error, 1)}
	r := wire.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	hello, err := r.Read()
	_ = conn.SetReadDeadline(time.Time{})
	if err == nil {
		welcome.Type = wire.TypeWelcome
		_, err = conn.Write(wire.Encode(welcome))
	}
	if err != nil {
		conn.Close()
		return
	}
	f.hello = hello
	go func() {
		for {
			m, err := r.Read()
			if err != nil {
				f.err <- err
				close(f.msgs)
				return
			}
			f.msgs <- m
		}
	}()
	ch <- f
}

// next returns the next message the generation sends, and fails the test
// if none comes before deadline, or the generation hangs up.
func (f *fakeCoordinator) next(what string, deadline <-chan time.Time) wire.Msg {
	f.t.Helper()
	select {
	case m, ok := <-f.msgs:
		if !ok {
			f.t.Fatalf("waiting for %s: the generation hung up: %v", what, <-f.err)
		}
		return m
	case <-deadline:
		f.t.Fatalf("no %s in time", what)
		panic("unreachable")
	}
}

// expect returns the next message that is not stats, which must be of type
// typ.
func (f *fakeCoordinator) expect(typ string) wire.Msg {
	f.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		m := f.next(typ, deadline)
		if m.Type == wire.TypeStats {
			if m.Stats != nil {
				f.mu.Lock()
				f.stats = *m.Stats
				f.mu.Unlock()
			}
			continue
		}
		if m.Type != typ {
			f.t.Fatalf("got %+v, want %s", m, typ)
		}
		return m
	}
}

// waitStats waits for a stats report that satisfies cond.
func (f *fakeCoordinator) waitStats(what string, cond func(wire.Stats) bool) {
	f.t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		m := f.next("stats with "+what, deadline)
		if m.Type != wire.TypeStats || m.Stats == nil {
			f.t.Fatalf("waiting for stats, got %+v", m)
		}
		if cond(*m.Stats) {
			return
		}
	}
}

func (f *fakeCoordinator) send(m wire.Msg) {
	f.t.Helper()
	if _, err := f.conn.Write(wire.Encode(m)); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeCoordinator) command(m wire.Msg) {
	f.t.Helper()
	f.send(m)
	ack := f.expect(wire.TypeAck)
	if ack.ID != m.ID || !ack.OK || ack.Error != "" {
		f.t.Fatalf("%s %d: ack %+v, want an ok ack with the same id", m.Type, m.ID, ack)
	}
}

func TestAgentWithCoordinator(t *testing.T) {
	g := serveSupervised(t, 7, "s3cret", 0, nil)
	a, addr, served, f := g.a, g.addr, g.served, g.f
	if f.hello.Type != wire.TypeHello || f.hello.Generation != 7 || f.hello.PID != os.Getpid() || f.hello.Secret != "s3cret" {
		t.Fatalf("hello %+v, want generation 7, pid %d and the secret", f.hello, os.Getpid())
	}
	if Generation() != 7 {
		t.Errorf("Generation() = %d, want 7", Generation())
	}
	ready := f.expect(wire.TypeReady)
	if !ready.Steerable || ready.SteerError != "" || !slices.Equal(ready.Addrs, []string{addr}) {
		t.Errorf("ready %+v, want steerable on %s", ready, addr)
	}

	f.command(wire.Msg{Type: wire.TypeSteer, ID: 1})
	f.command(wire.Msg{Type: wire.TypePin, ID: 2})
	getOK(t, addr, "")
	f.waitStats("1 request", func(s wire.Stats) bool { return s.Requests >= 1 })

	slow := make(chan error, 1)
	go func() {
		_, err := getNew(addr, "/slow?d=500ms")
		slow <- err
	}()
	f.waitStats("1 request in flight", func(s wire.Stats) bool { return s.Inflight == 1 && s.Connections == 1 })

	f.command(wire.Msg{Type: wire.TypeDrain, ID: 3, TimeoutMS: 5000})
	// The agent acknowledges the drain, then starts it.
	testproc.WaitFor(t, 5*time.Second, "Draining() to close", func() bool { return isClosed(a.draining) })
	f.expect(wire.TypeClosed)
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("the port still accepts connections after closed")
	}
	if err := <-slow; err != nil {
		t.Errorf("the request in flight during the drain: %v", err)
	}
	done := f.expect(wire.TypeDone)
	if done.Stats == nil || done.Stats.Inflight != 0 || done.Stats.Connections != 0 || done.Stats.Requests != 2 {
		t.Errorf("done %+v, want final stats of 0 in flight, 0 connections, 2 requests", done.Stats)
	}
	expectServed(t, served)
}

// freshStd gives the test a default agent of its own, made from the
// environment on first use, and the library's stderr in a buffer.
func freshStd(t *testing.T) *bytes.Buffer {
	saved, savedStderr := std, stderr
	var log bytes.Buffer
	std, stderr = sync.OnceValues(envAgent), &log
	drainingFailed = sync.Once{}
	t.Cleanup(func() {
		std, stderr = saved, savedStderr
		drainingFailed = sync.Once{}
	})
	return &log
}

// The package-level functions report a refused hello, through a default
// agent of the test's own: Listen does not wait for the answer (the app
// listens while the coordinator reads the hello), Ready and Serve report it.
func TestAgentRefused(t *testing.T) {
	listenCoordinator(t, 3, "x", wire.Msg{Error: "wrong secret for generation 3"})
	log := freshStd(t)
	ln, err := Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	if err := Ready(); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "wrong secret") {
		t.Errorf("Ready: %v, want ErrRefused with the coordinator's reason", err)
	}
	if err := Serve(context.Background(), &http.Server{ReadHeaderTimeout: time.Second}, ln); !errors.Is(err, ErrRefused) {
		t.Errorf("Serve: %v, want ErrRefused", err)
	}
	if isClosed(Draining()) {
		t.Error("Draining() is closed for a refused generation")
	}
	if got := log.String(); !strings.Contains(got, "wrong secret") {
		t.Errorf("stderr %q: want Draining to say the coordinator refused", got)
	}
}

// A generation whose coordinator is gone, and that no new coordinator
// adopts within the adoption timeout, leaves rather than serve unsupervised.
func TestAgentLostCoordinatorDrains(t *testing.T) {
	t.Setenv(EnvAdoptTimeout, "300ms")
	g := serveSupervised(t, 2, "s", 5*time.Second, nil)
	g.f.expect(wire.TypeReady)
	getOK(t, g.addr, "")
	// The coordinator dies and nothing answers on its socket any more.
	if err := os.Remove(os.Getenv(EnvSocket)); err != nil {
		t.Fatal(err)
	}
	g.f.conn.Close()
	expectServed(t, g.served)
	if !isClosed(g.a.draining) {
		t.Error("Draining() is open")
	}
}

// A generation whose coordinator died keeps serving and asks the next
// coordinator on the socket to adopt it, saying where it stands; the new
// coordinator can then drain it as usual.
func TestAgentAdopted(t *testing.T) {
	t.Setenv(EnvAdoptTimeout, "20s")
	g := serveSupervised(t, 4, "s4", 5*time.Second, nil)
	a, addr, served := g.a, g.addr, g.served
	g.f.expect(wire.TypeReady)
	g.f.conn.Close() // the coordinator dies
	f2 := within(t, g.coord, "reconnect to be adopted")
	if h := f2.hello; !h.Adopt || h.State != "ready" || h.Generation != 4 || h.Secret != "s4" || !h.Steerable || len(h.Addrs) == 0 {
		t.Fatalf("adoption hello %+v: want adopt, state ready, generation 4, its secret, steerable, its addresses", h)
	}
	getOK(t, addr, " while being adopted")
	if isClosed(a.draining) {
		t.Fatal("draining although adopted")
	}
	f2.command(wire.Msg{Type: wire.TypeDrain, ID: 1, TimeoutMS: 3000})
	f2.expect(wire.TypeClosed)
	expectServed(t, served)
}

// lateListener returns from Accept late once it is closed, as a busy
// scheduler may: the http.Server still tracks it when Serve shuts down.
type lateListener struct{ net.Listener }

func (l lateListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		time.Sleep(300 * time.Millisecond) // the scheduling delay under test
	}
	return c, err
}

// NetListener lets the hand-over reach the socket.
func (l lateListener) NetListener() net.Listener { return l.Listener }

// A clean drain returns nil even if the server has not yet noticed that the
// hand-over closed its listener (Shutdown then closes it a second time).
func TestServeCleanDrainReturnsNil(t *testing.T) {
	a := standaloneAgent(t, 0)
	ln := listenLocal(t, a)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := serveOn(ctx, a, nil, lateListener{ln})
	getOK(t, ln.Addr().String(), "")
	testproc.WaitFor(t, 5*time.Second, "the connection to close", func() bool { return counters(a).Connections == 0 })
	cancel()
	expectServed(t, served)
}

// A generation that cannot read its environment never drains, and says so:
// Listen, Serve and Ready return the error, which names the variable, and
// Draining says on stderr that it will never close.
func TestBadEnvironmentIsVisible(t *testing.T) {
	for _, tc := range []struct{ key, value string }{
		{EnvGeneration, "two"},
		{EnvAdoptTimeout, "soon"},
		{EnvAdoptTimeout, "-1s"},
		{envHandover, "fast"},
	} {
		t.Run(tc.key+"="+tc.value, func(t *testing.T) {
			clearEnv(t)
			t.Setenv(EnvSocket, "/nonexistent/rollover.sock")
			t.Setenv(EnvGeneration, "2")
			t.Setenv(tc.key, tc.value)
			log := freshStd(t)

			want := tc.key + "=" + fmt.Sprintf("%q", tc.value)
			if _, err := Listen(context.Background(), "tcp", "127.0.0.1:0"); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Listen: %v, want an error naming %s", err, want)
			}
			if err := Serve(context.Background(), &http.Server{ReadHeaderTimeout: time.Second}, nil); err == nil {
				t.Error("Serve: nil error")
			}
			if err := Ready(); err == nil {
				t.Error("Ready: nil error")
			}
			if isClosed(Draining()) {
				t.Error("Draining() is closed")
			}
			_ = Draining()
			if got := log.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, "never close") || !strings.Contains(got, want) {
				t.Errorf("stderr %q: want one line saying Draining never closes, naming %s", got, want)
			}
		})
	}
}
