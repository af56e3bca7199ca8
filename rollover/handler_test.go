package rollover

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The handler and listener of an agent count requests and connections, and
// once the agent drains, a response says Connection: close.
func TestHandlerAndListener(t *testing.T) {
	a, err := newAgent(config{})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	inHandler := make(chan struct{}, 1)
	h := a.handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/wait" {
			inHandler <- struct{}{}
			<-release
		}
	}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener, _ = a.register(ln, "tcp")
	srv.Start()
	defer srv.Close()

	done := make(chan struct{})
	go func() {
		defer close(done)
		resp, err := http.Get(srv.URL + "/wait")
		if err == nil {
			resp.Body.Close()
		}
	}()
	<-inHandler
	if s := a.counter.Snapshot(); s.Inflight != 1 || s.Connections != 1 || s.Requests != 1 {
		t.Errorf("during a request: %+v, want 1 in flight, 1 connection, 1 request", s)
	}
	a.closing.Store(true)
	close(release)
	<-done
	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if !resp.Close {
		t.Error("a response while closing did not say Connection: close")
	}
	// Each response while closing ended its connection. The server closes
	// them asynchronously; the last close while closing wakes the waiters.
	idle, stop := make(chan struct{}), make(chan struct{})
	defer close(stop)
	go func() { a.awaitIdle(stop, nil); close(idle) }()
	within(t, idle, "close of every connection")
	if s := a.counter.Snapshot(); s.Inflight != 0 || s.Requests != 2 || s.Connections != 0 {
		t.Errorf("after: %+v, want 0 in flight, 2 requests, 0 connections", s)
	}
	if n := testutil.CollectAndCount(a.own, "rollover_request_duration_seconds"); n != 1 {
		t.Errorf("latency histogram: %d series", n)
	}
}

// An app's own wrapper around a listener from Listen is served as it is:
// its connections are counted once and its socket handed over once.
func TestServeWrappedListenerCountedOnce(t *testing.T) {
	a := standaloneAgent(t, 0)
	ln := listenLocal(t, a)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := serveOn(ctx, a, nil, wrapped{ln})
	ka := dialKeepAlive(t, ln.Addr().String())
	ka.send(t, "/")
	if resp, body := ka.read(t); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("GET /: %s %q", resp.Status, body)
	}
	if s := counters(a); s.Connections != 1 {
		t.Errorf("%d connections counted for one", s.Connections)
	}
	if n := len(a.snapshotListeners()); n != 1 {
		t.Errorf("%d listeners to hand over, want 1", n)
	}
	ka.conn.Close()
	cancel()
	expectServed(t, served)
}

type wrapped struct{ net.Listener }

func (w wrapped) NetListener() net.Listener { return w.Listener }

// Agents are values: one draining leaves another in the same process
// serving.
func TestAgentsAreIndependent(t *testing.T) {
	a, b := standaloneAgent(t, 5*time.Second), newTestAgent(t, 5*time.Second)
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	ctxB, cancelB := context.WithCancel(context.Background())
	defer cancelB()
	addrA, servedA := serve(t, a, ctxA)
	addrB, servedB := serve(t, b, ctxB)
	cancelA()
	expectServed(t, servedA)
	if c, err := net.DialTimeout("tcp", addrA, time.Second); err == nil {
		c.Close()
		t.Error("a's port still accepts connections after its drain")
	}
	if isClosed(b.draining) {
		t.Fatal("b drains with a")
	}
	ka := dialKeepAlive(t, addrB)
	ka.send(t, "/")
	if resp, body := ka.read(t); resp.StatusCode != 200 || body != "ok" || resp.Close {
		t.Errorf("b after a's drain: %s %q close=%v, want 200 ok on a kept-alive connection", resp.Status, body, resp.Close)
	}
	if s := counters(b); s.Requests != 1 {
		t.Errorf("b counted %d requests, want 1", s.Requests)
	}
	ka.conn.Close()
	cancelB()
	expectServed(t, servedB)
}

// Every waiter for the last connection wakes, not just one (an app may
// Serve several listeners).
func TestBroadcastWakesEveryWaiter(t *testing.T) {
	var b broadcast
	w1, w2 := b.wait(), b.wait()
	b.fire()
	for i, w := range []<-chan struct{}{w1, w2} {
		if !isClosed(w) {
			t.Errorf("waiter %d did not wake", i)
		}
	}
	if isClosed(b.wait()) {
		t.Error("a wait after the fire returned a fired channel")
	}
}
