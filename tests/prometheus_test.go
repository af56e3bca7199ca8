package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
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

	"github.com/rollover-sh/rollover/tests/harness"
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

	prom := startPrometheus(t, ctx, promtool, prometheus, svc.MetricsAddr)
	prom.waitVector(t, ctx, `up{job="rollover"} == 1`, "the coordinator scraped")
	checkRules(t, ctx, prom)

	// Ten slow requests on generation 1, seen by Prometheus, then a rollover.
	type answer struct {
		code int
		gen  string
		err  error
	}
	answers := make(chan answer, 10)
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, gen, _, err := svc.Get(ctx, "/slow?d=4s")
			answers <- answer{code, gen, err}
		}()
	}
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
	wg.Wait()
	close(answers)
	for a := range answers {
		if a.err != nil || a.code != http.StatusOK || a.gen != "1" {
			t.Errorf("slow request: code %d gen %q err %v; want 200 from gen 1", a.code, a.gen, a.err)
		}
	}

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

	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
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
	}
	for _, p := range drainPanels {
		if !gens[p]["1"] || !gens[p]["2"] {
			t.Errorf("panel %q shows generations %v, want 1 and 2", p, gens[p])
		}
	}
}

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

	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	listen := "127.0.0.1:" + strconv.Itoa(port)
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

// checkRules waits until Prometheus has evaluated every rule once, and
// checks that each evaluated cleanly and tells the reader how bad it is and
// what to fix.
func checkRules(t *testing.T, ctx context.Context, p *promServer) {
	t.Helper()
	want := []string{"RolloverFailed", "DrainTooLong", "NoActiveGeneration", "ForcedDrains", "MigrateReqDisabled"}
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
