package coordinator

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"
	"go.uber.org/goleak"

	"github.com/rollover-sh/rollover/rollover"
	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// The test binary doubles as a generation (the helper-process pattern of
// os/exec's exec_test.go). The coordinator drops every ROLLOVER_* variable
// from a child's environment and a generation's command line is all that
// `next` can vary, so the test passes the generation's settings as KEY=VALUE
// arguments after genArg; TestMain puts them into the environment.
const (
	genArg    = "-rollover.test.generation"
	envMode   = "ROLLOVER_TEST_MODE"        // ready, never-ready, crash-on-start, crash-after-ready, slow-drain, ready-then-exit, panics
	envAddr   = "ROLLOVER_TEST_ADDR"        // 127.0.0.1:port to serve on
	envDelay  = "ROLLOVER_TEST_READY_DELAY" // warm-up before listening (a duration)
	envTag    = "ROLLOVER_TEST_TAG"         // marks the command line of every process a test starts
	crashLine = "boom: config missing"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == genArg {
		for _, kv := range os.Args[2:] {
			if k, v, ok := strings.Cut(kv, "="); ok {
				os.Setenv(k, v)
			}
		}
	}
	if mode := os.Getenv(envMode); mode != "" {
		os.Exit(generation(mode))
	}
	// Every goroutine and timer a coordinator starts has an owner that
	// waits for it: once the tests are done, none is left.
	goleak.VerifyTestMain(m)
}

// generation runs this process as a generation in mode and returns its exit
// code.
func generation(mode string) int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "generation %s: %v\n", mode, err)
		return 1
	}
	forever := func() {
		for {
			time.Sleep(time.Hour)
		}
	}
	if mode == "crash-on-start" {
		fmt.Fprintln(os.Stderr, crashLine)
		return 3
	}
	if mode == "steer-fails" {
		return steerFails()
	}
	if d, err := time.ParseDuration(os.Getenv(envDelay)); err == nil {
		time.Sleep(d) // warm-up, as a real app might
	}
	if mode == "ready-then-exit" {
		// Ready without a listener (so not steerable, like an app that
		// serves its own protocol), then die at once.
		if err := rollover.Ready(); err != nil {
			return fail(err)
		}
		return 1
	}
	ctx := context.Background()
	ln, err := rollover.Listen(ctx, "tcp", os.Getenv(envAddr))
	if err != nil {
		return fail(err)
	}
	if mode == "crash-after-hello" {
		// Listen said hello; die before ready.
		fmt.Fprintln(os.Stderr, "panic-ish: cache warm-up failed")
		return 2
	}
	srv := &http.Server{Handler: genHandler(), ReadHeaderTimeout: 5 * time.Second}
	switch mode {
	case "panics":
		// Ready and serving, but every handler panics: a bad deploy that
		// only shows under traffic.
		srv.Handler = http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom: nil map") })
		srv.ErrorLog = log.New(io.Discard, "", 0)
		if err := rollover.Serve(ctx, srv, ln); err != nil {
			return fail(err)
		}
		return 0
	case "ready":
		if err := rollover.Serve(ctx, srv, ln); err != nil {
			return fail(err)
		}
		return 0
	case "never-ready":
		forever()
	case "crash-after-ready":
		if err := rollover.Ready(); err != nil {
			return fail(err)
		}
		go func() { _ = rollover.Serve(ctx, srv, ln) }()
		time.Sleep(300 * time.Millisecond)
		fmt.Fprintln(os.Stderr, "crashing on purpose")
		return 1
	case "slow-drain":
		// Ignore the drain entirely: only SIGKILL ends this generation.
		signal.Ignore(syscall.SIGTERM)
		err := rollover.Serve(ctx, srv, ln)
		fmt.Fprintf(os.Stderr, "serve returned (%v); lingering\n", err)
		forever()
	}
	return fail(fmt.Errorf("unknown mode %q", mode))
}

// steerFails speaks the protocol by hand: it reports ready and steerable,
// then fails every steering verification, as a generation whose probe
// connection landed elsewhere would. It drains by exiting.
func steerFails() int {
	conn, err := net.Dial("unix", os.Getenv(rollover.EnvSocket))
	if err != nil {
		return 1
	}
	gen, _ := strconv.Atoi(os.Getenv(rollover.EnvGeneration))
	send := func(m wire.Msg) { _, _ = conn.Write(wire.Encode(m)) }
	send(wire.Msg{Type: wire.TypeHello, Generation: gen, PID: os.Getpid(), Secret: os.Getenv(rollover.EnvSecret)})
	r := wire.NewReader(conn)
	if m, err := r.Read(); err != nil || m.Error != "" {
		return 1
	}
	send(wire.Msg{Type: wire.TypeReady, Steerable: true})
	for {
		m, err := r.Read()
		if err != nil {
			return 1
		}
		switch m.Type {
		case wire.TypeSteer:
			send(wire.Msg{Type: wire.TypeAck, ID: m.ID, Error: "steer verify: probe was not accepted by this generation"})
		case wire.TypeDrain:
			send(wire.Msg{Type: wire.TypeAck, ID: m.ID, OK: true})
			send(wire.Msg{Type: wire.TypeClosed})
			return 0
		}
	}
}

// genHandler answers "gen N pid P". /slow?d=DURATION answers after d; /hang
// sends its headers and never finishes.
func genHandler() http.Handler {
	answer := func(w http.ResponseWriter) {
		fmt.Fprintf(w, "gen %d pid %d\n", rollover.Generation(), os.Getpid())
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { answer(w) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 || d > time.Minute {
			http.Error(w, "bad d", http.StatusBadRequest)
			return
		}
		time.Sleep(d) // the point of /slow: ignore the client and the drain
		answer(w)
	})
	mux.HandleFunc("/hang", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		select {}
	})
	return mux
}

// --- the coordinator under test ---

// rig is a coordinator running in this process with its generations.
type rig struct {
	t    *testing.T
	c    *Coordinator
	sock string
	addr string // 127.0.0.1:port the generations share
	tag  string
	logs *logSink

	cancel context.CancelFunc
	ran    chan struct{} // Run returned; runErr set
	runErr error
}

// testConfig returns a Config with short timeouts; fields set in cfg win.
func testConfig(cfg Config) Config {
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 5 * time.Second
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	if cfg.KillGrace == 0 {
		cfg.KillGrace = 500 * time.Millisecond
	}
	return cfg // DrainGrace 0: loopback needs none
}

// newRig creates a coordinator whose generation 1 runs mode, but does not
// run it.
func newRig(t *testing.T, mode string, cfg Config) *rig {
	t.Helper()
	// Short: socket paths max 108 bytes. A child test process uses its
	// parent's directory, which outlives a crash of the child.
	dir, err := os.MkdirTemp(os.Getenv(envChildDir), "rt")
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{
		t:    t,
		sock: filepath.Join(dir, "c.sock"),
		addr: testproc.FreeAddr(t),
		tag:  cmp.Or(os.Getenv(envChildTag), randomTag()),
		logs: &logSink{},
		ran:  make(chan struct{}),
	}
	t.Cleanup(func() {
		r.killStrays()
		os.RemoveAll(dir)
		r.logs.check(t)
	})
	cfg = testConfig(cfg)
	cfg.Argv = r.argv(mode)
	cfg.Socket = r.sock
	cfg.Log = slog.New(r.logs.handler())
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	r.c = c
	return r
}

// startRig runs a coordinator whose generation 1 runs mode and waits until
// generation 1 is active.
func startRig(t *testing.T, mode string, cfg Config) *rig {
	t.Helper()
	r := newRig(t, mode, cfg)
	r.run()
	r.waitFor(10*time.Second, "generation 1 active", func() bool {
		select {
		case <-r.ran:
			t.Fatalf("Run returned before generation 1 was active: %v", r.runErr)
		default:
		}
		st, err := r.statusErr()
		return err == nil && st.Active == 1
	})
	return r
}

// run starts Run; cleanup cancels it and waits for it.
func (r *rig) run() {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		defer close(r.ran)
		r.runErr = r.c.Run(ctx)
	}()
	r.t.Cleanup(func() {
		cancel()
		select {
		case <-r.ran:
		case <-time.After(30 * time.Second):
			r.t.Errorf("Run did not return within 30s of cancel")
		}
	})
}

// wait waits for Run to return and returns its error.
func (r *rig) wait(timeout time.Duration) error {
	r.t.Helper()
	select {
	case <-r.ran:
		return r.runErr
	case <-time.After(timeout):
		r.t.Fatalf("Run did not return within %v", timeout)
		return nil
	}
}

// argv is the command line of a generation in mode.
func (r *rig) argv(mode string, settings ...string) []string {
	exe, err := os.Executable()
	if err != nil {
		r.t.Fatal(err)
	}
	return append([]string{exe, genArg, envMode + "=" + mode, envAddr + "=" + r.addr, envTag + "=" + r.tag}, settings...)
}

func (r *rig) waitFor(timeout time.Duration, what string, cond func() bool) {
	r.t.Helper()
	testproc.WaitFor(r.t, timeout, what, cond)
}

// --- the control socket, spoken as the CLI speaks it ---

// call dials sock, sends req and reads events until the result.
func call(sock string, req wire.Msg, timeout time.Duration) ([]wire.Event, wire.Msg, error) {
	conn, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return nil, wire.Msg{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(wire.Encode(req)); err != nil {
		return nil, wire.Msg{}, err
	}
	r := wire.NewReader(conn)
	var events []wire.Event
	for range 10000 {
		m, err := r.Read()
		if err != nil {
			return events, wire.Msg{}, fmt.Errorf("read after %d events: %w", len(events), err)
		}
		switch m.Type {
		case wire.TypeEvent:
			if m.Event != nil {
				events = append(events, *m.Event)
			}
		case wire.TypeResult:
			return events, m, nil
		default:
			return events, m, fmt.Errorf("unexpected %q message", m.Type)
		}
	}
	return events, wire.Msg{}, errors.New("too many events")
}

func (r *rig) statusErr() (*wire.Status, error) {
	_, res, err := call(r.sock, wire.Msg{Type: wire.TypeStatus}, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if !res.OK || res.Status == nil {
		return nil, fmt.Errorf("status failed: %q", res.Error)
	}
	return res.Status, nil
}

func (r *rig) status() *wire.Status {
	r.t.Helper()
	st, err := r.statusErr()
	if err != nil {
		r.t.Fatalf("status: %v", err)
	}
	return st
}

// next rolls over to argv and returns the events and the result.
func (r *rig) next(argv []string) ([]wire.Event, wire.Msg) {
	r.t.Helper()
	events, res, err := call(r.sock, wire.Msg{Type: wire.TypeNext, Argv: argv}, 30*time.Second)
	if err != nil {
		r.t.Fatalf("next: %v", err)
	}
	return events, res
}

// gen returns generation n's status, or nil.
func genOf(st *wire.Status, n int) *wire.GenStatus {
	for i := range st.Generations {
		if st.Generations[i].Generation == n {
			return &st.Generations[i]
		}
	}
	return nil
}

// --- HTTP to the generations ---

var answerRE = regexp.MustCompile(`^gen (\d+) pid (\d+)\n$`)

// get requests path on a new connection and returns the answering
// generation and pid.
func (r *rig) get(path string) (gen, pid int, err error) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}, Timeout: 10 * time.Second}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + r.addr + path)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("%s: %s", resp.Status, b)
	}
	m := answerRE.FindSubmatch(b)
	if m == nil {
		return 0, 0, fmt.Errorf("unexpected body %q", b)
	}
	gen, _ = strconv.Atoi(string(m[1]))
	pid, _ = strconv.Atoi(string(m[2]))
	return gen, pid, nil
}

func (r *rig) mustGet(path string) (gen, pid int) {
	r.t.Helper()
	gen, pid, err := r.get(path)
	if err != nil {
		r.t.Fatalf("GET %s: %v", path, err)
	}
	return gen, pid
}

// answer is what a request that get sent brought back.
type answer struct {
	gen, pid int
	err      error
}

// slowAcrossNext sends the slow request path to generation 1, waits until it
// is in flight there, and rolls over to a new generation in mode ready. It
// returns where the request's answer will come, and the new generation's pid.
func (r *rig) slowAcrossNext(path string) (slow <-chan answer, pid2 int) {
	r.t.Helper()
	ch := make(chan answer, 1)
	go func() {
		gen, pid, err := r.get(path)
		ch <- answer{gen, pid, err}
	}()
	r.waitFor(5*time.Second, "the slow request in flight on gen 1", func() bool {
		g := genOf(r.status(), 1)
		return g != nil && g.Stats.Inflight == 1
	})
	events, res := r.next(r.argv("ready"))
	if !res.OK {
		r.t.Fatalf("next: %s", res.Error)
	}
	return ch, eventOf(events, wire.PhaseStarted).PID
}

// --- processes ---

// A test that may crash its process (a panic in the coordinator) runs alone
// in a child test process. The child tags its generations with the parent's
// tag, so the parent can find any it left behind.
const (
	envChildTag = "ROLLOVER_TEST_CHILD_TAG"
	envChildDir = "ROLLOVER_TEST_CHILD_DIR"
)

// inChild reports whether this process is the child that runs t. In the
// parent it runs the child (testproc.InChild), fails t if the child fails or
// leaves a generation behind, and returns false.
func inChild(t *testing.T) bool {
	t.Helper()
	if testproc.IsChild(t) {
		return true
	}
	tag := randomTag()
	dir := testproc.ShortDir(t)
	strays := &rig{t: t, tag: tag, logs: &logSink{}}
	t.Cleanup(strays.killStrays) // generations of a child that died
	return testproc.InChild(t, testproc.Child{Env: []string{envChildTag + "=" + tag, envChildDir + "=" + dir}})
}

func randomTag() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (r *rig) waitGone(pid int, timeout time.Duration) {
	r.t.Helper()
	r.waitFor(timeout, fmt.Sprintf("pid %d to be gone", pid), func() bool { return testproc.Gone(pid) })
}

// tagged returns the live processes whose command line carries this rig's
// tag: every generation it started, and only those.
func (r *rig) tagged() []int {
	want := envTag + "=" + r.tag
	procs, err := procfs.AllProcs()
	if err != nil {
		r.t.Fatalf("list processes: %v", err)
	}
	var pids []int
	for _, p := range procs {
		if args, err := p.CmdLine(); err == nil && slices.Contains(args, want) {
			pids = append(pids, p.PID)
		}
	}
	return pids
}

// pids returns every generation pid the coordinator reported: in log
// records about a generation, and in started events.
func (r *rig) pids() []int {
	var pids []int
	for _, rec := range r.logs.records() {
		_, aboutGen := rec.attrs["gen"]
		if p, ok := rec.attrs["pid"]; ok && aboutGen {
			if n, err := strconv.Atoi(p); err == nil {
				pids = append(pids, n)
			}
		}
		if m := startedRE.FindStringSubmatch(rec.msg); m != nil {
			n, _ := strconv.Atoi(m[2])
			pids = append(pids, n)
		}
	}
	slices.Sort(pids)
	return slices.Compact(pids)
}

// assertNoneLeft checks that every generation is gone and reaped.
func (r *rig) assertNoneLeft() {
	r.t.Helper()
	for _, pid := range r.pids() {
		if !testproc.Gone(pid) {
			r.t.Errorf("generation pid %d is still there (alive or not reaped)", pid)
		}
	}
	if left := r.tagged(); len(left) > 0 {
		r.t.Errorf("processes left behind: %v", left)
	}
}

// killStrays kills, by pid, any process this rig started that is still
// alive, and fails the test if there was one.
func (r *rig) killStrays() {
	left := r.tagged()
	for _, pid := range left {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if len(left) > 0 {
		r.t.Errorf("cleanup: killed leftover processes %v", left)
	}
}

// --- logs ---

var startedRE = regexp.MustCompile(`^started gen (\d+) \(pid (\d+)\)$`)

type logRecord struct {
	at    time.Time
	msg   string
	attrs map[string]string
	line  string
}

// logSink collects the coordinator's log, which includes its generations'
// output. It outlives the test: a coordinator goroutine may log late.
type logSink struct {
	mu   sync.Mutex
	recs []logRecord
}

func (s *logSink) handler() slog.Handler { return sinkHandler{s: s} }

func (s *logSink) records() []logRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.recs)
}

// starts returns the times generations were started, in order.
func (s *logSink) starts() []time.Time {
	var ts []time.Time
	for _, rec := range s.records() {
		if startedRE.MatchString(rec.msg) {
			ts = append(ts, rec.at)
		}
	}
	return ts
}

// check fails the test on a data race or panic in any process, and shows the
// log when the test failed.
func (s *logSink) check(t *testing.T) {
	recs := s.records()
	for _, rec := range recs {
		if strings.Contains(rec.msg, "DATA RACE") || strings.HasPrefix(rec.msg, "panic:") || strings.HasPrefix(rec.msg, "fatal error:") {
			t.Errorf("a generation reported: %s", rec.line)
		}
	}
	if t.Failed() {
		var b strings.Builder
		for _, rec := range recs {
			b.WriteString(rec.line)
			b.WriteByte('\n')
		}
		t.Logf("coordinator log:\n%s", b.String())
	}
}

type sinkHandler struct {
	s     *logSink
	attrs []slog.Attr
}

func (h sinkHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h sinkHandler) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{at: r.Time, msg: r.Message, attrs: map[string]string{}}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %q", r.Time.Format("15:04:05.000"), r.Level, r.Message)
	add := func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	rec.line = b.String()
	h.s.mu.Lock()
	h.s.recs = append(h.s.recs, rec)
	h.s.mu.Unlock()
	return nil
}

func (h sinkHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return sinkHandler{s: h.s, attrs: append(slices.Clip(h.attrs), as...)}
}

func (h sinkHandler) WithGroup(string) slog.Handler { return h }
