package rollover

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// handler counts requests around h: in flight, in total, their final
// responses by status class, and handler panics (recovered, counted and
// re-panicked, so that net/http behaves as without the library;
// http.ErrAbortHandler is not a panic). Once the agent drains or is
// released, every HTTP/1.x response whose header is not yet written says
// "Connection: close", including those of requests already in flight, so
// keep-alive clients leave after their current request instead of being
// cut off while idle. HTTP/2 connections get GOAWAY instead (see h2.go).
// A hijacked connection (a WebSocket) stops being a request in flight at
// the hijack; it is counted as a connection until it closes.
func (a *agent) handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := closeWriters.Get().(*closeWriter)
		*cw = closeWriter{ResponseWriter: w, a: a, h2: r.ProtoMajor == 2}
		cw.start = a.counter.StartRequest()
		defer a.finish(cw)
		h.ServeHTTP(cw, r)
		cw.returned = true
	})
}

// finish ends the request that cw answered. A deferred call of its own, so
// that recover sees a panic.
func (a *agent) finish(cw *closeWriter) {
	var p any
	if !cw.returned {
		p = recover() // nil for runtime.Goexit
		if p != nil && p != http.ErrAbortHandler {
			a.counter.Panic()
		}
	}
	switch {
	case p != nil:
		// No response of its own: net/http aborts the connection.
	case cw.hijacked:
		a.counter.Response(http.StatusSwitchingProtocols)
	case !cw.wroteHeader:
		cw.markClose() // the server writes the header after h returns
		a.counter.Response(http.StatusOK)
	default:
		a.counter.Response(cw.status)
	}
	if !cw.ended {
		a.counter.EndRequest(cw.start)
	}
	if hr := a.health.Load(); hr != nil {
		a.checkHealth(hr)
	}
	putCloseWriter(cw)
	if p != nil {
		panic(p)
	}
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
// the old generation until the drain timeout. It records the final status.
type closeWriter struct {
	http.ResponseWriter
	a           *agent
	start       time.Time
	h2          bool // an HTTP/2 stream: GOAWAY moves its client, not a header
	ended       bool // no longer in flight: hijacked
	wroteHeader bool
	hijacked    bool
	returned    bool // the handler returned (did not panic)
	status      int
}

func (w *closeWriter) markClose() {
	// HTTP/2 has no Connection header; net/http and x/net turn a
	// "Connection: close" there into a GOAWAY that races the client's next
	// stream. h2.go sends a safe one.
	if !w.h2 && w.a.closing.Load() {
		w.ResponseWriter.Header().Set("Connection", "close")
	}
}

func (w *closeWriter) WriteHeader(code int) {
	if !w.wroteHeader && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.wroteHeader = true
		w.status = code
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
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil && !w.hijacked {
		// From now on a connection (counted until it closes), no longer a
		// request in flight, even while the handler runs it (WebSockets).
		w.hijacked, w.ended = true, true
		w.a.counter.EndRequest(w.start)
	}
	return c, rw, err
}

// Unwrap lets http.ResponseController reach the server's writer.
func (w *closeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
