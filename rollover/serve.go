package rollover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
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

// Draining is closed when this generation is told to drain: by the
// coordinator, or, standalone, by SIGTERM or SIGINT while Serve runs. By then
// the listeners are being handed over; an app that serves its own protocol
// stops accepting and finishes its connections.
func Draining() <-chan struct{} {
	a, err := std()
	if err != nil {
		// Never closed: an agent that failed to start never drains.
		return make(chan struct{})
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
// drain: the listener is handed over, every response says Connection: close,
// the connections finish (bounded by the drain timeout), and only then is
// srv shut down. Canceling ctx drains too. Standalone, SIGTERM and SIGINT
// drain.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	a, err := std()
	if err != nil {
		return err
	}
	return a.serve(ctx, srv, ln)
}

func (a *agent) listen(ctx context.Context, network, address string) (net.Listener, error) {
	ln, err := reuse.Listen(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return a.register(ln), nil
}

func (a *agent) serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	l := a.register(ln)
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	srv.Handler = a.handler(h)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	if err := a.ready(); err != nil {
		_ = srv.Close()
		return fmt.Errorf("rollover: ready: %w", err)
	}

	var sig chan os.Signal
	if !a.supervised() {
		sig = make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		defer signal.Stop(sig)
	}
	select {
	case <-a.draining:
	case <-ctx.Done():
		a.drain(drainOrder{})
	case <-sig:
		a.drain(drainOrder{})
	case err := <-served:
		select {
		case <-a.draining:
		default:
			return err
		}
	}
	<-a.closed
	a.awaitConnections()
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	// The hand-over closed the listeners; Shutdown closes them again if
	// srv.Serve has not yet returned from Accept, and says so (net.ErrClosed).
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, net.ErrClosed) {
		return err
	}
	_ = srv.Close()
	a.done()
	return nil
}
