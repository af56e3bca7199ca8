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
	// ErrForeign: a process that is no generation listens on the port.
	ErrForeign = errors.New("refused")
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
	Instances   int // processes per generation (0: 1)

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

	// AllowForeign lets generations share their port with processes that
	// are no generation (by default a start or rollover that finds one is
	// refused: it would take new connections and never be rolled over).
	AllowForeign bool

	// Notify, when set, receives sd_notify messages ("READY=1\nSTATUS=…")
	// for the service manager: ready, reloading around a rollover, stopping.
	Notify func(msg string)
}

// Coordinator spawns generations and rolls them over. At most one rollover
// runs at a time. One goroutine (loop) owns all state, in a machine that
// changes only by events (see machine.go); each rollover is a rollout
// (rollout.go).
//
// Its lifetime, the oklog/run way: every other goroutine is a task (the
// control socket's acceptor and connections, each rollout, process
// waiters, timers, watchers), and Run returns only once the generations are
// gone and every task has returned; the owner loop goes last.
type Coordinator struct {
	cfg     Config
	launch  Launch // generation 1's
	log     *slog.Logger
	ln      *net.UnixListener
	metrics *metrics.Coordinator
	m       *machine // owned by loop
	tasks   *tasks
	peers   peers // open control connections, closed when Run ends

	events   chan event
	loopQuit chan struct{} // ends the owner loop
	loopDone chan struct{} // the owner loop is gone
	// halt is done once a stop is asked for (Stop, a canceled context,
	// `rollover stop`).
	halt    context.Context
	haltNow context.CancelFunc
	over    chan struct{} // every generation is gone; overErr is set before
	overErr error         // what the stop cost (ErrForced), for `rollover stop`
	cmdID   atomic.Uint64
	clis    atomic.Int32  // CLI requests being served
	cliLeft chan struct{} // a CLI request ended
}

// New validates cfg and opens the control socket.
func New(cfg Config) (*Coordinator, error) {
	launch := Launch{Argv: cfg.Argv, Ready: cfg.Ready, Addr: cfg.Addr, DrainSignal: cfg.DrainSignal, Instances: cfg.Instances}.withDefaults(Launch{})
	if err := launch.check(); err != nil {
		return nil, err
	}
	if cfg.Socket == "" {
		return nil, fmt.Errorf("%w: no socket path", ErrUsage)
	}
	cfg = cfg.withDefaults()
	ln, err := listenControl(cfg.Socket)
	if err != nil {
		return nil, err
	}
	halt, haltNow := context.WithCancel(context.Background())
	c := &Coordinator{
		cfg:      cfg,
		launch:   launch,
		log:      cfg.Log,
		ln:       ln,
		tasks:    newTasks(),
		events:   make(chan event),
		loopQuit: make(chan struct{}),
		loopDone: make(chan struct{}),
		halt:     halt,
		haltNow:  haltNow,
		over:     make(chan struct{}),
		cliLeft:  make(chan struct{}, 1),
	}
	c.metrics = metrics.NewCoordinator(c.sample, metricLabels())
	sp := &spawner{socket: cfg.Socket, adoptTimeout: cfg.AdoptTimeout, killGrace: cfg.KillGrace, log: cfg.Log, wait: c.tasks.Go, ended: c.processEnded}
	c.m = newMachine(launch, effects{
		log:          cfg.Log,
		metrics:      c.metrics,
		now:          time.Now,
		spawn:        sp.spawn,
		order:        c.order,
		cut:          c.cut,
		kill:         c.kill,
		signal:       func(g *gen, sig syscall.Signal) { g.signal(sig) },
		after:        c.after,
		save:         c.save,
		restart:      c.restart,
		repin:        func(g *gen) { c.tasks.Go(func(context.Context) { c.repin(g) }) },
		notify:       c.notify,
		drainTimeout: cfg.DrainTimeout,
	})
	return c, nil
}

// withDefaults gives every zero duration its Default.
func (cfg Config) withDefaults() Config {
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = DefaultReadyTimeout
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	cfg.DrainGrace = max(cfg.DrainGrace, 0)
	if cfg.KillGrace <= 0 {
		cfg.KillGrace = DefaultKillGrace
	}
	cfg.Bake = max(cfg.Bake, 0)
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
	return cfg
}

// Metrics is the coordinator's Prometheus collector.
func (c *Coordinator) Metrics() *metrics.Coordinator { return c.metrics }

// post hands ev to the owner loop. It reports false when the loop is gone.
func (c *Coordinator) post(ev event) bool {
	select {
	case c.events <- ev:
		return true
	case <-c.loopDone:
		return false
	}
}

// request posts the request that mk builds around a reply channel and
// waits for the answer. It reports false when the owner loop is gone.
func request[T any](c *Coordinator, mk func(chan T) event) (T, bool) {
	return requestWithin(c, mk, nil)
}

// requestWithin is request that gives up if the owner does not take the
// request before timeout fires (nil: never). Scrapes use it, so that they
// never hang on a busy coordinator.
func requestWithin[T any](c *Coordinator, mk func(chan T) event, timeout <-chan time.Time) (T, bool) {
	var zero T
	reply := make(chan T, 1)
	select {
	case c.events <- mk(reply):
	case <-c.loopDone:
		return zero, false
	case <-timeout:
		return zero, false
	}
	select {
	case v := <-reply:
		return v, true
	case <-c.loopDone:
		return zero, false
	}
}

// do posts a request whose answer is that it ran.
func (c *Coordinator) do(mk func(chan struct{}) event) bool {
	reply := make(chan struct{})
	if !c.post(mk(reply)) {
		return false
	}
	select {
	case <-reply:
		return true
	case <-c.loopDone:
		return false
	}
}

// view asks for what other goroutines may know of g.
func (c *Coordinator) view(g *gen) genView {
	v, _ := request(c, func(r chan genView) event { return qGen{g: g, reply: r} })
	return v
}

// finish ends the rollover that spawned g with its outcome.
func (c *Coordinator) finish(g *gen, o outcome, err error) {
	c.do(func(ch chan struct{}) event { return evFinish{g: g, outcome: o, err: err, reply: ch} })
}

func (c *Coordinator) loop() {
	defer close(c.loopDone)
	for {
		select {
		case ev := <-c.events:
			c.m.step(ev)
		case <-c.loopQuit:
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
func (c *Coordinator) Stop() { c.haltNow() }

// Force escalates a stop that is under way: the first call sends SIGTERM
// to every generation's process group (SIGKILL after the kill grace), later
// calls SIGKILL at once. It returns how many times the stop was forced.
// Run then returns ErrForced.
func (c *Coordinator) Force() int {
	c.haltNow()
	n, _ := request(c, func(r chan int) event { return evForce{reply: r} })
	return n
}

// Run starts generation 1, serves the control socket and rolls over on
// request until ctx is done, Stop is called or `stop` arrives; then it
// drains every generation and returns nil, or an error wrapping ErrForced
// when a generation had to be killed on the way (see Force). It fails if
// generation 1 never gets ready. It returns once every goroutine it
// started has returned.
func (c *Coordinator) Run(ctx context.Context) error {
	go c.loop()
	c.tasks.Go(c.accept)
	// Canceling ctx also stops a start that still waits for generation 1.
	stopOnCancel := context.AfterFunc(ctx, c.haltNow)
	defer stopOnCancel()

	err := c.serve()

	c.do(func(r chan struct{}) event { return evForget{reply: r} })
	c.overErr = err
	close(c.over)
	c.awaitCLIs(2 * time.Second) // let `stop` and `next --wait` clients read their results
	c.ln.Close()
	_ = os.Remove(c.cfg.Socket)
	c.peers.closeAll()
	c.tasks.stop()
	close(c.loopQuit)
	<-c.loopDone
	return err
}

// serve runs the service from generation 1 (or the adopted generations of
// a predecessor) to the end of the stop, when every generation is gone.
func (c *Coordinator) serve() error {
	if !c.adopt() {
		r, err := c.begin(rolloverReq{}, nil)
		if err == nil {
			<-r.settled
			err = r.err
		}
		if err != nil {
			serr := c.shutdown(false)
			if errors.Is(err, ErrStopping) {
				return serr // stopped (ctx, `stop`) before generation 1 was ready
			}
			return err
		}
	}
	v, _ := request(c, func(r chan view) event { return qView{reply: r} })
	c.reportSteering(v)
	c.notify(fmt.Sprintf("READY=1\nSTATUS=active generation %d (pid %d)", v.active, v.activePID))
	<-c.halt.Done()
	return c.shutdown(true)
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
func (c *Coordinator) Reload() { c.rollAgain("reload") }

// rollAgain rolls over to the active (or last active) command line, as a
// task, and logs why it failed (what: reload, restart).
func (c *Coordinator) rollAgain(what string) {
	c.tasks.Go(func(context.Context) {
		r, err := c.begin(rolloverReq{}, nil)
		if err == nil {
			<-r.settled
			err = r.err
		}
		if err != nil {
			c.log.Error(what+" failed", "err", err)
		}
	})
}

// shutdown drains every generation (a rollover past activation finishes its
// hand-over first) and waits until they are gone. told: the service was
// up, so the drain is worth saying; after a failed start it is not.
func (c *Coordinator) shutdown(told bool) error {
	c.haltNow()
	if told {
		c.notify("STOPPING=1\nSTATUS=stopping: draining every generation")
	}
	n, _ := request(c, func(r chan int) event { return evStop{reply: r} })
	if told {
		what := fmt.Sprintf("%d generations", n)
		if n == 1 {
			what = "1 generation"
		}
		c.log.Info(fmt.Sprintf("draining %s (max %v; Ctrl-C again to force)", what, c.cfg.DrainTimeout), "generations", n, "drain_timeout", c.cfg.DrainTimeout)
	}
	select {
	case <-c.m.idle:
	case <-c.loopDone:
	}
	if v, _ := request(c, func(r chan view) event { return qView{reply: r} }); v.stopForced {
		c.log.Warn("stopped: every generation is gone, some of them killed")
		return fmt.Errorf("%w: some generation was killed before it finished draining", ErrForced)
	}
	if told {
		c.log.Info("stopped: every generation drained")
	}
	return nil
}

func (c *Coordinator) status() wire.Status {
	st, _ := request(c, func(r chan wire.Status) event { return qStatus{reply: r} })
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
	gens, ok := requestWithin(c, func(r chan []*gen) event { return qConnected{reply: r} }, time.After(time.Second))
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
			a, err := c.commandWithin(g, wire.Msg{Type: wire.TypeMetrics}, timeout)
			return a.Metrics, err
		}})
	}
	return srcs
}

// sample feeds the metrics collector; it gives up rather than block a scrape.
func (c *Coordinator) sample() (metrics.Sample, bool) {
	s, ok := requestWithin(c, func(r chan metrics.Sample) event { return qSample{reply: r} }, time.After(time.Second))
	if mr, err := reuse.MigrateReq(); err == nil {
		s.MigrateReq = &mr
	}
	if u, err := metrics.ReadUDPErrors(); err == nil {
		s.UDP = u
	}
	return s, ok
}

// tasks are the goroutines Run waits for. Each gets a context that is done
// once Run ends; once stop began, no new task starts.
type tasks struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

func newTasks() *tasks {
	ctx, cancel := context.WithCancel(context.Background())
	return &tasks{ctx: ctx, cancel: cancel}
}

// Go runs f as a task.
func (t *tasks) Go(f func(ctx context.Context)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		f(t.ctx)
	}()
}

// stop cancels every task's context and waits until all have returned.
func (t *tasks) stop() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.cancel()
	t.wg.Wait()
}
