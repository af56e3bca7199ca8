package rollover

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
)

// handler counts requests around h. Once the agent drains, every response
// whose header is not yet written says "Connection: close", including those
// of requests already in flight, so keep-alive clients leave after their
// current request instead of being cut off while idle.
func (a *agent) handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := a.counter.StartRequest()
		defer a.counter.EndRequest(start)
		cw := closeWriters.Get().(*closeWriter)
		*cw = closeWriter{ResponseWriter: w, closing: &a.closing}
		defer putCloseWriter(cw)
		h.ServeHTTP(cw, r)
		if !cw.wroteHeader {
			cw.markClose() // the server writes the header after h returns
		}
	})
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
	closing     *atomic.Bool
	wroteHeader bool
}

func (w *closeWriter) markClose() {
	if w.closing.Load() {
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
