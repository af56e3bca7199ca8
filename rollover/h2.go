//lint:file-ignore SA1019 x/net v0.62 deprecates its HTTP/2 server for the one in net/http, which in Go 1.26 has no way to send one connection's GOAWAY without Server.Shutdown (which closes idle HTTP/1.1 connections too); ServeConn on a connection of our own is that way.

package rollover

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// HTTP/2 drain. A drain (or a release) must move HTTP/2 clients to the new
// generation at once, let their streams in flight finish, and leave idle
// HTTP/1.1 connections alone (they keep the Connection: close path), so
// http.Server.Shutdown, which would close those, is no tool here.
//
// Serve therefore serves HTTP/2 itself, through golang.org/x/net/http2, for
// TLS h2, h2c enabled through http.Server.Protocols, and h2c handed to an
// x/net h2c handler: each connection gets its own http2.Server, configured
// on a listener-less http.Server whose Shutdown sends only that
// connection's graceful GOAWAY. And the GOAWAY is sent in two steps, as RFC
// 9113 §6.8 advises: first one with the last stream ID 2^31-1, which tells
// the client to open no new stream there while every stream it has sent
// still counts; then, h2GoAwayDelay (at least a round trip) later, x/net's
// own, with the real last stream ID. A single GOAWAY (x/net's, or the one
// that a "Connection: close" response triggers) races the client's next
// stream, which the client then fails or retries.

// h2GoAwayDelay is the least time between the two GOAWAYs; a drain uses its
// grace when that is longer (the grace covers the clients' round trip).
const h2GoAwayDelay = 100 * time.Millisecond

// goAwayMax is a GOAWAY frame: length 8, type 7, no flags, stream 0; last
// stream ID 2^31-1, error code NO_ERROR.
var goAwayMax = [...]byte{0, 0, 8, 7, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0}

// h2cHandlerType is the type of x/net's h2c handler, which Serve takes over.
var h2cHandlerType = reflect.TypeOf(h2c.NewHandler(http.NotFoundHandler(), nil))

// installH2 makes srv serve HTTP/2 through the agent, unless the app
// configured HTTP/2 itself (srv.TLSNextProto set: with x/net's
// ConfigureServer, or to turn HTTP/2 off) or GODEBUG turned it off.
func (a *agent) installH2(srv *http.Server) {
	if srv.TLSNextProto != nil || strings.Contains(os.Getenv("GODEBUG"), "http2server=0") {
		return
	}
	srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){
		"h2": func(hs *http.Server, c *tls.Conn, h http.Handler) {
			hc := &h2Conn{Conn: c}
			a.serveH2(hs, h2TLSConn{hc, c}, hc, h, false)
		},
		// net/http's key for h2c (http.Protocols.SetUnencryptedHTTP2): the
		// preface is read and the real connection sits behind c.
		"unencrypted_http2": func(hs *http.Server, c *tls.Conn, h http.Handler) {
			u, ok := c.NetConn().(interface{ UnencryptedNetConn() net.Conn })
			if !ok {
				_ = c.Close()
				return
			}
			hc := &h2Conn{Conn: u.UnencryptedNetConn()}
			a.serveH2(hs, hc, hc, h, true)
		},
	}
}

// serveH2 serves one HTTP/2 connection; c is hc, or hc with the TLS state.
func (a *agent) serveH2(hs *http.Server, c net.Conn, hc *h2Conn, h http.Handler, sawPreface bool) {
	ctx := context.Background()
	if bc, ok := h.(interface{ BaseContext() context.Context }); ok {
		ctx = bc.BaseContext() // net/http's per-connection context
	}
	s := &http2.Server{}
	hc.shadow = &http.Server{}
	if err := http2.ConfigureServer(hc.shadow, s); err != nil {
		_ = c.Close()
		return
	}
	hc.served = make(chan struct{})
	a.h2mu.Lock()
	a.h2conns[hc] = struct{}{}
	if a.closing.Load() {
		hc.startGoAway(h2GoAwayDelay)
	}
	a.h2mu.Unlock()
	defer func() {
		a.h2mu.Lock()
		delete(a.h2conns, hc) // no goAway starts after this
		a.h2mu.Unlock()
		close(hc.served)
		hc.goAways.Wait()
	}()
	s.ServeConn(c, &http2.ServeConnOpts{Context: ctx, Handler: h, BaseConfig: hs, SawClientPreface: sawPreface})
}

// goAwayH2 sends every HTTP/2 connection its GOAWAYs, delay apart.
// Connections that start from now on while closing get them too.
func (a *agent) goAwayH2(delay time.Duration) {
	a.h2mu.Lock()
	defer a.h2mu.Unlock()
	for hc := range a.h2conns {
		hc.startGoAway(delay)
	}
}

// serveH2C takes over an h2c request (prior knowledge, or an Upgrade) that
// an x/net h2c handler would serve with a GOAWAY the library cannot send:
// the connection is served as Serve serves h2c, its streams by the same
// handler. It reports whether r was such a request.
func (a *agent) serveH2C(w http.ResponseWriter, r *http.Request, h http.Handler) bool {
	hs, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	if hs == nil {
		return false
	}
	opts := http2.ServeConnOpts{Context: r.Context(), BaseConfig: hs, Handler: h}
	var conn net.Conn
	var rw *bufio.ReadWriter
	var err error
	switch {
	case r.Method == "PRI" && len(r.Header) == 0 && r.URL.Path == "*" && r.Proto == "HTTP/2.0":
		if conn, rw, err = http.NewResponseController(w).Hijack(); err != nil {
			return true
		}
		buf := make([]byte, len("SM\r\n\r\n"))
		if _, err := io.ReadFull(rw, buf); err != nil || string(buf) != "SM\r\n\r\n" {
			_ = conn.Close()
			return true
		}
		opts.SawClientPreface = true
	case headerHasToken(r.Header, "Upgrade", "h2c") && headerHasToken(r.Header, "Connection", "HTTP2-Settings"):
		settings, err := h2cSettings(r.Header)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return true
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return true
		}
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		if conn, rw, err = http.NewResponseController(w).Hijack(); err != nil {
			return true
		}
		_, _ = rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
		opts.UpgradeRequest, opts.Settings = r, settings
	default:
		return false
	}
	if err := rw.Flush(); err != nil {
		_ = conn.Close()
		return true
	}
	hc := &h2Conn{Conn: &bufConn{Conn: conn, r: rw.Reader}}
	defer hc.Close()
	a.serveH2(hs, hc, hc, h, opts.SawClientPreface)
	return true
}

// headerHasToken reports whether a comma-separated header of h holds token.
func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func h2cSettings(h http.Header) ([]byte, error) {
	vals := h.Values("HTTP2-Settings")
	if len(vals) != 1 {
		return nil, errors.New("h2c upgrade: want one HTTP2-Settings header")
	}
	return base64.RawURLEncoding.DecodeString(vals[0])
}

// bufConn reads what the server buffered before the hijack first.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) {
	if c.r != nil {
		if n := c.r.Buffered(); n > 0 {
			return c.r.Read(p[:min(len(p), n)])
		}
		c.r = nil
	}
	return c.Conn.Read(p)
}

// h2Conn is an HTTP/2 server connection that can write a GOAWAY of its own
// between the server's frames. It follows the frames the server writes (a
// 9-byte header, then the payload) so that it writes one only at a frame
// boundary, after the server's first frame (its SETTINGS) and never inside
// a header block (HEADERS or PUSH_PROMISE without END_HEADERS, until the
// CONTINUATION that ends it).
type h2Conn struct {
	net.Conn
	shadow *http.Server // its Shutdown sends x/net's graceful GOAWAY
	// served is closed when serveH2 is done with the connection, which
	// then waits for goAways: a GOAWAY never outlives its connection.
	served  chan struct{}
	goAways sync.WaitGroup // under the agent's h2mu while in h2conns

	mu      sync.Mutex
	hdr     [9]byte
	hn      int // header bytes seen of the current frame
	rem     int // payload bytes left of the current frame
	typ     byte
	flags   byte
	frames  int  // frames written
	block   bool // inside a header block
	pending bool // a GOAWAY waits for the next boundary
	sent    bool
}

// h2TLSConn is an h2Conn over TLS: x/net reads the TLS state through
// ConnectionState.
type h2TLSConn struct {
	*h2Conn
	tc *tls.Conn
}

func (c h2TLSConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }

// boundary reports whether a frame of ours may be written now.
func (c *h2Conn) boundary() bool { return c.frames > 0 && c.hn == 0 && c.rem == 0 && !c.block }

// advance follows the frames in p; with stop, it stops at the first
// boundary. It returns how much of p it went through.
func (c *h2Conn) advance(p []byte, stop bool) int {
	i := 0
	for i < len(p) {
		if stop && c.boundary() {
			return i
		}
		if c.rem > 0 {
			n := min(c.rem, len(p)-i)
			c.rem -= n
			i += n
			if c.rem == 0 {
				c.endFrame()
			}
			continue
		}
		c.hdr[c.hn] = p[i]
		c.hn++
		i++
		if c.hn == len(c.hdr) {
			c.hn = 0
			c.rem = int(c.hdr[0])<<16 | int(c.hdr[1])<<8 | int(c.hdr[2])
			c.typ, c.flags = c.hdr[3], c.hdr[4]
			if c.rem == 0 {
				c.endFrame()
			}
		}
	}
	return i
}

func (c *h2Conn) endFrame() {
	const headers, pushPromise, continuation, endHeaders = 0x1, 0x5, 0x9, 0x4
	c.frames++
	switch c.typ {
	case headers, pushPromise:
		c.block = c.flags&endHeaders == 0
	case continuation:
		if c.flags&endHeaders != 0 {
			c.block = false
		}
	}
}

func (c *h2Conn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.pending {
		c.advance(p, false)
		return c.Conn.Write(p)
	}
	i := c.advance(p, true)
	if !c.boundary() {
		return c.Conn.Write(p)
	}
	n, err := c.Conn.Write(p[:i])
	if err != nil {
		return n, err
	}
	if err := c.writeGoAway(); err != nil {
		return n, err
	}
	if i == len(p) {
		return n, nil
	}
	c.advance(p[i:], false)
	m, err := c.Conn.Write(p[i:])
	return n + m, err
}

func (c *h2Conn) writeGoAway() error {
	c.pending, c.sent = false, true
	_, err := c.Conn.Write(goAwayMax[:])
	return err
}

// startGoAway runs goAway for the connection, which serveH2 waits for. The
// caller holds the agent's h2mu and found c in h2conns.
func (c *h2Conn) startGoAway(delay time.Duration) {
	c.goAways.Go(func() { c.goAway(delay) })
}

// goAway sends the first GOAWAY now or at the next boundary, and x/net's
// graceful one delay later, unless the connection is done by then. Once
// per connection.
func (c *h2Conn) goAway(delay time.Duration) {
	c.mu.Lock()
	if c.sent || c.pending {
		c.mu.Unlock()
		return
	}
	if c.boundary() {
		_ = c.writeGoAway()
	} else {
		c.pending = true
	}
	c.mu.Unlock()
	if sleep(delay, c.served) && c.shadow != nil {
		_ = c.shadow.Shutdown(context.Background())
	}
}
