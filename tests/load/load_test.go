package load

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// connCounter records the distinct client connections a server saw.
type connCounter struct {
	mu    sync.Mutex
	addrs map[string]bool
}

func (c *connCounter) add(a string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.addrs == nil {
		c.addrs = map[string]bool{}
	}
	c.addrs[a] = true
}

func (c *connCounter) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.addrs)
}

func run(t *testing.T, o Options) Result {
	t.Helper()
	res, err := Run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(res)
	return res
}

func TestHealthy(t *testing.T) {
	for _, keep := range []bool{true, false} {
		t.Run(fmt.Sprintf("keepalive=%v", keep), func(t *testing.T) {
			var conns connCounter
			var bad atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				conns.add(r.RemoteAddr)
				if r.Method != http.MethodPost || r.ContentLength != 0 {
					bad.Add(1)
				}
				w.Header().Set(GenerationHeader, "7")
				io.WriteString(w, "hello")
			}))
			defer srv.Close()
			const n = 300
			res := run(t, Options{URL: srv.URL, Clients: 4, KeepAlive: keep, MaxRequests: n, Duration: time.Minute})
			if res.Requests != n || res.OK != n || res.Failures != 0 || len(res.ByKind) != 0 {
				t.Fatalf("want %d OK requests and no failures, got %v %v", n, res, res.Samples)
			}
			if res.ByGeneration["7"] != n || len(res.ByGeneration) != 1 {
				t.Errorf("ByGeneration = %v", res.ByGeneration)
			}
			if res.P50 <= 0 || res.P99 < res.P50 || res.RPS() <= 0 {
				t.Errorf("latency/rps: %v", res)
			}
			if bad.Load() != 0 {
				t.Errorf("%d requests were not POST with an empty body", bad.Load())
			}
			if keep && conns.n() > 4 {
				t.Errorf("keep-alive: %d connections for 4 clients", conns.n())
			}
			if !keep && conns.n() != n {
				t.Errorf("no keep-alive: %d connections for %d requests", conns.n(), n)
			}
		})
	}
}

// Connections and their goroutines are gone once Run returns.
func TestNoLeak(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	before := runtime.NumGoroutine()
	for _, keep := range []bool{true, false} {
		run(t, Options{URL: srv.URL, Clients: 8, KeepAlive: keep, MaxRequests: 100})
	}
	deadline := time.Now().Add(3 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("goroutines: %d before, %d after", before, runtime.NumGoroutine())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestNoGenerationHeader(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	res := run(t, Options{URL: srv.URL, Clients: 2, KeepAlive: true, MaxRequests: 10})
	if res.OK != 10 || res.ByGeneration[""] != 10 {
		t.Fatalf("%v %v", res, res.ByGeneration)
	}
}

func TestDuration(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	start := time.Now()
	res := run(t, Options{URL: srv.URL, Clients: 4, KeepAlive: true, Duration: 300 * time.Millisecond})
	if took := time.Since(start); took > 1300*time.Millisecond {
		t.Errorf("Run took %v for Duration 300ms", took)
	}
	if res.Requests == 0 || res.Failures != 0 {
		t.Errorf("%v %v", res, res.Samples)
	}
}

// slowServer answers after d, or gives up when the client goes away.
func slowServer(d time.Duration) *httptest.Server {
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
		}
	}))
}

// Requests in flight when the run ends are not counted at all.
func TestEndOfRunIsNotAFailure(t *testing.T) {
	srv := slowServer(10 * time.Second)
	defer srv.Close()
	for _, keep := range []bool{true, false} {
		start := time.Now()
		res := run(t, Options{URL: srv.URL, Clients: 4, KeepAlive: keep, Duration: 200 * time.Millisecond, Timeout: 20 * time.Second})
		if took := time.Since(start); took > 1200*time.Millisecond {
			t.Errorf("Run took %v for Duration 200ms", took)
		}
		if res.Requests != 0 || res.Failures != 0 {
			t.Errorf("keepalive=%v: in-flight requests counted: %v %v", keep, res, res.Samples)
		}

		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		res, err := Run(ctx, Options{URL: srv.URL, Clients: 4, KeepAlive: keep, Timeout: 20 * time.Second})
		cancel()
		if err != nil || res.Requests != 0 {
			t.Errorf("keepalive=%v: ctx end counted: %v %v", keep, res, err)
		}
	}
}

// A server that hijacks and closes every other request without answering
// must show up as failures: POST is not silently retried, neither on a
// reused connection nor on a fresh one.
func TestNoSilentRetry(t *testing.T) {
	for _, keep := range []bool{true, false} {
		t.Run(fmt.Sprintf("keepalive=%v", keep), func(t *testing.T) {
			var seen, dropped atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if seen.Add(1)%2 == 0 {
					dropped.Add(1)
					c, _, err := http.NewResponseController(w).Hijack()
					if err != nil {
						panic(err)
					}
					c.Close()
					return
				}
				io.WriteString(w, "ok")
			}))
			defer srv.Close()
			const n = 200
			res := run(t, Options{URL: srv.URL, Clients: 4, KeepAlive: keep, MaxRequests: n, Duration: time.Minute})
			if res.Requests != n || seen.Load() != n {
				t.Errorf("client finished %d requests, server saw %d, want %d each", res.Requests, seen.Load(), n)
			}
			if res.Failures != dropped.Load() || res.OK != n-dropped.Load() {
				t.Errorf("server dropped %d, client counted %d failures and %d OK", dropped.Load(), res.Failures, res.OK)
			}
			if res.ByKind[KindEOF]+res.ByKind[KindReset] != res.Failures || res.Failures == 0 {
				t.Errorf("want only eof/reset failures: %v %v", res, res.Samples)
			}
		})
	}
}

// The reason for POST: with GET the Transport replays requests that broke on
// a reused connection, so the server sees more requests than the client
// counts, and failures vanish.
func TestGETIsRetried(t *testing.T) {
	var seen atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen.Add(1)%2 == 0 {
			c, _, _ := http.NewResponseController(w).Hijack()
			c.Close()
		}
	}))
	defer srv.Close()
	res := run(t, Options{URL: srv.URL, Method: http.MethodGet, Clients: 4, KeepAlive: true, MaxRequests: 200})
	if seen.Load() <= res.Requests {
		t.Errorf("GET: server saw %d requests, client %d: expected hidden retries", seen.Load(), res.Requests)
	}
}

func TestStatus(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "draining", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	res := run(t, Options{URL: srv.URL, Clients: 2, KeepAlive: true, MaxRequests: 20})
	if res.Requests != 20 || res.OK != 0 || res.ByKind[KindStatus] != 20 {
		t.Fatalf("%v %v", res, res.Samples)
	}
	if len(res.Samples) == 0 || res.Samples[0] != "status: 503 Service Unavailable" {
		t.Errorf("samples %q", res.Samples)
	}
}

func TestRedirectIsNotFollowed(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://192.0.2.1/", http.StatusFound)
	}))
	defer srv.Close()
	res := run(t, Options{URL: srv.URL, Clients: 1, MaxRequests: 3})
	if res.ByKind[KindStatus] != 3 {
		t.Fatalf("%v %v", res, res.Samples)
	}
}

func TestConnect(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	for _, keep := range []bool{true, false} {
		res := run(t, Options{URL: "http://" + addr + "/", Clients: 2, KeepAlive: keep, MaxRequests: 20})
		if res.Requests != 20 || res.ByKind[KindConnect] != 20 {
			t.Fatalf("%v %v", res, res.Samples)
		}
	}
}

func TestTimeout(t *testing.T) {
	srv := slowServer(5 * time.Second)
	defer srv.Close()
	start := time.Now()
	res := run(t, Options{URL: srv.URL, Clients: 2, KeepAlive: true, MaxRequests: 4, Timeout: 100 * time.Millisecond})
	if res.Requests != 4 || res.ByKind[KindTimeout] != 4 {
		t.Fatalf("%v %v", res, res.Samples)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %v", took)
	}
}

// A timeout while reading the body is a timeout too.
func TestTimeoutInBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "abc")
		http.NewResponseController(w).Flush()
		<-r.Context().Done()
	}))
	defer srv.Close()
	res := run(t, Options{URL: srv.URL, Clients: 2, KeepAlive: true, MaxRequests: 4, Timeout: 100 * time.Millisecond})
	if res.Requests != 4 || res.ByKind[KindTimeout] != 4 {
		t.Fatalf("%v %v", res, res.Samples)
	}
}

// A Content-Length longer than the body, then close: a failure, not OK.
func TestShortBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n" + GenerationHeader + ": 1\r\n\r\nshort")
		buf.Flush()
		c.Close()
	}))
	defer srv.Close()
	for _, keep := range []bool{true, false} {
		res := run(t, Options{URL: srv.URL, Clients: 2, KeepAlive: keep, MaxRequests: 10})
		if res.Requests != 10 || res.OK != 0 || res.ByKind[KindEOF] != 10 || len(res.ByGeneration) != 0 {
			t.Fatalf("%v %v %v", res, res.ByGeneration, res.Samples)
		}
	}
}

func TestStartSnapshotStop(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(GenerationHeader, "3")
	}))
	defer srv.Close()
	r, err := Start(context.Background(), Options{URL: srv.URL, Clients: 4, KeepAlive: true, Duration: time.Minute, Pause: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 20 {
				s := r.Snapshot()
				if s.Requests != s.OK+s.Failures {
					t.Errorf("inconsistent snapshot %v", s)
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	if s := r.Snapshot(); s.Requests == 0 || s.Elapsed <= 0 {
		t.Errorf("snapshot while running: %v", s)
	}
	start := time.Now()
	res := r.Stop()
	if took := time.Since(start); took > time.Second {
		t.Errorf("Stop took %v", took)
	}
	if res.Requests == 0 || res.Failures != 0 || res.ByGeneration["3"] != res.OK {
		t.Errorf("%v %v", res, res.Samples)
	}
	if again := r.Stop(); again.Requests != res.Requests || again.Elapsed != res.Elapsed {
		t.Errorf("second Stop %v != %v", again, res)
	}
	if s := r.Snapshot(); s.Requests != res.Requests {
		t.Errorf("Snapshot after Stop %v != %v", s, res)
	}
	select {
	case <-r.Done():
	default:
		t.Error("Done not closed after Stop")
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []Options{
		{},
		{URL: "127.0.0.1:80"},
		{URL: "ftp://127.0.0.1/"},
		{URL: "http:///path"},
		{URL: "http://127.0.0.1/", Clients: -1},
		{URL: "http://127.0.0.1/", Duration: -time.Second},
		{URL: "http://127.0.0.1/", Method: "BAD METHOD"},
	} {
		if _, err := Run(context.Background(), o); err == nil {
			t.Errorf("%+v: no error", o)
		}
		if _, err := Start(context.Background(), o); err == nil {
			t.Errorf("%+v: Start: no error", o)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		err  error
		want Kind
	}{
		{&net.OpError{Op: "dial", Err: errors.New("x")}, KindConnect},
		{fmt.Errorf("read: %w", io.ErrUnexpectedEOF), KindEOF},
		{errors.New("http: server closed idle connection"), KindEOF},
		{errors.New("write: broken pipe"), KindReset},
		{context.DeadlineExceeded, KindTimeout},
		{errors.New("malformed HTTP response"), KindOther},
	} {
		if got := classify(c.err); got != c.want {
			t.Errorf("classify(%v) = %s, want %s", c.err, got, c.want)
		}
	}
}

func TestHistogram(t *testing.T) {
	var h histogram
	if h.quantile(0.5) != 0 {
		t.Fatal("empty histogram")
	}
	for v := range uint64(1 << 20) {
		if v > 0 && bucketOf(v) < bucketOf(v-1) {
			t.Fatalf("buckets not monotonic at %d", v)
		}
	}
	vals := make([]time.Duration, 100000)
	for i := range vals {
		vals[i] = time.Duration(rand.Int64N(int64(50 * time.Millisecond)))
		h.add(vals[i])
	}
	var split [2]histogram
	for i, v := range vals {
		split[i%2].add(v)
	}
	split[0].merge(&split[1])
	for _, q := range []float64{0.5, 0.99} {
		want := float64(q) * float64(50*time.Millisecond)
		for _, hh := range []*histogram{&h, &split[0]} {
			got := float64(hh.quantile(q))
			if got < want*0.97 || got > want*1.03 {
				t.Errorf("q%.2f = %v, want about %v", q, time.Duration(got), time.Duration(want))
			}
		}
	}
	// Exact for tiny values, clamped for huge ones.
	var s histogram
	s.add(5)
	if s.quantile(1) != 5 {
		t.Errorf("small: %v", s.quantile(1))
	}
	s.add(1000 * time.Hour)
	if got := s.quantile(1); got < 70*time.Minute || got > 75*time.Minute {
		t.Errorf("clamped: %v", got)
	}
}
