package coordinator

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/metrics"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// This file is the coordinator's state machine: typed generation states,
// typed events, and step, the one transition function. step runs on the
// owner goroutine (Coordinator.loop) and is the only writer of the machine
// and of the owner fields of every gen. It never blocks: what takes time
// (a process start aside, which must precede the generation's hello) is an
// effect that runs elsewhere and reports back with another event.

// genState is where a generation stands.
type genState uint8

const (
	stateStarting genState = iota + 1 // spawned, not ready yet
	stateReady                        // serves, dark: gets no new connections
	stateActive                       // receives new connections
	stateDraining                     // told to hand over and finish
	stateGone                         // exited
)

func (s genState) String() string {
	switch s {
	case stateStarting:
		return "starting"
	case stateReady:
		return "ready"
	case stateActive:
		return "active"
	case stateDraining:
		return "draining"
	case stateGone:
		return "gone"
	}
	return "unknown"
}

// parseState reads a state a generation reports when it asks to be adopted.
func parseState(s string) genState {
	switch s {
	case "ready":
		return stateReady
	case "draining":
		return stateDraining
	}
	return stateStarting
}

// Events: what happened, or what is asked. Those with a reply channel are
// requests; the channel must have room for one answer.
type (
	event interface{ isEvent() }

	// evBegin asks to start a rollover (spawn a new generation).
	evBegin struct {
		req   rolloverReq
		reply chan began
	}
	// evHello: a peer on the control socket says it is a generation.
	evHello struct {
		hello wire.Msg
		pid   int // from SO_PEERCRED
		conn  *genConn
		reply chan welcome
	}
	// evReady: the generation serves. lib: reported by the library, with
	// its steering ability; otherwise seen by notify or listen.
	evReady struct {
		g         *gen
		lib       bool
		steerable bool
		steerErr  string
		addrs     []string
	}
	evNotifyStatus struct {
		g    *gen
		text string
	}
	evStats struct {
		g     *gen
		stats wire.Stats
	}
	// evDisconnected: the generation's control connection conn ended.
	evDisconnected struct {
		g    *gen
		conn *genConn
	}
	// evActivate: the new generation was steered (or needs no steering);
	// make it the active one. last: nothing remains to hand over, so the
	// rollover ends here.
	evActivate struct {
		g     *gen
		last  bool
		reply chan error
	}
	// evDrain orders g to drain, once. reply, when set, gets its counters.
	evDrain struct {
		g     *gen
		reply chan wire.Stats
	}
	// evClosedListener: g has left the port.
	evClosedListener struct{ g *gen }
	// evDrainTimeout: g's drain deadline passed.
	evDrainTimeout struct{ g *gen }
	// evExited: g's process is gone; err is its exit (nil: status 0).
	evExited struct {
		g   *gen
		err error
	}
	// evWatch starts judging g's health by rule (nil: stops) as its stats
	// arrive: the rollover's bake or canary step.
	evWatch struct {
		g    *gen
		rule *wire.Health
	}
	// evCanary records the share of new connections the rollover's new
	// generation gets (0: the canary is over).
	evCanary struct{ weight int }
	// evRelease: the bake began; prev is steered away and drains its
	// connections, but keeps its listener for a rollback.
	evRelease struct{ g *gen }
	// evRollback gives the port back to prev, the generation g replaced,
	// and drains g: the bake or canary failed.
	evRollback struct {
		g, prev *gen
		reason  string // exited, health, health-url, abort
		reply   chan struct{}
	}
	// evControl asks the rollover in progress to promote its canary (or
	// end its bake) or to abort; reply says why not, if it cannot.
	evControl struct {
		what  string // wire.TypePromote or wire.TypeAbort
		reply chan error
	}
	// evReport: a rollover's loss report is complete.
	evReport struct{ r *wire.Report }
	// evFinish ends the rollover that spawned g (if it is still the one in
	// progress) with err.
	evFinish struct {
		g     *gen
		err   error
		reply chan struct{}
	}
	evRestartDue struct{}
	// evStop: drain every generation; idle closes once none is left.
	// reply, when set, gets how many generations there are to drain.
	evStop struct{ reply chan int }
	// evForce escalates a stop: the first one SIGTERMs every generation's
	// process group, the next ones SIGKILL them.
	evForce struct{ reply chan int }
	// evAdoptLoad registers the live generations a crashed predecessor
	// left (from its state file) and holds rollovers off until evAdoptEnd.
	evAdoptLoad struct {
		s     saved
		gens  []*gen
		reply chan struct{}
	}
	// evAdoptDecide forgets the generations that did not come back and
	// makes the predecessor's active one active again.
	evAdoptDecide struct {
		waiting []*gen
		reply   chan adoption
	}
	// evAdoptEnd drains what the predecessor was rolling to, and lets
	// rollovers run.
	evAdoptEnd struct {
		others []*gen
		reply  chan struct{}
	}
	// evForget: Run is over; no more state file.
	evForget struct{ reply chan struct{} }

	// Queries: read-only.
	qStatus struct{ reply chan wire.Status }
	qSample struct{ reply chan metrics.Sample }
	qConn   struct {
		g     *gen
		reply chan *genConn
	}
	qStats struct {
		g     *gen
		reply chan wire.Stats
	}
	qNumbers struct {
		g     *gen
		reply chan numbers
	}
	qConnected struct{ reply chan []*gen } // generations with a control connection
	qView      struct{ reply chan view }
)

func (evBegin) isEvent()          {}
func (evHello) isEvent()          {}
func (evReady) isEvent()          {}
func (evNotifyStatus) isEvent()   {}
func (evStats) isEvent()          {}
func (evDisconnected) isEvent()   {}
func (evActivate) isEvent()       {}
func (evDrain) isEvent()          {}
func (evClosedListener) isEvent() {}
func (evDrainTimeout) isEvent()   {}
func (evExited) isEvent()         {}
func (evFinish) isEvent()         {}
func (evWatch) isEvent()          {}
func (evCanary) isEvent()         {}
func (evRelease) isEvent()        {}
func (evRollback) isEvent()       {}
func (evControl) isEvent()        {}
func (evReport) isEvent()         {}
func (evRestartDue) isEvent()     {}
func (evStop) isEvent()           {}
func (evForce) isEvent()          {}
func (evAdoptLoad) isEvent()      {}
func (evAdoptDecide) isEvent()    {}
func (evAdoptEnd) isEvent()       {}
func (evForget) isEvent()         {}
func (qStatus) isEvent()          {}
func (qSample) isEvent()          {}
func (qConn) isEvent()            {}
func (qStats) isEvent()           {}
func (qNumbers) isEvent()         {}
func (qConnected) isEvent()       {}
func (qView) isEvent()            {}

// rolloverReq is what a rollover is asked to roll to.
type rolloverReq struct {
	launch   Launch // empty fields: the active generation's
	expect   int    // refuse unless this generation is active (0: any)
	rollback bool   // roll to the previous generation's launch
	// bake overrides Config.Bake when set; canary lists the weights of
	// the canary's steps (percent), each lasting step (0: until promote or
	// abort); healthURL overrides Config.HealthURL.
	bake      *time.Duration
	canary    []int
	step      time.Duration
	healthURL string
}

// began answers evBegin: the new generation and the one it replaces.
type began struct {
	g, prev   *gen
	ctl       chan string // promote or abort, from evControl
	reloading bool        // a rollover of a started service (not generation 1's start)
	note      string      // worth telling whoever asked
	err       error
}

// welcome answers evHello: the generation, or why it was refused.
type welcome struct {
	g      *gen
	reason string
}

// adoption answers evAdoptDecide.
type adoption struct {
	active *gen
	others []*gen
}

// view is what the coordinator's edges read of the machine.
type view struct {
	active         int
	activePID      int
	steerable      bool
	steerErr       string
	restartPending bool
	forced         bool
}

// effects are what transitions do to the world. The coordinator fills them
// with real processes and sockets; the machine's table tests with
// recorders.
type effects struct {
	log     *slog.Logger
	metrics *metrics.Coordinator
	now     func() time.Time
	// spawn starts g's process. On success g.pid is set, and the process's
	// end arrives as evExited.
	spawn func(g *gen) error
	// order sends g its drain order (the library's drain command, or the
	// drain signal) without blocking; conn is its control connection.
	order func(g *gen, conn *genConn)
	// kill ends g: SIGTERM to its process group, SIGKILL after the kill
	// grace. It never blocks.
	kill func(g *gen)
	// signal sends sig to g's process group.
	signal func(g *gen, sig syscall.Signal)
	// after posts ev once d has passed.
	after func(d time.Duration, ev event)
	// save writes the state file (nil: removes it).
	save func(s *saved)
	// restart rolls over to the last active command line (a restart).
	restart func()
	// notify tells the service manager (sd_notify), when there is one.
	notify       func(msg string)
	drainTimeout time.Duration
}

// machine is the coordinator's state. Only step writes it.
type machine struct {
	fx    effects
	first Launch // generation 1's launch: the base when nothing was active

	next     int
	gens     map[int]*gen
	active   *gen
	previous *Launch // what was active before the current one

	rolling    *gen        // the new generation of the rollover in progress
	reloading  bool        // that rollover replaces a started service
	ctl        chan string // that rollover's promote and abort
	canary     int         // the share of new connections its canary gets
	baking     *gen        // the generation in its bake or canary
	rolledBack string      // why that rollover was rolled back (a reason of rollover_rollbacks_total), if it was
	adopting   bool        // adopting a predecessor's generations (holds rollovers off)

	stopping       bool
	started        bool    // some generation became active
	lastLaunch     *Launch // an active generation that exited on its own
	crashes        int     // for the restart backoff; reset after a minute of uptime
	activeExits    int
	restartPending bool
	lastReport     *wire.Report
	forces         int           // evForce received
	forced         bool          // some generation was killed: a forced drain or stop
	final          bool          // no more state file
	idle           chan struct{} // closed once stopping and every generation is gone
}

func newMachine(first Launch, fx effects) *machine {
	return &machine{fx: fx, first: first, gens: map[int]*gen{}, idle: make(chan struct{})}
}

func (m *machine) inProgress() bool { return m.rolling != nil || m.adopting }

// step applies one event. It is the only writer of the machine's state.
func (m *machine) step(ev event) {
	switch e := ev.(type) {
	case evBegin:
		e.reply <- m.begin(e.req)
	case evHello:
		e.reply <- m.hello(e)
	case evReady:
		m.ready(e)
	case evNotifyStatus:
		e.g.notifyStatus = e.text
	case evStats:
		m.stats(e.g, e.stats)
	case evDisconnected:
		if e.g.conn == e.conn {
			e.g.conn = nil
		}
	case evActivate:
		e.reply <- m.activate(e.g, e.last)
	case evDrain:
		m.drain(e.g)
		if e.reply != nil {
			e.reply <- e.g.stats
		}
	case evClosedListener:
		closeOnce(e.g.left)
	case evDrainTimeout:
		if e.g.state != stateGone {
			m.forced = true
			// What it still held is cut now; the library's own count
			// (in done) wins when it reported one.
			e.g.forcedConns = max(e.g.forcedConns, e.g.stats.Connections)
			e.g.forcedReqs = max(e.g.forcedReqs, e.g.stats.Inflight)
			m.fx.metrics.ForcedDrains.Inc()
			e.g.killed = true
			m.fx.log.Warn("drain timed out; killing", "gen", e.g.n, "pid", e.g.pid, "drain_timeout", m.fx.drainTimeout)
			m.fx.kill(e.g)
		}
	case evExited:
		m.exited(e.g, e.err)
	case evWatch:
		e.g.health = e.rule
		m.judge(e.g)
		if e.rule != nil {
			m.baking = e.g
		} else if m.baking == e.g {
			m.baking = nil
		}
	case evCanary:
		m.canary = e.weight
		m.fx.metrics.CanaryWeight.Set(float64(e.weight))
	case evRelease:
		if e.g.state != stateGone {
			e.g.state, e.g.released = stateDraining, true
		}
	case evRollback:
		m.rollback(e.g, e.prev, e.reason)
		close(e.reply)
	case evControl:
		switch {
		case m.ctl == nil:
			e.reply <- errors.New("no canary or bake is waiting")
		default:
			select {
			case m.ctl <- e.what:
				e.reply <- nil
			default:
				e.reply <- errors.New("the rollover is already acting on a promote or abort")
			}
		}
	case evReport:
		m.lastReport = e.r
	case evFinish:
		if m.rolling == e.g {
			m.finish(e.err)
		}
		close(e.reply)
	case evRestartDue:
		m.restartPending = false
		if m.active == nil && !m.stopping {
			m.fx.restart()
		}
	case evStop:
		m.stopping = true
		if !m.inProgress() {
			m.drainAll()
		}
		if e.reply != nil {
			e.reply <- len(m.gens)
		}
		m.checkIdle()
	case evForce:
		m.stopping = true
		m.forces++
		for _, g := range m.sorted() {
			m.forced, g.killed = true, true
			if m.forces == 1 {
				m.fx.log.Warn("forcing the stop: SIGTERM", "gen", g.n, "pid", g.pid)
				m.fx.kill(g)
			} else {
				m.fx.log.Warn("forcing the stop: SIGKILL", "gen", g.n, "pid", g.pid)
				m.fx.signal(g, syscall.SIGKILL)
			}
		}
		e.reply <- m.forces
	case evAdoptLoad:
		m.next, m.previous, m.adopting = e.s.Next, e.s.Previous, true
		for _, g := range e.gens {
			m.gens[g.n] = g
		}
		close(e.reply)
	case evAdoptDecide:
		e.reply <- m.adoptDecide(e.waiting)
	case evAdoptEnd:
		m.adoptEnd(e.others)
		close(e.reply)
	case evForget:
		m.final = true
		m.fx.save(nil)
		close(e.reply)
	case qStatus:
		e.reply <- m.status()
	case qSample:
		e.reply <- m.sample()
	case qConn:
		e.reply <- e.g.conn
	case qStats:
		e.reply <- e.g.stats
	case qNumbers:
		e.reply <- numbers{stats: e.g.stats, forcedConns: e.g.forcedConns, forcedReqs: e.g.forcedReqs}
	case qConnected:
		var gs []*gen
		for _, g := range m.gens {
			if g.conn != nil {
				gs = append(gs, g)
			}
		}
		e.reply <- gs
	case qView:
		e.reply <- m.view()
	default:
		panic(fmt.Sprintf("coordinator: unknown event %T", ev)) // a programming error
	}
}

// begin starts a rollover: it refuses while another one runs, resolves the
// launch, and spawns the new generation. A failed check or spawn is a
// failed rollover.
func (m *machine) begin(req rolloverReq) began {
	active := 0
	if m.active != nil {
		active = m.active.n
	}
	switch {
	case m.stopping:
		return began{err: ErrStopping}
	case req.expect != 0 && req.expect != active:
		return began{err: fmt.Errorf("%w: the active generation is %d, not %d (--expect-generation)", ErrStale, active, req.expect)}
	case m.inProgress():
		return began{err: fmt.Errorf("%w: wait for it to finish and try again", ErrInProgress)}
	case req.rollback && m.previous == nil:
		return began{err: errors.New("no previous generation to roll back to")}
	}
	base := m.first
	switch {
	case m.active != nil:
		base = m.active.launch
	case m.lastLaunch != nil:
		base = *m.lastLaunch
	}
	l := req.launch
	if req.rollback {
		l = *m.previous
	}
	l = l.withDefaults(base)
	l.Argv = slices.Clone(l.Argv)
	fail := func(err error) began {
		m.rolling = nil
		m.finish(err)
		return began{err: err}
	}
	if len(l.Argv) == 0 {
		return fail(fmt.Errorf("%w: no command line to roll to; pass one: rollover next -- CMD [ARGS...]", ErrUsage))
	}
	if err := l.checkMode(); err != nil { // the address was checked before
		return fail(err)
	}
	m.next++
	g := newGen(m.next, l)
	// Spawned here, on the owner goroutine, so that the generation is known
	// (number, pid, secret) before its hello can arrive.
	if err := m.fx.spawn(g); err != nil {
		if !errors.Is(err, ErrCommand) {
			err = fmt.Errorf("%w: start gen %d: %v", ErrRollover, g.n, err)
		} else {
			err = fmt.Errorf("start gen %d: %w", g.n, err)
		}
		return fail(err)
	}
	m.gens[g.n] = g
	m.rolling, m.reloading = g, m.started
	m.ctl = make(chan string, 1)
	m.save()
	b := began{g: g, prev: m.active, reloading: m.reloading, ctl: m.ctl}
	if a := m.active; a != nil && slices.Equal(g.launch.Argv, a.launch.Argv) && g.exe.same(a.exe) {
		b.note = fmt.Sprintf("gen %d runs the same %s as gen %d (unchanged since %s): this restarts the same program; if a deploy copied a new one, it did not land (a plain cp onto a running binary fails with \"Text file busy\": write a new file and mv it into place)",
			g.n, g.launch.Argv[0], a.n, a.exe.mtime.Format(time.DateTime))
	}
	return b
}

// finish ends the rollover in progress with err.
func (m *machine) finish(err error) {
	m.rolling, m.ctl, m.baking = nil, nil, nil
	if m.canary != 0 {
		m.canary = 0
		m.fx.metrics.CanaryWeight.Set(0)
	}
	// Each rollover counts once, under its one outcome, so that an alert
	// reads one series and never subtracts one counter from another.
	result := "ok"
	switch {
	case err == nil:
		m.started = true
	case m.rolledBack == "abort":
		result = "aborted"
	case m.rolledBack != "":
		result = "rolled_back"
	default:
		result = "failed"
	}
	m.rolledBack = ""
	m.fx.metrics.Rollovers.WithLabelValues(result).Inc()
	if m.reloading {
		m.reloading = false
		m.notifyReady(err)
	}
	if m.active == nil && m.started && !m.stopping {
		m.scheduleRestart()
	}
	if m.stopping {
		m.drainAll()
	}
	m.checkIdle()
}

// notifyReady tells the service manager the service is ready again, with
// the active generation and why a rollover failed, if one did.
func (m *machine) notifyReady(failure error) {
	var n, pid int
	if m.active != nil {
		n, pid = m.active.n, m.active.pid
	}
	status := fmt.Sprintf("active generation %d (pid %d)", n, pid)
	if failure != nil {
		status = fmt.Sprintf("rollover failed: %s; active generation %d", failure, n)
	}
	m.fx.notify("READY=1\nSTATUS=" + status)
}

func (m *machine) hello(e evHello) welcome {
	g := m.gens[e.hello.Generation]
	reason := ""
	switch {
	case m.final:
		reason = "coordinator is stopping"
	case g == nil:
		reason = fmt.Sprintf("generation %d is not one this coordinator spawned", e.hello.Generation)
	case e.hello.Secret != g.secret:
		reason = fmt.Sprintf("wrong secret for generation %d", g.n)
	case e.pid != g.pid || e.hello.PID != g.pid:
		reason = fmt.Sprintf("pid %d is not generation %d's pid", e.pid, g.n)
	case g.conn != nil:
		reason = fmt.Sprintf("generation %d is already connected", g.n)
	case e.hello.Adopt && !g.adopting:
		reason = fmt.Sprintf("generation %d was not left by a previous coordinator", g.n)
	case !e.hello.Adopt && g.adopting:
		reason = fmt.Sprintf("generation %d must ask to be adopted", g.n)
	}
	if reason != "" {
		return welcome{reason: reason}
	}
	if e.hello.Adopt {
		g.adopting = false
		g.steerable, g.steerErr = e.hello.Steerable, e.hello.SteerError
		g.state = parseState(e.hello.State)
		switch g.state {
		case stateReady:
			closeOnce(g.ready)
		case stateDraining:
			g.drainStart = m.fx.now()
		}
	}
	g.conn = e.conn
	closeOnce(g.hello)
	return welcome{g: g}
}

func (m *machine) ready(e evReady) {
	g := e.g
	if isDone(g.ready) {
		return // said twice; what was read after the first stands
	}
	if e.lib {
		g.steerable, g.steerErr, g.addrs = e.steerable, e.steerErr, e.addrs
	}
	if g.state == stateStarting {
		g.state = stateReady
		g.readyAt = m.fx.now()
		m.fx.metrics.Ready.Observe(g.readyAt.Sub(g.start).Seconds())
	}
	close(g.ready)
}

// stats records what g reported, judges its health, and keeps what its
// drain deadline cut.
func (m *machine) stats(g *gen, s wire.Stats) {
	g.stats = s
	g.forcedConns = max(g.forcedConns, s.ForcedConnections)
	g.forcedReqs = max(g.forcedReqs, s.ForcedRequests)
	m.judge(g)
}

// judge closes g.unhealthy once g breaks its health rule.
func (m *machine) judge(g *gen) {
	if g.health == nil || g.state == stateGone || isDone(g.unhealthy) || !g.health.Failing(g.stats) {
		return
	}
	s := g.stats
	bad := s.R5xx + s.Panics
	total := s.R1xx + s.R2xx + s.R3xx + s.R4xx + bad
	g.unhealthyWhy = fmt.Sprintf("%d of %d responses were 5xx or panics (%.0f%%, limit %.0f%% of at least %d)", bad, total, 100*float64(bad)/float64(total), 100*g.health.MaxErrorRatio, g.health.MinRequests)
	close(g.unhealthy)
}

// rollback makes prev, the generation g replaced, active again and drains
// g. prev takes the port back itself (resume), before this.
func (m *machine) rollback(g, prev *gen, reason string) {
	m.fx.metrics.Rollbacks.WithLabelValues(reason).Inc()
	m.baking = nil
	if m.rolling == g {
		m.rolledBack = reason
	}
	if prev.state != stateGone {
		prev.state, prev.released = stateActive, false
		m.active = prev
	} else if m.active == g {
		m.active = nil
	}
	g.health = nil
	m.drain(g)
	m.save()
}

func (m *machine) activate(g *gen, last bool) error {
	if g.state == stateGone {
		return fmt.Errorf("gen %d exited right after it was ready (%s); last stderr: %s", g.n, exitText(g.exitErr), g.tail.String())
	}
	if m.active != nil {
		pl := m.active.launch
		m.previous = &pl
	}
	m.active = g
	g.state = stateActive
	g.activeAt = m.fx.now()
	m.save()
	if last && m.rolling == g {
		m.finish(nil)
	}
	return nil
}

// drain orders g to hand its port over and finish its connections, once,
// and starts its drain clock.
func (m *machine) drain(g *gen) {
	if g.state == stateGone || !g.drainStart.IsZero() {
		return
	}
	g.drainStart = m.fx.now()
	g.state = stateDraining
	m.fx.order(g, g.conn)
	m.fx.after(m.fx.drainTimeout, evDrainTimeout{g: g})
}

func (m *machine) drainAll() {
	for _, g := range m.gens {
		m.drain(g)
	}
}

func (m *machine) exited(g *gen, err error) {
	if g.state == stateGone {
		return
	}
	g.exitErr = err
	g.state = stateGone
	delete(m.gens, g.n)
	closeOnce(g.left)
	close(g.exited)
	now := m.fx.now()
	if g.forcedConns > 0 || g.forcedReqs > 0 {
		m.fx.metrics.ForcedConnections.Add(float64(g.forcedConns))
		m.fx.metrics.ForcedRequests.Add(float64(g.forcedReqs))
		m.fx.log.Warn(fmt.Sprintf("gen %d: its drain deadline cut %d connections and %d requests", g.n, g.forcedConns, g.forcedReqs), "gen", g.n, "pid", g.pid, "forced_connections", g.forcedConns, "forced_requests", g.forcedReqs)
	}
	switch {
	case m.baking == g:
		// Judged by its rollover, which rolls back: not a crash to restart.
		// The kernel already sends every new connection to the generation
		// in the bake's standby; it is active again from now.
		m.baking = nil
		if m.active == g {
			m.active = nil
			for _, p := range m.gens {
				if p.released {
					p.state, p.released = stateActive, false
					m.active = p
				}
			}
		}
		m.fx.log.Warn("generation exited during its bake", "gen", g.n, "pid", g.pid, "exit", exitText(err))
	case !g.drainStart.IsZero():
		d := now.Sub(g.drainStart)
		m.fx.metrics.Drain.Observe(d.Seconds())
		if g.killed {
			m.fx.log.Warn("generation killed: it did not finish draining in time", "gen", g.n, "pid", g.pid, "after", d.Round(time.Millisecond), "exit", exitText(err))
		} else {
			m.fx.log.Info("generation drained", "gen", g.n, "pid", g.pid, "after", d.Round(time.Millisecond), "exit", exitText(err))
		}
	case m.active == g:
		m.active = nil
		m.activeExits++
		m.fx.metrics.ActiveExits.Inc()
		gl := g.launch
		m.lastLaunch = &gl
		m.fx.log.Error("ACTIVE GENERATION EXITED ON ITS OWN; restarting its command", "gen", g.n, "pid", g.pid, "exit", exitText(err), "uptime", now.Sub(g.start).Round(time.Millisecond))
		if now.Sub(g.activeAt) > time.Minute {
			m.crashes = 0
		}
		if !m.inProgress() && !m.stopping {
			m.scheduleRestart()
		}
	}
	m.save()
	m.checkIdle()
}

// scheduleRestart starts the last active command line again after an
// exponential backoff.
func (m *machine) scheduleRestart() {
	if m.restartPending || m.lastLaunch == nil {
		return
	}
	delay := min(MaxRestartDelay, 500*time.Millisecond<<min(m.crashes, 10))
	m.crashes++
	m.restartPending = true
	m.fx.log.Warn("restarting after backoff", "delay", delay, "attempt", m.crashes)
	m.fx.after(delay, evRestartDue{})
}

func (m *machine) checkIdle() {
	if m.stopping && !m.inProgress() && len(m.gens) == 0 {
		closeOnce(m.idle)
	}
}

func (m *machine) adoptDecide(waiting []*gen) adoption {
	var a adoption
	for _, g := range waiting {
		if g.state == stateGone {
			continue
		}
		if g.conn == nil && g.adopting {
			// Not back in time: it drains on its own when its adoption
			// window ends. Forget it.
			delete(m.gens, g.n)
			continue
		}
		if g.wasActive && g.state == stateReady && a.active == nil {
			g.state = stateActive
			g.activeAt = m.fx.now()
			m.active, m.started = g, true
			a.active = g
		} else {
			a.others = append(a.others, g)
		}
	}
	m.save()
	return a
}

// adoptEnd drains the generations a predecessor left that are not active:
// a rollover it had in progress failed. Those already draining were told
// before the crash; only their drain clock starts again.
func (m *machine) adoptEnd(others []*gen) {
	for _, g := range others {
		if g.state == stateDraining {
			m.fx.after(m.fx.drainTimeout, evDrainTimeout{g: g})
		} else {
			m.drain(g)
		}
	}
	m.adopting = false
	if m.stopping {
		m.drainAll()
	}
	m.checkIdle()
}

// save writes the state file: called after every change a successor needs
// (a spawn, an activation, an exit).
func (m *machine) save() {
	if m.final {
		return
	}
	s := saved{Next: m.next, Previous: m.previous}
	if m.active != nil {
		s.Active = m.active.n
	}
	for _, g := range m.sorted() {
		s.Gens = append(s.Gens, savedGen{N: g.n, PID: g.pid, Secret: g.secret, Launch: g.launch, Start: g.start})
	}
	m.fx.save(&s)
}

func (m *machine) sorted() []*gen {
	gs := make([]*gen, 0, len(m.gens))
	for _, g := range m.gens {
		gs = append(gs, g)
	}
	slices.SortFunc(gs, func(a, b *gen) int { return a.n - b.n })
	return gs
}

func (m *machine) status() wire.Status {
	st := wire.Status{PID: os.Getpid(), InProgress: m.inProgress(), ActiveExits: m.activeExits, RestartPending: m.restartPending, Generations: []wire.GenStatus{},
		CanaryWeight: m.canary, LastReport: m.lastReport}
	if m.baking != nil {
		st.Baking = m.baking.n
	}
	if m.active != nil {
		st.Active = m.active.n
	}
	for _, g := range m.sorted() {
		st.Generations = append(st.Generations, wire.GenStatus{
			Generation: g.n, PID: g.pid, State: g.state.String(), Argv: g.launch.Argv,
			Steerable: g.steerable, StartedAt: g.start, Stats: g.stats,
			Ready: g.launch.Ready, Notify: g.notifyStatus,
		})
	}
	return st
}

func (m *machine) sample() metrics.Sample {
	var s metrics.Sample
	if m.active != nil {
		s.Active = m.active.n
	}
	for _, g := range m.sorted() {
		s.Generations = append(s.Generations, metrics.GenSample{
			N: g.n, PID: g.pid, Command: strings.Join(g.launch.Argv, " "), State: g.state.String(),
			Inflight: g.stats.Inflight, Connections: g.stats.Connections, Requests: g.stats.Requests,
			Responses: [5]uint64{g.stats.R1xx, g.stats.R2xx, g.stats.R3xx, g.stats.R4xx, g.stats.R5xx}, Panics: g.stats.Panics,
		})
	}
	return s
}

func (m *machine) view() view {
	v := view{restartPending: m.restartPending, forced: m.forced}
	if a := m.active; a != nil {
		v.active, v.activePID, v.steerable, v.steerErr = a.n, a.pid, a.steerable, a.steerErr
	}
	return v
}
