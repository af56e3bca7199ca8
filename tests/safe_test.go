package tests

// Safe activation under real load (issue 11, "What must hold"): a new
// generation SIGKILLed in its bake, one that crashes on its first request,
// one whose handlers all panic, a 10% canary with promote and abort, a
// drain cut at its deadline, and a hung old generation. Every test counts
// its failed requests by kind and logs the figures.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// The tests' load: safeClients keep-alive clients, safeClients with a new
// connection per request, and probeClients of a dialProbe. A client has
// at most one request in flight, so a generation that dies at an instant
// holds at most allClients requests.
//
// With tcp_migrate_req=0 a client can lose one more (dyingBound). A dying
// process's sockets are released one by one, and its listener is not the
// first to go: its accepted connections were seen reset milliseconds
// before it left the reuseport group. (The kernel runs the deferred
// releases of an exiting task's files in reverse order, the highest fd
// first, and the listener has a lower fd than the connections it accepted;
// that is our reading, not measured.) A client reset early dials again, the
// group's program still steers it to the dying listener, and its queued
// connection is reset a moment later with the listener's queue; it cannot
// lose a third, for then the listener is gone. With tcp_migrate_req=1
// that queued connection migrates to the old generation instead.
const (
	safeClients  = 8
	probeClients = 8
	allClients   = 2*safeClients + probeClients
	dyingBound   = 2 * allClients
)

// stampedEvent is an event of `rollover next --json` and when it was read.
type stampedEvent struct {
	wire.Event
	At time.Time
}

// nextRun is a `rollover next --json` running in the background, its
// events read as they come.
type nextRun struct {
	begun  time.Time
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan struct{} // closed once the CLI has exited
	ended  time.Time     // set before done is closed
	err    error         // set before done is closed

	mu      sync.Mutex
	events  []stampedEvent
	changed chan struct{} // closed and replaced at every event
	cursor  int           // the next event waitFor looks at
}

// startNext runs `rollover next --json FLAGS -- ARGV` against svc. Cleanup ends the
// CLI if it is still running and SIGKILLs the generations it started that
// are still alive (by pid, after SIGCONT in case a test stopped one).
func startNext(t *testing.T, svc *harness.Service, flags []string, argv []string) *nextRun {
	t.Helper()
	full := append([]string{"next", "--socket", svc.Socket, "--json"}, flags...)
	full = append(append(full, "--"), argv...)
	n := &nextRun{
		cmd:     exec.Command(filepath.Join(bin, "rollover"), full...),
		stderr:  &syncBuffer{},
		done:    make(chan struct{}),
		changed: make(chan struct{}),
	}
	n.cmd.Stderr = n.stderr
	stdout, err := n.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	n.begun = time.Now()
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var e wire.Event
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			n.mu.Lock()
			n.events = append(n.events, stampedEvent{e, time.Now()})
			close(n.changed)
			n.changed = make(chan struct{})
			n.mu.Unlock()
		}
		n.err = n.cmd.Wait()
		n.ended = time.Now()
		close(n.done)
	}()
	t.Cleanup(func() {
		select {
		case <-n.done:
		default:
			_ = n.cmd.Process.Kill()
			<-n.done
		}
		pids := n.pids()
		if left := harness.WaitGone(pids, 5*time.Second); len(left) > 0 {
			t.Errorf("generations %v started by `rollover next` still alive at cleanup; killing them", left)
			for _, p := range left {
				_ = syscall.Kill(p, syscall.SIGCONT)
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
	})
	return n
}

// pids are the generations this rollover started.
func (n *nextRun) pids() []int {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []int
	for _, e := range n.events {
		if e.Phase == wire.PhaseStarted && e.PID > 0 {
			out = append(out, e.PID)
		}
	}
	return out
}

// waitFor returns the next event (after those waitFor returned before) for
// which match holds; it fails t if the CLI exits or d passes first.
func (n *nextRun) waitFor(t *testing.T, what string, d time.Duration, match func(wire.Event) bool) stampedEvent {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		e, ok, changed := n.scan(match)
		if ok {
			return e
		}
		select {
		case <-changed:
		case <-n.done:
			// The reader appended every event before done: look once more.
			if e, ok, _ := n.scan(match); ok {
				return e
			}
			t.Fatalf("`rollover next` exited (%v) before %s; events: %s; stderr: %s", n.err, what, n.phases(), n.stderr.String())
		case <-timer.C:
			t.Fatalf("no %s within %v; events so far: %s; stderr: %s", what, d, n.phases(), n.stderr.String())
		}
	}
}

// scan moves the cursor past the next event that matches, and returns it;
// without one, it returns the channel that the next event closes.
func (n *nextRun) scan(match func(wire.Event) bool) (e stampedEvent, ok bool, changed <-chan struct{}) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for ; n.cursor < len(n.events); n.cursor++ {
		if e := n.events[n.cursor]; match(e.Event) {
			n.cursor++
			return e, true, nil
		}
	}
	return stampedEvent{}, false, n.changed
}

// waitPhase is waitFor of the next event of phase.
func (n *nextRun) waitPhase(t *testing.T, phase string, d time.Duration) stampedEvent {
	t.Helper()
	return n.waitFor(t, phase, d, func(e wire.Event) bool { return e.Phase == phase })
}

// wait waits for the CLI to exit and returns its exit code.
func (n *nextRun) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-n.done:
	case <-time.After(d):
		t.Fatalf("`rollover next` still running after %v; events: %s", d, n.phases())
	}
	var ee *exec.ExitError
	switch {
	case n.err == nil:
		return 0
	case errors.As(n.err, &ee):
		return ee.ExitCode()
	}
	t.Fatalf("rollover next: %v", n.err)
	return -1
}

// find returns the last event of phase, if any.
func (n *nextRun) find(phase string) (stampedEvent, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i := len(n.events) - 1; i >= 0; i-- {
		if n.events[i].Phase == phase {
			return n.events[i], true
		}
	}
	return stampedEvent{}, false
}

// phases renders the events read so far, each with its time since the CLI
// began.
func (n *nextRun) phases() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var b strings.Builder
	for i, e := range n.events {
		if i > 0 {
			b.WriteString(" → ")
		}
		fmt.Fprintf(&b, "[+%dms] %s", e.At.Sub(n.begun).Milliseconds(), e.String())
	}
	return b.String()
}

// mixedLoad is safeClients keep-alive clients, safeClients clients with a
// new connection per request, and a dialProbe, all on "/".
type mixedLoad struct {
	keepAlive, newConn *load.Runner
	probe              *dialProbe
}

// mixedResult is a mixedLoad's tally.
type mixedResult struct {
	KeepAlive load.Result `json:"keep_alive"`
	NewConn   load.Result `json:"new_conn"`
	Probe     dialCounts  `json:"probe"`
}

// all is the tally of the whole load, the probe included.
func (r mixedResult) all() load.Result {
	s := sumResults(r.KeepAlive, r.NewConn)
	s.Requests += r.Probe.Requests
	s.OK += r.Probe.OK
	s.Failures += r.Probe.Requests - r.Probe.OK
	return s
}

func (r mixedResult) log(t *testing.T) {
	t.Helper()
	all := r.all()
	t.Logf("load, keep-alive: %s", r.KeepAlive)
	t.Logf("load, new connection per request: %s", r.NewConn)
	t.Logf("dial probe: %s", r.Probe)
	t.Logf("failed %d of %d requests (load by kind %v); samples %q", all.Failures, all.Requests, sumResults(r.KeepAlive, r.NewConn).ByKind, all.Samples)
}

// startMixedLoad starts a mixedLoad of at most d, each request bounded by
// timeout, and lets it run for a second and until it is answered.
func startMixedLoad(t *testing.T, svc *harness.Service, d, timeout time.Duration) mixedLoad {
	t.Helper()
	var m mixedLoad
	for _, ka := range []bool{true, false} {
		r, err := load.Start(context.Background(), load.Options{
			URL: "http://" + svc.Addr + "/", Clients: safeClients, KeepAlive: ka, Duration: d, Timeout: timeout,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Stop() })
		if ka {
			m.keepAlive = r
		} else {
			m.newConn = r
		}
	}
	m.probe = startDialProbe(svc.Addr, probeClients, d, timeout)
	t.Cleanup(func() { m.probe.stop() })
	start, deadline := time.Now(), time.Now().Add(10*time.Second)
	for time.Since(start) < time.Second || m.keepAlive.Snapshot().OK < 50 || m.newConn.Snapshot().OK < 50 || m.probe.counts().OK < 10 {
		if time.Now().After(deadline) {
			t.Fatalf("the load is not answered: keep-alive %s; new connections %s; probe %s", m.keepAlive.Snapshot(), m.newConn.Snapshot(), m.probe.counts())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return m
}

// snapshot is the load's answers so far (the probe's not included).
func (m mixedLoad) snapshot() load.Result {
	return sumResults(m.keepAlive.Snapshot(), m.newConn.Snapshot())
}

// stop ends the load and returns its tally.
func (m mixedLoad) stop() mixedResult {
	return mixedResult{KeepAlive: m.keepAlive.Stop(), NewConn: m.newConn.Stop(), Probe: m.probe.stop()}
}

// waitServed waits until the load's answers from generation gen reach n.
func (m mixedLoad) waitServed(t *testing.T, gen int, n int64, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for m.snapshot().ByGeneration[strconv.Itoa(gen)] < n {
		if time.Now().After(deadline) {
			t.Fatalf("gen %d answered fewer than %d requests in %v: %v", gen, n, d, m.snapshot().ByGeneration)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// afterwards lets the load run for d and until it has n more answers (5s
// more at most), and returns the answers by generation meanwhile.
func (m mixedLoad) afterwards(d time.Duration, n int64) map[string]int64 {
	before := m.snapshot()
	deadline := time.Now().Add(d + 5*time.Second)
	for start := time.Now(); (time.Since(start) < d || m.snapshot().OK < before.OK+n) && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	return diffGenerations(before, m.snapshot())
}

// dialProbe is a load of its own that the load package cannot be: half
// its clients open a new connection per request, half keep one alive; it
// tells failed dials apart by errno and keeps every client's failures.
// The load counts every failed dial as "connect", and a dial also fails
// when the handshake completed and the connection was reset before the
// client looked ("connect: connection reset by peer"): a connection queued
// on a listener that then closed, one the dying generation held. Only
// ECONNREFUSED means that no listener took the connection.
type dialProbe struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	c      dialCounts
}

// dialCounts is a dialProbe's tally.
type dialCounts struct {
	Requests  int64 `json:"requests"` // finished while the probe ran
	OK        int64 `json:"ok"`
	Refused   int64 `json:"refused"`    // dials that failed with ECONNREFUSED
	DialReset int64 `json:"dial_reset"` // dials that failed with ECONNRESET
	Other     int64 `json:"other"`      // failed requests otherwise
	// MostByOne is the most failed requests of one client; Failures are
	// the first 64.
	MostByOne int64          `json:"most_by_one"`
	Failures  []probeFailure `json:"failures,omitempty"`
}

// probeFailure is one failed request of a dialProbe.
type probeFailure struct {
	Client    int       `json:"client"`
	KeepAlive bool      `json:"keep_alive"`
	At        time.Time `json:"at"`
	Err       string    `json:"err"`
}

func (c dialCounts) String() string {
	return fmt.Sprintf("requests=%d ok=%d failed=%d (dial refused=%d dial reset=%d other=%d; at most %d by one client)",
		c.Requests, c.OK, c.Requests-c.OK, c.Refused, c.DialReset, c.Other, c.MostByOne)
}

// failuresSince renders the probe's failures with their time after t0,
// those of a client that failed more than once first.
func (c dialCounts) failuresSince(t0 time.Time) string {
	by := map[int]int{}
	for _, f := range c.Failures {
		by[f.Client]++
	}
	fs := slices.Clone(c.Failures)
	slices.SortStableFunc(fs, func(a, b probeFailure) int { return by[b.Client] - by[a.Client] })
	var parts []string
	for _, f := range fs {
		mode := "new-conn"
		if f.KeepAlive {
			mode = "keep-alive"
		}
		parts = append(parts, fmt.Sprintf("client %d (%s) +%v: %s", f.Client, mode, f.At.Sub(t0).Round(10*time.Microsecond), f.Err))
	}
	return strings.Join(parts, "; ")
}

func startDialProbe(addr string, clients int, d, timeout time.Duration) *dialProbe {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	p := &dialProbe{cancel: cancel}
	for i := range clients {
		keepAlive := i%2 == 1
		p.wg.Go(func() {
			// The errno of this client's last dial: the transport dials in
			// a goroutine of its own, which may outlive a request.
			var dialErrno atomic.Uintptr
			dialer := &net.Dialer{Timeout: timeout}
			tr := &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 1, Proxy: nil, DialContext: func(ctx context.Context, network, a string) (net.Conn, error) {
				c, err := dialer.DialContext(ctx, network, a)
				var errno syscall.Errno
				if errors.As(err, &errno) {
					dialErrno.Store(uintptr(errno))
				}
				return c, err
			}}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			var failed int64
			for ctx.Err() == nil {
				dialErrno.Store(0)
				rctx, rcancel := context.WithTimeout(ctx, timeout)
				// POST without a body: never replayed by the transport.
				req, _ := http.NewRequestWithContext(rctx, http.MethodPost, "http://"+addr+"/", nil)
				resp, err := client.Do(req)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = errors.New(resp.Status)
					}
				}
				rcancel()
				if ctx.Err() != nil && err != nil {
					return // cut by the end of the probe: not counted
				}
				p.mu.Lock()
				p.c.Requests++
				if err != nil {
					failed++
					p.c.MostByOne = max(p.c.MostByOne, failed)
					if len(p.c.Failures) < 64 {
						p.c.Failures = append(p.c.Failures, probeFailure{Client: i, KeepAlive: keepAlive, At: time.Now(), Err: err.Error()})
					}
				}
				switch {
				case err == nil:
					p.c.OK++
				case syscall.Errno(dialErrno.Load()) == syscall.ECONNREFUSED:
					p.c.Refused++
				case syscall.Errno(dialErrno.Load()) == syscall.ECONNRESET:
					p.c.DialReset++
				default:
					p.c.Other++
				}
				p.mu.Unlock()
			}
		})
	}
	return p
}

func (p *dialProbe) counts() dialCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.c
	c.Failures = slices.Clone(c.Failures)
	return c
}

// stop ends the probe and returns its tally; it may be called more than once.
func (p *dialProbe) stop() dialCounts {
	p.cancel()
	p.wg.Wait()
	return p.counts()
}

// sumResults adds two load results (latencies are not kept).
func sumResults(a, b load.Result) load.Result {
	s := load.Result{
		Requests: a.Requests + b.Requests, OK: a.OK + b.OK, Failures: a.Failures + b.Failures,
		ByKind: map[load.Kind]int64{}, ByGeneration: map[string]int64{}, Elapsed: max(a.Elapsed, b.Elapsed),
	}
	for _, r := range []load.Result{a, b} {
		for k, v := range r.ByKind {
			s.ByKind[k] += v
		}
		for g, v := range r.ByGeneration {
			s.ByGeneration[g] += v
		}
		s.Samples = append(s.Samples, r.Samples...)
	}
	return s
}

// diffGenerations is what each generation answered between two snapshots.
func diffGenerations(before, after load.Result) map[string]int64 {
	d := map[string]int64{}
	for g, v := range after.ByGeneration {
		if v -= before.ByGeneration[g]; v != 0 {
			d[g] = v
		}
	}
	return d
}

// waitSvcStatus polls status until ok holds for it, or fails t after d.
func waitSvcStatus(t *testing.T, svc *harness.Service, what string, d time.Duration, ok func(wire.Status) bool) wire.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d+5*time.Second)
	defer cancel()
	deadline := time.Now().Add(d)
	for {
		st, err := svc.Status(ctx)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("status: no %s within %v: %+v %v", what, d, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// newConnections sends n requests, each on a new connection, and returns
// the tally: which generation answered new connections.
func newConnections(t *testing.T, svc *harness.Service, n int64) load.Result {
	t.Helper()
	res, err := load.Run(context.Background(), load.Options{
		URL: "http://" + svc.Addr + "/", Clients: safeClients, MaxRequests: n, Duration: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.OK != n || res.Failures != 0 {
		t.Fatalf("%d new connections: %s; samples %v", n, res, res.Samples)
	}
	return res
}

// --- 1. SIGKILL in the bake, with tcp_migrate_req 0 and 1 ---

// envSafeKill carries a JSON killScenario to TestSafeKillHelper.
const envSafeKill = "ROLLOVER_TEST_SAFE_KILL"

type killScenario struct {
	Dir        string `json:"dir"`
	MigrateReq int    `json:"migrate_req"`
}

// killReport is what TestSafeKillHelper measured.
type killReport struct {
	Error      string `json:"error,omitempty"`
	MigrateReq string `json:"migrate_req"` // as read back in the namespace

	Code   int    `json:"code"` // of `rollover next --wait`
	Stderr string `json:"stderr"`
	Events string `json:"events"`
	PID    int    `json:"pid"` // the killed generation's

	Bake           time.Duration `json:"bake"`
	ActiveToKill   time.Duration `json:"active_to_kill"`   // `active` read to the SIGKILL
	KillToRollback time.Duration `json:"kill_to_rollback"` // the SIGKILL to `rolled-back` read
	ServedByNew    int64         `json:"served_by_new"`    // answers from gen 2 before the kill
	Killed         time.Time     `json:"killed"`
	RolledBack     bool          `json:"rolled_back"` // a rolled-back event naming gen 1
	Report         *wire.Report  `json:"report"`

	Load   mixedResult      `json:"load"`
	After  map[string]int64 `json:"after"` // answers by generation after the rollback
	Active int              `json:"active"`
	Gens   int              `json:"gens"` // live generations at the end
}

// The new generation SIGKILLed right after its activation, in its bake:
// the rollover is rolled back, `next` exits 1, no connection is refused,
// and the only failed requests are those the killed process held: one per
// client. Run in network namespaces of its own with tcp_migrate_req=0 and
// =1: with 1, the connections it had queued but not accepted migrate to
// the old generation instead of being reset; with 0, a client may lose a
// second one while the dying process's sockets go (see dyingBound).
func TestSafeKillInBake(t *testing.T) {
	prefix := unshareArgs(t)
	for _, mr := range []int{0, 1} {
		t.Run(fmt.Sprintf("tcp_migrate_req=%d", mr), func(t *testing.T) {
			sc := killScenario{Dir: testproc.ShortDir(t), MigrateReq: mr}
			raw, _ := json.Marshal(sc)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd, out := helperCommand(t, ctx, prefix, "TestSafeKillHelper", 90*time.Second, envSafeKill+"="+string(raw))
			start := time.Now()
			runErr := cmd.Run()
			checkOutput(t, "helper", out.String())
			// Everything in the helper's namespace is ours: nothing may
			// outlive it.
			if raw, err := os.ReadFile(filepath.Join(sc.Dir, "netns")); err == nil {
				inode, _ := strconv.ParseUint(string(raw), 10, 32)
				ns := procfs.Namespace{Type: "net", Inode: uint32(inode)}
				if left := foreignKillAll(foreignInNetns(ns)); len(left) > 0 {
					t.Errorf("processes left in the helper's namespace (killed): %v", left)
				}
			}
			b, err := os.ReadFile(filepath.Join(sc.Dir, "report.json"))
			if err != nil {
				t.Fatalf("helper: %v; no report: %v\n%s", runErr, err, tailLines(out.String(), 80))
			}
			var rep killReport
			if err := json.Unmarshal(b, &rep); err != nil {
				t.Fatal(err)
			}
			if rep.Error != "" || runErr != nil {
				t.Fatalf("helper: %v %s\n%s", runErr, rep.Error, tailLines(out.String(), 100))
			}
			all := rep.Load.all()
			t.Logf("tcp_migrate_req=%s: gen 2 (pid %d) answered %d requests, SIGKILLed %v after `active`; `rolled-back` %v after the kill (bake %v); next exit %d; helper %v",
				rep.MigrateReq, rep.PID, rep.ServedByNew, rep.ActiveToKill.Round(time.Millisecond), rep.KillToRollback.Round(time.Millisecond), rep.Bake, rep.Code, time.Since(start).Round(100*time.Millisecond))
			rep.Load.log(t)
			t.Logf("the probe's failures after the SIGKILL: %s", rep.Load.Probe.failuresSince(rep.Killed))
			t.Logf("after the rollback, answers by generation: %v", rep.After)
			if rep.Report != nil {
				t.Logf("%s", rep.Report)
			}
			t.Logf("events: %s", rep.Events)
			if rep.MigrateReq != strconv.Itoa(mr) {
				t.Errorf("tcp_migrate_req reads %q in the namespace, want %d", rep.MigrateReq, mr)
			}
			if rep.Code != 1 {
				t.Errorf("next exited %d, want 1 (rolled back); stderr: %s", rep.Code, rep.Stderr)
			}
			if !rep.RolledBack || !strings.Contains(rep.Stderr, "gen 2 exited") || !strings.Contains(rep.Stderr, "rolled back to gen 1") {
				t.Errorf("no rollback to gen 1 reported (event: %v); stderr: %s", rep.RolledBack, rep.Stderr)
			}
			if rep.KillToRollback > rep.Bake {
				t.Errorf("rolled back %v after the kill: not within the %v bake", rep.KillToRollback, rep.Bake)
			}
			if rep.Report == nil || !rep.Report.RolledBack {
				t.Errorf("report %v: want a rolled-back report", rep.Report)
			}
			checkNoRefusal(t, rep.Load, mr == 1)
			// One per client; at tcp_migrate_req=0, two (see dyingBound).
			bound, perClient := int64(allClients), int64(1)
			if mr == 0 {
				bound, perClient = dyingBound, 2
			}
			t.Logf("failed %d requests of %d clients (bound %d); the probe's clients lost at most %d each (bound %d)", all.Failures, allClients, bound, rep.Load.Probe.MostByOne, perClient)
			if all.Failures > bound || rep.Load.Probe.MostByOne > perClient {
				t.Errorf("%d requests failed, at most %d by one probe client: over %d (%d per client, %d clients)", all.Failures, rep.Load.Probe.MostByOne, bound, perClient, allClients)
			}
			if all.OK == 0 || rep.After["1"] == 0 || rep.After["2"] != 0 {
				t.Errorf("after the rollback answers came from %v: want gen 1 only", rep.After)
			}
			if rep.Active != 1 || rep.Gens != 1 {
				t.Errorf("at the end: active gen %d, %d generations; want gen 1 alone", rep.Active, rep.Gens)
			}
		})
	}
}

// TestSafeKillHelper is not a test of its own: TestSafeKillInBake runs it
// in a network namespace it creates.
func TestSafeKillHelper(t *testing.T) {
	var sc killScenario
	helperScenario(t, envSafeKill, "TestSafeKillInBake", &sc)
	var rep killReport
	defer func() {
		if t.Failed() && rep.Error == "" {
			rep.Error = "the helper failed (see its output)"
		}
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(filepath.Join(sc.Dir, "report.json"), b, 0o644); err != nil {
			t.Error(err)
		}
	}()
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		rep.Error = fmt.Sprintf("ip link set lo up: %v: %s", err, out)
		return
	}
	const sysctl = "/proc/sys/net/ipv4/tcp_migrate_req"
	if err := os.WriteFile(sysctl, []byte(strconv.Itoa(sc.MigrateReq)), 0o644); err != nil {
		rep.Error = fmt.Sprintf("set tcp_migrate_req: %v", err)
		return
	}
	v, _ := os.ReadFile(sysctl)
	rep.MigrateReq = strings.TrimSpace(string(v))
	// Whatever becomes of this helper, TestSafeKillInBake can then find
	// what it left in the namespace.
	ns, err := selfNetns()
	if err != nil {
		rep.Error = err.Error()
		return
	}
	if err := os.WriteFile(filepath.Join(sc.Dir, "netns"), []byte(strconv.FormatUint(uint64(ns.Inode), 10)), 0o644); err != nil {
		rep.Error = err.Error()
		return
	}
	killInBake(t, &rep)
}

// killInBake is TestSafeKillInBake's scenario, in the namespace.
func killInBake(t *testing.T, rep *killReport) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ld := startMixedLoad(t, svc, time.Minute, 5*time.Second)
	rep.Bake = 3 * time.Second
	n := startNext(t, svc, []string{"--wait", "--bake", rep.Bake.String()}, svc.AppArgv("v2"))
	started := n.waitPhase(t, wire.PhaseStarted, 30*time.Second)
	active := n.waitPhase(t, wire.PhaseActive, 30*time.Second)
	rep.PID = started.PID
	// Right after activation, once it serves real traffic (keep-alive
	// clients moved to it too): well inside the bake.
	ld.waitServed(t, 2, 100, rep.Bake/2)
	rep.ServedByNew = ld.snapshot().ByGeneration["2"]
	killed := time.Now()
	if err := syscall.Kill(started.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL gen 2 (pid %d): %v", started.PID, err)
	}
	rep.ActiveToKill, rep.Killed = killed.Sub(active.At), killed
	rb := n.waitPhase(t, wire.PhaseRolledBack, 10*time.Second)
	rep.KillToRollback = rb.At.Sub(killed)
	rep.RolledBack = rb.Generation == 1
	rep.Code = n.wait(t, 30*time.Second)
	rep.Stderr = n.stderr.String()
	if e, ok := n.find(wire.PhaseReport); ok {
		rep.Report = e.Report
	}
	// Gen 1 serves on: a while of load after the rollback.
	rep.After = ld.afterwards(time.Second, 500)
	rep.Load = ld.stop()
	rep.Events = n.phases()
	st, err := svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rep.Active, rep.Gens = st.Active, len(st.Generations)
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// --- 2 and 3. A crash on the first request, handlers that all panic ---

// badDeploy rolls over under load to demoapp v2 with -fail=mode and a 3s
// bake, and checks that it is rolled back within the bake with `next`
// exiting 1 and no connection refused. It returns the load's tally and the
// rollover.
//
// With -fail=panic, net/http recovers the panics and logs "http: panic
// serving …" with a stack, which has no "panic:" in it: startService's
// output check passes, and still catches an unrecovered panic.
func badDeploy(t *testing.T, mode string) (load.Result, *nextRun) {
	t.Helper()
	const bake = 3 * time.Second
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ld := startMixedLoad(t, svc, time.Minute, 5*time.Second)
	n := startNext(t, svc, []string{"--wait", "--bake", bake.String()}, append(svc.AppArgv("v2"), "-fail="+mode))
	active := n.waitPhase(t, wire.PhaseActive, 30*time.Second)
	rb := n.waitPhase(t, wire.PhaseRolledBack, bake+5*time.Second)
	code := n.wait(t, 30*time.Second)
	after := ld.afterwards(time.Second, 500)
	res := ld.stop()
	all := res.all()
	rep, _ := n.find(wire.PhaseReport)
	t.Logf("-fail=%s: `rolled-back` %v after `active` (bake %v); next exit %d after %v", mode, rb.At.Sub(active.At).Round(time.Millisecond), bake, code, n.ended.Sub(n.begun).Round(time.Millisecond))
	t.Logf("next: %s", strings.TrimSpace(n.stderr.String()))
	res.log(t)
	t.Logf("after the rollback, answers by generation: %v", after)
	if rep.Report != nil {
		t.Logf("%s", rep.Report)
	}
	t.Logf("events: %s", n.phases())
	if code != 1 {
		t.Errorf("next exited %d, want 1 (rolled back)", code)
	}
	if rb.Generation != 1 || !strings.Contains(n.stderr.String(), "rolled back to gen 1") {
		t.Errorf("rolled back to gen %d; stderr %q: want gen 1", rb.Generation, n.stderr.String())
	}
	if d := rb.At.Sub(active.At); d >= bake {
		t.Errorf("rolled back %v after activation: not within the %v bake", d, bake)
	}
	if rep.Report == nil || !rep.Report.RolledBack {
		t.Errorf("report %+v: want a rolled-back report", rep.Report)
	}
	checkNoRefusal(t, res, false)
	if after["1"] == 0 || after["2"] != 0 {
		t.Errorf("after the rollback answers came from %v: want gen 1 only", after)
	}
	st, err := svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Active != 1 || len(st.Generations) != 1 {
		t.Errorf("after the rollback: active %d, generations %+v; want gen 1 alone", st.Active, st.Generations)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	return all, n
}

// checkNoRefusal fails t if a connection was refused: the probe's dials
// tell ECONNREFUSED apart. The load's "connect" failures may be dials
// whose connection was queued on the dying generation and reset (see
// dialProbe); with tcp_migrate_req=1 (migrated) those migrate instead, and
// then the load must have none.
func checkNoRefusal(t *testing.T, r mixedResult, migrated bool) {
	t.Helper()
	if r.Probe.Refused != 0 {
		t.Errorf("%d of the probe's %d connections were refused (ECONNREFUSED)", r.Probe.Refused, r.Probe.Requests)
	}
	connect := r.KeepAlive.ByKind[load.KindConnect] + r.NewConn.ByKind[load.KindConnect]
	if migrated && (connect != 0 || r.Probe.DialReset != 0) {
		t.Errorf("with tcp_migrate_req=1, %d of the load's dials and %d of the probe's failed: queued connections should migrate", connect, r.Probe.DialReset)
	}
}

// A new generation that crashes (exits 2) on its first request is rolled
// back within the bake, next exits 1. The failed requests are those it
// received before it died: it dies at the first, and each client has at
// most one request in flight, so one per client (two at
// tcp_migrate_req=0, see dyingBound).
func TestSafeCrashOnFirstRequest(t *testing.T) {
	all, n := badDeploy(t, "crash")
	if !strings.Contains(n.stderr.String(), "gen 2 exited (exit status 2)") {
		t.Errorf("next's error does not say gen 2 exited with status 2: %s", n.stderr.String())
	}
	// It exits like a killed process: one per client, two with
	// tcp_migrate_req=0 (see dyingBound); this namespace's setting is the
	// host's.
	t.Logf("failed %d requests of %d clients (bound %d)", all.Failures, allClients, dyingBound)
	if all.Failures > dyingBound {
		t.Errorf("%d requests failed: over %d (two per client, %d clients)", all.Failures, dyingBound, allClients)
	}
}

// A new generation whose handlers all panic fails its health (20 responses,
// 10% or more 5xx or panics) and is rolled back within the bake, next exits
// 1. The failed requests are those it answered until the health crossed
// the line and the old generation took the port back.
func TestSafePanickingHandlers(t *testing.T) {
	all, n := badDeploy(t, "panic")
	if !strings.Contains(n.stderr.String(), "gen 2 failed its health") {
		t.Errorf("next's error does not name the failed health: %s", n.stderr.String())
	}
	rep, _ := n.find(wire.PhaseReport)
	var panics uint64
	if rep.Report != nil {
		for _, e := range rep.Report.Errors {
			if e.Generation == 2 {
				panics = e.Panics
			}
		}
	}
	t.Logf("%d requests failed; the report counts %d panics of gen 2", all.Failures, panics)
	if panics < 20 {
		t.Errorf("the report counts %d panics of gen 2, want at least --health-min-requests (20)", panics)
	}
	// Each failed request is one that gen 2 answered with a panic: none
	// was lost on the way back to gen 1.
	if all.Failures > int64(panics) {
		t.Errorf("%d requests failed, more than the %d panics of gen 2", all.Failures, panics)
	}
	// The health fails at the 20th panic; until the old generation has
	// re-pinned the group each client may lose a few more.
	if bound := int64(20 + 4*allClients); all.Failures > bound {
		t.Errorf("%d requests failed, over %d (20 to fail the health, then 4 per client until gen 1 took the port back)", all.Failures, bound)
	}
}

// --- 4. The canary ---

// A canary at 10% sends 10% ± 3% of new connections to the new generation
// (over 6,000 connections); promote takes it to 100% (every new connection
// on it afterwards), and abort of a second canary returns to the old
// generation; the load around it all fails 0 requests.
func TestSafeCanary(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ld := startMixedLoad(t, svc, 90*time.Second, 5*time.Second)

	n := startNext(t, svc, []string{"--bake", "1s", "--canary", "10%"}, svc.AppArgv("v2"))
	n.waitFor(t, "canary at 10%", 30*time.Second, func(e wire.Event) bool { return e.Phase == wire.PhaseCanary && e.Weight == 10 })
	st := waitSvcStatus(t, svc, "canary at 10%", 5*time.Second, func(st wire.Status) bool { return st.CanaryWeight == 10 })
	if st.Active != 1 || st.Baking != 2 {
		t.Errorf("status during the canary: active %d, baking %d; want 1 and 2", st.Active, st.Baking)
	}
	const conns = 6000
	share := newConnections(t, svc, conns)
	got := float64(share.ByGeneration["2"]) / float64(share.OK)
	t.Logf("canary 10%%: %d of %d new connections answered by gen 2 (%.2f%%), gen 1 %d; %s", share.ByGeneration["2"], share.OK, 100*got, share.ByGeneration["1"], share)
	if got < 0.07 || got > 0.13 || share.ByGeneration["1"]+share.ByGeneration["2"] != conns {
		t.Errorf("gen 2 answered %.2f%% of new connections (%v), want 10%% ± 3%%", 100*got, share.ByGeneration)
	}

	if _, errOut, code, err := svc.CLI(ctx, "promote"); err != nil || code != 0 {
		t.Fatalf("promote: exit %d %v: %s", code, err, errOut)
	}
	n.waitFor(t, "canary at 100%", 10*time.Second, func(e wire.Event) bool { return e.Phase == wire.PhaseCanary && e.Weight == 100 })
	n.waitPhase(t, wire.PhaseActive, 10*time.Second)
	promoted := newConnections(t, svc, 1000)
	t.Logf("after promote: new connections by generation %v", promoted.ByGeneration)
	if promoted.ByGeneration["2"] != 1000 {
		t.Errorf("after promote, new connections went to %v: want all on gen 2", promoted.ByGeneration)
	}
	if code := n.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("the promoted canary's next exited %d: %s; events %s", code, n.stderr.String(), n.phases())
	}
	t.Logf("promoted rollover: %s", n.phases())

	// A second canary, aborted: gen 2 keeps (gets back) every connection.
	n3 := startNext(t, svc, []string{"--canary", "10%"}, svc.AppArgv("v3"))
	n3.waitFor(t, "canary at 10%", 30*time.Second, func(e wire.Event) bool { return e.Phase == wire.PhaseCanary && e.Weight == 10 })
	taken := newConnections(t, svc, 1000)
	if taken.ByGeneration["3"] == 0 {
		t.Errorf("the second canary took no new connection: %v", taken.ByGeneration)
	}
	if _, errOut, code, err := svc.CLI(ctx, "abort"); err != nil || code != 0 {
		t.Fatalf("abort: exit %d %v: %s", code, err, errOut)
	}
	rb := n3.waitPhase(t, wire.PhaseRolledBack, 10*time.Second)
	if code := n3.wait(t, 30*time.Second); code != 1 || rb.Generation != 2 {
		t.Errorf("aborted canary: next exited %d, rolled back to gen %d; want 1 and gen 2: %s", code, rb.Generation, n3.stderr.String())
	}
	aborted := newConnections(t, svc, 1000)
	t.Logf("second canary: %v of 1000 new connections; after abort: %v; %s", taken.ByGeneration, aborted.ByGeneration, strings.TrimSpace(n3.stderr.String()))
	if aborted.ByGeneration["2"] != 1000 {
		t.Errorf("after abort, new connections went to %v: want all on gen 2", aborted.ByGeneration)
	}
	st = waitSvcStatus(t, svc, "gen 2 alone", 10*time.Second, func(st wire.Status) bool { return len(st.Generations) == 1 })
	if st.Active != 2 || st.CanaryWeight != 0 || st.Baking != 0 {
		t.Errorf("after abort: active %d, canary weight %d, baking %d; want 2, 0, 0", st.Active, st.CanaryWeight, st.Baking)
	}
	res := ld.stop()
	all := res.all()
	t.Logf("the load through canary, promote, bake, drain, second canary and abort:")
	res.log(t)
	if all.OK == 0 || all.Failures != 0 {
		t.Errorf("%d requests failed (%v): %q", all.Failures, all.ByKind, all.Samples)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// --- 5. A drain cut at its deadline; a hung old generation ---

// A request longer than --drain-timeout on the old generation is cut at
// the deadline: `next --wait` exits 4, and the report names the requests
// and connections cut. Every other request succeeds.
func TestSafeForcedDrain(t *testing.T) {
	const drainTimeout = time.Second
	svc := startService(t, harness.Config{DrainTimeout: drainTimeout})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ld := startMixedLoad(t, svc, time.Minute, 5*time.Second)
	slow := unanswered(ctx, svc, "/slow?d=20s")
	waitSvcStatus(t, svc, "the long request in flight on gen 1", 10*time.Second, func(st wire.Status) bool {
		return len(st.Generations) == 1 && st.Generations[0].Stats.Inflight >= 1
	})
	n := startNext(t, svc, []string{"--wait"}, svc.AppArgv("v2"))
	code := n.wait(t, 30*time.Second)
	var slowErr error
	select {
	case slowErr = <-slow:
	case <-time.After(10 * time.Second):
		t.Fatal("the long request is still running after the drain deadline")
	}
	res := ld.stop()
	all := res.all()
	rep, _ := n.find(wire.PhaseReport)
	drained, _ := n.find(wire.PhaseDrained)
	t.Logf("next --wait exited %d after %v; gen 1 drained after %dms (drain timeout %v); the long request: %v",
		code, n.ended.Sub(n.begun).Round(time.Millisecond), drained.Millis, drainTimeout, slowErr)
	if rep.Report != nil {
		t.Logf("%s", rep.Report)
	}
	t.Logf("next: %s", strings.TrimSpace(n.stderr.String()))
	res.log(t)
	if code != 4 {
		t.Errorf("next --wait exited %d, want 4 (the drain cut a request)", code)
	}
	if rep.Report == nil || rep.Report.ForcedRequests < 1 || rep.Report.ForcedConnections < 1 {
		t.Errorf("report %+v: want at least 1 forced request and 1 forced connection", rep.Report)
	}
	if all.OK == 0 || all.Failures != 0 {
		t.Errorf("%d requests of the load failed (%v): %q", all.Failures, all.ByKind, all.Samples)
	}
	st, err := svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.LastReport == nil || st.LastReport.ForcedRequests != rep.Report.ForcedRequests {
		t.Errorf("status last_report %+v, want the report of next", st.LastReport)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// An old generation that hangs (SIGSTOP) right after `next` began, or
// right after its drain order, is killed at the drain timeout plus the
// kill grace, counted from the drain order; `next` returns then, and the
// next rollover runs at once.
func TestSafeHungOldGeneration(t *testing.T) {
	const killGrace = 2 * time.Second // the harness's --kill-grace
	for _, tc := range []struct {
		name         string
		stopAt       string // the phase of `next` at which gen 1 is stopped
		grace, drain time.Duration
	}{
		// Stopped before it hears of the rollover: the release at the
		// bake's start and the drain order both go unanswered.
		{name: "stopped-at-start", stopAt: wire.PhaseStarted, grace: 100 * time.Millisecond, drain: time.Second},
		// Stopped in its drain grace (long enough that it cannot have
		// finished before the SIGSTOP lands).
		{name: "stopped-draining", stopAt: wire.PhaseDraining, grace: 800 * time.Millisecond, drain: 1500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := startService(t, harness.Config{DrainGrace: tc.grace, DrainTimeout: tc.drain})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			st, err := svc.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			old := st.Generations[0].PID
			// Its requests hang until it is killed: the load's timeout
			// is longer than that.
			ld := startMixedLoad(t, svc, time.Minute, 15*time.Second)
			n := startNext(t, svc, []string{"--wait", "--bake", "1s"}, svc.AppArgv("v2"))
			n.waitPhase(t, tc.stopAt, 30*time.Second)
			if err := syscall.Kill(old, syscall.SIGSTOP); err != nil {
				t.Fatalf("SIGSTOP gen 1 (pid %d): %v", old, err)
			}
			stopped := time.Now()
			order, ok := n.find(wire.PhaseDraining)
			if !ok {
				order = n.waitPhase(t, wire.PhaseDraining, 30*time.Second)
			}
			budget := tc.drain + killGrace
			// Two timers (the drain deadline, then the kill grace of
			// exec's WaitDelay), the owner loop, the reap and the event:
			// tens of ms measured; the margin is for a loaded 2-core CI
			// machine running race-enabled binaries.
			const tolerance = 500 * time.Millisecond
			if left := harness.WaitGone([]int{old}, budget+5*time.Second); len(left) > 0 {
				t.Fatalf("gen 1 (pid %d) still alive %v after its drain order", old, time.Since(order.At))
			}
			gone := time.Now()
			code := n.wait(t, 10*time.Second)
			drained, _ := n.find(wire.PhaseDrained)
			rep, _ := n.find(wire.PhaseReport)
			t.Logf("%s: SIGSTOP %v after next began; drain order (`draining` read) %v after next began; gen 1 gone %v after it (seen by polling), `drained` says %dms; budget %v (drain timeout %v + kill grace %v), tolerance +%v",
				tc.name, stopped.Sub(n.begun).Round(time.Millisecond), order.At.Sub(n.begun).Round(time.Millisecond), gone.Sub(order.At).Round(time.Millisecond), drained.Millis, budget, tc.drain, killGrace, tolerance)
			t.Logf("next --wait exited %d after %v, %v after the drain order; %s", code, n.ended.Sub(n.begun).Round(time.Millisecond), n.ended.Sub(order.At).Round(time.Millisecond), strings.TrimSpace(n.stderr.String()))
			if rep.Report != nil {
				t.Logf("%s", rep.Report)
			}
			if d := time.Duration(drained.Millis) * time.Millisecond; d < budget || d > budget+tolerance {
				t.Errorf("gen 1 was killed %v after its drain order, want %v (+%v)", d, budget, tolerance)
			}
			// Read by the CLI, `draining` comes a little after the drain
			// order itself: its lower bound is looser.
			if d := gone.Sub(order.At); d < budget-250*time.Millisecond || d > budget+tolerance {
				t.Errorf("gen 1 was gone %v after `draining` was read, want %v (+%v)", d, budget, tolerance)
			}
			if d := n.ended.Sub(order.At); d > budget+tolerance {
				t.Errorf("next returned %v after the drain order, over %v + %v", d, budget, tolerance)
			}
			if rep.Report == nil || (code == 4) != rep.Report.Lost() || (code != 0 && code != 4) {
				t.Errorf("next --wait exited %d with report %v: want 4 if it names a cut, else 0", code, rep.Report)
			}
			// The next rollover is not blocked.
			n3 := startNext(t, svc, []string{"--wait"}, svc.AppArgv("v3"))
			if code := n3.wait(t, 30*time.Second); code != 0 {
				t.Errorf("the next rollover after the kill exited %d: %s", code, n3.stderr.String())
			}
			t.Logf("the next rollover: exit 0 after %v: %s", n3.ended.Sub(n3.begun).Round(time.Millisecond), n3.phases())
			res := ld.stop()
			all := res.all()
			res.log(t)
			if all.OK == 0 {
				t.Error("the load was not answered")
			}
			checkNoRefusal(t, res, false)
			// Only requests held by the hung process fail: one per client.
			if all.Failures > allClients {
				t.Errorf("%d requests failed, more than one per client (%d clients)", all.Failures, allClients)
			}
			// The rollover killed a generation, and its report says so;
			// this stop drained everything, so `stop` and `start` exit 0
			// (the forced drain was the rollover's, not the stop's).
			if rep.Report == nil || len(rep.Report.Killed) != 1 || rep.Report.Killed[0].Generation != 1 {
				t.Errorf("report %+v: want gen 1 named as killed", rep.Report)
			}
			_, errOut, code, err := svc.CLI(ctx, "stop")
			if err != nil || code != 0 {
				t.Errorf("stop: exit %d %v: %s; want 0, this stop drained every generation", code, err, errOut)
			}
			select {
			case <-svc.Exited():
			case <-ctx.Done():
				t.Fatal("the coordinator did not exit after stop")
			}
			if c := svc.ExitCode(); c != 0 {
				t.Errorf("the coordinator exited %d, want 0 (its stop killed nothing)", c)
			}
			t.Logf("stop: exit %d (%s), coordinator exit %d", code, strings.TrimSpace(errOut), svc.ExitCode())
		})
	}
}
