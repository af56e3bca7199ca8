package tests

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// instanceCount is how many processes each generation of
// TestNotifyAppInstances runs (--instances).
const instanceCount = 4

// TestNotifyAppInstances rolls the Python app over with --instances 4,
// under a new connection per request, with tcp_migrate_req=0: each
// generation is four processes (ROLLOVER_INSTANCE=0..3), each binding the
// port on its own, under the coordinator's supervisor. It checks:
//   - the rollovers fail no request, and no connection reaches a
//     generation before all four instances said READY=1;
//   - the last generation's instances share 4,000 new connections evenly
//     (25% ± 3 sigma each);
//   - a SIGKILLed instance of the baked generation is restarted alone:
//     keep-alive clients of the other three see no failure, and afterwards
//     new connections spread over the four again.
func TestNotifyAppInstances(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	app, addr := notifyApp(t, dir)
	sc := foreignScenario{
		Name: "instances", Dir: dir, Addr: addr,
		StartFlags: []string{"--ready=notify", "--addr", addr, "--instances", strconv.Itoa(instanceCount)},
		Argv:       [2][]string{app("v1"), app("v2")},
		Rollovers:  6, Interval: 500 * time.Millisecond, Clients: 8, MigrateReq: 0,
		VersionHeader: "X-Notifyapp-Version", Body: "notifyapp {v} pid ",
		Spread: 4000, KillInstance: true,
	}
	rep := runForeignInNetns(t, sc)
	checkInstances(t, sc, rep)
	if log, err := os.ReadFile(sc.logPath()); err != nil {
		t.Error(err)
	} else if n := strings.Count(string(log), "were queued before READY=1"); n > 0 {
		t.Errorf("%d instances had connections queued before their READY=1:\n%s", n, tailLines(string(log), 30))
	}
	if rep.Load.Max >= notifyWarmUp {
		t.Errorf("the slowest request took %v, against a warm-up of %v: a connection waited for an instance to be ready", rep.Load.Max, notifyWarmUp)
	}
	t.Logf("slowest request %v (warm-up %v)", rep.Load.Max, notifyWarmUp)
}

// TestDemoAppInstances is TestNotifyAppInstances for the demo app, which
// links the library: the supervisor speaks the control protocol for its
// four instances (one ready, their counters summed, the drain passed on).
// Its answers name their pid.
func TestDemoAppInstances(t *testing.T) {
	dir := testproc.ShortDir(t)
	foreignLeaveNothing(t, dir)
	addr := testproc.FreeAddr(t)
	demo := func(v string) []string { return []string{filepath.Join(bin, "demoapp"), "-addr", addr, "-version", v} }
	sc := foreignScenario{
		Name: "demo-instances", Dir: dir, Addr: addr,
		StartFlags: []string{"--instances", strconv.Itoa(instanceCount)},
		Argv:       [2][]string{demo("v1"), demo("v2")},
		Rollovers:  4, Interval: 500 * time.Millisecond, Clients: 8, MigrateReq: 0,
		VersionHeader: "X-Demoapp-Version", Body: "demoapp {v} gen ",
		Spread: 4000, KillInstance: true,
	}
	rep := runForeignInNetns(t, sc)
	checkInstances(t, sc, rep)
	// The library's counters, summed over the instances, reach status.
	if n := len(rep.End.Generations); n == 0 || rep.End.Generations[n-1].Stats.Requests == 0 {
		t.Errorf("the last generation reports no requests: %+v", rep.End.Generations)
	}
}

// checkInstances checks what TestNotifyAppInstances and TestDemoAppInstances
// share: the rollovers failed nothing, the spread, gen 1's instances and
// sockets, and the kill of an instance.
func checkInstances(t *testing.T, sc foreignScenario, rep foreignReport) {
	t.Helper()
	rep.check(t, sc, 0)
	checkSpread(t, "after the rollovers", rep.Spread, rep.SpreadErrs, sc.Spread, instanceCount)
	g1 := foreignGen(t, rep.Start, 1)
	if g1.Instances != instanceCount || g1.Serving != instanceCount || !g1.Steerable || g1.Sockets != instanceCount {
		t.Errorf("gen 1: %d/%d instances serving, steerable %v (%s), %d sockets; want %d/%d, steered by the coordinator, %d sockets",
			g1.Serving, g1.Instances, g1.Steerable, g1.SteerError, g1.Sockets, instanceCount, instanceCount, instanceCount)
	}
	if log, err := os.ReadFile(sc.logPath()); err != nil {
		t.Error(err)
	} else {
		// Every hand-over held the old instances' sockets until they left
		// in order, the one after the restart too: the coordinator tracked
		// the restarted instance's socket.
		if strings.Contains(string(log), "could not hold") {
			t.Errorf("a hand-over could not hold the old generation's sockets:\n%s", grepLines(string(log), "could not hold"))
		}
	}
	t.Logf("load: %s; spread %v", rep.Load, rep.Spread)

	k := rep.Kill
	if k == nil {
		t.Fatal("the kill of an instance did not run")
	}
	if k.Error != "" {
		t.Fatalf("kill of an instance: %s", k.Error)
	}
	kept := slices.DeleteFunc(slices.Clone(k.Before), func(p int) bool { return p == k.Killed })
	restarted := slices.DeleteFunc(slices.Clone(k.After), func(p int) bool { return slices.Contains(kept, p) })
	if len(k.Before) != instanceCount || len(kept) != instanceCount-1 || len(k.After) != instanceCount || len(restarted) != 1 || restarted[0] == k.Killed {
		t.Errorf("instances before the kill of %d: %v, after: %v; want the other %d kept and one new", k.Killed, k.Before, k.After, instanceCount-1)
	}
	if k.OthersFailed > 0 || k.OthersServed == 0 {
		t.Errorf("keep-alive clients of the other instances: %d requests failed, %d served (%v); want 0 failed of some", k.OthersFailed, k.OthersServed, k.Samples)
	}
	checkSpread(t, "after the restart", k.Spread, k.SpreadErrs, killSpread, instanceCount)
	if k.NextErr != "" || k.NextLoad.Failures > 0 || k.NextLoad.OK == 0 {
		t.Errorf("the rollover from the generation whose instance was restarted: error %q, load %s; want it done with 0 failed", k.NextErr, k.NextLoad)
	}
	t.Logf("instance %d killed: restarted as %v in %v; keep-alive clients: %d served by the others, 0 failed there, %d failed on the killed one; spread after: %v; then a rollover: %s",
		k.Killed, restarted, k.Took, k.OthersServed, k.KilledFailed, k.Spread, k.NextLoad)
}

// checkSpread fails t unless workers processes answered n new connections
// with none failed, each taking its share within 4 sigma (binomial): at 3
// sigma each check fails by chance 0.27% of the time, and the suite makes
// a dozen of them; at 4, 0.006%. A slot left out is off by 25 sigma.
func checkSpread(t *testing.T, when string, spread map[string]int, errs, n, workers int) {
	t.Helper()
	if len(spread) != workers || errs > 0 {
		t.Errorf("%s, %d new connections were answered by %d processes (%v, %d failed); want %d", when, n, len(spread), spread, errs, workers)
	}
	p := 1.0 / float64(workers)
	sigma := math.Sqrt(float64(n) * p * (1 - p))
	for pid, c := range spread {
		if math.Abs(float64(c)-float64(n)*p) > 4*sigma {
			t.Errorf("%s, %s answered %d of %d new connections; want %.0f ± %.0f", when, pid, c, n, float64(n)*p, 4*sigma)
		}
	}
}

// killSpread is how many new connections count the spread after a restart.
const killSpread = 2000

// instanceKill is what the KillInstance phase of a foreign scenario saw.
type instanceKill struct {
	Error  string `json:"error,omitempty"`
	Killed int    `json:"killed"` // the pid SIGKILLed
	Before []int  `json:"before"` // the active generation's instances before
	After  []int  `json:"after"`  // and once all of them serve again
	// Keep-alive clients: requests that failed on a connection to the
	// killed instance (it was killed) and to the others (none may), and
	// what the others served while it was gone and came back.
	KilledFailed int            `json:"killed_failed"`
	OthersFailed int            `json:"others_failed"`
	OthersServed int64          `json:"others_served"`
	Samples      []string       `json:"samples,omitempty"`
	Took         time.Duration  `json:"took"` // kill to all serving again
	Spread       map[string]int `json:"spread"`
	SpreadErrs   int            `json:"spread_errors"`
	// Then one more rollover under load, from the generation whose
	// instance was restarted.
	NextErr  string      `json:"next_error,omitempty"`
	NextLoad load.Result `json:"next_load"`
}

// killInstance SIGKILLs one instance of the active generation under
// keep-alive clients, waits until its supervisor restarted it and the
// coordinator counts all instances serving, then spreads new connections.
func (sc foreignScenario) killInstance(ctx context.Context, co *foreignCoordinator, url string) *instanceKill {
	k := &instanceKill{}
	st, err := co.status(ctx)
	if err != nil {
		k.Error = err.Error()
		return k
	}
	sup, n := 0, 0
	for _, g := range st.Generations {
		if g.State == "active" {
			sup, n = g.PID, g.Instances
		}
	}
	if sup == 0 || n < 2 {
		k.Error = fmt.Sprintf("no active generation of several instances: %+v", st.Generations)
		return k
	}
	k.Before = childPIDs(sup)
	if len(k.Before) != n {
		k.Error = fmt.Sprintf("the supervisor %d has children %v, want %d", sup, k.Before, n)
		return k
	}
	k.Killed = k.Before[0]

	var mu sync.Mutex
	var answered atomic.Int64
	cctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }() // on every path: no client outlives the phase
	for range 8 {
		wg.Go(func() {
			tr := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, Proxy: nil}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
			last := 0
			for i := 0; i < 20000 && cctx.Err() == nil; i++ {
				pid, err := keepAliveGet(cctx, client, url)
				if cctx.Err() != nil {
					return
				}
				mu.Lock()
				switch {
				case err != nil && last == k.Killed:
					k.KilledFailed++
				case err != nil:
					k.OthersFailed++
					if len(k.Samples) < 5 {
						k.Samples = append(k.Samples, fmt.Sprintf("on pid %d: %v", last, err))
					}
				case pid != k.Killed:
					k.OthersServed++
				}
				mu.Unlock()
				if err == nil {
					// The connection it failed on was last seen on that pid.
					last = pid
					answered.Add(1)
				}
			}
		})
	}
	// The clients are connected and served before the kill.
	for deadline := time.Now().Add(10 * time.Second); answered.Load() < 100; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			k.Error = fmt.Sprintf("the keep-alive clients were answered %d times in 10s", answered.Load())
			return k
		}
	}
	killed := time.Now()
	if err := syscall.Kill(k.Killed, syscall.SIGKILL); err != nil {
		k.Error = fmt.Sprintf("kill %d: %v", k.Killed, err)
		return k
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		k.After = childPIDs(sup)
		st, err := co.status(ctx)
		serving := 0
		for _, g := range st.Generations {
			if g.PID == sup {
				serving = g.Serving
			}
		}
		if err == nil && serving == n && len(k.After) == n && !slices.Contains(k.After, k.Killed) {
			k.Took = time.Since(killed)
			break
		}
		if time.Now().After(deadline) {
			k.Error = fmt.Sprintf("10s after the kill of %d: instances %v, %d serving (status error %v), want %d", k.Killed, k.After, serving, err, n)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the clients go on with the restarted instance back
	stop()
	wg.Wait()
	k.Spread, k.SpreadErrs = foreignScenario{VersionHeader: sc.VersionHeader, Spread: killSpread}.spread(ctx, url)

	runner, err := load.Start(ctx, load.Options{URL: url, Clients: sc.Clients, Duration: 30 * time.Second})
	if err != nil {
		k.Error = err.Error()
		return k
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := co.next(ctx, sc.Argv[1]); err != nil {
		k.NextErr = err.Error()
	}
	time.Sleep(200 * time.Millisecond)
	k.NextLoad = runner.Stop()
	return k
}

// keepAliveGet GETs url on client's kept-alive connection and returns the
// pid that ends the answer's body.
func keepAliveGet(ctx context.Context, client *http.Client, url string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("status %s", resp.Status)
	}
	_, p, _ := strings.Cut(strings.TrimSpace(string(b)), " pid ")
	pid, err := strconv.Atoi(p)
	if err != nil {
		return 0, fmt.Errorf("body %q names no pid", b)
	}
	return pid, nil
}

// childPIDs lists pid's children, from every one of its threads.
func childPIDs(pid int) []int {
	var out []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, s := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(s); err == nil {
				out = append(out, p)
			}
		}
	}
	slices.Sort(out)
	return out
}
