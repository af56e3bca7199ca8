package coordinator

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

func phases(events []wire.Event) []string {
	var ps []string
	for _, e := range events {
		ps = append(ps, e.Phase)
	}
	return ps
}

func eventOf(events []wire.Event, phase string) *wire.Event {
	for i := range events {
		if events[i].Phase == phase {
			return &events[i]
		}
	}
	return nil
}

// toFloat64 is prometheus/testutil.ToFloat64, which needs a module this
// go.mod does not list yet (github.com/kylelemons/godebug).
func toFloat64(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 10)
	c.Collect(ch)
	close(ch)
	var ms []prometheus.Metric
	for m := range ch {
		ms = append(ms, m)
	}
	if len(ms) != 1 {
		t.Fatalf("collected %d metrics, want 1", len(ms))
	}
	var pb dto.Metric
	if err := ms[0].Write(&pb); err != nil {
		t.Fatal(err)
	}
	switch {
	case pb.Counter != nil:
		return pb.Counter.GetValue()
	case pb.Gauge != nil:
		return pb.Gauge.GetValue()
	case pb.Untyped != nil:
		return pb.Untyped.GetValue()
	}
	t.Fatalf("metric %v is not a counter or gauge", &pb)
	return 0
}

func rollovers(t *testing.T, c *Coordinator, result string) float64 {
	return toFloat64(t, c.Metrics().Rollovers.WithLabelValues(result))
}

// activeIs checks that generation n is the only active one, that it has pid,
// and that it answers requests.
func (r *rig) activeIs(n, pid int) {
	r.t.Helper()
	st := r.status()
	if st.Active != n {
		r.t.Fatalf("status: active gen %d, want %d", st.Active, n)
	}
	g := genOf(st, n)
	if g == nil || g.State != stateActive.String() || g.PID != pid {
		r.t.Fatalf("status: gen %d is %+v, want active with pid %d", n, g, pid)
	}
	if gotGen, gotPID := r.mustGet("/"); gotGen != n || gotPID != pid {
		r.t.Fatalf("GET / answered by gen %d pid %d, want gen %d pid %d", gotGen, gotPID, n, pid)
	}
}

func TestRollover(t *testing.T) {
	r := startRig(t, "ready", Config{})
	st := r.status()
	if len(st.Generations) != 1 {
		t.Fatalf("status lists %d generations, want 1: %+v", len(st.Generations), st.Generations)
	}
	if st.PID != os.Getpid() || st.Socket != r.sock || st.InProgress {
		t.Errorf("status = pid %d socket %q in progress %v, want pid %d socket %q, not in progress", st.PID, st.Socket, st.InProgress, os.Getpid(), r.sock)
	}
	_, pid1 := r.mustGet("/")
	r.activeIs(1, pid1)

	argv2 := r.argv("ready", envDelay+"=1ms")
	events, res := r.next(argv2)
	if !res.OK {
		t.Fatalf("next failed: %s", res.Error)
	}
	want := []string{wire.PhaseStarted, wire.PhaseReady, wire.PhaseActive, wire.PhaseDraining, wire.PhaseLeft, wire.PhaseReport}
	if got := phases(events); !slices.Equal(got, want) {
		t.Fatalf("next events %v, want %v", got, want)
	}
	started := events[0]
	if started.Generation != 2 || started.PID <= 0 || started.PID == pid1 {
		t.Fatalf("started event %+v, want gen 2 with a new pid", started)
	}
	if events[1].Generation != 2 || events[2].Generation != 2 || events[3].Generation != 1 || events[4].Generation != 1 {
		t.Fatalf("events name the wrong generations: %+v", events)
	}
	r.activeIs(2, started.PID)
	r.waitGone(pid1, 5*time.Second)
	r.waitFor(5*time.Second, "status to list only gen 2", func() bool {
		st := r.status()
		return len(st.Generations) == 1 && st.Generations[0].Generation == 2
	})
	if g := genOf(r.status(), 2); !slices.Equal(g.Argv, argv2) {
		t.Errorf("gen 2 runs %q, want %q", g.Argv, argv2)
	}
	if ok, failed := rollovers(t, r.c, "ok"), rollovers(t, r.c, "failed"); ok != 2 || failed != 0 {
		t.Errorf("rollovers_total ok=%v failed=%v, want 2 and 0", ok, failed)
	}

	// rollback starts generation 1's command line as generation 3.
	events, res, err := call(r.sock, wire.Msg{Type: wire.TypeRollback}, 30*time.Second)
	if err != nil || !res.OK {
		t.Fatalf("rollback: %v %q", err, res.Error)
	}
	if s := eventOf(events, wire.PhaseStarted); s == nil || s.Generation != 3 {
		t.Fatalf("rollback: events %+v, want gen 3 started", events)
	}
	r.activeIs(3, eventOf(events, wire.PhaseStarted).PID)
	if g := genOf(r.status(), 3); !slices.Equal(g.Argv, r.c.cfg.Argv) {
		t.Errorf("rollback: gen 3 runs %q, want gen 1's %q", g.Argv, r.c.cfg.Argv)
	}

	// next without a command line repeats the active one.
	events, res = r.next(nil)
	if !res.OK {
		t.Fatalf("next with the active command line failed: %s", res.Error)
	}
	if s := eventOf(events, wire.PhaseStarted); s == nil || s.Generation != 4 {
		t.Fatalf("next without a command: events %+v, want gen 4 started", events)
	}
	r.activeIs(4, eventOf(events, wire.PhaseStarted).PID)
	if g := genOf(r.status(), 4); !slices.Equal(g.Argv, r.c.cfg.Argv) {
		t.Errorf("next without a command: gen 4 runs %q, want %q", g.Argv, r.c.cfg.Argv)
	}

	r.cancel()
	if err := r.wait(20 * time.Second); err != nil {
		t.Fatalf("Run returned %v after cancel, want nil", err)
	}
	r.assertNoneLeft()
}

func TestNextNeverReady(t *testing.T) {
	r := startRig(t, "ready", Config{ReadyTimeout: time.Second})
	_, pid1 := r.mustGet("/")

	events, res := r.next(r.argv("never-ready"))
	if res.OK {
		t.Fatalf("next to a generation that never gets ready succeeded: %+v", events)
	}
	if !strings.Contains(res.Error, "ready-timeout") || res.Code != 1 {
		t.Errorf("next failed with code %d %q, want code 1 and an error mentioning ready-timeout", res.Code, res.Error)
	}
	started := eventOf(events, wire.PhaseStarted)
	if started == nil || started.Generation != 2 {
		t.Fatalf("events %+v, want gen 2 started", events)
	}
	if eventOf(events, wire.PhaseActive) != nil || eventOf(events, wire.PhaseDraining) != nil {
		t.Errorf("a failed rollover activated or drained something: %+v", events)
	}
	r.waitGone(started.PID, 5*time.Second)
	r.activeIs(1, pid1)
	if st := r.status(); len(st.Generations) != 1 || st.InProgress {
		t.Errorf("after the failed rollover status lists %+v (in progress %v), want gen 1 only", st.Generations, st.InProgress)
	}
	if failed := rollovers(t, r.c, "failed"); failed != 1 {
		t.Errorf("rollovers_total{result=failed} = %v, want 1", failed)
	}

	events, res = r.next(r.argv("ready"))
	if !res.OK {
		t.Fatalf("next after a failed one: %s (stuck?)", res.Error)
	}
	r.activeIs(3, eventOf(events, wire.PhaseStarted).PID)
	r.waitGone(pid1, 5*time.Second)
}

// A new generation that fails before it is active (exits at once, crashes
// after its hello, fails the steering verification) fails the rollover with
// a reason naming it, is gone, leaves the active generation serving, and
// the next good rollover works.
func TestNextFailsBeforeActive(t *testing.T) {
	for _, tc := range []struct {
		mode string
		want []string
	}{
		{"crash-on-start", []string{"exited before it was ready", "exit status 3", crashLine}},
		{"crash-after-hello", []string{"exited before it was ready", "exit status 2", "cache warm-up failed"}},
		{"steer-fails", []string{"failed the steering verification", "probe was not accepted"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			r := startRig(t, "ready", Config{})
			_, pid1 := r.mustGet("/")
			events, res := r.next(r.argv(tc.mode))
			if res.OK {
				t.Fatalf("next to a %s generation succeeded", tc.mode)
			}
			for _, w := range tc.want {
				if !strings.Contains(res.Error, w) {
					t.Errorf("error %q does not say %q", res.Error, w)
				}
			}
			started := eventOf(events, wire.PhaseStarted)
			if started == nil {
				t.Fatalf("events %+v, want a started event", events)
			}
			r.waitGone(started.PID, 5*time.Second)
			r.activeIs(1, pid1)
			if gen, _ := r.mustGet("/"); gen != 1 {
				t.Fatalf("answered by gen %d after the failed rollover, want 1", gen)
			}
			events, res = r.next(r.argv("ready"))
			if !res.OK {
				t.Fatalf("next after a failed one: %s", res.Error)
			}
			r.activeIs(3, eventOf(events, wire.PhaseStarted).PID)
		})
	}
}

func TestConcurrentNext(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")

	// The generation warms up long enough for both requests to meet it.
	argv := r.argv("ready", envDelay+"=700ms")
	type outcome struct {
		events []wire.Event
		res    wire.Msg
		err    error
	}
	var wg sync.WaitGroup
	out := make([]outcome, 2)
	for i := range out {
		wg.Go(func() {
			out[i].events, out[i].res, out[i].err = call(r.sock, wire.Msg{Type: wire.TypeNext, Argv: argv}, 30*time.Second)
		})
	}
	wg.Wait()
	var won, lost []outcome
	for _, o := range out {
		if o.err != nil {
			t.Fatalf("next: %v", o.err)
		}
		if o.res.OK {
			won = append(won, o)
		} else {
			lost = append(lost, o)
		}
	}
	if len(won) != 1 || len(lost) != 1 {
		t.Fatalf("%d rollovers proceeded and %d were refused, want 1 and 1: %+v", len(won), len(lost), out)
	}
	if !strings.Contains(lost[0].res.Error, "rollover in progress") {
		t.Errorf("the refused next says %q, want \"rollover in progress\"", lost[0].res.Error)
	}
	if len(lost[0].events) != 0 {
		t.Errorf("the refused next reported events %+v", lost[0].events)
	}
	started := eventOf(won[0].events, wire.PhaseStarted)
	if started == nil || started.Generation != 2 {
		t.Fatalf("the winning next: events %+v, want gen 2 started", won[0].events)
	}
	r.activeIs(2, started.PID)
	r.waitGone(pid1, 5*time.Second)
	r.waitFor(5*time.Second, "status to list only gen 2", func() bool { return len(r.status().Generations) == 1 })
}

func TestForcedDrain(t *testing.T) {
	const drainTimeout, killGrace = time.Second, 500 * time.Millisecond
	r := startRig(t, "slow-drain", Config{DrainTimeout: drainTimeout, KillGrace: killGrace})
	_, pid1 := r.mustGet("/")

	// A request that never finishes pins generation 1.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + r.addr + "/hang")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	hung := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, resp.Body)
		hung <- err
	}()

	events, res := r.next(r.argv("ready"))
	if !res.OK {
		t.Fatalf("next: %s", res.Error)
	}
	nextDone := time.Now()
	r.activeIs(2, eventOf(events, wire.PhaseStarted).PID)
	if gen1 := genOf(r.status(), 1); gen1 == nil || gen1.State != stateDraining.String() {
		t.Fatalf("right after next, gen 1 is %+v, want draining", gen1)
	}
	if got := toFloat64(t, r.c.Metrics().ForcedDrains); got != 0 {
		t.Fatalf("forced drains = %v before the drain timeout, want 0", got)
	}

	r.waitFor(drainTimeout+5*time.Second, "the forced drain to be counted", func() bool {
		return toFloat64(t, r.c.Metrics().ForcedDrains) == 1
	})
	r.waitGone(pid1, killGrace+5*time.Second)
	// Generation 1 ignores SIGTERM, so only SIGKILL after the kill grace ends it.
	if took := time.Since(nextDone); took < drainTimeout+killGrace-300*time.Millisecond {
		t.Errorf("gen 1 was gone %v after the rollover, before drain timeout + kill grace %v", took, drainTimeout+killGrace)
	}
	if got := toFloat64(t, r.c.Metrics().ForcedDrains); got != 1 {
		t.Errorf("forced drains = %v, want 1", got)
	}
	r.waitFor(2*time.Second, "status to drop gen 1", func() bool { return genOf(r.status(), 1) == nil })
	select {
	case err := <-hung:
		if err == nil {
			t.Error("the hung request ended cleanly; it should have been cut off")
		}
	case <-time.After(5 * time.Second):
		t.Error("the hung request was not cut off when its generation was killed")
	}
	r.activeIs(2, eventOf(events, wire.PhaseStarted).PID)
}

func TestRestartCrashingActive(t *testing.T) {
	r := startRig(t, "crash-after-ready", Config{})

	// Each generation lives about 300ms after ready; the backoff before the
	// restarts is 500ms, 1s, 2s, ...
	r.waitFor(10*time.Second, "two restarts", func() bool { return len(r.logs.starts()) >= 3 })
	starts := r.logs.starts()
	first, gap1, gap2 := starts[0], starts[1].Sub(starts[0]), starts[2].Sub(starts[1])
	if gap1 < 500*time.Millisecond {
		t.Errorf("first restart %v after the start, want at least the 500ms backoff", gap1)
	}
	if gap2 < gap1+250*time.Millisecond {
		t.Errorf("restart delays do not grow: %v then %v", gap1, gap2)
	}
	// Watch a fixed window: a spinning coordinator starts ~8 generations in 3s.
	if d := time.Until(first.Add(3 * time.Second)); d > 0 {
		time.Sleep(d)
	}
	n := 0
	for _, s := range r.logs.starts() {
		if s.Sub(first) <= 3*time.Second {
			n++
		}
	}
	if n > 4 {
		t.Errorf("%d generations started within 3s: the restart loop spins", n)
	}

	r.cancel()
	if err := r.wait(20 * time.Second); err != nil {
		t.Fatalf("Run returned %v after cancel, want nil", err)
	}
	r.assertNoneLeft()
}

func TestSlowRequestDuringRollover(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")
	// Longer than the 1s that Serve gives Shutdown: only a real drain (wait
	// for the connections, then Shutdown) lets it finish.
	slow, pid2 := r.slowAcrossNext("/slow?d=1500ms")
	select {
	case a := <-slow:
		if a.err != nil || a.gen != 1 || a.pid != pid1 {
			t.Errorf("slow request: gen %d pid %d err %v, want a 200 from gen 1 pid %d", a.gen, a.pid, a.err, pid1)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request did not complete")
	}
	r.activeIs(2, pid2)
	r.waitGone(pid1, 5*time.Second)
}

func TestStop(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")
	// Leave gen 1 draining a request while gen 2 is active.
	slow, pid2 := r.slowAcrossNext("/slow?d=1500ms")

	_, res, err := call(r.sock, wire.Msg{Type: wire.TypeStop}, 20*time.Second)
	if err != nil || !res.OK {
		t.Fatalf("stop: %v %q", err, res.Error)
	}
	if err := r.wait(10 * time.Second); err != nil {
		t.Fatalf("Run returned %v after stop, want nil", err)
	}
	if a := <-slow; a.err != nil || a.gen != 1 {
		t.Errorf("the request in flight during stop: gen %d, err %v; want a 200 from gen 1", a.gen, a.err)
	}
	for _, pid := range []int{pid1, pid2} {
		if !testproc.Gone(pid) {
			t.Errorf("pid %d is still there after stop", pid)
		}
	}
	if _, err := os.Lstat(r.sock); !os.IsNotExist(err) {
		t.Errorf("socket file still there after stop: %v", err)
	}
	r.assertNoneLeft()
}

func TestControlSocketSecurity(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")

	fi, err := os.Stat(r.sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", fi.Mode())
	}

	// A silent client must not hold its connection forever; check it while
	// the other cases run.
	silent, err := net.Dial("unix", r.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	silentDone := make(chan error, 1)
	go func() {
		_ = silent.SetReadDeadline(time.Now().Add(firstMessageTimeout + 5*time.Second))
		_, err := io.ReadAll(silent) // an error reply then EOF, or just EOF
		silentDone <- err
	}()

	hello := func(m wire.Msg) wire.Msg {
		t.Helper()
		conn, err := net.Dial("unix", r.sock)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		m.Type = wire.TypeHello
		if _, err := conn.Write(wire.Encode(m)); err != nil {
			t.Fatal(err)
		}
		resp, err := wire.NewReader(conn).Read()
		if err != nil {
			t.Fatalf("hello %+v: no answer: %v", m, err)
		}
		if _, err := wire.NewReader(conn).Read(); err == nil {
			t.Errorf("hello %+v: the connection stayed open after the refusal", m)
		}
		return resp
	}
	for _, tc := range []struct {
		name string
		m    wire.Msg
	}{
		{"wrong secret", wire.Msg{Generation: 1, PID: pid1, Secret: "00112233445566778899aabbccddeeff"}},
		{"no secret", wire.Msg{Generation: 1, PID: pid1}},
		{"unknown generation", wire.Msg{Generation: 99, PID: os.Getpid(), Secret: "x"}},
		{"generation 0", wire.Msg{PID: os.Getpid()}},
	} {
		if resp := hello(tc.m); resp.Type != wire.TypeWelcome || resp.Error == "" || resp.OK {
			t.Errorf("%s: hello answered %+v, want a welcome with an error", tc.name, resp)
		}
	}
	// Even with generation 1's secret, this process is not generation 1.
	p1, err := procfs.NewProc(pid1)
	if err != nil {
		t.Fatal(err)
	}
	environ, err := p1.Environ()
	if err != nil {
		t.Fatal(err)
	}
	var secret string
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, "ROLLOVER_SECRET="); ok {
			secret = v
		}
	}
	if secret == "" {
		t.Fatal("gen 1 has no ROLLOVER_SECRET")
	}
	resp := hello(wire.Msg{Generation: 1, PID: pid1, Secret: secret})
	if resp.Error == "" || !strings.Contains(resp.Error, "pid") {
		t.Errorf("hello with gen 1's secret from pid %d answered %+v, want a refusal naming the pid", os.Getpid(), resp)
	}

	// Malformed input gets an error reply or a disconnect, never a hang.
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"garbage", []byte("\x00\x01\xffgarbage\n")},
		{"not json", []byte("status\n")},
		{"wrong version", []byte(`{"v":2,"type":"status"}` + "\n")},
		{"unknown type", []byte(`{"v":1,"type":"launch"}` + "\n")},
		{"coordinator message first", []byte(`{"v":1,"type":"ready"}` + "\n")},
		{"too long", append(bytes.Repeat([]byte("a"), wire.MaxLine+100), '\n')},
		{"half a line", []byte(`{"v":1,"type":"sta`)},
	} {
		conn, err := net.Dial("unix", r.sock)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, werr := conn.Write(tc.data)
		if tc.name == "half a line" {
			_ = conn.(*net.UnixConn).CloseWrite()
		}
		resp, rerr := wire.NewReader(conn).Read()
		switch {
		case rerr == nil && (resp.Type != wire.TypeResult || resp.Error == "" || resp.OK):
			t.Errorf("%s: answered %+v, want an error result", tc.name, resp)
		case rerr != nil && isTimeout(rerr):
			t.Errorf("%s: no answer and no disconnect within 5s (write err %v)", tc.name, werr)
		}
		conn.Close()
		if _, err := r.statusErr(); err != nil {
			t.Fatalf("after %s, status fails: %v", tc.name, err)
		}
	}

	select {
	case err := <-silentDone:
		if isTimeout(err) {
			t.Errorf("a silent client was not disconnected within %v", firstMessageTimeout+5*time.Second)
		}
	case <-time.After(firstMessageTimeout + 10*time.Second):
		t.Error("a silent client was never disconnected")
	}
	r.activeIs(1, pid1)
	if st := r.status(); len(st.Generations) != 1 {
		t.Errorf("status lists %+v, want gen 1 only", st.Generations)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestSecondCoordinatorRefused(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")
	c2, err := New(testConfig(Config{Argv: r.argv("ready"), Socket: r.sock}))
	if err == nil {
		c2.ln.Close()
		t.Fatal("a second coordinator opened a socket that another one serves")
	}
	if !strings.Contains(err.Error(), "another coordinator") {
		t.Errorf("second New: %v, want an error mentioning another coordinator", err)
	}
	r.activeIs(1, pid1)
}

func TestStaleSocketReplaced(t *testing.T) {
	dir := testproc.ShortDir(t)
	sock := filepath.Join(dir, "c.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("no stale socket file to test with: %v", err)
	}

	r := newRig(t, "ready", Config{})
	r.c.ln.Close() // only its argv and tag are wanted
	cfg := testConfig(Config{Argv: r.argv("ready"), Socket: sock, Log: r.c.log})
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("New on a stale socket: %v", err)
	}
	r.c, r.sock = c, sock
	r.run()
	r.waitFor(10*time.Second, "generation 1 active", func() bool {
		st, err := r.statusErr()
		return err == nil && st.Active == 1
	})
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the replaced socket: %v %v, want mode 0600", fi.Mode(), err)
	}
	r.cancel()
	if err := r.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	r.assertNoneLeft()
}

func TestSocketPathIsNotASocket(t *testing.T) {
	dir := testproc.ShortDir(t)
	path := filepath.Join(dir, "c.sock")
	if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	c, err := New(testConfig(Config{Argv: []string{exe}, Socket: path}))
	if err == nil {
		c.ln.Close()
		t.Fatal("New replaced a regular file with its socket")
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Errorf("New clobbered the file at the socket path")
	}
}

func TestRunFailsWhenGeneration1NeverReady(t *testing.T) {
	r := newRig(t, "never-ready", Config{ReadyTimeout: time.Second})
	r.run()
	err := r.wait(15 * time.Second)
	if err == nil || !strings.Contains(err.Error(), "ready-timeout") {
		t.Fatalf("Run returned %v, want an error mentioning ready-timeout", err)
	}
	if _, err := os.Lstat(r.sock); !os.IsNotExist(err) {
		t.Errorf("socket file still there after Run failed: %v", err)
	}
	r.assertNoneLeft()
}

// Canceling ctx (SIGTERM, SIGINT) while generation 1 is starting must not
// wait for the whole ready timeout.
func TestRunCanceledWhileGeneration1Starts(t *testing.T) {
	const readyTimeout = 5 * time.Second
	r := newRig(t, "never-ready", Config{ReadyTimeout: readyTimeout})
	r.run()
	r.waitFor(5*time.Second, "generation 1 to be spawned", func() bool {
		st, err := r.statusErr()
		return err == nil && len(st.Generations) == 1 && len(r.tagged()) == 1
	})
	r.cancel()
	start := time.Now()
	err := r.wait(readyTimeout + 5*time.Second)
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Run returned %v after cancel, want it within the kill grace (it waited for --ready-timeout)", took.Round(time.Millisecond))
	}
	if err != nil {
		t.Errorf("Run returned %v after cancel, want nil", err)
	}
	r.assertNoneLeft()
}

// A generation that dies after its ready report but before it is made
// active must fail the rollover like any earlier failure: the coordinator
// must not activate a dead generation and drain the healthy one.
func TestGenerationExitingRightAfterReady(t *testing.T) {
	r := startRig(t, "ready", Config{})
	_, pid1 := r.mustGet("/")
	var events []wire.Event
	// The CLI's emit runs on the rollover goroutine between ready and
	// activation; holding it until the coordinator has reaped the new
	// generation makes the race deterministic.
	ro, err := r.c.begin(rolloverReq{launch: Launch{Argv: r.argv("ready-then-exit")}}, func(e wire.Event) {
		events = append(events, e)
		if e.Phase == wire.PhaseReady {
			r.waitFor(5*time.Second, "the new generation to be reaped", func() bool {
				return genOf(r.status(), e.Generation) == nil
			})
		}
	})
	if err == nil {
		<-ro.settled
		err = ro.err
	}
	if err == nil {
		t.Errorf("rolling over to a generation that died before activation succeeded: %v", phases(events))
	}
	if st := r.status(); st.Active != 1 || genOf(st, st.Active) == nil {
		t.Fatalf("after the rollover: active gen %d, generations %+v; want gen 1 still active", st.Active, st.Generations)
	}
	r.activeIs(1, pid1)
}

// A request on a connection the coordinator accepted before Run returned
// must be refused, not crash the process (a nil *os.Process when the owner
// loop is gone).
func TestRequestAfterRunReturned(t *testing.T) {
	if !inChild(t) {
		return
	}
	r := startRig(t, "ready", Config{})
	conn, err := net.Dial("unix", r.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r.cancel()
	if err := r.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(wire.Encode(wire.Msg{Type: wire.TypeNext, Argv: r.argv("ready")})); err != nil {
		// Run closed the connection as it ended: a fine answer.
		if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
	}
	rd := wire.NewReader(conn)
	for range 100 {
		m, err := rd.Read()
		if err != nil {
			if isTimeout(err) {
				t.Error("no answer to a request after Run returned")
			}
			break // a disconnect is a fine answer
		}
		if m.Type == wire.TypeResult {
			if m.OK {
				t.Errorf("a rollover after Run returned succeeded: %+v", m)
			}
			break
		}
	}
	if left := r.tagged(); len(left) > 0 {
		t.Errorf("a request after Run returned started processes %v", left)
	}
}

// A restart that was pending when an operator rolled over by hand must not
// roll over the new, healthy generation again.
func TestPendingRestartAfterNext(t *testing.T) {
	r := startRig(t, "crash-after-ready", Config{})
	r.waitFor(5*time.Second, "generation 1 to crash", func() bool {
		st := r.status()
		return st.Active == 0 && len(st.Generations) == 0
	})
	crashed := time.Now() // the restart fires 500ms after the crash
	events, res := r.next(r.argv("ready"))
	if !res.OK {
		t.Fatalf("next: %s", res.Error)
	}
	started := eventOf(events, wire.PhaseStarted)
	if time.Since(crashed) > 400*time.Millisecond {
		t.Skipf("next took %v, too slow to beat the restart backoff", time.Since(crashed))
	}
	// Watch past the backoff: nothing may replace the healthy generation.
	for time.Since(crashed) < 1500*time.Millisecond {
		if st := r.status(); st.Active != started.Generation {
			t.Fatalf("gen %d replaced by gen %d without a request: a stale restart fired", started.Generation, st.Active)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.activeIs(started.Generation, started.PID)
}

// Socket paths that cannot work are refused with the fix in the message.
func TestSocketPathErrors(t *testing.T) {
	exe, _ := os.Executable()
	long := filepath.Join(t.TempDir(), strings.Repeat("x", 120)+".sock")
	_, err := New(testConfig(Config{Argv: []string{exe}, Socket: long}))
	if !errors.Is(err, ErrSocket) || !strings.Contains(err.Error(), "over the 107-byte limit") || !strings.Contains(err.Error(), "--socket") {
		t.Errorf("a %d-byte socket path: %v, want the length limit and --socket", len(long), err)
	}
	if _, err := os.Stat(long); err == nil {
		t.Error("a socket was created at the long path")
	}
	// Nobody, root included, creates directories in /proc.
	_, err = New(testConfig(Config{Argv: []string{exe}, Socket: "/proc/rollover-test/c.sock"}))
	if !errors.Is(err, ErrSocket) || !strings.Contains(err.Error(), "--socket") {
		t.Errorf("an unwritable socket directory: %v, want a hint naming --socket", err)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 { // root writes anywhere
		_, err := New(testConfig(Config{Argv: []string{exe}, Socket: filepath.Join(dir, "c.sock")}))
		if !errors.Is(err, ErrSocket) || !strings.Contains(err.Error(), "permission denied") || !strings.Contains(err.Error(), "--socket") {
			t.Errorf("a read-only socket directory: %v, want permission denied and a hint naming --socket", err)
		}
	}
}

// An app's own timestamp is dropped from its forwarded lines; the rest of
// the line stays whole.
func TestAppTimestampsDropped(t *testing.T) {
	for in, want := range map[string]string{
		"2026/12/01 07:37:53 listening on :8080":          "listening on :8080",
		"2026/12/01 07:37:53.123456 listening":            "listening",
		"2026-12-01T07:37:53.573Z INFO started":           "INFO started",
		"2026-12-01T07:37:53+01:00 started":               "started",
		"2026-12-01 07:37:53,123 INFO root: started":      "INFO root: started",
		"time=2026-12-01T07:37:53.573Z level=INFO msg=up": "level=INFO msg=up",
		"no time here":        "no time here",
		"2026/12/01 07:37:53": "2026/12/01 07:37:53", // nothing else to say
		`{"time":"2026-12-01T07:37:53Z","msg":"json stays"}`: `{"time":"2026-12-01T07:37:53Z","msg":"json stays"}`,
	} {
		var got []string
		w := &lineLog{log: slog.New(sinkHandler{s: &logSink{}}), tail: newTail(3)}
		_, _ = w.Write([]byte(in + "\n"))
		got = strings.Split(w.tail.String(), " | ")
		if len(got) != 1 || got[0] != want {
			t.Errorf("%q forwarded as %q, want %q", in, got, want)
		}
	}
}

// A rollover started from the CLI is logged phase by phase with gen and pid
// fields, and rolling to the very same program says so.
func TestCLIRolloverLoggedAndSameProgramNoted(t *testing.T) {
	r := startRig(t, "ready", Config{})
	events, res := r.next(nil) // the active command line, the same file
	if !res.OK {
		t.Fatalf("next: %s", res.Error)
	}
	note := eventOf(events, wire.PhaseInfo)
	if note == nil || !strings.Contains(note.Text, "runs the same") || !strings.Contains(note.Text, "Text file busy") {
		t.Errorf("rolling to the unchanged program: events %+v, want a note saying so", events)
	}
	started := eventOf(events, wire.PhaseStarted)
	var sawStarted, sawActive bool
	for _, rec := range r.logs.records() {
		switch {
		case rec.msg == fmt.Sprintf("started gen 2 (pid %d)", started.PID):
			sawStarted = rec.attrs["gen"] == "2" && rec.attrs["pid"] == strconv.Itoa(started.PID)
		case rec.msg == "gen 2 active":
			sawActive = rec.attrs["gen"] == "2"
		}
	}
	if !sawStarted || !sawActive {
		t.Errorf("the coordinator's log lacks the CLI rollover's phases with gen and pid fields (started %v, active %v)", sawStarted, sawActive)
	}
	// Different arguments are a new configuration, not a repeat: no note.
	events, res = r.next(r.argv("ready", envDelay+"=1ms"))
	if !res.OK {
		t.Fatalf("next: %s", res.Error)
	}
	if e := eventOf(events, wire.PhaseInfo); e != nil {
		t.Errorf("a rollover with new arguments was noted as a repeat: %q", e.Text)
	}
}
