// Command protoapp is the app of the protocol matrix (tests/protocol_test.go):
// the patterns of the README's "Serving TLS, HTTP/2, gRPC and WebSockets",
// one per -mode, each as an app would write it against the library's
// documented API.
//
//	http      rollover.Serve, HTTP/1.1
//	tls       rollover.Serve with srv.TLSConfig: HTTPS, ALPN h2 and http/1.1
//	tls-wrap  tls.NewListener(rollover.Listen(...)) given to rollover.Serve
//	h2c       rollover.Serve, h2c through http.Server.Protocols
//	h2c-xnet  rollover.Serve, h2c through golang.org/x/net/http2/h2c
//	grpc      grpc.Server on rollover.Listen, GracefulStop on Draining
//	ws        rollover.Serve with WebSockets (coder/websocket) that get a
//	          close frame 1001 (going away) on Draining
//
// Every HTTP mode answers any method on / with "ok" and the header
// X-Rollover-Generation, and on /slow?d=DURATION after d. gRPC serves the
// standard health service and sends x-rollover-generation in its header
// metadata. WebSockets on /ws echo every message, prefixed with the
// generation.
//lint:file-ignore SA1019 the x/net h2c pattern that apps still use is what -mode h2c-xnet tests

package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/rollover-sh/rollover/rollover"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	flag.String("version", "v1", "version (ignored: the generation tells generations apart)")
	mode := flag.String("mode", "http", "http, tls, tls-wrap, h2c, h2c-xnet, grpc or ws")
	cert := flag.String("cert", "", "TLS certificate file (tls, tls-wrap)")
	key := flag.String("key", "", "TLS key file (tls, tls-wrap)")
	flag.Parse()
	if err := run(*mode, *addr, *cert, *key); err != nil {
		fmt.Fprintf(os.Stderr, "protoapp: %v\n", err)
		os.Exit(1)
	}
}

func run(mode, addr, certFile, keyFile string) error {
	ctx := context.Background()
	switch mode {
	case "grpc":
		return serveGRPC(addr)
	case "http", "tls", "tls-wrap", "h2c", "h2c-xnet", "ws":
	default:
		return fmt.Errorf("unknown -mode %q", mode)
	}
	ln, err := rollover.Listen(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler(), ReadHeaderTimeout: 10 * time.Second}
	switch mode {
	case "tls", "tls-wrap":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return err
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
		if mode == "tls" {
			srv.TLSConfig = cfg // rollover.Serve serves TLS, ALPN h2 and http/1.1
			break
		}
		cfg.NextProtos = []string{"h2", "http/1.1"}
		ln = tls.NewListener(ln, cfg)
	case "h2c":
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
	case "h2c-xnet":
		srv.Handler = h2c.NewHandler(srv.Handler, &http2.Server{})
	case "ws":
		srv.Handler = wsHandler(srv.Handler)
	}
	return rollover.Serve(ctx, srv, ln)
}

func handler() http.Handler {
	gen := strconv.Itoa(rollover.Generation())
	answer := func(w http.ResponseWriter) {
		w.Header().Set("X-Rollover-Generation", gen)
		_, _ = w.Write([]byte("ok\n"))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { answer(w) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 || d > time.Minute {
			http.Error(w, "d must be a duration up to 1m", http.StatusBadRequest)
			return
		}
		time.Sleep(d) // a slow handler that does not watch the drain
		answer(w)
	})
	return mux
}

// wsHandler serves WebSockets on /ws and everything else with next. On
// Draining every socket gets a close frame 1001 (going away), and a socket
// that opens after it gets one at once: its client reconnects, to the new
// generation.
func wsHandler(next http.Handler) http.Handler {
	gen := strconv.Itoa(rollover.Generation())
	mux := http.NewServeMux()
	mux.Handle("/", next)
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			select {
			case <-rollover.Draining():
				_ = c.Close(websocket.StatusGoingAway, "generation "+gen+" drains")
			case <-ctx.Done():
			}
		}()
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil {
				return
			}
			if err := c.Write(ctx, typ, append([]byte(gen+" "), msg...)); err != nil {
				return
			}
		}
	})
	return mux
}

// serveGRPC is the README's gRPC pattern: a canonical main, with
// GracefulStop on Draining.
func serveGRPC(addr string) error {
	ln, err := rollover.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	gen := strconv.Itoa(rollover.Generation())
	s := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		_ = grpc.SetHeader(ctx, metadata.Pairs("x-rollover-generation", gen))
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(s, health.NewServer())
	go func() {
		<-rollover.Draining() // the listener is handed over: no new connection comes
		s.GracefulStop()      // GOAWAY, in-flight RPCs finish, then Serve returns
	}()
	if err := rollover.Ready(); err != nil {
		return err
	}
	if err := s.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		log.Fatal(err)
	}
	return nil
}
