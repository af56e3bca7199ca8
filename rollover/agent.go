package rollover

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/rollover-sh/rollover/metrics"
	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// Environment variables the coordinator sets for each generation.
const (
	EnvSocket     = "ROLLOVER_SOCKET"
	EnvGeneration = "ROLLOVER_GENERATION"
	EnvSecret     = "ROLLOVER_SECRET"
	// EnvAdoptTimeout is how long a generation that lost its coordinator
	// keeps serving while it waits to be adopted by a new one (default
	// DefaultAdoptTimeout); after that it drains and exits.
	EnvAdoptTimeout = "ROLLOVER_ADOPT_TIMEOUT"
	// EnvHandover=naive turns the zero-drop hand-over off: no steering, the
	// listener is closed at once and the server shut down at once. It exists
	// only to show what the hand-over prevents (make bench, tests).
	EnvHandover = "ROLLOVER_HANDOVER"
)

// Defaults for a drain that no coordinator parameterised (standalone mode).
var (
	DefaultDrainTimeout = 30 * time.Second
	// DefaultQueueDrain bounds the wait for a listener's accept queue to empty.
	DefaultQueueDrain = time.Second
	// DefaultAdoptTimeout: see EnvAdoptTimeout.
	DefaultAdoptTimeout = 30 * time.Second
	// helloTimeout bounds the wait for the coordinator's welcome.
	helloTimeout = 5 * time.Second
	// probeTimeout bounds the wait for a steering probe to be accepted.
	probeTimeout = time.Second
)

// ErrRefused is returned when the coordinator refuses this process's hello.
var ErrRefused = errors.New("rollover: coordinator refused this generation")

// drainOrder is what a drain was asked to do.
type drainOrder struct {
	grace   time.Duration
	timeout time.Duration
}

// agent is this process's link to its coordinator. There is one per process
// because the coordinator sees a generation as a process.
type agent struct {
	gen        int
	naive      bool
	supervised bool // started by a coordinator
	path       string
	wmu        sync.Mutex
	conn       net.Conn // under wmu; nil when standalone or orphaned
	counter    metrics.Counters
	own        *prometheus.Registry // the library's own metrics

	mu        sync.Mutex
	listeners []*metrics.Listener
	probes    map[string]chan struct{} // probe client address → accepted
	accepted  map[string]bool          // accepted while probing, before the probe registered
	probing   atomic.Int32

	readyOnce sync.Once
	readyErr  error
	readyMsg  wire.Msg // what ready reported, for a hello to a new coordinator

	drainOnce sync.Once
	draining  chan struct{} // closed when a drain starts
	order     drainOrder    // set before draining is closed
	closed    chan struct{} // closed once every listener is closed
	doneOnce  sync.Once
	finished  atomic.Bool
}

var (
	stdOnce sync.Once
	std     *agent
	stdErr  error
)

// get returns the process's agent, connecting to the coordinator on first use.
func get() (*agent, error) {
	stdOnce.Do(func() { std, stdErr = newAgent() })
	return std, stdErr
}

func newAgent() (*agent, error) {
	a := &agent{
		probes:   map[string]chan struct{}{},
		accepted: map[string]bool{},
		draining: make(chan struct{}),
		closed:   make(chan struct{}),
		naive:    os.Getenv(EnvHandover) == "naive",
		own:      prometheus.NewRegistry(),
	}
	latency := metrics.NewLatency()
	a.own.MustRegister(latency)
	a.counter.Latency = latency
	path := os.Getenv(EnvSocket)
	if path == "" {
		return a, nil
	}
	gen, err := strconv.Atoi(os.Getenv(EnvGeneration))
	if err != nil || gen <= 0 {
		return nil, fmt.Errorf("rollover: %s=%q is not a generation number", EnvGeneration, os.Getenv(EnvGeneration))
	}
	a.gen, a.path, a.supervised = gen, path, true
	// Our stdout and stderr are pipes to the coordinator. If it dies, a
	// write there must fail rather than kill us with SIGPIPE: a coordinator
	// crash must cost no request.
	signal.Ignore(syscall.SIGPIPE)
	conn, r, err := a.hello(wire.Msg{})
	if err != nil {
		return nil, err
	}
	a.setConn(conn)
	go a.readLoop(conn, r)
	go a.statsLoop()
	return a, nil
}

// hello connects to the coordinator and introduces this generation; extra
// carries the adoption fields.
func (a *agent) hello(extra wire.Msg) (net.Conn, *wire.Reader, error) {
	conn, err := net.DialTimeout("unix", a.path, helloTimeout)
	if err != nil {
		return nil, nil, fmt.Errorf("rollover: connect to coordinator: %w", err)
	}
	r := wire.NewReader(conn)
	_ = conn.SetDeadline(time.Now().Add(helloTimeout))
	hello := extra
	hello.Type, hello.Generation, hello.PID, hello.Secret = wire.TypeHello, a.gen, os.Getpid(), os.Getenv(EnvSecret)
	if _, err := conn.Write(wire.Encode(hello)); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("rollover: hello: %w", err)
	}
	m, err := r.Read()
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("rollover: hello: %w", err)
	}
	if m.Type != wire.TypeWelcome || m.Error != "" {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: %s", ErrRefused, m.Error)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, r, nil
}

func (a *agent) setConn(c net.Conn) {
	a.wmu.Lock()
	a.conn = c
	a.wmu.Unlock()
}

func (a *agent) send(m wire.Msg) error {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if a.conn == nil {
		return nil
	}
	_ = a.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := a.conn.Write(wire.Encode(m))
	return err
}

func (a *agent) stats() *wire.Stats {
	s := a.counter.Snapshot()
	return &wire.Stats{Inflight: s.Inflight, Connections: s.Connections, Requests: s.Requests}
}

func (a *agent) statsLoop() {
	t := time.NewTicker(wire.StatsInterval)
	defer t.Stop()
	for range t.C {
		if a.finished.Load() {
			return
		}
		_ = a.send(wire.Msg{Type: wire.TypeStats, Stats: a.stats()})
	}
}

func (a *agent) readLoop(conn net.Conn, r *wire.Reader) {
	for {
		m, err := r.Read()
		if err != nil {
			conn.Close()
			a.wmu.Lock()
			if a.conn == conn {
				a.conn = nil
			}
			a.wmu.Unlock()
			if !a.finished.Load() {
				go a.orphaned(err)
			}
			return
		}
		switch m.Type {
		case wire.TypeSteer:
			go a.ack(m.ID, a.steer())
		case wire.TypePin:
			go a.ack(m.ID, a.pin())
		case wire.TypeMetrics:
			go a.answerMetrics(m.ID)
		case wire.TypeDrain:
			a.ack(m.ID, nil)
			a.drain(drainOrder{
				grace:   time.Duration(m.GraceMS) * time.Millisecond,
				timeout: time.Duration(m.TimeoutMS) * time.Millisecond,
			})
		}
	}
}

// orphaned keeps serving while it waits for a new coordinator to adopt this
// generation; past the adoption timeout, nobody will hand the port over, so
// it drains and exits rather than serve unsupervised.
func (a *agent) orphaned(cause error) {
	window := DefaultAdoptTimeout
	if d, err := time.ParseDuration(os.Getenv(EnvAdoptTimeout)); err == nil && d >= 0 {
		window = d
	}
	fmt.Fprintf(os.Stderr, "rollover: lost the coordinator (%v); serving on, waiting up to %v to be adopted\n", cause, window)
	deadline := time.Now().Add(window)
	for time.Now().Before(deadline) && !a.finished.Load() {
		a.mu.Lock()
		hello := a.readyMsg
		a.mu.Unlock()
		wasReady := hello.Type != ""
		hello.Type, hello.Adopt, hello.State = "", true, "starting"
		select {
		case <-a.draining:
			hello.State = "draining"
		default:
			if wasReady {
				hello.State = "ready"
			}
		}
		if conn, r, err := a.hello(hello); err == nil {
			fmt.Fprintf(os.Stderr, "rollover: adopted by a new coordinator\n")
			a.setConn(conn)
			go a.readLoop(conn, r)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !a.finished.Load() {
		fmt.Fprintf(os.Stderr, "rollover: not adopted within %v; draining\n", window)
		a.drain(drainOrder{timeout: DefaultDrainTimeout})
	}
}

func (a *agent) ack(id uint64, err error) {
	m := wire.Msg{Type: wire.TypeAck, ID: id, OK: err == nil}
	if err != nil {
		m.Error = err.Error()
	}
	_ = a.send(m)
}

// appRegistry holds the app's own collectors; see Registry.
var appRegistry = prometheus.NewRegistry()

// Registry is where an app registers its own Prometheus collectors. The
// coordinator's /metrics includes them for every live generation, with a
// generation label added, so one scrape target shows all generations.
// Metric names that clash with the coordinator's own are dropped there.
func Registry() *prometheus.Registry { return appRegistry }

// answerMetrics sends the library's and the app's metrics in the text format.
func (a *agent) answerMetrics(id uint64) {
	mfs, err := prometheus.Gatherers{a.own, appRegistry}.Gather()
	var buf bytes.Buffer
	for _, mf := range mfs {
		if _, werr := expfmt.MetricFamilyToText(&buf, mf); werr != nil && err == nil {
			err = werr
		}
	}
	m := wire.Msg{Type: wire.TypeAck, ID: id, OK: true, Metrics: buf.String()}
	if err != nil && len(mfs) == 0 {
		m.OK, m.Error, m.Metrics = false, err.Error(), ""
	} else if err != nil {
		fmt.Fprintf(os.Stderr, "rollover: gathering metrics: %v\n", err)
	}
	_ = a.send(m)
}

// register adds a listener to the set that is steered and handed over.
func (a *agent) register(ln net.Listener) *metrics.Listener {
	if l, ok := ln.(*metrics.Listener); ok {
		return l
	}
	l := a.counter.Listener(ln, a.onAccept)
	a.mu.Lock()
	a.listeners = append(a.listeners, l)
	a.mu.Unlock()
	return l
}

func (a *agent) snapshotListeners() []*metrics.Listener {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]*metrics.Listener(nil), a.listeners...)
}

// ready pins the reuseport groups to the active generation (index 0; this
// process when it is alone) and tells the coordinator it serves.
func (a *agent) ready() error {
	a.readyOnce.Do(func() {
		m := wire.Msg{Type: wire.TypeReady, Steerable: true}
		lns := a.snapshotListeners()
		if a.naive {
			lns = nil
			m.Steerable, m.SteerError = false, EnvHandover+"=naive"
		}
		if len(lns) == 0 && !a.naive {
			m.Steerable, m.SteerError = false, "no listener from rollover.Listen or rollover.Serve"
		}
		for _, l := range lns {
			m.Addrs = append(m.Addrs, l.Addr().String())
			if !a.supervised {
				continue // standalone: nothing to hand over to
			}
			if err := reuse.Steer(l, 0); err != nil && m.Steerable {
				m.Steerable, m.SteerError = false, err.Error()
			}
		}
		a.mu.Lock()
		a.readyMsg = m
		a.mu.Unlock()
		a.readyErr = a.send(m)
	})
	return a.readyErr
}

func (a *agent) pin() error {
	for _, l := range a.snapshotListeners() {
		if err := reuse.Steer(l, 0); err != nil {
			return err
		}
	}
	return nil
}

// steer makes every listener's group send new connections to this process
// (index 1, behind the old generation at 0) and proves it with a probe
// connection per listener.
func (a *agent) steer() error {
	for _, l := range a.snapshotListeners() {
		if err := reuse.Steer(l, 1); err != nil {
			return err
		}
		if err := a.probe(l); err != nil {
			return err
		}
	}
	return nil
}

func (a *agent) onAccept(c net.Conn) {
	if a.probing.Load() == 0 {
		return
	}
	key := c.RemoteAddr().String()
	a.mu.Lock()
	defer a.mu.Unlock()
	if ch := a.probes[key]; ch != nil {
		close(ch)
		delete(a.probes, key)
		return
	}
	// Loopback accepts can beat the prober to registering its address.
	a.accepted[key] = true
}

// probe dials the listener and waits until this process accepted that very
// connection.
func (a *agent) probe(l *metrics.Listener) error {
	addr, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return fmt.Errorf("rollover: steer verify: %s is not a TCP address", l.Addr())
	}
	target := *addr
	if target.IP.IsUnspecified() {
		if target.IP.To4() != nil {
			target.IP = net.IPv4(127, 0, 0, 1)
		} else {
			target.IP = net.IPv6loopback
		}
	}
	a.probing.Add(1)
	defer a.probing.Add(-1)
	d := net.Dialer{Timeout: probeTimeout}
	c, err := d.Dial("tcp", target.String())
	if err != nil {
		return fmt.Errorf("rollover: steer verify: %w", err)
	}
	defer c.Close()
	ch := make(chan struct{})
	key := c.LocalAddr().String()
	a.mu.Lock()
	if a.accepted[key] {
		close(ch)
	} else {
		a.probes[key] = ch
	}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.probes, key)
		clear(a.accepted)
		a.mu.Unlock()
	}()
	select {
	case <-ch:
		return nil
	case <-time.After(probeTimeout):
		return fmt.Errorf("rollover: steer verify: probe to %s was not accepted by this generation within %v", target.String(), probeTimeout)
	}
}

// drain starts the hand-over once: answer with Connection: close from now
// on, keep accepting for the grace (clients whose handshake the old program
// still routed here), wait for the accept queues to empty, then close.
func (a *agent) drain(o drainOrder) {
	a.drainOnce.Do(func() {
		if o.timeout <= 0 {
			o.timeout = DefaultDrainTimeout
		}
		a.order = o
		a.counter.SetClosing()
		close(a.draining)
		go a.handOver(o)
	})
}

func (a *agent) handOver(o drainOrder) {
	if a.naive {
		for _, l := range a.snapshotListeners() {
			l.Close()
		}
		close(a.closed)
		_ = a.send(wire.Msg{Type: wire.TypeClosed})
		return
	}
	if o.grace > 0 {
		time.Sleep(o.grace)
	}
	for _, l := range a.snapshotListeners() {
		ctx, cancel := context.WithTimeout(context.Background(), DefaultQueueDrain)
		if err := reuse.DrainQueue(ctx, l, time.Millisecond); err != nil && !errors.Is(err, errors.ErrUnsupported) {
			fmt.Fprintf(os.Stderr, "rollover: %v\n", err)
		}
		cancel()
		l.Close()
	}
	close(a.closed)
	_ = a.send(wire.Msg{Type: wire.TypeClosed})
}

// done reports the final counters; the process exits right after.
func (a *agent) done() {
	a.doneOnce.Do(func() {
		a.finished.Store(true)
		_ = a.send(wire.Msg{Type: wire.TypeDone, Stats: a.stats()})
	})
}
