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
// effect that runs elsewhere and reports back with another event. The
// rollover's procedure is rollout.go's; here is only what it changes.

// genState is where a generation stands.
type genState uint8

const (
	stateStarting genState = iota + 1 // spawned, not ready yet
	stateReady                        // serves, dark: gets no new connections
	stateActive                       // receives new connections
	stateDraining                     // told to hand over and finish
	stateGone                         // exited
)

// liveStates are the states a live generation can be in: the label values
// of rollover_generation_state.
var liveStates = []genState{stateStarting, stateReady, stateActive, stateDraining}

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
	for _, st := range liveStates {
		if st.String() == s && st != stateActive {
			return st
		}
	}
	return stateStarting
}

// metricLabels are the label values the metrics take from these types.
func metricLabels() metrics.Labels {
	var l metrics.Labels
	for _, s := range liveStates {
		l.States = append(l.States, s.String())
	}
	for _, o := range outcomes {
		l.Results = append(l.Results, o.String())
	}
	for _, c := range rollbackCauses {
		l.Reasons = append(l.Reasons, c.reason())
	}
	return l
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
		conn  *peerConn
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
	// evInstances: of g's instances (--instances), serving serve now;
	// exited, when set, says which one exited and how.
	evInstances struct {
		g       *gen
		serving int
		exited  string
	}
	evStats struct {
		g     *gen
		stats wire.Stats
	}
	// evDisconnected: the generation's control connection conn ended.
	evDisconnected struct {
		g    *gen
		conn *peerConn
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
	// evHeld: the coordinator holds g's sockets in their groups, so g has
	// left the port only when they are let go (evClosedListener), not
	// when it exits.
	evHeld struct{ g *gen }
	// evDrainTimeout: g's drain deadline passed.
	evDrainTimeout struct{ g *gen }
	// evSockets: the coordinator found g's listening sockets and can steer
	// them (socks), or cannot (why).
	evSockets struct {
		g     *gen
		socks []remoteSocket
		why   string
	}
	// evCounted: the connections g still held, as the kernel counts them,
	// just before it was killed.
	evCounted struct {
		g     *gen
		conns int64
	}
	// evExited: g's process is gone; err is its exit (nil: status 0).
	evExited struct {
		g   *gen
		err error
	}
	// evWatch starts judging g's health by rule (nil: stops) as its stats
	// arrive, and its exit as a rollback: the rollover's canary or bake.
	evWatch struct {
		g    *gen
		rule *wire.Health
	}
	// evBaked ends the bake of g; reply says false if g exited first (its
	// verdict is on the way to the rollout).
	evBaked struct {
		g     *gen
		reply chan bool
	}
	// evPhase: the rollover in progress reached phase (weight: a canary's
	// share of new connections; step of steps: its step below 100%, which
	// ends at until, or waits for a promote or an abort when until is zero).
	evPhase struct {
		phase       phase
		weight      int
		step, steps int
		until       time.Time
	}
	// evRelease: the bake began; g, the old generation, is steered away and
	// drains its connections, but keeps its listener for a rollback.
	evRelease struct {
		g     *gen
		until time.Time
	}
	// evRollback gives the port back to prev, the generation g replaced,
	// and drains g: the bake or canary failed.
	evRollback struct {
		g, prev *gen
		cause   cause
		reply   chan struct{}
	}
	// evControl asks the rollover in progress to promote its canary (or
	// end its bake) or to abort; reply says why not, if it cannot.
	evControl struct {
		what  cause // causePromote or causeAbort
		reply chan error
	}
	// evReport: a rollover's loss report is complete.
	evReport struct{ r *wire.Report }
	// evFinish ends the rollover that spawned g (if it is still the one in
	// progress) with its outcome, and err.
	evFinish struct {
		g       *gen
		outcome outcome
		err     error
		reply   chan struct{}
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
		reply chan *peerConn
	}
	qGen struct {
		g     *gen
		reply chan genView
	}
	qConnected struct{ reply chan []*gen } // generations with a control connection
	qView      struct{ reply chan view }
)

func (evBegin) isEvent()          {}
func (evHello) isEvent()          {}
func (evReady) isEvent()          {}
func (evNotifyStatus) isEvent()   {}
func (evInstances) isEvent()      {}
func (evStats) isEvent()          {}
func (evDisconnected) isEvent()   {}
func (evActivate) isEvent()       {}
func (evDrain) isEvent()          {}
func (evClosedListener) isEvent() {}
func (evHeld) isEvent()           {}
func (evDrainTimeout) isEvent()   {}
func (evCounted) isEvent()        {}
func (evSockets) isEvent()        {}
func (evExited) isEvent()         {}
func (evFinish) isEvent()         {}
func (evWatch) isEvent()          {}
func (evBaked) isEvent()          {}
func (evPhase) isEvent()          {}
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
func (qGen) isEvent()             {}
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
	// wait: whoever asked follows the rollover to its loss report (next
	// --wait), not only until it settles.
	wait bool
}

// began answers evBegin: the new generation and the one it replaces.
type began struct {
	g, prev   *gen
	was       genView        // prev, as the rollover began
	hear      <-chan verdict // the rollover's verdicts
	reloading bool           // a rollover of a started service (not generation 1's start)
	note      string         // worth telling whoever asked
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
	stopForced     bool // some generation was killed since the stop began
}

// genView is what a goroutine other than the owner may know of a
// generation: a copy, taken on the owner goroutine.
type genView struct {
	state                   genState
	stats                   wire.Stats
	statsAge                time.Duration // since its last report
	steerable               bool
	steerErr                string
	addrs                   []string
	readyIn                 time.Duration // spawn to ready
	exit                    string        // how it ended, once gone
	drainedIn               time.Duration // drain order to exit (0: never ordered)
	forcedConns, forcedReqs int64         // cut at its drain deadline
	killed                  bool
	remote                  []remoteSocket // its sockets, when the coordinator steers them
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
	// drain signal) without blocking; conn is its control connection,
	// remote the sockets the coordinator steers for it, succ those of the
	// generation it hands over to, when the coordinator steers that one.
	order func(g *gen, conn *peerConn, remote, succ []remoteSocket)
	// cut counts the connections g holds on port (evCounted; 0: any port),
	// then ends it: SIGTERM to its process group, SIGKILL after the kill
	// grace. It never blocks.
	cut func(g *gen, port int)
	// kill ends g like cut, without counting.
	kill func(g *gen)
	// signal sends sig to g's process group.
	signal func(g *gen, sig syscall.Signal)
	// after posts ev once d has passed.
	after func(d time.Duration, ev event)
	// save writes the state file (nil: removes it).
	save func(s *saved)
	// restart rolls over to the last active command line (a restart).
	restart func()
	// repin finds g's sockets again and spreads new connections over
	// them, g being alone in its groups.
	repin func(g *gen)
	// notify tells the service manager (sd_notify), when there is one.
	notify       func(msg string)
	drainTimeout time.Duration
}

// rollState is the rollover in progress, as the machine keeps it.
type rollState struct {
	g, prev   *gen
	hear      chan verdict // to the rollout
	told      bool         // a promote or abort was passed on
	reloading bool         // it replaces a started service
	phase     phase
	weight    int       // the share of new connections its canary gets
	bakeUntil time.Time // the end of its bake
	// step of steps is its canary's step below 100%, which ends at
	// stepUntil (zero: it waits for a promote or an abort).
	step, steps int
	stepUntil   time.Time
}

// machine is the coordinator's state. Only step writes it.
type machine struct {
	fx    effects
	first Launch // generation 1's launch: the base when nothing was active

	next     int
	gens     map[int]*gen
	active   *gen
	previous *Launch // what was active before the current one

	roll     *rollState // the rollover in progress
	judged   *gen       // the generation in its bake or canary
	adopting bool       // adopting a predecessor's generations (holds rollovers off)

	stopping       bool
	started        bool    // some generation became active
	lastLaunch     *Launch // an active generation that exited on its own
	crashes        int     // for the restart backoff; reset after a minute of uptime
	activeExits    int
	restartPending bool
	lastReport     *wire.Report
	forces         int           // evForce received
	stopForced     bool          // some generation was killed since the stop began
	final          bool          // no more state file
	idle           chan struct{} // closed once stopping and every generation is gone
}

func newMachine(first Launch, fx effects) *machine {
	return &machine{fx: fx, first: first, gens: map[int]*gen{}, idle: make(chan struct{})}
}

func (m *machine) inProgress() bool { return m.roll != nil || m.adopting }

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
	case evInstances:
		m.instances(e)
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
	case evHeld:
		e.g.held = true
	case evDrainTimeout:
		m.drainTimedOut(e.g)
	case evCounted:
		e.g.forcedConns = max(e.g.forcedConns, e.conns)
	case evSockets:
		e.g.remote = e.socks
		if e.socks != nil {
			e.g.steerable, e.g.steerErr = true, ""
		} else {
			e.g.steerErr = e.why
		}
	case evExited:
		m.exited(e.g, e.err)
	default:
		m.stepRollover(ev)
	}
}

// stepRollover applies the events of a rollover and of a stop.
func (m *machine) stepRollover(ev event) {
	switch e := ev.(type) {
	case evWatch:
		m.watch(e.g, e.rule)
	case evBaked:
		e.reply <- m.judged == e.g && e.g.state != stateGone
		if m.judged == e.g {
			m.watch(e.g, nil)
		}
	case evPhase:
		m.phase(e)
	case evRelease:
		if e.g.state != stateGone {
			e.g.state, e.g.released = stateDraining, true
		}
		if m.roll != nil {
			m.roll.phase, m.roll.bakeUntil = phaseBaking, e.until
		}
	case evRollback:
		m.rollback(e.g, e.prev, e.cause)
		close(e.reply)
	case evControl:
		e.reply <- m.control(e.what)
	case evReport:
		m.lastReport = e.r
	case evFinish:
		if m.roll != nil && m.roll.g == e.g {
			m.finish(e.outcome, e.err)
		}
		close(e.reply)
	case evRestartDue:
		m.restartPending = false
		if m.active == nil && !m.stopping {
			m.fx.restart()
		}
	case evStop:
		m.stop(e.reply)
	case evForce:
		e.reply <- m.force()
	default:
		m.stepAdoption(ev)
	}
}

// stepAdoption applies adoption's events and answers queries.
func (m *machine) stepAdoption(ev event) {
	switch e := ev.(type) {
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
	case qGen:
		e.reply <- m.genView(e.g)
	case qConnected:
		var gs []*gen
		for _, g := range m.sorted() {
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
	if err := m.refusal(req); err != nil {
		return began{err: err}
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
		m.finish(outcomeFailed, err)
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
	m.roll = &rollState{g: g, prev: m.active, hear: make(chan verdict, 4), reloading: m.started, phase: phaseSpawned}
	m.save()
	b := began{g: g, prev: m.active, hear: m.roll.hear, reloading: m.started}
	if a := m.active; a != nil {
		b.was = m.genView(a)
		if slices.Equal(g.launch.Argv, a.launch.Argv) && g.exe.same(a.exe) {
			b.note = fmt.Sprintf("gen %d runs the same %s as gen %d (unchanged since %s): this restarts the same program; if a deploy copied a new one, it did not land (a plain cp onto a running binary fails with \"Text file busy\": write a new file and mv it into place)",
				g.n, g.launch.Argv[0], a.n, a.exe.mtime.Format(time.DateTime))
		}
	}
	return b
}

// refusal says why a rollover cannot begin now, if it cannot.
func (m *machine) refusal(req rolloverReq) error {
	active := 0
	if m.active != nil {
		active = m.active.n
	}
	switch {
	case m.stopping:
		return ErrStopping
	case req.expect != 0 && req.expect != active:
		return fmt.Errorf("%w: the active generation is %d, not %d (--expect-generation)", ErrStale, active, req.expect)
	case m.inProgress():
		return fmt.Errorf("%w: wait for it to finish and try again", ErrInProgress)
	case req.rollback && m.previous == nil:
		return errors.New("no previous generation to roll back to")
	}
	return nil
}

// finish ends the rollover in progress with its outcome.
func (m *machine) finish(o outcome, err error) {
	reloading := m.roll != nil && m.roll.reloading
	m.roll, m.judged = nil, nil
	m.count(o, err)
	if a := m.active; a != nil && a.repinDue && a.remote != nil && a.state != stateGone {
		a.repinDue = false
		m.fx.repin(a) // alone in its groups now
	}
	if reloading {
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

// count counts a rollover once, under its outcome.
func (m *machine) count(o outcome, err error) {
	if o == outcomeOK && err == nil {
		m.started = true
	}
	m.fx.metrics.CanaryWeight.Set(0)
	m.fx.metrics.Rollovers.WithLabelValues(o.String()).Inc()
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
	if m.roll != nil && m.roll.g == g {
		m.roll.phase = phaseReady
	}
	close(g.ready)
}

// stats records what g reported, judges its health, and keeps what its
// drain deadline cut.
func (m *machine) stats(g *gen, s wire.Stats) {
	g.stats, g.statsAt = s, m.fx.now()
	g.forcedConns = max(g.forcedConns, s.ForcedConnections)
	g.forcedReqs = max(g.forcedReqs, s.ForcedRequests)
	m.judge(g)
}

// watch starts (rule set) or stops judging g for the rollover.
func (m *machine) watch(g *gen, rule *wire.Health) {
	g.health = rule
	if rule != nil {
		m.judged = g
		m.judge(g)
	} else if m.judged == g {
		m.judged = nil
	}
}

// judge tells the rollover once g breaks its health rule.
func (m *machine) judge(g *gen) {
	if g.health == nil || g.state == stateGone || g.unhealthy || !g.health.Failing(g.stats) {
		return
	}
	bad, total := g.stats.Judged()
	what := "responses were 5xx or panics"
	if g.stats.Answers > 0 {
		what = "responses and answers were 5xx, panics or failed answers"
	}
	g.unhealthy = true
	m.tell(verdict{cause: causeHealth, detail: fmt.Sprintf("%d of %d %s (%.0f%%, limit %.0f%% of at least %d)", bad, total, what, 100*float64(bad)/float64(total), 100*g.health.MaxErrorRatio, g.health.MinRequests)})
}

// instances records how many of g's instances serve. One that exited in
// g's bake or canary rolls the generation back, as its whole exit would;
// after that its supervisor restarts it alone. The active generation's
// groups lost or gained a socket: the program is rebuilt over those left.
func (m *machine) instances(e evInstances) {
	g := e.g
	g.instances = e.serving
	if e.exited != "" && m.judged == g {
		m.tell(verdict{cause: causeExited, detail: e.exited})
	}
	if m.roll != nil {
		g.repinDue = true // the rollover's steering holds until it ends
		return
	}
	if g.state == stateGone || g.remote == nil || m.active != g {
		return
	}
	m.fx.repin(g)
}

// tell passes v to the rollover in progress; it never blocks (the
// rollover acts on the first verdict of a wait).
func (m *machine) tell(v verdict) {
	if m.roll == nil {
		return
	}
	select {
	case m.roll.hear <- v:
	default:
	}
}

// control passes a promote or abort to a canary or bake that waits.
func (m *machine) control(c cause) error {
	switch {
	case m.roll == nil || (m.roll.phase != phaseCanary && m.roll.phase != phaseBaking):
		return errors.New("no canary or bake is waiting")
	case m.roll.told:
		return errors.New("the rollover is already acting on a promote or abort")
	}
	m.roll.told = true
	m.tell(verdict{cause: c, detail: "by hand"})
	return nil
}

// phase records where the rollover in progress stands.
func (m *machine) phase(e evPhase) {
	if m.roll == nil {
		return
	}
	m.roll.phase, m.roll.told = e.phase, false
	m.roll.step, m.roll.steps, m.roll.stepUntil = e.step, e.steps, e.until
	if e.phase == phaseCanary {
		m.roll.weight = e.weight
		m.fx.metrics.CanaryWeight.Set(float64(e.weight))
	}
}

// rollback makes prev, the generation g replaced, active again and drains
// g. prev takes the port back itself (resume), before this.
func (m *machine) rollback(g, prev *gen, c cause) {
	m.fx.metrics.Rollbacks.WithLabelValues(c.reason()).Inc()
	m.judged = nil
	if m.roll != nil && m.roll.g == g {
		m.roll.phase = phaseRolledBack
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
	if m.roll != nil && m.roll.g == g {
		m.roll.phase = phaseSteered
	}
	m.save()
	if last && m.roll != nil && m.roll.g == g {
		m.finish(outcomeOK, nil)
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
	if m.roll != nil && m.roll.prev == g && m.roll.phase != phaseRolledBack {
		m.roll.phase = phaseDraining
	}
	var succ []remoteSocket // the sockets of the one it hands over to, when steered from outside
	if a := m.active; a != nil && a != g && a.n > g.n {
		succ = a.remote
	}
	m.fx.order(g, g.conn, g.remote, succ)
	m.fx.after(m.fx.drainTimeout, evDrainTimeout{g: g})
}

// drainTimedOut cuts g at its drain deadline: what it still held is cut
// now (the library's own count, reported in done, wins when it is higher;
// the kernel's count of its connections comes as evCounted).
func (m *machine) drainTimedOut(g *gen) {
	if g.state == stateGone {
		return
	}
	if m.stopping {
		m.stopForced = true
	}
	g.forcedConns = max(g.forcedConns, g.stats.Connections)
	g.forcedReqs = max(g.forcedReqs, g.stats.Inflight)
	m.fx.metrics.ForcedDrains.Inc()
	g.killed = true
	m.fx.log.Warn("drain timed out; killing", "gen", g.n, "pid", g.pid, "drain_timeout", m.fx.drainTimeout)
	m.fx.cut(g, g.port())
}

func (m *machine) drainAll() {
	for _, g := range m.sorted() {
		m.drain(g)
	}
}

// stop drains every generation, unless a rollover must end first.
func (m *machine) stop(reply chan int) {
	m.stopping = true
	if m.roll != nil {
		m.tell(verdict{cause: causeStop, detail: "the coordinator is stopping"})
	}
	if !m.inProgress() {
		m.drainAll()
	}
	if reply != nil {
		reply <- len(m.gens)
	}
	m.checkIdle()
}

// force escalates a stop: SIGTERM to every generation first, SIGKILL after.
func (m *machine) force() int {
	m.stopping = true
	m.forces++
	for _, g := range m.sorted() {
		m.stopForced, g.killed = true, true
		if m.forces == 1 {
			m.fx.log.Warn("forcing the stop: SIGTERM", "gen", g.n, "pid", g.pid)
			m.fx.kill(g)
		} else {
			m.fx.log.Warn("forcing the stop: SIGKILL", "gen", g.n, "pid", g.pid)
			m.fx.signal(g, syscall.SIGKILL)
		}
	}
	return m.forces
}

func (m *machine) exited(g *gen, err error) {
	if g.state == stateGone {
		return
	}
	now := m.fx.now()
	g.exitErr, g.exitAt = err, now
	g.state = stateGone
	delete(m.gens, g.n)
	if !g.held {
		closeOnce(g.left)
	}
	close(g.gone)
	if g.forcedConns > 0 || g.forcedReqs > 0 {
		m.fx.metrics.ForcedConnections.Add(float64(g.forcedConns))
		m.fx.metrics.ForcedRequests.Add(float64(g.forcedReqs))
		m.fx.log.Warn(fmt.Sprintf("gen %d: its drain deadline cut %d connections and %d requests", g.n, g.forcedConns, g.forcedReqs), "gen", g.n, "pid", g.pid, "forced_connections", g.forcedConns, "forced_requests", g.forcedReqs)
	}
	switch {
	case m.judged == g:
		m.exitedJudged(g, err)
	case !g.drainStart.IsZero():
		d := now.Sub(g.drainStart)
		m.fx.metrics.Drain.Observe(d.Seconds())
		if g.killed {
			m.fx.log.Warn("generation killed: it did not finish draining in time", "gen", g.n, "pid", g.pid, "after", d.Round(time.Millisecond), "exit", exitText(err))
		} else {
			m.fx.log.Info("generation drained", "gen", g.n, "pid", g.pid, "after", d.Round(time.Millisecond), "exit", exitText(err))
		}
	case m.active == g:
		m.exitedActive(g, err, now)
	}
	m.save()
	m.checkIdle()
}

// exitedJudged: g exited in its bake or canary. Its rollover rolls back:
// not a crash to restart. The kernel already sends every new connection
// to the generation in the bake's standby; it is active again from now.
func (m *machine) exitedJudged(g *gen, err error) {
	m.judged = nil
	m.tell(verdict{cause: causeExited, detail: exitText(err)})
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
}

// exitedActive: the active generation exited on its own; its command is
// restarted after a backoff.
func (m *machine) exitedActive(g *gen, err error, now time.Time) {
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
		LastReport: m.lastReport}
	if r := m.roll; r != nil {
		st.Rollout = &wire.RolloutStatus{Generation: r.g.n, Phase: r.phase.String(), Weight: r.weight}
		if r.phase == phaseCanary {
			st.CanaryWeight = r.weight
			st.Rollout.Step, st.Rollout.Steps = r.step, r.steps
			if r.step > 0 && r.stepUntil.IsZero() {
				st.Rollout.Waiting = true
			} else if r.step > 0 {
				st.Rollout.StepLeftMS = max(0, r.stepUntil.Sub(m.fx.now()).Milliseconds())
			}
		}
		if r.phase == phaseBaking {
			st.Rollout.BakeLeftMS = max(0, r.bakeUntil.Sub(m.fx.now()).Milliseconds())
		}
	}
	if m.judged != nil {
		st.Baking = m.judged.n
	}
	if m.active != nil {
		st.Active = m.active.n
	}
	for _, g := range m.sorted() {
		st.Generations = append(st.Generations, wire.GenStatus{
			Generation: g.n, PID: g.pid, State: g.state.String(), Argv: g.launch.Argv,
			Steerable: g.steerable, SteerError: g.steerErr, Sockets: len(g.remote), StartedAt: g.start, Stats: g.stats,
			Ready: g.launch.Ready, Notify: g.notifyStatus,
		})
		if g.launch.supervised() {
			st.Generations[len(st.Generations)-1].Instances = g.launch.Instances
			st.Generations[len(st.Generations)-1].Serving = g.serving()
		}
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
			N: g.n, PID: g.pid, Command: strings.Join(g.launch.Argv, " "), State: g.state.String(), Stats: g.stats,
			Instances: g.serving(),
		})
	}
	return s
}

func (m *machine) view() view {
	v := view{restartPending: m.restartPending, stopForced: m.stopForced}
	if a := m.active; a != nil {
		v.active, v.activePID, v.steerable, v.steerErr = a.n, a.pid, a.steerable, a.steerErr
	}
	return v
}

func (m *machine) genView(g *gen) genView {
	v := genView{state: g.state, stats: g.stats, steerable: g.steerable, steerErr: g.steerErr, addrs: g.addrs,
		forcedConns: g.forcedConns, forcedReqs: g.forcedReqs, killed: g.killed, remote: g.remote}
	now := m.fx.now()
	if !g.statsAt.IsZero() {
		v.statsAge = now.Sub(g.statsAt)
	}
	if !g.readyAt.IsZero() {
		v.readyIn = g.readyAt.Sub(g.start)
	}
	if g.state == stateGone {
		v.exit = exitText(g.exitErr)
		if !g.drainStart.IsZero() {
			v.drainedIn = g.exitAt.Sub(g.drainStart)
		}
	}
	return v
}
