package rollover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"reflect"
	"strconv"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/reuse"
)

// Listen opens a listener that shares its port with the other generations
// (SO_REUSEPORT, MPTCP off). Its connections are counted, and the
// coordinator steers and hands it over.
func Listen(ctx context.Context, network, address string) (net.Listener, error) {
	a, err := std()
	if err != nil {
		return nil, err
	}
	return a.listen(ctx, network, address)
}

// Ready tells the coordinator that this generation serves. Serve calls it;
// apps that serve raw TCP or gRPC on a listener from Listen call it once they
// accept. Without a coordinator it does nothing.
func Ready() error {
	a, err := std()
	if err != nil {
		return err
	}
	return a.ready()
}

// Draining is closed once this generation has handed its listeners over:
// a drain was ordered (by the coordinator; standalone, by SIGTERM or SIGINT
// while Serve runs; by the cancellation of Serve's context; or when no new
// coordinator adopted an orphaned generation in time), the grace has
// passed, every accept queue is empty and every listener's socket is
// closed. No new connection arrives after it, so an app stops taking new
// work and finishes what it has: gRPC's GracefulStop, a close frame (1001,
// going away) to each WebSocket, the end of a raw accept loop. A bake
// (the coordinator's release) does not close it: the generation may be
// asked to take the port back.
//
// Serve needs none of this: from the moment the drain is ordered, its
// HTTP/1.x responses say Connection: close and its HTTP/2 connections get
// GOAWAY, and it returns once its connections are done. Whatever is still
// open at the drain deadline is closed and reported as forced.
//
// If the library could not start (a ROLLOVER_* variable it cannot read, a
// coordinator that is unreachable or refused this generation), nothing
// will ever be drained, so the channel never closes: Listen, Serve, ServeTLS
// and Ready return that error, and the first call of Draining says it on
// stderr. A refusal comes back from Ready, Serve and ServeTLS only (Listen
// does not wait for the coordinator's answer) and is said on stderr when it
// arrives. An app that waits on Draining checks the errors of its Listen
// and its Ready.
func Draining() <-chan struct{} {
	a, err := std()
	if err != nil {
		return neverDraining(err)
	}
	return a.draining
}

// Generation is this process's generation number, 0 when standalone.
func Generation() int {
	n, _ := strconv.Atoi(os.Getenv(EnvGeneration))
	return n
}

// ListenAndServe serves handler on addr until the generation is drained.
func ListenAndServe(addr string, handler http.Handler) error {
	ln, err := Listen(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	return Serve(context.Background(), srv, ln)
}

// Serve serves srv on ln, reports ready, and returns nil after a graceful
// drain: the listener is handed over, every HTTP/1.x response says
// Connection: close and every HTTP/2 connection gets GOAWAY, the
// connections finish (bounded by the drain timeout), and only then is srv
// shut down. Canceling ctx drains too. Standalone, SIGTERM and SIGINT
// drain.
//
// With srv.TLSConfig set (with a certificate), Serve serves TLS on a
// listener from Listen, with ALPN h2 and http/1.1 as srv.ServeTLS does. A
// listener that the app wrapped itself around one from Listen
// (tls.NewListener) is served as it is: its socket underneath is still
// steered, handed over and counted once.
//
// HTTP/2 (TLS h2, h2c through srv.Protocols, and h2c through an x/net
// h2c.NewHandler given as srv.Handler) is served by the library, unless
// the app set srv.TLSNextProto itself.
//
// Serve changes srv: it replaces srv.Handler with the library's handler
// around it (around http.DefaultServeMux when srv.Handler is nil), which
// counts the requests and says Connection: close during a drain, and it
// sets srv.TLSNextProto when that is nil. Set srv.Handler before Serve,
// and do not serve srv again elsewhere: a second Serve of the same srv
// would count its requests twice.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	a, err := std()
	if err != nil {
		return err
	}
	return a.serve(ctx, srv, ln, nil)
}

// ServeTLS is Serve with TLS from certFile and keyFile, as
// http.Server.ServeTLS: they may be empty when srv.TLSConfig holds the
// certificate.
func ServeTLS(ctx context.Context, srv *http.Server, ln net.Listener, certFile, keyFile string) error {
	a, err := std()
	if err != nil {
		return err
	}
	return a.serve(ctx, srv, ln, &[2]string{certFile, keyFile})
}

func (a *agent) listen(ctx context.Context, network, address string) (net.Listener, error) {
	ln, err := reuse.Listen(ctx, network, address)
	if err != nil {
		return nil, err
	}
	l, _ := a.register(ln, network)
	return l, nil
}

// serve serves srv on ln; files, when set, are ServeTLS's certificate and
// key.
func (a *agent) serve(ctx context.Context, srv *http.Server, ln net.Listener, files *[2]string) error {
	l, wrapped := a.register(ln, "tcp")
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	counted := a.handler(h)
	srv.Handler = counted
	if reflect.TypeOf(h) == h2cHandlerType {
		srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !a.serveH2C(w, r, counted) {
				counted.ServeHTTP(w, r)
			}
		})
	}
	a.installH2(srv)
	if files == nil && !wrapped && srv.TLSConfig != nil &&
		(len(srv.TLSConfig.Certificates) > 0 || srv.TLSConfig.GetCertificate != nil || srv.TLSConfig.GetConfigForClient != nil) {
		files = &[2]string{}
	}

	// Serve owns the goroutine that runs srv and returns only after it.
	served := make(chan error, 1)
	go func() {
		if files != nil {
			served <- srv.ServeTLS(l, files[0], files[1])
			return
		}
		served <- srv.Serve(l)
	}()
	if err := a.ready(); err != nil {
		_ = srv.Close()
		<-served
		return fmt.Errorf("rollover: ready: %w", err)
	}

	var sig chan os.Signal
	if !a.supervised() {
		sig = make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		defer signal.Stop(sig)
	}
	select {
	case <-a.ordered:
	case <-ctx.Done():
		a.drain(drainOrder{})
	case <-sig:
		a.drain(drainOrder{})
	case err := <-served:
		if !isClosed(a.ordered) {
			return err
		}
		served <- err // for the wait below
	}
	<-a.draining
	a.awaitConnections()
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	// The hand-over closed the sockets; Shutdown closes the listeners for
	// the app, which ends srv.Serve's Accept.
	err := srv.Shutdown(sctx)
	_ = srv.Close()
	<-served
	if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, net.ErrClosed) {
		return err
	}
	a.done()
	return nil
}
