package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// promDir holds the shipped Prometheus configuration and alert rules.
const promDir = "../deploy/prometheus"

// A real Prometheus, run with the shipped scrape configuration and alert
// rules against a real coordinator, watches a drain: generation 1's slow
// requests show in flight, generation 2 becomes active while they finish,
// and generation 1's series end. Every query of the Grafana dashboard and
// every alert rule then evaluates without error against that data, and the
// drain panels show both generations.
func TestPrometheusWatchesDrain(t *testing.T) {
	promtool := needTool(t, "promtool")
	prometheus := needTool(t, "prometheus")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()

	// The shipped files, as an operator would check them.
	runTool(t, nil, promtool, "check", "config", promDir+"/prometheus.yml")
	runTool(t, nil, promtool, "check", "rules", promDir+"/rollover.rules.yml")
	runTool(t, nil, promtool, "test", "rules", promDir+"/rollover.rules.test.yml")
	dash := loadDashboard(t)

	svc := startService(t, harness.Config{Metrics: true})

	// One scrape by hand: the exposition is lint clean.
	body := httpGet(t, ctx, "http://"+svc.MetricsAddr+"/metrics")
	runTool(t, body, promtool, "check", "metrics")
	exp, err := parseExposition(body)
	if err != nil {
		t.Fatal(err)
	}

	prom := startPrometheus(t, ctx, promtool, prometheus, svc.MetricsAddr)
	prom.waitVector(t, ctx, `up{job="rollover"} == 1`, "the coordinator scraped")
	checkRules(t, ctx, prom)
	checkSafetySeries(t, ctx, prom)
	// Every rule, as Prometheus loaded it, asks only for what the
	// coordinator exports.
	for _, rule := range prom.rules(t, ctx) {
		for _, p := range queryProblems(rule.Query, exp) {
			t.Errorf("rule %s: %s", rule.Name, p)
		}
	}

	// Ten slow requests on generation 1, seen by Prometheus, then a rollover.
	slow := slowRequests(t, ctx, svc, 10, "/slow?d=4s", "1")
	slowStart := time.Now()
	prom.waitVector(t, ctx, `rollover_inflight_requests{generation="1"} >= 10`, "generation 1's 10 slow requests in flight")
	t.Logf("Prometheus saw the slow requests %v after they started", time.Since(slowStart).Round(time.Millisecond))
	r, err := svc.Next(ctx, "v2", false)
	if err != nil {
		t.Fatalf("next: %v", err)
	}
	if r.Generation != 2 {
		t.Fatalf("next started generation %d, want 2", r.Generation)
	}
	slow()

	prom.waitVector(t, ctx, `rollover_active_generation == 2`, "generation 2 active")
	prom.waitVector(t, ctx, `max_over_time(rollover_generation_state{generation="1",state="draining"}[5m]) == 1`, "generation 1 seen draining")
	prom.waitVector(t, ctx, `rollover_drain_duration_seconds_count >= 1`, "generation 1's drain observed")

	checkInflightEnded(t, ctx, prom)
	checkDashboardQueries(t, ctx, prom, dash, svc.MetricsAddr, start)

	// Every alert rule, as Prometheus loaded it, evaluates too.
	for _, rule := range prom.rules(t, ctx) {
		if _, err := prom.queryRange(ctx, rule.Query, start, time.Now()); err != nil {
			t.Errorf("rule %s: %s: %v", rule.Name, rule.Query, err)
		}
	}
	// A clean rollover is no alert.
	if firing, err := prom.query(ctx, `ALERTS{alertstate="firing"}`); err != nil || len(firing) > 0 {
		t.Errorf("alerts firing after a clean rollover: %v %v", firing, err)
	}

	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
}

// checkSafetySeries checks that Prometheus has the series of the bake, the
// canary and the loss report from the first scrapes, all at 0: the rollback
// counter with every reason, the canary weight, the counts cut at drain
// deadlines, and generation 1's responses by class and panics.
func checkSafetySeries(t *testing.T, ctx context.Context, prom *promServer) {
	t.Helper()
	for _, c := range []struct {
		expr, label string
		want        []string
	}{
		{`rollover_rollbacks_total`, "reason", []string{"abort", "exited", "health", "health-url"}},
		{`rollover_rollovers_total{result!="ok"}`, "result", []string{"aborted", "failed", "rolled_back"}},
		{`rollover_canary_weight`, "", []string{""}},
		{`rollover_forced_connections_total`, "", []string{""}},
		{`rollover_forced_requests_total`, "", []string{""}},
		{`rollover_forced_drains_total`, "", []string{""}},
		{`rollover_responses_total{generation="1"}`, "code", []string{"1xx", "2xx", "3xx", "4xx", "5xx"}},
		{`rollover_panics_total{generation="1"}`, "", []string{""}},
	} {
		res := prom.waitVector(t, ctx, c.expr, c.expr)
		var got []string
		for _, s := range res {
			got = append(got, s.Metric[c.label])
			if c.label != "code" && s.Value.V != 0 {
				t.Errorf("%s%v = %v, want 0", c.expr, s.Metric, s.Value.V)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %s values %q, want %q", c.expr, c.label, got, c.want)
		}
	}
}

// A drain cut at its deadline, watched by a real Prometheus with the shipped
// rules: generation 1 holds a request longer than --drain-timeout (1s), so
// the rollover cuts it, whether the library cuts it just before the deadline
// or the coordinator kills the generation at it. Prometheus sees the
// connection and the request cut, the dashboard's loss panels and
// annotation count them, and RolloverLoss fires with both counts, while
// ForcedDrains, RolloverFailed and RolloverRolledBack stay quiet.
func TestPrometheusAlertsOnCutDrain(t *testing.T) {
	promtool := needTool(t, "promtool")
	prometheus := needTool(t, "prometheus")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	dash := loadDashboard(t)

	svc := startService(t, harness.Config{Metrics: true, DrainTimeout: time.Second})
	prom := startPrometheus(t, ctx, promtool, prometheus, svc.MetricsAddr)
	// The counters' zeros are stored before the cut, so that increase()
	// sees it.
	for _, c := range []string{"rollover_forced_connections_total", "rollover_forced_requests_total"} {
		prom.waitVector(t, ctx, c+" == 0", c+" at 0")
	}

	cut := unanswered(ctx, svc, "/slow?d=50s")
	prom.waitVector(t, ctx, `rollover_inflight_requests{generation="1"} >= 1`, "generation 1's slow request in flight")
	if _, err := svc.Next(ctx, "v2", false); err != nil {
		t.Fatalf("next: %v", err)
	}
	select {
	case err := <-cut:
		t.Logf("the slow request on generation 1: %v", err)
		if strings.Contains(err.Error(), "answered") {
			t.Errorf("the slow request: %v, want it cut", err)
		}
	case <-ctx.Done():
		t.Fatal("the slow request was never cut")
	}
	prom.waitVector(t, ctx, `rollover_forced_connections_total == 1`, "the cut connection")
	prom.waitVector(t, ctx, `rollover_forced_requests_total == 1`, "the cut request")

	loss := prom.waitAlert(t, ctx, "RolloverLoss")
	t.Logf("RolloverLoss: %s", loss.Annotations["description"])
	if !strings.Contains(loss.Annotations["description"], "cut 1 connection(s) and 1 request(s)") {
		t.Errorf("RolloverLoss's description does not count 1 connection and 1 request: %q", loss.Annotations["description"])
	}
	if loss.Labels["severity"] != "warning" || loss.Labels["instance"] != svc.MetricsAddr {
		t.Errorf("RolloverLoss labels %v", loss.Labels)
	}
	prom.waitRuleState(t, ctx, "ForcedDrains", "inactive")
	prom.checkQuiet(t, ctx, start, "RolloverFailed", "RolloverRolledBack")

	waitPeaks(t, ctx, prom, dash, svc.MetricsAddr, start, []peak{
		{"Cut at drain deadlines in range", "connections", 1},
		{"Cut at drain deadlines in range", "requests", 1},
		{"Cut at drain deadlines per minute", "connections", 1},
		{"Cut at drain deadlines per minute", "requests", 1},
		{"annotation Cut at drain deadlines", "", 1},
	})

	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
}

// Rollbacks watched by a real Prometheus with the shipped rules. A canary at
// 10% shows in rollover_canary_weight and in the dashboard's canary and
// phase panels; `abort` rolls it back, counted under reason abort, and no
// alert fires. Then a new generation that crashes on its first request
// (demoapp -fail=crash) is rolled back automatically during its bake:
// RolloverRolledBack fires with reason exited, and RolloverFailed does not
// (each rollover counts once, under its one result). The bake and the canary are asked for
// over the control socket, as the CLI asks for them.
func TestPrometheusAlertsOnRollback(t *testing.T) {
	promtool := needTool(t, "promtool")
	prometheus := needTool(t, "prometheus")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	dash := loadDashboard(t)

	svc := startService(t, harness.Config{Metrics: true})
	prom := startPrometheus(t, ctx, promtool, prometheus, svc.MetricsAddr)
	prom.waitVector(t, ctx, `rollover_rollbacks_total{reason="exited"} == 0`, "the rollback counters at 0")

	// Generation 2, a canary at 10%, waits for promote or abort.
	canary := make(chan error, 1)
	go func() {
		_, err := control(ctx, svc.Socket, wire.Msg{Type: wire.TypeNext, Argv: svc.AppArgv("v2"), Canary: []int{10}}, nil)
		canary <- err
	}()
	prom.waitVector(t, ctx, `rollover_canary_weight == 10`, "the canary at 10%")
	if _, err := control(ctx, svc.Socket, wire.Msg{Type: wire.TypeAbort}, nil); err != nil {
		t.Fatalf("abort: %v", err)
	}
	if err := <-canary; err == nil || !strings.Contains(err.Error(), "rolled back to gen 1") {
		t.Fatalf("the aborted canary's next: %v, want rolled back to gen 1", err)
	}
	prom.waitVector(t, ctx, `rollover_rollbacks_total{reason="abort"} == 1`, "the abort")
	prom.waitVector(t, ctx, `rollover_canary_weight == 0`, "the canary weight back at 0")

	// Generation 3 bakes, crashes on the first request, and is rolled back.
	baking := make(chan struct{})
	rolled := make(chan error, 1)
	go func() {
		var once sync.Once
		argv := append(svc.AppArgv("v3"), "-fail=crash")
		_, err := control(ctx, svc.Socket, wire.Msg{Type: wire.TypeNext, Argv: argv, Bake: "30s"}, func(e wire.Event) {
			if e.Phase == wire.PhaseBaking {
				once.Do(func() { close(baking) })
			}
		})
		rolled <- err
	}()
	select {
	case <-baking:
	case err := <-rolled:
		t.Fatalf("next with a bake ended before the bake: %v", err)
	case <-ctx.Done():
		t.Fatal("generation 3 never baked")
	}
	code, gen, _, err := svc.Get(ctx, "/")
	t.Logf("a request during generation 3's bake: %d from gen %q, %v", code, gen, err)
	select {
	case err := <-rolled:
		t.Logf("next: %v", err)
		if err == nil || !strings.Contains(err.Error(), "exited") || !strings.Contains(err.Error(), "rolled back to gen 1") {
			t.Fatalf("next: %v, want gen 3 exited, rolled back to gen 1", err)
		}
	case <-ctx.Done():
		t.Fatal("generation 3 was never rolled back")
	}

	back := prom.waitAlert(t, ctx, "RolloverRolledBack")
	t.Logf("RolloverRolledBack: %s: %s", back.Annotations["summary"], back.Annotations["description"])
	if back.Labels["reason"] != "exited" || back.Labels["result"] != "rolled_back" || back.Labels["severity"] != "warning" {
		t.Errorf("RolloverRolledBack labels %v, want reason exited, result rolled_back, severity warning", back.Labels)
	}
	if !strings.HasSuffix(back.Annotations["summary"], "the new generation exited") ||
		!strings.Contains(back.Annotations["description"], "1 rollover(s) on "+svc.MetricsAddr+" were rolled back in the last 10 minutes (reason exited)") {
		t.Errorf("RolloverRolledBack annotations %v", back.Annotations)
	}
	// Each rollover counts once, under its one result: nothing under failed.
	prom.waitVector(t, ctx, `rollover_rollovers_total{result="aborted"} == 1`, "the aborted canary counted as aborted")
	prom.waitVector(t, ctx, `rollover_rollovers_total{result="rolled_back"} == 1`, "the crash in the bake counted as rolled back")
	prom.waitVector(t, ctx, `rollover_rollovers_total{result="failed"} == 0`, "no failed rollover")
	prom.checkQuiet(t, ctx, start, "RolloverFailed", "RolloverLoss")
	if got, err := prom.query(ctx, `ALERTS{alertname="RolloverRolledBack"}`); err != nil || len(got) != 1 {
		t.Errorf("RolloverRolledBack alerts: %v %v, want the one for exited (none for abort)", got, err)
	}

	waitPeaks(t, ctx, prom, dash, svc.MetricsAddr, start, []peak{
		{"Canary weight", "canary weight", 10},
		{"Canary weight now", "", 10},
		{"Rollover phase", "rollover", 3}, // canary
		{"Rollbacks in range", "abort", 1},
		{"Rollbacks in range", "exited", 1},
		{"Rollbacks per minute by reason", "abort", 1},
		{"Rollbacks per minute by reason", "exited", 1},
		{"annotation Rollbacks", "", 1},
	})

	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
}

// control sends one request on the coordinator's control socket, as the CLI
// does, calls onEvent for each event, and returns the result, or its error.
func control(ctx context.Context, socket string, m wire.Msg, onEvent func(wire.Event)) (wire.Msg, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return wire.Msg{}, err
	}
	defer conn.Close()
	defer context.AfterFunc(ctx, func() { conn.Close() })()
	if _, err := conn.Write(wire.Encode(m)); err != nil {
		return wire.Msg{}, err
	}
	r := wire.NewReader(conn)
	for {
		resp, err := r.Read()
		if err != nil {
			return wire.Msg{}, fmt.Errorf("%s: no result: %w", m.Type, err)
		}
		switch {
		case resp.Type == wire.TypeEvent && resp.Event != nil && onEvent != nil:
			onEvent(*resp.Event)
		case resp.Type == wire.TypeResult && !resp.OK:
			return resp, fmt.Errorf("%s (code %d)", resp.Error, resp.Code)
		case resp.Type == wire.TypeResult:
			return resp, nil
		}
	}
}

// checkQuiet evaluates the named rules' expressions, as Prometheus loaded
// them, at every second since start: each must have given no series, so the
// alert never fired (these rules fire at once).
func (p *promServer) checkQuiet(t *testing.T, ctx context.Context, start time.Time, names ...string) {
	t.Helper()
	found := 0
	for _, r := range p.rules(t, ctx) {
		if !slices.Contains(names, r.Name) {
			continue
		}
		found++
		series, err := p.queryRange(ctx, r.Query, start, time.Now())
		if err != nil {
			t.Errorf("rule %s: %v", r.Name, err)
		} else if len(series) > 0 {
			t.Errorf("rule %s would have fired: %s gave %+v", r.Name, r.Query, series)
		}
	}
	if found != len(names) {
		t.Errorf("found %d of the rules %v", found, names)
	}
}

// peak is a value that a series of a dashboard panel must reach.
type peak struct {
	panel, series string // series by its name in the legend
	atLeast       float64
}

// waitPeaks polls until every series in want has reached its value since
// start: the last scrapes take a moment to show in a range query.
func waitPeaks(t *testing.T, ctx context.Context, prom *promServer, dash grafanaDashboard, coordinator string, start time.Time, want []peak) {
	t.Helper()
	var panels []string
	for _, w := range want {
		panels = append(panels, w.panel)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		peaks := dashboardPeaks(t, ctx, prom, dash, coordinator, start, panels...)
		var short []string
		for _, w := range want {
			if got := peaks[w.panel][w.series]; got < w.atLeast {
				short = append(short, fmt.Sprintf("%s: %q peaks at %v, want %v", w.panel, w.series, got, w.atLeast))
			}
		}
		if len(short) == 0 {
			t.Logf("panels at their peak: %v", peaks)
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after 10s:\n%s", strings.Join(short, "\n"))
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// legendLabel matches {{label}} in a legend format.
var legendLabel = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

// dashboardPeaks evaluates the queries of the named panels (and "annotation
// NAME"s) from start to now, with Grafana's variables set for coordinator,
// and returns each series' highest value, by panel and by its name in the
// legend ("" for an annotation or an automatic legend).
func dashboardPeaks(t *testing.T, ctx context.Context, prom *promServer, dash grafanaDashboard, coordinator string, start time.Time, panels ...string) map[string]map[string]float64 {
	t.Helper()
	vars := map[string]string{"__rate_interval": "4s", "__interval": "1s", "__range": "5m", "instance": coordinator}
	peaks := map[string]map[string]float64{}
	for _, q := range dash.queries() {
		if !slices.Contains(panels, q.Panel) {
			continue
		}
		expr, err := expandGrafanaVars(q.Expr, vars)
		if err != nil {
			t.Fatal(err)
		}
		series, err := prom.queryRange(ctx, expr, start, time.Now())
		if err != nil {
			t.Fatalf("%s: %s: %v", q.Panel, expr, err)
		}
		if peaks[q.Panel] == nil {
			peaks[q.Panel] = map[string]float64{}
		}
		for _, s := range series {
			name := q.Legend
			if name == "__auto" {
				name = ""
			}
			name = legendLabel.ReplaceAllStringFunc(name, func(m string) string { return s.Metric[legendLabel.FindStringSubmatch(m)[1]] })
			for _, v := range s.Values {
				if old, ok := peaks[q.Panel][name]; !ok || v.V > old {
					peaks[q.Panel][name] = v.V
				}
			}
		}
	}
	for _, p := range panels {
		if peaks[p] == nil {
			t.Errorf("no panel or annotation %q", p)
		}
	}
	return peaks
}

// checkInflightEnded waits until generation 1's in-flight series, which
// peaked at 10 or more, reads 0 or has ended: the coordinator reports only
// live generations, so the series ends when generation 1 exits.
func checkInflightEnded(t *testing.T, ctx context.Context, prom *promServer) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		now := time.Now()
		series, err := prom.queryRange(ctx, `rollover_inflight_requests{generation="1"}`, now.Add(-time.Minute), now)
		if err != nil {
			t.Fatal(err)
		}
		if len(series) != 1 || len(series[0].Values) == 0 {
			t.Fatalf("generation 1's in-flight requests over the last minute: %d series, want 1: %+v", len(series), series)
		}
		peak := math.Inf(-1)
		for _, p := range series[0].Values {
			peak = math.Max(peak, p.V)
		}
		last := series[0].Values[len(series[0].Values)-1]
		if peak < 10 {
			t.Fatalf("generation 1's in-flight requests peaked at %v, want >= 10: %v", peak, series[0].Values)
		}
		ended := last.time().Before(now.Add(-5 * time.Second))
		if last.V == 0 || ended {
			t.Logf("generation 1 in flight: peak %v, last %v at %s (series ended: %v)", peak, last.V, last.time().Format(time.TimeOnly), ended)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation 1's in-flight requests still %v at %s", last.V, last.time().Format(time.TimeOnly))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// checkDashboardQueries evaluates every query of the dashboard from start to
// now, with Grafana's variables set as Grafana would set them for a 1s
// scrape interval and the given coordinator: each must evaluate, the
// "Rollovers" annotation must mark the rollover, and the drain panels must
// show generations 1 and 2.
func checkDashboardQueries(t *testing.T, ctx context.Context, prom *promServer, dash grafanaDashboard, coordinator string, start time.Time) {
	t.Helper()
	end := time.Now()

	// The dashboard's variables offer this coordinator.
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			t.Errorf("variable %q: definition %q is not label_values(METRIC, LABEL)", v.Name, v.Definition)
			continue
		}
		res, err := prom.query(ctx, m[1])
		if err != nil {
			t.Fatalf("variable %q: %v", v.Name, err)
		}
		var values []string
		for _, s := range res {
			values = append(values, s.Metric[m[2]])
		}
		if v.Name == "instance" && !slices.Contains(values, coordinator) {
			t.Errorf("variable %q offers %v, want %s among them", v.Name, values, coordinator)
		}
	}

	vars := map[string]string{
		"__rate_interval": "4s", // 4 × the 1s scrape interval
		"__interval":      "1s",
		"__range":         "5m",
		"instance":        coordinator,
	}
	gens := map[string]map[string]bool{}
	phases := map[float64]bool{}
	for _, q := range dash.queries() {
		expr, err := expandGrafanaVars(q.Expr, vars)
		if err != nil {
			t.Errorf("%s: %v", q.Panel, err)
			continue
		}
		series, err := prom.queryRange(ctx, expr, start, end)
		if err != nil {
			t.Errorf("%s: %s: %v", q.Panel, expr, err)
			continue
		}
		for _, s := range series {
			if gens[q.Panel] == nil {
				gens[q.Panel] = map[string]bool{}
			}
			gens[q.Panel][s.Metric["generation"]] = true
		}
		if q.Panel == "annotation Rollovers" && len(series) == 0 {
			t.Errorf("%s: %s marks no rollover, want the one to generation 2", q.Panel, expr)
		}
		for _, s := range series {
			for _, p := range s.Values {
				switch q.Panel {
				case "Rollover phase":
					phases[p.V] = true
				case "Canary weight", "Canary weight now":
					if p.V != 0 {
						t.Errorf("%s: %v at %s without a canary", q.Panel, p.V, p.time().Format(time.TimeOnly))
					}
				}
			}
		}
	}
	for _, p := range append(drainPanels, generationLossPanels...) {
		if !gens[p]["1"] || !gens[p]["2"] {
			t.Errorf("panel %q shows generations %v, want 1 and 2", p, gens[p])
		}
	}
	// Steady (0), then generation 1 draining beside the active 2 (2).
	if !phases[0] || !phases[2] || phases[3] {
		t.Errorf("panel \"Rollover phase\" shows %v, want 0 (steady) and 2 (bake or drain), and no 3 (canary)", phases)
	}
}

// generationLossPanels show, per generation, what the health rule of the
// bake judges.
var generationLossPanels = []string{"5xx and panics/s per generation"}

// runTool runs a tool with stdin and fails the test, with its output, unless
// it exits 0.
func runTool(t *testing.T, stdin []byte, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
}

func httpGet(t *testing.T, ctx context.Context, u string) []byte {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v\n%s", u, resp.Status, err, b)
	}
	return b
}

// labelValues matches a Prometheus variable query: label_values(METRIC, LABEL).
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// grafanaVar matches $name and ${name}.
var grafanaVar = regexp.MustCompile(`\$(?:\{(\w+)\}|(\w+))`)

// expandGrafanaVars replaces Grafana's variables in expr; a variable it does
// not know is an error, since Prometheus would reject the query.
func expandGrafanaVars(expr string, vars map[string]string) (string, error) {
	var unknown []string
	out := grafanaVar.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVar.FindStringSubmatch(m)
		name := sub[1] + sub[2]
		v, ok := vars[name]
		if !ok {
			unknown = append(unknown, m)
			return m
		}
		return v
	})
	if len(unknown) > 0 {
		return "", fmt.Errorf("unknown variables %v in %s", unknown, expr)
	}
	return out, nil
}

// promServer is a Prometheus started by the test, and its HTTP API.
type promServer struct {
	base string
}

// startPrometheus runs Prometheus with the shipped prometheus.yml and rules,
// changed only to scrape addr and to scrape and evaluate every second, and
// waits until it is ready. Cleanup stops it by pid: SIGTERM, then SIGKILL
// after 10s.
func startPrometheus(t *testing.T, ctx context.Context, promtool, prometheus, addr string) *promServer {
	t.Helper()
	dir := t.TempDir()
	cfg, err := os.ReadFile(promDir + "/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ re, repl string }{
		{`127\.0\.0\.1:9754`, addr},
		{`(?m)^(\s*(?:scrape_interval|evaluation_interval|scrape_timeout):)\s*\S+`, "${1} 1s"},
	} {
		re := regexp.MustCompile(r.re)
		if !re.Match(cfg) {
			t.Fatalf("%s/prometheus.yml has no %s to replace", promDir, r.re)
		}
		cfg = re.ReplaceAll(cfg, []byte(r.repl))
	}
	rules, err := os.ReadFile(promDir + "/rollover.rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "prometheus.yml")
	for name, b := range map[string][]byte{"prometheus.yml": cfg, "rollover.rules.yml": rules} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	runTool(t, nil, promtool, "check", "config", cfgPath)

	listen := testproc.FreeAddr(t)
	out := &syncBuffer{}
	cmd := exec.Command(prometheus, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+listen)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("prometheus (pid %d) ignored SIGTERM for 10s; killing it", cmd.Process.Pid)
			_ = cmd.Process.Kill()
			<-exited
		}
		checkOutput(t, "prometheus", out.String())
		if t.Failed() {
			t.Logf("prometheus log:\n%s", tailLines(out.String(), 40))
		}
	})

	p := &promServer{base: "http://" + listen}
	deadline := time.Now().Add(30 * time.Second)
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.base+"/-/ready", nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-exited:
			t.Fatalf("prometheus exited during start:\n%s", out.String())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready after 30s: %v\n%s", err, out.String())
		}
	}
}

// promPoint is one sample: a [unix seconds, "value"] pair in the API.
type promPoint struct {
	T float64
	V float64
}

func (p *promPoint) UnmarshalJSON(b []byte) error {
	var pair [2]json.RawMessage
	if err := json.Unmarshal(b, &pair); err != nil {
		return err
	}
	var v string
	if err := json.Unmarshal(pair[0], &p.T); err != nil {
		return err
	}
	if err := json.Unmarshal(pair[1], &v); err != nil {
		return err
	}
	var err error
	p.V, err = strconv.ParseFloat(v, 64) // also "NaN" and "+Inf"
	return err
}

func (p promPoint) time() time.Time { return time.UnixMilli(int64(p.T * 1000)) }

type promSeries struct {
	Metric map[string]string `json:"metric"`
	Value  promPoint         `json:"value"`  // instant queries
	Values []promPoint       `json:"values"` // range queries
}

// api calls the HTTP API and decodes its data, or returns the error
// Prometheus gave.
func (p *promServer) api(ctx context.Context, path string, form url.Values, data any) error {
	// Queries go as a form: dashboard expressions can be long.
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+path, nil)
	if form != nil {
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, p.base+path, strings.NewReader(form.Encode()))
	}
	if err != nil {
		return err
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	var env struct {
		Status    string          `json:"status"`
		ErrorType string          `json:"errorType"`
		Error     string          `json:"error"`
		Data      json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return fmt.Errorf("%s: %s: %w: %.200s", path, resp.Status, err, b)
	}
	if env.Status != "success" {
		return fmt.Errorf("%s: %s: %s", path, env.ErrorType, env.Error)
	}
	return json.Unmarshal(env.Data, data)
}

// query evaluates expr now; expr must give an instant vector.
func (p *promServer) query(ctx context.Context, expr string) ([]promSeries, error) {
	var data struct {
		ResultType string       `json:"resultType"`
		Result     []promSeries `json:"result"`
	}
	err := p.api(ctx, "/api/v1/query", url.Values{"query": {expr}}, &data)
	if err == nil && data.ResultType != "vector" {
		err = fmt.Errorf("%s gives a %s, want a vector", expr, data.ResultType)
	}
	return data.Result, err
}

// queryRange evaluates expr from start to end, every second.
func (p *promServer) queryRange(ctx context.Context, expr string, start, end time.Time) ([]promSeries, error) {
	var data struct {
		Result []promSeries `json:"result"`
	}
	err := p.api(ctx, "/api/v1/query_range", url.Values{
		"query": {expr},
		"start": {strconv.FormatFloat(float64(start.UnixMilli())/1000, 'f', 3, 64)},
		"end":   {strconv.FormatFloat(float64(end.UnixMilli())/1000, 'f', 3, 64)},
		"step":  {"1"},
	}, &data)
	return data.Result, err
}

// waitVector polls expr until it gives at least one series.
func (p *promServer) waitVector(t *testing.T, ctx context.Context, expr, what string) []promSeries {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err := p.query(ctx, expr)
		if err != nil {
			t.Fatal(err)
		}
		if len(res) > 0 {
			return res
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus never saw %s: %s is empty after 20s", what, expr)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// promRule is an alerting rule as /api/v1/rules reports it.
type promRule struct {
	Name        string            `json:"name"`
	Query       string            `json:"query"`
	Type        string            `json:"type"`
	State       string            `json:"state"` // alerting rules: inactive, pending or firing
	Health      string            `json:"health"`
	LastError   string            `json:"lastError"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

// rules lists every rule Prometheus loaded.
func (p *promServer) rules(t *testing.T, ctx context.Context) []promRule {
	t.Helper()
	var data struct {
		Groups []struct {
			Rules []promRule `json:"rules"`
		} `json:"groups"`
	}
	if err := p.api(ctx, "/api/v1/rules", nil, &data); err != nil {
		t.Fatal(err)
	}
	var out []promRule
	for _, g := range data.Groups {
		out = append(out, g.Rules...)
	}
	return out
}

// promAlert is an alert as /api/v1/alerts reports it.
type promAlert struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	State       string            `json:"state"`
}

// waitAlert polls until the alert name fires, and returns it.
func (p *promServer) waitAlert(t *testing.T, ctx context.Context, name string) promAlert {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var data struct {
			Alerts []promAlert `json:"alerts"`
		}
		if err := p.api(ctx, "/api/v1/alerts", nil, &data); err != nil {
			t.Fatal(err)
		}
		for _, a := range data.Alerts {
			if a.Labels["alertname"] == name && a.State == "firing" {
				return a
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("alert %s not firing after 20s: %+v", name, data.Alerts)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitRuleState polls until the alerting rule name is in state.
func (p *promServer) waitRuleState(t *testing.T, ctx context.Context, name, state string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got []string
		for _, r := range p.rules(t, ctx) {
			if r.Name == name {
				got = append(got, r.State)
			}
		}
		if len(got) == 1 && got[0] == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("rule %s: state %q after 10s, want %s", name, got, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkRules waits until Prometheus has evaluated every rule once, and
// checks that each evaluated cleanly and tells the reader how bad it is and
// what to fix.
func checkRules(t *testing.T, ctx context.Context, p *promServer) {
	t.Helper()
	want := []string{"RolloverFailed", "DrainTooLong", "NoActiveGeneration", "ForcedDrains", "MigrateReqDisabled", "RolloverRolledBack", "RolloverLoss"}
	deadline := time.Now().Add(20 * time.Second)
	for {
		rules := p.rules(t, ctx)
		pending := 0
		for _, r := range rules {
			if r.Health == "unknown" {
				pending++
			}
		}
		if pending == 0 || time.Now().After(deadline) {
			names := map[string]bool{}
			for _, r := range rules {
				names[r.Name] = true
				if r.Health != "ok" {
					t.Errorf("rule %s: health %q: %s", r.Name, r.Health, r.LastError)
				}
				if r.Type != "alerting" {
					continue
				}
				switch r.Labels["severity"] {
				case "critical", "warning", "info":
				default:
					t.Errorf("alert %s: severity %q, want critical, warning or info", r.Name, r.Labels["severity"])
				}
				if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
					t.Errorf("alert %s: needs a summary and a description", r.Name)
				}
			}
			for _, n := range want {
				if !names[n] {
					t.Errorf("no alert %s among the loaded rules", n)
				}
			}
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}
