package tests

// Apps that do not link the library, as real generations: nginx here, the
// Python notify app in notifyapp_test.go. Neither can be steered, so their
// hand-over relies on net.ipv4.tcp_migrate_req=1, which a test may only set
// in a network namespace of its own. The coordinator, the generations, the
// load and the rollovers must all live in that namespace, so the test
// re-executes its own binary under `unshare -n` as TestForeignAppHelper,
// which runs one foreignScenario there and writes a foreignReport to a file;
// the test then judges the report. The machinery below is shared with
// notifyapp_test.go.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/prometheus/procfs"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// TestNginxRollover rolls real nginx over between two configurations, under
// load, with tcp_migrate_req=1: nginx is started as `nginx -e stderr -c
// vN.conf` with --ready=listen and --drain-signal=SIGQUIT (its graceful
// shutdown), and every client request must succeed.
func TestNginxRollover(t *testing.T) {
	nginx := needTool(t, "nginx")
	if os.Geteuid() != 0 {
		// In a user namespace nginx's master looks like root, and its workers
		// then fail to switch to the unmapped user nobody.
		foreignNeed(t, "the nginx test runs as root (nginx's workers cannot drop privileges in a user namespace)")
	}
	for _, keepAlive := range []bool{false, true} {
		name := "new-connection"
		if keepAlive {
			name = "keep-alive"
		}
		t.Run(name, func(t *testing.T) {
			dir := testproc.ShortDir(t)
			foreignLeaveNothing(t, dir)
			addr := testproc.FreeAddr(t)
			var confs [2]string
			for i, v := range []string{"v1", "v2"} {
				confs[i] = renderNginxConf(t, nginx, dir, v, addr)
			}
			sc := foreignScenario{
				Name: "nginx " + name, Dir: dir, Addr: addr,
				StartFlags: []string{"--ready=listen", "--addr", addr, "--drain-signal=SIGQUIT"},
				Argv: [2][]string{
					{nginx, "-e", "stderr", "-c", confs[0]},
					{nginx, "-e", "stderr", "-c", confs[1]},
				},
				VersionHeader: "X-Nginx-Config", Body: "nginx {v}\n",
				Rollovers: 20, Interval: 500 * time.Millisecond, Clients: 16, KeepAlive: keepAlive,
				// The coordinator steers nginx's reuseport sockets, one per
				// worker, from outside: no tcp_migrate_req needed.
				MigrateReq: 0,
			}
			rep := runForeignInNetns(t, sc)
			// Generation 1 comes up the way it was launched, steered by
			// the coordinator through duplicates of its workers' sockets.
			g1 := foreignGen(t, rep.Start, 1)
			if g1.Ready != "listen" || !g1.Steerable || g1.Sockets != nginxWorkers {
				t.Errorf("gen 1: ready %q, steerable %v (%s), %d sockets; want listen, steered by the coordinator, %d sockets", g1.Ready, g1.Steerable, g1.SteerError, g1.Sockets, nginxWorkers)
			}
			if !keepAlive {
				rep.check(t, sc, 0)
				return
			}
			// Keep-alive clients do lose requests, and not to the listener
			// hand-over (the new-connection run loses none): on SIGQUIT
			// nginx closes its idle keep-alive connections at once, and a
			// client that sent a request on one just then gets EOF or a
			// reset. Measured: 36 to 74 per 20 rollovers (1.8 to 3.7 per
			// rollover), nearly all eof, a few reset. HTTP clients retry
			// that for idempotent requests; the load's POST is never
			// retried, so it shows. Everything else is checked as strictly;
			// the bound only catches a change for the worse.
			rep.check(t, sc, 10*int64(sc.Rollovers))
			t.Logf("nginx closing idle keep-alive connections on SIGQUIT: %d failed requests in %d rollovers (%.1f per rollover): %v",
				rep.Load.Failures, rep.Rollovers, float64(rep.Load.Failures)/float64(max(rep.Rollovers, 1)), rep.Load.ByKind)
		})
	}
}

// nginxWorkers is worker_processes: each worker has its own reuseport
// socket, so a generation is that many sockets in the group.
const nginxWorkers = 4

// renderNginxConf writes dir/version.conf from testdata/nginx/nginx.conf.tmpl
// and checks it with `nginx -t`.
func renderNginxConf(t *testing.T, nginx, dir, version, addr string) string {
	t.Helper()
	tmpl, err := template.ParseFiles("testdata/nginx/nginx.conf.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := tmpl.Execute(&b, map[string]any{"Dir": dir, "Version": version, "Addr": addr, "Workers": nginxWorkers}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, version+".conf")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(nginx, "-t", "-q", "-e", "stderr", "-c", path).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t %s: %v\n%s\n%s", path, err, out, b.String())
	}
	return path
}

// envForeignScenario carries a JSON foreignScenario to TestForeignAppHelper.
const envForeignScenario = "ROLLOVER_TEST_FOREIGN_SCENARIO"

// foreignScenario is one run of an app without the library: a coordinator
// with Argv[0] as generation 1, then Rollovers rollovers alternating between
// Argv[1] and Argv[0], about every Interval, under load.
type foreignScenario struct {
	Name       string        `json:"name"`
	Dir        string        `json:"dir"` // private; in every command line of ours
	Addr       string        `json:"addr"`
	StartFlags []string      `json:"start_flags"` // --ready, --addr, --drain-signal
	Argv       [2][]string   `json:"argv"`        // v1, v2
	Rollovers  int           `json:"rollovers"`
	Interval   time.Duration `json:"interval"`
	Clients    int           `json:"clients"`
	KeepAlive  bool          `json:"keep_alive"`
	MigrateReq int           `json:"migrate_req"` // -1: leave the sysctl alone

	// VersionHeader names the version ("v1", "v2") in every answer; the
	// body starts with Body, "{v}" replaced by the version.
	VersionHeader string `json:"version_header"`
	Body          string `json:"body"`
	// Spread: after the rollovers, this many new connections, each
	// answered by the process that accepted it (its body ends "pid N"),
	// tallied in the report's Spread.
	Spread int `json:"spread,omitempty"`
	// KillInstance: then SIGKILL one instance of the active generation
	// (--instances) under keep-alive clients (the report's Kill).
	KillInstance bool `json:"kill_instance,omitempty"`
}

func (sc foreignScenario) reportPath() string { return filepath.Join(sc.Dir, "report.json") }
func (sc foreignScenario) logPath() string    { return filepath.Join(sc.Dir, "coordinator.log") }

// foreignReport is what TestForeignAppHelper measured.
type foreignReport struct {
	Error      string      `json:"error,omitempty"` // the run could not be done
	Netns      string      `json:"netns"`
	MigrateReq string      `json:"migrate_req"` // the sysctl as read back
	Start      wire.Status `json:"start"`       // status once generation 1 is active
	End        wire.Status `json:"end"`         // status after the last rollover

	Rollovers    int             `json:"rollovers"` // that succeeded
	RolloverErrs []string        `json:"rollover_errors,omitempty"`
	Took         []time.Duration `json:"took"` // per `rollover next`
	// ProbeErrs: after each `next` returned, a new connection must reach
	// the new version.
	ProbeErrs []string `json:"probe_errors,omitempty"`

	Load load.Result `json:"load"`
	// Versions counts answers by version header, from a client that checks
	// each body against its header; ObserverFailures are its failed requests.
	Versions         map[string]int64 `json:"versions"`
	ObserverFailures int64            `json:"observer_failures"`
	ObserverSamples  []string         `json:"observer_samples,omitempty"`

	Spread     map[string]int `json:"spread,omitempty"` // answers by "vN pid N", see foreignScenario.Spread
	SpreadErrs int            `json:"spread_errors,omitempty"`
	Kill       *instanceKill  `json:"kill,omitempty"`

	PIDs      []int    `json:"pids"`                // every generation's pid seen
	Lingering []string `json:"lingering,omitempty"` // old generations' processes alive after the load stopped
	StopErr   string   `json:"stop_error,omitempty"`
	Left      []string `json:"left,omitempty"` // processes in the namespace after stop (then killed)
	Elapsed   time.Duration
}

// check fails t on every failed rollover, leftover process or failed
// request; the load may fail at most maxLoadFailures requests (0 but for
// nginx with keep-alive clients, see TestNginxRollover).
func (rep foreignReport) check(t *testing.T, sc foreignScenario, maxLoadFailures int64) {
	t.Helper()
	if want := strconv.Itoa(sc.MigrateReq); sc.MigrateReq >= 0 && (rep.MigrateReq != want || rep.Start.MigrateReq == nil || *rep.Start.MigrateReq != (sc.MigrateReq == 1)) {
		t.Errorf("tcp_migrate_req is %q in the namespace, status says %v; want %s", rep.MigrateReq, rep.Start.MigrateReq, want)
	}
	if rep.Rollovers != sc.Rollovers || len(rep.RolloverErrs) > 0 {
		t.Errorf("%d of %d rollovers succeeded: %v", rep.Rollovers, sc.Rollovers, rep.RolloverErrs)
	}
	if rep.Load.OK == 0 || rep.Load.Failures > maxLoadFailures {
		t.Errorf("load: %d requests failed (%v), %d ok: %v", rep.Load.Failures, rep.Load.ByKind, rep.Load.OK, rep.Load.Samples)
	}
	if rep.ObserverFailures != 0 {
		t.Errorf("observer: %d requests failed: %v", rep.ObserverFailures, rep.ObserverSamples)
	}
	if len(rep.ProbeErrs) > 0 {
		t.Errorf("after `rollover next` returned, new connections did not all reach the new version: %v", rep.ProbeErrs)
	}
	if rep.Versions["v1"] == 0 || rep.Versions["v2"] == 0 || len(rep.Versions) != 2 {
		t.Errorf("answers by version %v: want both v1 and v2, nothing else", rep.Versions)
	}
	if len(rep.Lingering) > 0 {
		t.Errorf("old generations still alive after the load stopped: %v", rep.Lingering)
	}
	if rep.StopErr != "" {
		t.Errorf("rollover stop: %s", rep.StopErr)
	}
	if len(rep.Left) > 0 {
		t.Errorf("processes left in the namespace after stop (killed): %v", rep.Left)
	}
}

// runForeignInNetns runs sc in a fresh network namespace (see
// TestForeignAppHelper) and returns the report; it fails t when there is
// none, and checks the coordinator's and the helper's output for races and
// panics.
func runForeignInNetns(t *testing.T, sc foreignScenario) foreignReport {
	t.Helper()
	prefix := unshareArgs(t)
	raw, err := json.Marshal(sc)
	if err != nil {
		t.Fatal(err)
	}
	budget := time.Duration(sc.Rollovers)*(sc.Interval+2*time.Second) + 90*time.Second
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	cmd, out := helperCommand(t, ctx, prefix, "TestForeignAppHelper", budget, envForeignScenario+"="+string(raw))
	start := time.Now()
	runErr := cmd.Run()
	log, _ := os.ReadFile(sc.logPath())
	if d := os.Getenv("ROLLOVER_TEST_KEEPLOG"); d != "" {
		_ = os.WriteFile(filepath.Join(d, strings.ReplaceAll(sc.Name, " ", "-")+".log"), log, 0o644)
	}
	checkOutput(t, "coordinator", string(log))
	checkOutput(t, "helper", out.String())
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("coordinator log (tail):\n%s", tailLines(string(log), 60))
			t.Logf("helper output (tail):\n%s", tailLines(out.String(), 40))
		}
	})
	b, err := os.ReadFile(sc.reportPath())
	if err != nil {
		t.Fatalf("helper: %v; no report: %v\n%s", runErr, err, tailLines(out.String(), 60))
	}
	var rep foreignReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("helper: %v; report unreadable: %v\n%s", runErr, err, b)
	}
	if rep.Error != "" {
		t.Fatalf("helper could not run %s: %s", sc.Name, rep.Error)
	}
	if runErr != nil {
		t.Errorf("helper: %v", runErr)
	}
	t.Logf("%s: %d rollovers in %v (helper %v, with its build), next took p50 %v; load %s; answers by version %v (observer failures %d); %d generation pids",
		sc.Name, rep.Rollovers, rep.Elapsed.Round(time.Millisecond), time.Since(start).Round(time.Second),
		median(rep.Took), rep.Load.String(), rep.Versions, rep.ObserverFailures, len(rep.PIDs))
	return rep
}

// TestForeignAppHelper is not a test of its own: TestNginxRollover and
// TestNotifyAppRollover run it in a network namespace they create, with the
// scenario in $ROLLOVER_TEST_FOREIGN_SCENARIO.
func TestForeignAppHelper(t *testing.T) {
	var sc foreignScenario
	helperScenario(t, envForeignScenario, "TestNginxRollover and TestNotifyAppRollover", &sc)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	rep := sc.run(ctx, t.Logf)
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sc.reportPath(), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if rep.Error != "" {
		t.Fatal(rep.Error)
	}
}

// run does the scenario here, in the namespace, and leaves nothing running.
func (sc foreignScenario) run(ctx context.Context, logf func(string, ...any)) (rep foreignReport) {
	start := time.Now()
	defer func() { rep.Elapsed = time.Since(start) }()
	fail := func(format string, a ...any) foreignReport {
		rep.Error = fmt.Sprintf(format, a...)
		return rep
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return fail("ip link set lo up: %v: %s", err, bytes.TrimSpace(out))
	}
	const sysctl = "/proc/sys/net/ipv4/tcp_migrate_req"
	if sc.MigrateReq >= 0 {
		if err := os.WriteFile(sysctl, []byte(strconv.Itoa(sc.MigrateReq)), 0o644); err != nil {
			return fail("set tcp_migrate_req: %v", err)
		}
	}
	mr, _ := os.ReadFile(sysctl)
	rep.MigrateReq = strings.TrimSpace(string(mr))
	ns, err := selfNetns()
	if err != nil {
		return fail("%v", err)
	}
	rep.Netns = fmt.Sprintf("%s:[%d]", ns.Type, ns.Inode)
	// Whatever happens, nothing of ours outlives the helper: every process
	// in this namespace but the helper is ours.
	defer func() {
		rep.Left = append(rep.Left, foreignKillAll(foreignInNetns(ns))...)
	}()

	logFile, err := os.Create(sc.logPath())
	if err != nil {
		return fail("%v", err)
	}
	defer logFile.Close()
	co, err := startForeignCoordinator(ctx, filepath.Join(bin, "rollover"), sc.Dir, sc.StartFlags, sc.Argv[0], logFile)
	if err != nil {
		return fail("%v", err)
	}
	defer co.kill()
	rep.Start = co.started

	url := "http://" + sc.Addr + "/"
	if err := sc.probe(ctx, url, "v1"); err != nil {
		return fail("generation 1 does not answer: %v", err)
	}
	runner, err := load.Start(ctx, load.Options{
		URL: url, Clients: sc.Clients, KeepAlive: sc.KeepAlive,
		Duration: time.Duration(sc.Rollovers+4)*sc.Interval + 30*time.Second,
	})
	if err != nil {
		return fail("%v", err)
	}
	obs := &foreignObserver{versions: map[string]int64{}}
	obsCtx, obsStop := context.WithCancel(ctx)
	var obsWG sync.WaitGroup
	for range 2 {
		obsWG.Go(func() { obs.run(obsCtx, url, sc.VersionHeader, sc.Body) })
	}
	stopLoad := func() {
		rep.Load = runner.Stop()
		obsStop()
		obsWG.Wait()
		obs.mu.Lock()
		rep.Versions, rep.ObserverFailures, rep.ObserverSamples = obs.versions, obs.failures, obs.samples
		obs.mu.Unlock()
	}

	tick := time.NewTicker(sc.Interval)
	defer tick.Stop()
	for i := 1; i <= sc.Rollovers && ctx.Err() == nil; i++ {
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
		v := i % 2 // v2 on odd rollovers, back to v1 on even ones
		took, err := co.next(ctx, sc.Argv[v])
		rep.Took = append(rep.Took, took)
		if err != nil {
			rep.RolloverErrs = append(rep.RolloverErrs, fmt.Sprintf("rollover %d: %v", i, err))
			continue
		}
		rep.Rollovers++
		if err := sc.probe(ctx, url, "v"+strconv.Itoa(v+1)); err != nil {
			rep.ProbeErrs = append(rep.ProbeErrs, fmt.Sprintf("rollover %d: %v", i, err))
		}
		logf("rollover %d to v%d took %v; %s", i, v+1, took.Round(time.Millisecond), runner.Snapshot().String())
	}
	// A little load on the last generation too.
	select {
	case <-ctx.Done():
	case <-tick.C:
	}
	stopLoad()
	if ctx.Err() != nil {
		return fail("interrupted")
	}
	rep.Spread, rep.SpreadErrs = sc.spread(ctx, url)
	if sc.KillInstance {
		rep.Kill = sc.killInstance(ctx, co, url)
	}
	rep.End, err = co.status(ctx)
	if err != nil {
		return fail("status: %v", err)
	}
	rep.PIDs = co.pids()

	// Every old generation, its workers included, drains and exits; only
	// the active generation's process group and the coordinator remain.
	active := 0
	for _, g := range rep.End.Generations {
		if g.State == "active" {
			active = g.PID
		}
	}
	lingering := func(pid int) bool {
		st, err := procStat(pid)
		return pid != co.pid() && (err != nil || st.PGRP != active)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		rep.Lingering = foreignDescribe(foreignMatch(func(pid int) bool { return foreignInNetns(ns)(pid) && lingering(pid) }))
		if len(rep.Lingering) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := co.stop(sctx); err != nil {
		rep.StopErr = err.Error()
	}
	if left := harness.WaitGone(append(co.pids(), co.pid()), 5*time.Second); len(left) > 0 {
		rep.Left = append(rep.Left, fmt.Sprintf("generation or coordinator pids still alive after stop: %v", left))
	}
	deadline = time.Now().Add(5 * time.Second)
	for len(foreignMatch(foreignInNetns(ns))) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	return rep
}

// spread makes sc.Spread requests, each on a new connection, from 8
// clients, and counts the answers by version and the pid that ends their
// body ("v1 pid 1234").
func (sc foreignScenario) spread(ctx context.Context, url string) (map[string]int, int) {
	if sc.Spread == 0 {
		return nil, 0
	}
	var mu sync.Mutex
	tally, errs := map[string]int{}, 0
	next := make(chan struct{}, sc.Spread)
	for range sc.Spread {
		next <- struct{}{}
	}
	close(next)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range next {
				version, body, err := foreignGet(ctx, url, sc.VersionHeader)
				_, pid, ok := strings.Cut(strings.TrimSpace(body), " pid ")
				mu.Lock()
				if err != nil || !ok {
					errs++
				} else {
					tally[version+" pid "+pid]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return tally, errs
}

// probe checks that a new connection reaches version.
func (sc foreignScenario) probe(ctx context.Context, url, version string) error {
	ver, body, err := foreignGet(ctx, url, sc.VersionHeader)
	switch {
	case err != nil:
		return err
	case ver != version:
		return fmt.Errorf("answered by %q (%q), want %s", ver, body, version)
	case !strings.HasPrefix(body, strings.ReplaceAll(sc.Body, "{v}", ver)):
		return fmt.Errorf("body %q does not match header %s: %s", body, sc.VersionHeader, ver)
	}
	return nil
}

// foreignGet fetches url on a new connection, which net/http never retries,
// and returns the version header and the body of a 200 answer.
func foreignGet(ctx context.Context, url, header string) (version, body string, err error) {
	tr := &http.Transport{DisableKeepAlives: true, Proxy: nil}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", "", err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %s", resp.Status)
	}
	return resp.Header.Get(header), string(b), err
}

// foreignObserver counts answers by version and checks each body.
type foreignObserver struct {
	mu       sync.Mutex
	versions map[string]int64
	failures int64
	samples  []string
}

func (o *foreignObserver) run(ctx context.Context, url, header, bodyTmpl string) {
	for ctx.Err() == nil {
		ver, body, err := foreignGet(ctx, url, header)
		if ctx.Err() != nil {
			return // cut short by the end of the run
		}
		if err == nil && !strings.HasPrefix(body, strings.ReplaceAll(bodyTmpl, "{v}", ver)) {
			err = fmt.Errorf("body %q does not match %s: %q", body, header, ver)
		}
		o.mu.Lock()
		if err != nil {
			o.failures++
			if len(o.samples) < 10 {
				o.samples = append(o.samples, err.Error())
			}
		} else {
			o.versions[ver]++
		}
		o.mu.Unlock()
	}
}

// foreignCoordinator is a `rollover start` of an app without the library.
type foreignCoordinator struct {
	rollover, socket string
	cmd              *exec.Cmd
	exited           chan struct{}
	exitErr          error
	started          wire.Status
	dir              string

	mu   sync.Mutex
	seen map[int]bool // generation pids
}

// startForeignCoordinator runs `rollover start FLAGS -- ARGV` with its
// control socket in dir, and waits until generation 1 is active.
func startForeignCoordinator(ctx context.Context, rolloverBin, dir string, flags, argv []string, out io.Writer) (*foreignCoordinator, error) {
	c := &foreignCoordinator{
		rollover: rolloverBin, socket: filepath.Join(dir, "ctl.sock"), dir: dir,
		exited: make(chan struct{}), seen: map[int]bool{},
	}
	args := append([]string{"start", "--socket", c.socket, "--drain-grace", "100ms", "--drain-timeout", "10s", "--bake", "200ms",
		"--ready-timeout", "10s", "--kill-grace", "2s", "--metrics-addr", ""}, flags...)
	args = append(append(args, "--"), argv...)
	c.cmd = exec.Command(rolloverBin, args...)
	c.cmd.Stdout, c.cmd.Stderr = out, out
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { c.exitErr = c.cmd.Wait(); close(c.exited) }()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := c.status(ctx)
		if err == nil && st.Active > 0 {
			c.started = st
			return c, nil
		}
		select {
		case <-c.exited:
			return nil, fmt.Errorf("coordinator exited during start: %v", c.exitErr)
		case <-ctx.Done():
			c.kill()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.kill()
			return nil, fmt.Errorf("no active generation within 15s: %v", err)
		}
	}
}

func (c *foreignCoordinator) pid() int { return c.cmd.Process.Pid }

func (c *foreignCoordinator) pids() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int
	for p := range c.seen {
		out = append(out, p)
	}
	sort.Ints(out)
	return out
}

// cli runs `rollover CMD --socket S ARGS...`.
func (c *foreignCoordinator) cli(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	stdout, stderr, code, err := harness.CLI(ctx, c.rollover, c.socket, args...)
	if err == nil && code != 0 {
		err = fmt.Errorf("exit status %d", code)
	}
	if err != nil {
		err = fmt.Errorf("rollover %s: %v: %s", args[0], err, strings.TrimSpace(stderr))
	}
	return stdout, stderr, err
}

func (c *foreignCoordinator) status(ctx context.Context) (wire.Status, error) {
	st, err := harness.Status(ctx, c.rollover, c.socket)
	if err != nil {
		return st, err
	}
	c.mu.Lock()
	for _, g := range st.Generations {
		if g.PID > 0 {
			c.seen[g.PID] = true
		}
	}
	c.mu.Unlock()
	return st, nil
}

// next runs `rollover next --json -- ARGV` (how it reports ready and
// drains carries over from the active generation) and returns how long it
// took.
func (c *foreignCoordinator) next(ctx context.Context, argv []string) (time.Duration, error) {
	start := time.Now()
	out, _, err := c.cli(ctx, append([]string{"next", "--json", "--"}, argv...)...)
	took := time.Since(start)
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var e wire.Event
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Phase == wire.PhaseStarted && e.PID > 0 {
			c.mu.Lock()
			c.seen[e.PID] = true
			c.mu.Unlock()
		}
	}
	return took, err
}

// stop runs `rollover stop` and waits for the coordinator to exit.
func (c *foreignCoordinator) stop(ctx context.Context) error {
	if _, err := c.status(ctx); err != nil { // record the last pids
		return err
	}
	if _, _, err := c.cli(ctx, "stop"); err != nil {
		return err
	}
	select {
	case <-c.exited:
		return c.exitErr
	case <-ctx.Done():
		return fmt.Errorf("coordinator still running after stop: %w", ctx.Err())
	}
}

// kill ends the coordinator, if it still runs, and every generation seen
// that is still ours (its command line names our directory), with its
// process group.
func (c *foreignCoordinator) kill() {
	select {
	case <-c.exited:
	default:
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
	for _, p := range c.pids() {
		if strings.Contains(foreignCmdline(p), c.dir) {
			_ = syscall.Kill(-p, syscall.SIGKILL)
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	}
}

// foreignCmdline is a process's command line, arguments joined by spaces;
// "" when it is gone.
func foreignCmdline(pid int) string {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return ""
	}
	argv, err := p.CmdLine()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(strings.Join(argv, " "))
}

// foreignMatch lists the live processes, other than this one, for which
// match is true.
func foreignMatch(match func(pid int) bool) []int {
	var out []int
	for _, p := range allProcs() {
		if p.PID != os.Getpid() && match(p.PID) {
			out = append(out, p.PID)
		}
	}
	return out
}

// selfNetns is this process's network namespace.
func selfNetns() (procfs.Namespace, error) {
	p, err := procfs.Self()
	if err != nil {
		return procfs.Namespace{}, err
	}
	nss, err := p.Namespaces()
	if err != nil {
		return procfs.Namespace{}, err
	}
	ns, ok := nss["net"]
	if !ok {
		return procfs.Namespace{}, fmt.Errorf("pid %d has no network namespace in /proc", p.PID)
	}
	return ns, nil
}

// foreignInNetns matches processes in the network namespace ns. Zombies
// have none and never match.
func foreignInNetns(ns procfs.Namespace) func(int) bool {
	return func(pid int) bool {
		p, err := procfs.NewProc(pid)
		if err != nil {
			return false
		}
		nss, err := p.Namespaces()
		return err == nil && nss["net"] == ns
	}
}

// foreignInCmdline matches processes whose command line contains s.
func foreignInCmdline(s string) func(int) bool {
	return func(pid int) bool { return strings.Contains(foreignCmdline(pid), s) }
}

func foreignDescribe(pids []int) []string {
	var out []string
	for _, p := range pids {
		out = append(out, fmt.Sprintf("%d %q", p, foreignCmdline(p)))
	}
	return out
}

// foreignKillAll SIGKILLs the processes match selects (they must be ours),
// waits for them to go, and describes them.
func foreignKillAll(match func(int) bool) []string {
	pids := foreignMatch(match)
	desc := foreignDescribe(pids)
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []int
		for _, p := range pids {
			if running(p) {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			desc = append(desc, fmt.Sprintf("still alive after SIGKILL: %v", left))
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return desc
}

// foreignLeaveNothing fails t at cleanup if a process whose command line
// names dir (the coordinator, nginx masters, the Python app) is still
// running, and kills it.
func foreignLeaveNothing(t *testing.T, dir string) {
	t.Helper()
	t.Cleanup(func() {
		if left := foreignKillAll(foreignInCmdline(dir)); len(left) > 0 {
			t.Errorf("processes left behind (killed): %v", left)
		}
	})
}

// foreignGen returns generation n from a status, or fails t.
func foreignGen(t *testing.T, st wire.Status, n int) wire.GenStatus {
	t.Helper()
	for _, g := range st.Generations {
		if g.Generation == n {
			return g
		}
	}
	t.Fatalf("no generation %d in status %+v", n, st)
	return wire.GenStatus{}
}

// foreignNeed skips t outside CI and fails it in CI, like needTool.
func foreignNeed(t *testing.T, why string) {
	t.Helper()
	if inCI() {
		t.Fatalf("required in CI: %s", why)
	}
	t.Skipf("skipping: %s", why)
}
