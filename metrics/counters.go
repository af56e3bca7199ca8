package metrics

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Counters counts an app's HTTP work with atomics only, so the hot path costs
// a few uncontended atomic operations per request. The zero value is ready.
type Counters struct {
	// Latency, when set before Handler is used, observes each request's
	// duration in seconds.
	Latency prometheus.Observer

	inflight atomic.Int64
	conns    atomic.Int64
	requests atomic.Uint64
	closing  atomic.Bool
}

// Snapshot is a consistent-enough read of the counters.
type Snapshot struct {
	Inflight    int64
	Connections int64
	Requests    uint64
}

// Snapshot returns the current values.
func (c *Counters) Snapshot() Snapshot {
	return Snapshot{
		Inflight:    c.inflight.Load(),
		Connections: c.conns.Load(),
		Requests:    c.requests.Load(),
	}
}

// SetClosing makes every response from now on carry "Connection: close", so
// keep-alive clients leave after their current request instead of being cut
// off while idle.
func (c *Counters) SetClosing() { c.closing.Store(true) }

// Handler counts requests in flight and in total around h. Once SetClosing
// was called, every response whose header is not yet written says
// "Connection: close", including those of requests already in flight.
func (c *Counters) Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		c.requests.Add(1)
		c.inflight.Add(1)
		defer c.done(start)
		cw := closeWriters.Get().(*closeWriter)
		*cw = closeWriter{ResponseWriter: w, c: c}
		defer putCloseWriter(cw)
		h.ServeHTTP(cw, r)
		if !cw.wroteHeader {
			cw.markClose() // the server writes the header after h returns
		}
	})
}

func (c *Counters) done(start time.Time) {
	c.inflight.Add(-1)
	if c.Latency != nil {
		c.Latency.Observe(time.Since(start).Seconds())
	}
}

// NewLatency is the request-duration histogram the library reports; the
// coordinator adds the generation label.
func NewLatency() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "rollover_request_duration_seconds",
		Help:    "Time to serve a request, from the handler's start to its return.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	})
}

// Listener counts the connections ln accepts until each is closed, hijacked
// ones included. onAccept, when non-nil, sees every accepted connection.
func (c *Counters) Listener(ln net.Listener, onAccept func(net.Conn)) *Listener {
	return &Listener{Listener: ln, c: c, onAccept: onAccept}
}

// Listener is a net.Listener whose connections are counted.
type Listener struct {
	net.Listener
	c        *Counters
	onAccept func(net.Conn)
}

// NetListener returns the wrapped listener, for socket options.
func (l *Listener) NetListener() net.Listener { return l.Listener }

// Accept accepts and counts a connection.
func (l *Listener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.c.conns.Add(1)
	if l.onAccept != nil {
		l.onAccept(conn)
	}
	// Keep *net.TCPConn's methods (ReadFrom for sendfile, CloseWrite) visible.
	if tc, ok := conn.(*net.TCPConn); ok {
		return &tcpConn{TCPConn: tc, c: l.c}, nil
	}
	return &countedConn{Conn: conn, c: l.c}, nil
}

type tcpConn struct {
	*net.TCPConn
	c    *Counters
	once sync.Once
}

func (t *tcpConn) Close() error {
	t.once.Do(func() { t.c.conns.Add(-1) })
	return t.TCPConn.Close()
}

type countedConn struct {
	net.Conn
	c    *Counters
	once sync.Once
}

func (t *countedConn) Close() error {
	t.once.Do(func() { t.c.conns.Add(-1) })
	return t.Conn.Close()
}

// closeWriters saves an allocation per request on the hot path. A handler
// must not use its ResponseWriter after returning (net/http's rule too).
var closeWriters = sync.Pool{New: func() any { return new(closeWriter) }}

func putCloseWriter(cw *closeWriter) {
	*cw = closeWriter{}
	closeWriters.Put(cw)
}

// closeWriter decides on "Connection: close" when the header is written, not
// when the request arrived: a request in flight when the drain starts must
// still send its client away, or the client keeps the connection and holds
// the old generation until the drain timeout.
type closeWriter struct {
	http.ResponseWriter
	c           *Counters
	wroteHeader bool
}

func (w *closeWriter) markClose() {
	if w.c.closing.Load() {
		w.ResponseWriter.Header().Set("Connection", "close")
	}
}

func (w *closeWriter) WriteHeader(code int) {
	if !w.wroteHeader && code >= 200 {
		w.wroteHeader = true
		w.markClose()
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *closeWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

// ReadFrom keeps sendfile for handlers that io.Copy a file.
func (w *closeWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return io.Copy(w.ResponseWriter, r)
}

// Flush and Hijack keep the interfaces that handlers type-assert for.
func (w *closeWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *closeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// Unwrap lets http.ResponseController reach the server's writer.
func (w *closeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
