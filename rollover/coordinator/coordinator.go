package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rollover-sh/rollover/metrics"
	"github.com/rollover-sh/rollover/reuse"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// Defaults for a zero Config.
var (
	DefaultReadyTimeout = 30 * time.Second
	DefaultDrainTimeout = 30 * time.Second
	DefaultDrainGrace   = time.Second
	DefaultKillGrace    = 5 * time.Second
	// DefaultBake keeps the old generation ready to take the port back
	// for 5s: long enough to see a new generation crash on its first
	// requests or answer 5xx under real traffic, short enough that `next`
	// and `systemctl reload` stay quick.
	DefaultBake = 5 * time.Second
	// The default health rule: at least 20 responses, of which 10% or more
	// are 5xx or panics, fail a bake.
	DefaultHealthMinRequests   uint64 = 20
	DefaultHealthMaxErrorRatio        = 0.1
	// MaxRestartDelay bounds the backoff between restarts of a crashing
	// active generation.
	MaxRestartDelay = 30 * time.Second
)

// Errors callers can test with errors.Is.
var (
	ErrUsage      = errors.New("usage")
	ErrCommand    = errors.New("bad command")
	ErrInProgress = errors.New("rollover in progress")
	ErrStale      = errors.New("refused")
	ErrRollover   = errors.New("rollover failed")
	ErrStopping   = errors.New("coordinator is stopping")
	ErrSocket     = errors.New("control socket")
	// ErrForced: Run stopped, but some generation had to be killed (a
	// drain past its timeout, or Force): work in flight may have been cut.
	ErrForced = errors.New("forced")
)

// Config configures a coordinator. A zero duration takes its Default
// (DrainGrace excepted: 0 is a valid grace on loopback).
type Config struct {
	Argv         []string      // generation 1's command line
	Socket       string        // control socket path
	ReadyTimeout time.Duration // spawn to ready
	DrainTimeout time.Duration // drain start to exit, then SIGTERM
	DrainGrace   time.Duration // the old generation keeps accepting this long after the steer
	KillGrace    time.Duration // SIGTERM to SIGKILL
	AdoptWait    time.Duration // at start, wait this long for a crashed predecessor's generations
	// AdoptTimeout is how long generations keep serving after this
	// coordinator dies, waiting for a new one to adopt them (0: the
	// library's default, 30s).
	AdoptTimeout time.Duration
	Log          *slog.Logger

	// How generation 1 (and, unless a rollover says otherwise, its
	// successors) reports ready and drains; see Launch.
	Ready       string
	Addr        string
	DrainSignal syscall.Signal

	// Bake is how long the old generation keeps its listener, steered
	// away, after a rollover, so that the rollover can be rolled back at
	// once if the new generation exits or fails its health (0: no bake;
	// the CLI's default is DefaultBake). HealthMinRequests and
	// HealthMaxErrorRatio are the health rule (0: the defaults); HealthURL,
	// when set, is probed through the port during the bake.
	Bake                time.Duration
	HealthMinRequests   uint64
	HealthMaxErrorRatio float64
	HealthURL           string

	// Notify, when set, receives sd_notify messages ("READY=1\nSTATUS=…")
	// for the service manager: ready, reloading around a rollover, stopping.
	Notify func(msg string)
}

// Coordinator spawns generations and rolls them over. At most one rollover
// runs at a time. One goroutine (loop) owns all state, in a machine that
// changes only by events (see machine.go).
type Coordinator struct {
	cfg     Config
	launch  Launch // generation 1's
	log     *slog.Logger
	ln      *net.UnixListener
	metrics *metrics.Coordinator
	m       *machine // owned by loop

	events   chan event
	quit     chan struct{} // ends the owner loop
	dead     chan struct{} // owner loop gone
	stopCh   chan struct{} // stop requested
	stopOnce sync.Once
	stopped  chan struct{} // every generation gone; stopErr set before
	stopErr  error         // what the stop cost (ErrForced), for `rollover stop`
	cmdID    atomic.Uint64
	clis     atomic.Int32  // CLI requests being served
	cliLeft  chan struct{} // a CLI request ended
}

// New validates cfg and opens the control socket.
func New(cfg Config) (*Coordinator, error) {
	launch := Launch{Argv: cfg.Argv, Ready: cfg.Ready, Addr: cfg.Addr, DrainSignal: cfg.DrainSignal}.withDefaults(Launch{})
	if err := launch.check(); err != nil {
		return nil, err
	}
	if cfg.Socket == "" {
		return nil, fmt.Errorf("%w: no socket path", ErrUsage)
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = DefaultReadyTimeout
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.DrainGrace < 0 {
		cfg.DrainGrace = 0
	}
	if cfg.KillGrace <= 0 {
		cfg.KillGrace = DefaultKillGrace
	}
	if cfg.Bake < 0 {
		cfg.Bake = 0
	}
	if cfg.HealthMinRequests == 0 {
		cfg.HealthMinRequests = DefaultHealthMinRequests
	}
	if cfg.HealthMaxErrorRatio <= 0 {
		cfg.HealthMaxErrorRatio = DefaultHealthMaxErrorRatio
	}
	if cfg.AdoptWait <= 0 {
		cfg.AdoptWait = DefaultAdoptWait
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	ln, err := listenControl(cfg.Socket)
	if err != nil {
		return nil, err
	}
	c := &Coordinator{
		cfg:     cfg,
		launch:  launch,
		log:     cfg.Log,
		ln:      ln,
		events:  make(chan event),
		quit:    make(chan struct{}),
		dead:    make(chan struct{}),
		stopCh:  make(chan struct{}),
		stopped: make(chan struct{}),
		cliLeft: make(chan struct{}, 1),
	}
	c.metrics = metrics.NewCoordinator(c.sample)
	sp := &spawner{socket: cfg.Socket, adoptTimeout: cfg.AdoptTimeout, killGrace: cfg.KillGrace, log: cfg.Log, exited: c.exited}
	c.m = newMachine(launch, effects{
		log:          cfg.Log,
		metrics:      c.metrics,
		now:          time.Now,
		spawn:        sp.spawn,
		order:        c.order,
		kill:         func(g *gen) { g.kill(cfg.KillGrace) },
		signal:       func(g *gen, sig syscall.Signal) { g.signal(sig) },
		after:        func(d time.Duration, ev event) { time.AfterFunc(d, func() { c.post(ev) }) },
		save:         c.save,
		restart:      c.restart,
		notify:       c.notify,
		drainTimeout: cfg.DrainTimeout,
	})
	return c, nil
}

// Metrics is the coordinator's Prometheus collector.
func (c *Coordinator) Metrics() *metrics.Coordinator { return c.metrics }

// post hands ev to the owner loop. It reports false when the loop is gone.
func (c *Coordinator) post(ev event) bool {
	select {
	case c.events <- ev:
		return true
	case <-c.dead:
		return false
	}
}

// ask posts the request that mk builds around a reply channel and waits for
// the answer. It reports false when the owner loop is gone.
func ask[T any](c *Coordinator, mk func(chan T) event) (T, bool) {
	return askWithin(c, mk, nil)
}

// askWithin is ask that gives up if the owner does not take the request
// before timeout fires (nil: never). Scrapes use it, so that they never
// hang on a busy coordinator.
func askWithin[T any](c *Coordinator, mk func(chan T) event, timeout <-chan time.Time) (T, bool) {
	var zero T
	reply := make(chan T, 1)
	select {
	case c.events <- mk(reply):
	case <-c.dead:
		return zero, false
	case <-timeout:
		return zero, false
	}
	select {
	case v := <-reply:
		return v, true
	case <-c.dead:
		return zero, false
	}
}

// done posts a request whose answer is that it ran.
func (c *Coordinator) done(mk func(chan struct{}) event) bool {
	reply := make(chan struct{})
	if !c.post(mk(reply)) {
		return false
	}
	select {
	case <-reply:
		return true
	case <-c.dead:
		return false
	}
}

func (c *Coordinator) loop() {
	defer close(c.dead)
	for {
		select {
		case ev := <-c.events:
			c.m.step(ev)
		case <-c.quit:
			return
		}
	}
}

// Close releases the control socket of a coordinator whose Run was never
// called (Run releases it itself).
func (c *Coordinator) Close() error {
	err := c.ln.Close()
	_ = os.Remove(c.cfg.Socket)
	return err
}

// Stop makes Run drain every generation and return, as canceling its
// context does.
func (c *Coordinator) Stop() { c.requestStop() }

// Force escalates a stop that is under way: the first call sends SIGTERM
// to every generation's process group (SIGKILL after the kill grace), later
// calls SIGKILL at once. It returns how many times the stop was forced.
// Run then returns ErrForced.
func (c *Coordinator) Force() int {
	c.requestStop()
	n, _ := ask(c, func(r chan int) event { return evForce{reply: r} })
	return n
}

// Run starts generation 1, serves the control socket and rolls over on
// request until ctx is done, Stop is called or `stop` arrives; then it
// drains every generation and returns nil, or an error wrapping ErrForced
// when a generation had to be killed on the way (see Force). It fails if
// generation 1 never gets ready.
func (c *Coordinator) Run(ctx context.Context) error {
	defer c.ln.Close()
	defer os.Remove(c.cfg.Socket)
	go c.accept()
	go c.loop()
	// Canceling ctx also stops a start that still waits for generation 1.
	stopOnCancel := context.AfterFunc(ctx, c.requestStop)
	defer stopOnCancel()
	defer func() {
		c.done(func(r chan struct{}) event { return evForget{reply: r} })
		close(c.stopped)
		c.awaitCLIs(2 * time.Second) // let `stop` and `next --wait` clients read their results
		close(c.quit)
		<-c.dead
	}()

	if !c.adopt() {
		if _, err := c.tryRollover(rolloverReq{}, nil); err != nil {
			serr := c.shutdown()
			if errors.Is(err, ErrStopping) {
				return serr // stopped (ctx, `stop`) before generation 1 was ready
			}
			return err
		}
	}
	v, _ := ask(c, func(r chan view) event { return qView{reply: r} })
	c.reportSteering(v)
	c.notify(fmt.Sprintf("READY=1\nSTATUS=active generation %d (pid %d)", v.active, v.activePID))
	select {
	case <-ctx.Done():
	case <-c.stopCh:
	}
	return c.shutdown()
}

func (c *Coordinator) cliStarted() { c.clis.Add(1) }

func (c *Coordinator) cliDone() {
	c.clis.Add(-1)
	select {
	case c.cliLeft <- struct{}{}:
	default:
	}
}

// awaitCLIs waits, at most d, until no CLI request is being served.
func (c *Coordinator) awaitCLIs(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	for c.clis.Load() > 0 {
		select {
		case <-c.cliLeft:
		case <-t.C:
			return
		}
	}
}

// notify sends msg to the service manager, when there is one.
func (c *Coordinator) notify(msg string) {
	if c.cfg.Notify != nil {
		c.cfg.Notify(msg)
	}
}

// reportSteering says at start-up how hand-overs will work, with one warning
// line when neither steering nor the kernel's migration can protect them.
func (c *Coordinator) reportSteering(v view) {
	mr, err := reuse.MigrateReq()
	switch {
	case v.steerable:
		c.log.Info("hand-over: BPF steering", "tcp_migrate_req", mr)
	case err == nil && mr:
		c.log.Info("hand-over: generation cannot be steered; relying on tcp_migrate_req=1", "reason", v.steerErr)
	default:
		c.log.Warn("hand-over unprotected: the generation cannot be steered and net.ipv4.tcp_migrate_req is 0, so connections queued on an old listener may be reset; enable it (deploy/sysctl/90-rollover.conf)", "reason", v.steerErr)
	}
}

// Reload rolls over to the active command line again (SIGHUP, SIGUSR2).
func (c *Coordinator) Reload() {
	go func() {
		if _, err := c.tryRollover(rolloverReq{}, nil); err != nil {
			c.log.Error("reload failed", "err", err)
		}
	}()
}

// requestStop makes Run return after draining.
func (c *Coordinator) requestStop() {
	c.stopOnce.Do(func() { close(c.stopCh) })
}

// shutdown drains every generation (a rollover past activation finishes its
// hand-over first) and waits until they are gone.
func (c *Coordinator) shutdown() error {
	c.requestStop()
	c.notify("STOPPING=1\nSTATUS=stopping: draining every generation")
	n, _ := ask(c, func(r chan int) event { return evStop{reply: r} })
	what := fmt.Sprintf("%d generations", n)
	if n == 1 {
		what = "1 generation"
	}
	c.log.Info(fmt.Sprintf("draining %s (max %v; Ctrl-C again to force)", what, c.cfg.DrainTimeout), "generations", n, "drain_timeout", c.cfg.DrainTimeout)
	select {
	case <-c.m.idle:
	case <-c.dead:
	}
	if v, _ := ask(c, func(r chan view) event { return qView{reply: r} }); v.forced {
		c.log.Warn("stopped: every generation is gone, some of them killed")
		c.stopErr = fmt.Errorf("%w: some generation was killed before it finished draining", ErrForced)
		return c.stopErr
	}
	c.log.Info("stopped: every generation drained")
	return nil
}

func (c *Coordinator) status() wire.Status {
	st, _ := ask(c, func(r chan wire.Status) event { return qStatus{reply: r} })
	st.PID, st.Socket = os.Getpid(), c.cfg.Socket
	if st.Generations == nil {
		st.Generations = []wire.GenStatus{}
	}
	if mr, err := reuse.MigrateReq(); err == nil {
		st.MigrateReq = &mr
	}
	return st
}

// Gatherer is what /metrics serves: own (the coordinator's registry) plus
// every live generation's own metrics, labelled with its generation.
func (c *Coordinator) Gatherer(own prometheus.Gatherer) prometheus.Gatherer {
	return c.metrics.Gatherer(own, c.metricSources)
}

func (c *Coordinator) metricSources() []metrics.Source {
	gens, ok := askWithin(c, func(r chan []*gen) event { return qConnected{reply: r} }, time.After(time.Second))
	if !ok {
		return nil
	}
	srcs := make([]metrics.Source, 0, len(gens))
	for _, g := range gens {
		srcs = append(srcs, metrics.Source{Generation: g.n, Fetch: func(ctx context.Context) (string, error) {
			timeout := metrics.DefaultFetchTimeout
			if d, ok := ctx.Deadline(); ok {
				timeout = time.Until(d)
			}
			a, err := c.ask(g, wire.Msg{Type: wire.TypeMetrics}, timeout)
			return a.Metrics, err
		}})
	}
	return srcs
}

// sample feeds the metrics collector; it gives up rather than block a scrape.
func (c *Coordinator) sample() (metrics.Sample, bool) {
	s, ok := askWithin(c, func(r chan metrics.Sample) event { return qSample{reply: r} }, time.After(time.Second))
	if mr, err := reuse.MigrateReq(); err == nil {
		s.MigrateReq = &mr
	}
	return s, ok
}
