package rollover

import (
	"bytes"
	"errors"
	"fmt"
	"io"
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
	// EnvInstance is set, to 0..N-1, in each process of a generation of
	// several (rollover start --instances N), and EnvInstances to N. The
	// coordinator then steers the generation's sockets itself: the library
	// attaches no program.
	EnvInstance  = "ROLLOVER_INSTANCE"
	EnvInstances = "ROLLOVER_INSTANCES"
)

// envHandover=naive turns the zero-drop hand-over off: no steering, the
// listener is closed at once and the server shut down at once. It is no
// API: it exists only to show what the hand-over prevents (cmd/demoapp
// -naive for make bench, and tests), which set the variable by its string.
const envHandover = "ROLLOVER_HANDOVER"

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

// ErrRefused is returned when the coordinator refuses this process's hello:
// by Ready and Serve (Listen does not wait for the coordinator's answer).
var ErrRefused = errors.New("rollover: coordinator refused this generation")

// drainOrder is what a drain was asked to do.
type drainOrder struct {
	grace   time.Duration
	timeout time.Duration // 0: the agent's drain timeout
}

// config is what an agent is made of: the coordinator's environment for the
// default agent (envConfig), or a test's own values.
type config struct {
	socket     string // the coordinator's control socket; empty runs standalone
	generation int
	secret     string
	naive      bool // envHandover=naive
	instance   bool // EnvInstance is set: the coordinator steers
	// adoptTimeout: see EnvAdoptTimeout; 0 drains as soon as the
	// coordinator is lost.
	adoptTimeout time.Duration
	// drainTimeout bounds a drain that no coordinator parameterised; 0 means
	// DefaultDrainTimeout at the time of the drain.
	drainTimeout time.Duration
}

// envConfig reads the variables the coordinator sets for a generation. A
// variable that is set but wrong is an error that names it: the generation
// must not run on a setting it did not understand.
func envConfig() (config, error) {
	c := config{
		socket:       os.Getenv(EnvSocket),
		secret:       os.Getenv(EnvSecret),
		adoptTimeout: DefaultAdoptTimeout,
		instance:     os.Getenv(EnvInstance) != "",
	}
	switch v := os.Getenv(envHandover); v {
	case "":
	case "naive":
		c.naive = true
	default:
		return config{}, fmt.Errorf("rollover: %s=%q: want naive or nothing", envHandover, v)
	}
	if v := os.Getenv(EnvAdoptTimeout); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return config{}, fmt.Errorf("rollover: %s=%q is not a duration of 0 or more (such as 30s)", EnvAdoptTimeout, v)
		}
		c.adoptTimeout = d
	}
	if c.socket == "" {
		return c, nil
	}
	gen, err := strconv.Atoi(os.Getenv(EnvGeneration))
	if err != nil || gen <= 0 {
		return config{}, fmt.Errorf("rollover: %s=%q is not a generation number", EnvGeneration, os.Getenv(EnvGeneration))
	}
	c.generation = gen
	return c, nil
}

// std is the agent behind the package-level functions, made from the
// environment on first use. The coordinator sees a generation as a process,
// so a process that it started links it through this one agent.
var std = sync.OnceValues(envAgent)

// stderr is where the library says what the app should know; a test seam.
var stderr io.Writer = os.Stderr

// drainingFailed says once that Draining cannot fire.
var drainingFailed sync.Once

// neverDraining is Draining's channel when the agent failed: it never
// closes, and the first call says why on stderr.
func neverDraining(err error) <-chan struct{} {
	drainingFailed.Do(func() {
		fmt.Fprintf(stderr, "rollover: Draining will never close: %v\n", err)
	})
	return make(chan struct{})
}

func envAgent() (*agent, error) {
	cfg, err := envConfig()
	if err != nil {
		return nil, err
	}
	return newAgent(cfg)
}

// agent links an app's listeners and server to its coordinator: it counts
// their work, steers their reuseport groups and hands them over on a drain.
type agent struct {
	cfg     config
	wmu     sync.Mutex
	conn    net.Conn // under wmu; nil when standalone or orphaned
	counter metrics.Counters
	own     *prometheus.Registry // the library's own metrics

	mu        sync.Mutex
	listeners []*listener
	probes    map[string]probeWait // probe client address → its listener and wake-up
	early     map[string]*listener // accepted while probing, before the probe registered
	probing   atomic.Int32

	packets     []*packetConn // UDP sockets from ListenPacket, under mu
	packetProbe packetProbe   // the steering probe datagram awaited, under mu
	answered    broadcast     // fired on each reply once UDP reads stopped

	connMu sync.Mutex
	open   map[io.Closer]struct{} // every counted connection not yet closed

	readyOnce sync.Once
	readyErr  error
	readyMsg  wire.Msg // what ready reported, for a hello to a new coordinator

	// health is the rule of a bake or canary step (nil: none); unhealthy
	// says the counters broke it when last checked.
	health    atomic.Pointer[wire.Health]
	unhealthy atomic.Bool

	released atomic.Bool // the bake: keep-alive stops, the listeners stay

	drainOnce sync.Once
	leftOnce  sync.Once     // leave
	ordered   chan struct{} // closed when a drain is ordered
	order     drainOrder    // set before ordered is closed
	closing   atomic.Bool   // responses say Connection: close (a release or a drain)
	idle      broadcast     // fired when the last connection closes while closing
	draining  chan struct{} // Draining: closed once every listener is handed over
	cut       chan struct{} // closed once the drain deadline has passed (see deadline)

	forcedConns atomic.Int64 // cut at the drain deadline
	forcedReqs  atomic.Int64

	h2mu    sync.Mutex
	h2conns map[*h2Conn]struct{} // HTTP/2 connections being served

	doneOnce sync.Once
	finished chan struct{} // closed once the final counters are reported

	// report asks statsLoop to report the counters now (a health
	// crossing), not at the next tick.
	report chan struct{}
	// wg holds every goroutine the agent starts; done waits for them. Each
	// is started by the agent's own goroutines or before done, never
	// after it.
	wg sync.WaitGroup

	helloSent  chan struct{} // closed once the first hello was sent, or failed (nil: standalone)
	welcomed   chan struct{} // closed once it was answered (nil: standalone)
	welcomeErr error         // its refusal or failure; set before welcomed is closed
}

// newAgent makes an agent; with a socket, it connects to the coordinator
// and says hello first.
func newAgent(cfg config) (*agent, error) {
	a := &agent{
		cfg:      cfg,
		probes:   map[string]probeWait{},
		early:    map[string]*listener{},
		open:     map[io.Closer]struct{}{},
		h2conns:  map[*h2Conn]struct{}{},
		ordered:  make(chan struct{}),
		draining: make(chan struct{}),
		cut:      make(chan struct{}),
		finished: make(chan struct{}),
		report:   make(chan struct{}, 1),
		own:      prometheus.NewRegistry(),
	}
	latency := metrics.NewLatency()
	a.own.MustRegister(latency)
	a.counter.Latency = latency
	if !a.supervised() {
		return a, nil
	}
	// Our stdout and stderr are pipes to the coordinator. If it dies, a
	// write there must fail rather than kill us with SIGPIPE: a coordinator
	// crash must cost no request.
	signal.Ignore(syscall.SIGPIPE)
	conn, err := a.dial()
	if err != nil {
		return nil, err
	}
	// The hello is sent and its welcome read on the side (a process's
	// first JSON encoding alone takes 0.3ms): the app listens meanwhile.
	// Its ready follows the hello on the wire, and the coordinator reads
	// it only once it welcomed the hello. A refusal comes back from ready.
	a.helloSent, a.welcomed = make(chan struct{}), make(chan struct{})
	a.wg.Go(func() { a.introduce(conn) })
	return a, nil
}

// introduce sends the first hello on conn and reads its welcome; welcomed,
// it reports stats and serves the coordinator's commands.
func (a *agent) introduce(conn net.Conn) {
	r, err := a.sayHello(conn, wire.Msg{})
	if err == nil && !a.setConn(conn) { // what is sent from now on follows the hello
		conn.Close()
		err = errors.New("rollover: hello: the generation is done")
	}
	close(a.helloSent)
	if err == nil {
		err = awaitWelcome(conn, r) // done, closing conn, ends it
	}
	a.welcomeErr = err
	if err != nil {
		a.setConn(nil)
		neverDraining(err) // said now: Listen has not waited for it
	}
	close(a.welcomed)
	if err == nil {
		a.wg.Go(a.statsLoop)
		a.readLoop(conn, r)
	}
}

// welcome waits for the coordinator's answer to the first hello and
// returns its refusal, if any.
func (a *agent) welcome() error {
	if a.welcomed == nil {
		return nil // standalone
	}
	<-a.welcomed // bounded by helloTimeout
	return a.welcomeErr
}

// supervised reports whether a coordinator started this generation.
func (a *agent) supervised() bool { return a.cfg.socket != "" }

func (a *agent) isFinished() bool {
	select {
	case <-a.finished:
		return true
	default:
		return false
	}
}

func (a *agent) drainTimeout() time.Duration {
	if a.cfg.drainTimeout > 0 {
		return a.cfg.drainTimeout
	}
	return DefaultDrainTimeout
}

// hello connects to the coordinator, introduces this generation and waits
// for its welcome; extra carries the adoption fields.
func (a *agent) hello(extra wire.Msg) (net.Conn, *wire.Reader, error) {
	conn, err := a.dial()
	if err != nil {
		return nil, nil, err
	}
	r, err := a.sayHello(conn, extra)
	if err == nil {
		err = awaitWelcome(conn, r)
	}
	if err != nil {
		return nil, nil, err
	}
	return conn, r, nil
}

// dial connects to the coordinator's control socket.
func (a *agent) dial() (net.Conn, error) {
	conn, err := net.DialTimeout("unix", a.cfg.socket, helloTimeout)
	if err != nil {
		return nil, fmt.Errorf("rollover: connect to coordinator: %w", err)
	}
	return conn, nil
}

// sayHello introduces this generation on conn; on an error, it closes conn.
func (a *agent) sayHello(conn net.Conn, extra wire.Msg) (*wire.Reader, error) {
	hello := extra
	hello.Type, hello.Generation, hello.PID, hello.Secret = wire.TypeHello, a.cfg.generation, os.Getpid(), a.cfg.secret
	_ = conn.SetWriteDeadline(time.Now().Add(helloTimeout))
	if _, err := conn.Write(wire.Encode(hello)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("rollover: hello: %w", err)
	}
	return wire.NewReader(conn), nil
}

// awaitWelcome reads the coordinator's answer to the hello; on a refusal
// or an error, it closes conn.
func awaitWelcome(conn net.Conn, r *wire.Reader) error {
	_ = conn.SetReadDeadline(time.Now().Add(helloTimeout))
	m, err := r.Read()
	if err != nil {
		conn.Close()
		return fmt.Errorf("rollover: hello: %w", err)
	}
	if m.Type != wire.TypeWelcome || m.Error != "" {
		conn.Close()
		return fmt.Errorf("%w: %s", ErrRefused, m.Error)
	}
	_ = conn.SetReadDeadline(time.Time{})
	return nil
}

// setConn makes c the connection to the coordinator. Once the agent is
// done it refuses, and reports false: done has closed the last one.
func (a *agent) setConn(c net.Conn) bool {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if a.isFinished() {
		return false
	}
	a.conn = c
	return true
}

// send writes m to the coordinator, after the first hello: what the app
// does before the hello is on the wire (its ready, a listener closed at
// once, its end) waits for it rather than being dropped.
func (a *agent) send(m wire.Msg) error {
	if a.helloSent != nil {
		<-a.helloSent // bounded by helloTimeout
	}
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
	s := a.statsValue()
	return &s
}

// statsValue is the counters as the protocol reports them.
func (a *agent) statsValue() wire.Stats {
	s := a.counter.Snapshot()
	s.ForcedConnections, s.ForcedRequests = a.forcedConns.Load(), a.forcedReqs.Load()
	return s
}

func (a *agent) statsLoop() {
	t := time.NewTicker(wire.StatsInterval)
	defer t.Stop()
	for {
		select {
		case <-a.finished:
			return
		case <-t.C:
		case <-a.report:
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
			if !a.isFinished() {
				a.wg.Go(func() { a.orphaned(err) })
			}
			return
		}
		switch m.Type {
		case wire.TypeSteer:
			err := a.steer(m.Weight, m.Health)
			a.wg.Go(func() { a.ack(m.ID, err) })
		case wire.TypePin:
			err := a.pin()
			a.wg.Go(func() { a.ack(m.ID, err) })
		case wire.TypeRelease:
			// In order, before the next command: a resume must find the
			// release done.
			a.ack(m.ID, a.release())
		case wire.TypeResume:
			a.ack(m.ID, a.resume())
		case wire.TypeMetrics:
			a.wg.Go(func() { a.answerMetrics(m.ID) })
		case wire.TypeDrain:
			a.ack(m.ID, nil)
			a.drain(drainOrder{
				grace:   time.Duration(m.GraceMS) * time.Millisecond,
				timeout: time.Duration(m.TimeoutMS) * time.Millisecond,
			})
		}
	}
}

// adoptRetry is how often a generation that lost its coordinator asks the
// socket again to be adopted.
const adoptRetry = 200 * time.Millisecond

// orphaned keeps serving while it waits for a new coordinator to adopt this
// generation; past the adoption timeout, nobody will hand the port over, so
// it drains and exits rather than serve unsupervised.
func (a *agent) orphaned(cause error) {
	window := a.cfg.adoptTimeout
	fmt.Fprintf(os.Stderr, "rollover: lost the coordinator (%v); serving on, waiting up to %v to be adopted\n", cause, window)
	if window > 0 && a.awaitAdoption(window) {
		return
	}
	if !a.isFinished() {
		fmt.Fprintf(os.Stderr, "rollover: not adopted within %v; draining\n", window)
		a.drain(drainOrder{})
	}
}

// awaitAdoption asks to be adopted every adoptRetry. It reports whether it
// stopped before the window ended: adopted, or the agent is done.
func (a *agent) awaitAdoption(window time.Duration) bool {
	expired := time.NewTimer(window)
	defer expired.Stop()
	retry := time.NewTicker(adoptRetry)
	defer retry.Stop()
	for {
		if a.rejoin() {
			fmt.Fprintf(os.Stderr, "rollover: adopted by a new coordinator\n")
			return true
		}
		select {
		case <-a.finished:
			return true
		case <-expired.C:
			return false
		case <-retry.C:
		}
	}
}

// rejoin asks the coordinator's socket once to adopt this generation, saying
// where it stands, and reports whether a coordinator did.
func (a *agent) rejoin() bool {
	a.mu.Lock()
	hello := a.readyMsg
	a.mu.Unlock()
	wasReady := hello.Type != ""
	hello.Type, hello.Adopt, hello.State = "", true, "starting"
	select {
	case <-a.ordered:
		hello.State = "draining"
	default:
		if wasReady {
			hello.State = "ready"
		}
	}
	conn, r, err := a.hello(hello)
	if err != nil {
		return false
	}
	if !a.setConn(conn) {
		conn.Close() // done meanwhile: nothing is left to adopt
		return true
	}
	a.wg.Go(func() { a.readLoop(conn, r) })
	return true
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

// done reports the final counters once, closes the connection to the
// coordinator and ends the agent's own goroutines, and returns once they
// have all exited; the process exits right after.
func (a *agent) done() {
	a.doneOnce.Do(func() {
		a.wmu.Lock()
		close(a.finished)
		a.wmu.Unlock()
		if isClosed(a.ordered) {
			// The process ends: UDP sockets still open for replies close
			// now, and closed comes before done on the wire.
			for _, p := range a.snapshotPackets() {
				_ = p.closeSocket()
			}
			a.leave()
		}
		_ = a.send(wire.Msg{Type: wire.TypeDone, Stats: a.stats()})
		a.wmu.Lock()
		if a.conn != nil {
			a.conn.Close() // ends readLoop
			a.conn = nil
		}
		a.wmu.Unlock()
	})
	a.wg.Wait()
}
