package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
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

	// Notify, when set, receives sd_notify messages ("READY=1\nSTATUS=…")
	// for the service manager: ready, reloading around a rollover, stopping.
	Notify func(msg string)
}

// Coordinator spawns generations and rolls them over. At most one rollover
// runs at a time; one goroutine owns all state (see loop).
type Coordinator struct {
	cfg     Config
	launch  Launch // generation 1's
	log     *slog.Logger
	ln      *net.UnixListener
	metrics *metrics.Coordinator

	calls    chan func()
	quit     chan struct{} // ends the owner loop
	dead     chan struct{} // owner loop gone
	stopCh   chan struct{} // stop requested
	stopOnce sync.Once
	stopped  chan struct{} // every generation gone
	cmdID    atomic.Uint64
	clis     atomic.Int32 // CLI requests being served

	persistMu sync.Mutex
	final     bool // under persistMu: no more state file

	// owner
	s state
}

type state struct {
	next           int
	gens           map[int]*gen
	active         *gen
	previous       *Launch // what was active before the current one
	busy           bool
	stopping       bool
	started        bool    // generation 1 became active
	lastLaunch     *Launch // an active generation that died
	crashes        int     // for the backoff; reset after a minute of uptime
	activeExits    int
	restartPending bool
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
		calls:   make(chan func()),
		quit:    make(chan struct{}),
		dead:    make(chan struct{}),
		stopCh:  make(chan struct{}),
		stopped: make(chan struct{}),
		s:       state{gens: map[int]*gen{}},
	}
	c.metrics = metrics.NewCoordinator(c.sample)
	return c, nil
}

// Metrics is the coordinator's Prometheus collector.
func (c *Coordinator) Metrics() *metrics.Coordinator { return c.metrics }

// do runs f on the owner goroutine and waits for it. f must not block.
func (c *Coordinator) do(f func()) bool {
	return c.doWithin(f, nil)
}

// doWithin is do that gives up, without running f, if the owner does not
// take f before timeout fires (nil: never). Scrapes use it so that they
// never hang on a busy coordinator.
func (c *Coordinator) doWithin(f func(), timeout <-chan time.Time) bool {
	done := make(chan struct{})
	select {
	case c.calls <- func() { f(); close(done) }:
		<-done
		return true
	case <-c.dead:
		return false
	case <-timeout:
		return false
	}
}

// Run starts generation 1, serves the control socket and rolls over on
// request until ctx is done or `stop` arrives; then it drains every
// generation and returns nil. It fails if generation 1 never gets ready.
func (c *Coordinator) Run(ctx context.Context) error {
	defer c.ln.Close()
	defer os.Remove(c.cfg.Socket)
	go c.accept()
	go c.loop()
	// Canceling ctx also stops a start that still waits for generation 1.
	stopOnCancel := context.AfterFunc(ctx, c.requestStop)
	defer stopOnCancel()
	defer func() {
		c.forget()
		close(c.stopped)
		// Let `stop` and `next --wait` clients read their results.
		for deadline := time.Now().Add(2 * time.Second); c.clis.Load() > 0 && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		close(c.quit)
		<-c.dead
	}()

	c.do(func() { c.s.busy = true })
	if c.adopt() {
		c.do(func() { c.s.busy = false })
	} else if _, err := c.rollover(c.launch, func(e wire.Event) { c.log.Info(e.String()) }); err != nil {
		c.shutdown()
		if errors.Is(err, ErrStopping) {
			return nil // stopped (ctx, `stop`) before generation 1 was ready
		}
		return err
	}
	c.reportSteering()
	c.notifyReady("")
	select {
	case <-ctx.Done():
	case <-c.stopCh:
	}
	c.shutdown()
	return nil
}

// notify sends msg to the service manager, when there is one.
func (c *Coordinator) notify(msg string) {
	if c.cfg.Notify != nil {
		c.cfg.Notify(msg)
	}
}

// notifyReady tells the service manager the service is ready again, with
// the active generation (and why a rollover failed, if one did).
func (c *Coordinator) notifyReady(failure string) {
	var n, pid int
	c.do(func() {
		if a := c.s.active; a != nil {
			n, pid = a.n, a.pid
		}
	})
	status := fmt.Sprintf("active generation %d (pid %d)", n, pid)
	if failure != "" {
		status = fmt.Sprintf("rollover failed: %s; active generation %d", failure, n)
	}
	c.notify("READY=1\nSTATUS=" + status)
}

// reportSteering says at start-up how hand-overs will work, with one warning
// line when neither steering nor the kernel's migration can protect them.
func (c *Coordinator) reportSteering() {
	var steerable bool
	var why string
	c.do(func() {
		if a := c.s.active; a != nil {
			steerable, why = a.steerable, a.steerErr
		}
	})
	mr, err := reuse.MigrateReq()
	switch {
	case steerable:
		c.log.Info("hand-over: BPF steering", "tcp_migrate_req", mr)
	case err == nil && mr:
		c.log.Info("hand-over: generation cannot be steered; relying on tcp_migrate_req=1", "reason", why)
	default:
		c.log.Warn("hand-over unprotected: the generation cannot be steered and net.ipv4.tcp_migrate_req is 0, so connections queued on an old listener may be reset; enable it (deploy/sysctl/90-rollover.conf)", "reason", why)
	}
}

// Reload rolls over to the active command line again (SIGHUP, SIGUSR2).
func (c *Coordinator) Reload() {
	go func() {
		_, err := c.tryRollover(Launch{}, 0, func(e wire.Event) { c.log.Info(e.String()) })
		if err != nil {
			c.log.Error("reload failed", "err", err)
		}
	}()
}

func (c *Coordinator) loop() {
	defer close(c.dead)
	for {
		select {
		case f := <-c.calls:
			f()
		case <-c.quit:
			return
		}
	}
}

// requestStop makes Run return after draining.
func (c *Coordinator) requestStop() {
	c.stopOnce.Do(func() { close(c.stopCh) })
}

// shutdown drains every generation and waits for them to exit.
func (c *Coordinator) shutdown() {
	c.requestStop()
	c.notify("STOPPING=1\nSTATUS=stopping: draining every generation")
	var gens []*gen
	c.do(func() {
		c.s.stopping = true
		for _, g := range c.s.gens {
			gens = append(gens, g)
		}
	})
	// A rollover that is past activation finishes its hand-over first.
	deadline := time.Now().Add(c.cfg.ReadyTimeout + c.cfg.DrainTimeout)
	for time.Now().Before(deadline) {
		busy := false
		c.do(func() {
			busy = c.s.busy
			gens = gens[:0]
			for _, g := range c.s.gens {
				gens = append(gens, g)
			}
		})
		if !busy {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, g := range gens {
		c.drain(g)
	}
	for _, g := range gens {
		<-g.exited
	}
	c.log.Info("stopped: every generation drained")
}

func (c *Coordinator) status() wire.Status {
	st := wire.Status{PID: os.Getpid(), Socket: c.cfg.Socket, Generations: []wire.GenStatus{}}
	if mr, err := reuse.MigrateReq(); err == nil {
		st.MigrateReq = &mr
	}
	c.do(func() {
		st.InProgress = c.s.busy
		st.ActiveExits, st.RestartPending = c.s.activeExits, c.s.restartPending
		if c.s.active != nil {
			st.Active = c.s.active.n
		}
		for _, g := range c.s.gens {
			st.Generations = append(st.Generations, wire.GenStatus{
				Generation: g.n, PID: g.pid, State: g.state, Argv: g.argv,
				Steerable: g.steerable, StartedAt: g.start, Stats: g.stats,
				Ready: g.launch.Ready, Notify: g.notifyStatus,
			})
		}
	})
	slices.SortFunc(st.Generations, func(a, b wire.GenStatus) int { return a.Generation - b.Generation })
	return st
}

// Gatherer is what /metrics serves: own (the coordinator's registry) plus
// every live generation's own metrics, labelled with its generation.
func (c *Coordinator) Gatherer(own prometheus.Gatherer) prometheus.Gatherer {
	return c.metrics.Gatherer(own, c.metricSources)
}

func (c *Coordinator) metricSources() []metrics.Source {
	var gens []*gen
	if !c.doWithin(func() {
		for _, g := range c.s.gens {
			if g.conn != nil {
				gens = append(gens, g)
			}
		}
	}, time.After(time.Second)) {
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
	var s metrics.Sample
	if mr, err := reuse.MigrateReq(); err == nil {
		s.MigrateReq = &mr
	}
	ok := c.doWithin(func() {
		if c.s.active != nil {
			s.Active = c.s.active.n
		}
		for _, g := range c.s.gens {
			s.Generations = append(s.Generations, metrics.Generation{
				Generation: g.n, PID: g.pid, Command: strings.Join(g.argv, " "), State: g.state,
				Inflight: g.stats.Inflight, Connections: g.stats.Connections, Requests: g.stats.Requests,
			})
		}
	}, time.After(time.Second))
	return s, ok
}
