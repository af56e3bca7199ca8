package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/rollover-sh/rollover/tests/harness"
)

// dashboardPath is the Grafana dashboard users import or provision.
const dashboardPath = "../deploy/grafana/rollover.json"

// dsVar is how every query names its data source: through the dashboard's
// "datasource" variable, so the dashboard works with whatever Prometheus the
// user picks instead of a uid that exists only on our machines.
const dsVar = "${datasource}"

// grafanaDashboard is the part of Grafana's classic dashboard JSON model the
// checks look at.
type grafanaDashboard struct {
	UID           string         `json:"uid"`
	Title         string         `json:"title"`
	Editable      *bool          `json:"editable"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
	Templating    struct {
		List []grafanaVariable `json:"list"`
	} `json:"templating"`
	Annotations struct {
		List []grafanaAnnotation `json:"list"`
	} `json:"annotations"`
}

type grafanaRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaGridPos struct {
	X, Y, W, H int
}

type grafanaPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Collapsed  bool            `json:"collapsed"`
	Datasource *grafanaRef     `json:"datasource"`
	GridPos    *grafanaGridPos `json:"gridPos"`
	Targets    []grafanaTarget `json:"targets"`
	Panels     []grafanaPanel  `json:"panels"` // a collapsed row's panels
}

type grafanaTarget struct {
	RefID        string      `json:"refId"`
	Expr         string      `json:"expr"`
	LegendFormat string      `json:"legendFormat"`
	Datasource   *grafanaRef `json:"datasource"`
}

type grafanaVariable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"` // a string, or an object for query variables
	Definition string          `json:"definition"`
	Datasource *grafanaRef     `json:"datasource"`
}

type grafanaAnnotation struct {
	Name       string      `json:"name"`
	BuiltIn    int         `json:"builtIn"`
	Datasource *grafanaRef `json:"datasource"`
	Expr       string      `json:"expr"`
}

// drainPanels are the panels that show a drain: during and after a rollover
// they have a series for the old generation and one for the new.
var drainPanels = []string{"In-flight requests per generation", "Open connections per generation", "Generation states"}

// safePanels show the bake, the canary, rollbacks and the loss report.
var safePanels = []string{
	"Canary weight now", "Rollbacks in range", "Cut at drain deadlines in range", "5xx and panics in range",
	"Rollover phase", "Canary weight", "Rollbacks per minute by reason",
	"Cut at drain deadlines per minute", "5xx and panics/s per generation", "5xx-or-panic share per generation",
}

// eventAnnotations mark events on every time series panel.
var eventAnnotations = []string{"Rollovers", "Failed rollovers", "Forced drains", "Cut at drain deadlines", "Rollbacks"}

// dashboardQuery is one PromQL expression of the dashboard and where it is.
type dashboardQuery struct {
	Panel  string // panel title, or "annotation NAME"
	Legend string // the target's legendFormat ("" for annotations)
	Expr   string
}

// loadDashboard reads the shipped dashboard and fails the test on any
// problem dashboardProblems finds.
func loadDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	if probs := dashboardProblems(raw); len(probs) > 0 {
		t.Fatalf("%s:\n  %s", dashboardPath, strings.Join(probs, "\n  "))
	}
	var d grafanaDashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	return d
}

// dashboardProblems lists what is wrong with a dashboard's JSON: everything
// that would make a panel query the wrong data source, or no data at all,
// once provisioned.
func dashboardProblems(raw []byte) []string {
	var d grafanaDashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		return []string{"parse: " + err.Error()}
	}
	var probs []string
	bad := func(format string, args ...any) { probs = append(probs, fmt.Sprintf(format, args...)) }

	if d.UID != "rollover-drain" {
		bad("uid is %q, want the fixed rollover-drain (links and provisioning rely on it)", d.UID)
	}
	if d.Title != "rollover" {
		bad("title is %q, want rollover", d.Title)
	}
	if d.Editable == nil || *d.Editable {
		bad(`"editable" must be false: the file is the source of truth`)
	}
	if d.SchemaVersion < 36 {
		bad("schemaVersion %d predates data source references as objects (36)", d.SchemaVersion)
	}

	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		if vars[v.Name] {
			bad("variable %q defined twice", v.Name)
		}
		vars[v.Name] = true
		if v.Name == "datasource" {
			var q string
			if v.Type != "datasource" || json.Unmarshal(v.Query, &q) != nil || q != "prometheus" {
				bad(`variable "datasource" must have type "datasource" and query "prometheus", has type %q query %s`, v.Type, v.Query)
			}
			continue
		}
		if v.Type == "query" && !usesDSVar(v.Datasource) {
			bad("variable %q: datasource %s does not use %s", v.Name, refString(v.Datasource), dsVar)
		}
	}
	if !vars["datasource"] {
		bad(`no "datasource" variable`)
	}

	ids := map[int]string{}
	var check func(ps []grafanaPanel, where string)
	check = func(ps []grafanaPanel, where string) {
		var boxes []grafanaPanel
		for _, p := range ps {
			name := fmt.Sprintf("%spanel %d %q", where, p.ID, p.Title)
			if p.ID <= 0 {
				bad("%s: id must be a positive number", name)
			} else if prev, dup := ids[p.ID]; dup {
				bad("%s: id %d already used by %s", name, p.ID, prev)
			} else {
				ids[p.ID] = name
			}
			switch g := p.GridPos; {
			case g == nil:
				bad("%s: no gridPos", name)
			case g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24:
				bad("%s: gridPos %+v is outside the 24-column grid", name, *g)
			default:
				for _, o := range boxes {
					if overlap(*g, *o.GridPos) {
						bad("%s: gridPos %+v overlaps panel %d %q at %+v", name, *g, o.ID, o.Title, *o.GridPos)
					}
				}
				boxes = append(boxes, p)
			}
			if p.Type == "row" {
				if len(p.Panels) > 0 && !p.Collapsed {
					bad("%s: an expanded row keeps its panels at the top level, not nested", name)
				}
				if len(p.Targets) > 0 {
					bad("%s: a row has no queries", name)
				}
				// A collapsed row's panels are laid out as if it were
				// expanded, so they are checked among themselves.
				check(p.Panels, fmt.Sprintf("row %q: ", p.Title))
				continue
			}
			if len(p.Panels) > 0 {
				bad("%s: only rows nest panels", name)
			}
			if !usesDSVar(p.Datasource) {
				bad("%s: datasource %s does not use %s", name, refString(p.Datasource), dsVar)
			}
			if len(p.Targets) == 0 {
				bad("%s: no targets", name)
			}
			refs := map[string]bool{}
			for i, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					bad("%s: target %d (%q) has no expr", name, i, tg.RefID)
				}
				if !usesDSVar(tg.Datasource) {
					bad("%s: target %d (%q): datasource %s does not use %s", name, i, tg.RefID, refString(tg.Datasource), dsVar)
				}
				if tg.RefID == "" || refs[tg.RefID] {
					bad("%s: target %d: refId %q is empty or repeated", name, i, tg.RefID)
				}
				refs[tg.RefID] = true
			}
		}
	}
	check(d.Panels, "")
	if len(ids) == 0 {
		bad("no panels")
	}

	for _, a := range d.Annotations.List {
		if a.BuiltIn != 0 {
			continue
		}
		if !usesDSVar(a.Datasource) {
			bad("annotation %q: datasource %s does not use %s", a.Name, refString(a.Datasource), dsVar)
		}
		if strings.TrimSpace(a.Expr) == "" {
			bad("annotation %q has no expr", a.Name)
		}
	}
	return probs
}

func usesDSVar(r *grafanaRef) bool {
	return r != nil && r.Type == "prometheus" && r.UID == dsVar
}

func refString(r *grafanaRef) string {
	if r == nil {
		return "(none)"
	}
	return fmt.Sprintf("{type %q uid %q}", r.Type, r.UID)
}

func overlap(a, b grafanaGridPos) bool {
	return a.X < b.X+b.W && b.X < a.X+a.W && a.Y < b.Y+b.H && b.Y < a.Y+a.H
}

// queries lists every PromQL expression of the dashboard: every target of
// every panel, nested ones included, and every annotation query.
func (d grafanaDashboard) queries() []dashboardQuery {
	var out []dashboardQuery
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				out = append(out, dashboardQuery{Panel: p.Title, Legend: tg.LegendFormat, Expr: tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, a := range d.Annotations.List {
		if a.BuiltIn == 0 {
			out = append(out, dashboardQuery{Panel: "annotation " + a.Name, Expr: a.Expr})
		}
	}
	return out
}

// The shipped dashboard passes every check, and has the panels that show a
// drain, the bake, the canary, rollbacks and the loss report, and the
// annotations that mark events.
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	titles := map[string]int{}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			if p.Type != "row" {
				titles[p.Title]++
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, want := range slices.Concat(drainPanels, safePanels) {
		if titles[want] == 0 {
			t.Errorf("no panel titled %q", want)
		}
	}
	for title, n := range titles {
		if n > 1 {
			t.Errorf("%d panels titled %q", n, title)
		}
	}
	var names []string
	for _, a := range d.Annotations.List {
		names = append(names, a.Name)
	}
	for _, want := range eventAnnotations {
		if !slices.Contains(names, want) {
			t.Errorf("no annotation %q (have %q)", want, names)
		}
	}
	if n := len(d.queries()); n < 30 {
		t.Errorf("only %d queries", n)
	}
}

// Every query of the dashboard, and its variables, refer only to metrics a
// real coordinator exports, and ask only for label values it exports: a
// misspelt name or value would leave a panel empty rather than fail. The
// names come from the exposition itself, so a metric renamed in metrics/
// fails here until the dashboard follows.
func TestDashboardMetricsExported(t *testing.T) {
	d := loadDashboard(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	svc := startService(t, harness.Config{Metrics: true})
	// An answered request, so that every family of the generation has a
	// sample.
	if code, _, _, err := svc.Get(ctx, "/"); err != nil || code != http.StatusOK {
		t.Fatalf("GET /: %d %v", code, err)
	}
	exp, err := parseExposition(httpGet(t, ctx, "http://"+svc.MetricsAddr+"/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	for _, p := range dashboardMetricProblems(d, exp) {
		t.Error(p)
	}

	// The check can fail: each mistake, made in a copy, is caught.
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct{ name, old, new, want string }{
		{"misspelt metric", `max(rollover_canary_weight{`, `max(rollover_canary_weights{`, "rollover_canary_weights"},
		{"misspelt label value", `code=\"5xx\"`, `code=\"5XX\"`, `code="5XX"`},
		{"regexp that matches no value", `state=~\"starting|ready\"`, `state=~\"begin|idle\"`, `state=~"begin|idle"`},
		{"misspelt variable metric", `label_values(rollover_build_info, instance)`, `label_values(rollover_buildinfo, instance)`, "rollover_buildinfo"},
		{"metric in an annotation", `increase(rollover_rollbacks_total{`, `increase(rollover_rollback_total{`, "rollover_rollback_total"},
	} {
		t.Run(strings.ReplaceAll(m.name, " ", "_"), func(t *testing.T) {
			if !bytes.Contains(raw, []byte(m.old)) {
				t.Fatalf("the dashboard has no %s to break", m.old)
			}
			var broken grafanaDashboard
			if err := json.Unmarshal(bytes.Replace(raw, []byte(m.old), []byte(m.new), 1), &broken); err != nil {
				t.Fatal(err)
			}
			probs := dashboardMetricProblems(broken, exp)
			if !strings.Contains(strings.Join(probs, "\n"), m.want) {
				t.Errorf("want a problem mentioning %s, got %q", m.want, probs)
			}
		})
	}
}

// exposition is what one scrape of a coordinator gave: for every sample name
// (histograms as _bucket, _sum and _count), the values each label took.
type exposition map[string]map[string]map[string]bool

func parseExposition(body []byte) (exposition, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("parse the exposition: %w", err)
	}
	exp := exposition{}
	add := func(name string, labels map[string]string) {
		if exp[name] == nil {
			exp[name] = map[string]map[string]bool{}
		}
		for k, v := range labels {
			if exp[name][k] == nil {
				exp[name][k] = map[string]bool{}
			}
			exp[name][k][v] = true
		}
	}
	for name, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			switch mf.GetType().String() {
			case "HISTOGRAM":
				add(name+"_sum", labels)
				add(name+"_count", labels)
				add(name+"_bucket", labels) // le is a grouping label, not matched
			case "SUMMARY":
				add(name+"_sum", labels)
				add(name+"_count", labels)
				add(name, labels)
			default:
				add(name, labels)
			}
		}
	}
	return exp, nil
}

// scrapeMade are the series Prometheus makes for every target; targetLabels
// are the labels it adds to every series.
var (
	scrapeMade   = []string{"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling", "scrape_series_added"}
	targetLabels = []string{"job", "instance"}
)

// dashboardMetricProblems lists the dashboard's references to metrics and
// label values that exp does not have.
func dashboardMetricProblems(d grafanaDashboard, exp exposition) []string {
	var probs []string
	for _, q := range d.queries() {
		for _, p := range queryProblems(q.Expr, exp) {
			probs = append(probs, fmt.Sprintf("%s: %s", q.Panel, p))
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			probs = append(probs, fmt.Sprintf("variable %q: definition %q is not label_values(METRIC, LABEL)", v.Name, v.Definition))
			continue
		}
		for _, p := range queryProblems(m[1], exp) {
			probs = append(probs, fmt.Sprintf("variable %q: %s", v.Name, p))
		}
	}
	return probs
}

// queryProblems lists what expr asks for that exp does not have: a metric
// name, or a label value that a matcher (=, != or =~) requires.
func queryProblems(expr string, exp exposition) []string {
	var probs []string
	for _, name := range promMetricNames(expr) {
		if _, ok := exp[name]; !ok && !slices.Contains(scrapeMade, name) {
			probs = append(probs, fmt.Sprintf("%s is not exported (in %s)", name, expr))
		}
	}
	for _, sel := range promSelector.FindAllStringSubmatch(expr, -1) {
		labels, ok := exp[sel[1]]
		if !ok {
			continue // reported above, or made by Prometheus
		}
		for _, m := range promMatcher.FindAllStringSubmatch(sel[2], -1) {
			label, op, value := m[1], m[2], m[3]
			if slices.Contains(targetLabels, label) || strings.Contains(value, "$") || value == "" || op == "!~" {
				continue
			}
			match := func(v string) bool { return v == value }
			if op == "=~" {
				re, err := regexp.Compile("^(?:" + value + ")$")
				if err != nil {
					probs = append(probs, fmt.Sprintf("%s%s%q: %v", label, op, value, err))
					continue
				}
				match = re.MatchString
			}
			var have []string
			found := false
			for v := range labels[label] {
				have = append(have, v)
				found = found || match(v)
			}
			if !found {
				sort.Strings(have)
				probs = append(probs, fmt.Sprintf("%s{%s%s%q}: %s has no such value (exported: %q)", sel[1], label, op, value, label, have))
			}
		}
	}
	return probs
}

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promBraces   = regexp.MustCompile(`\{[^}]*\}`)
	promBrackets = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	// A number or duration, or a name (a function's when a parenthesis
	// follows).
	promToken    = regexp.MustCompile(`[0-9][0-9.]*(?:[eE][-+]?[0-9]+)?[a-z]*|([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?`)
	promSelector = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}`)
	promMatcher  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"`)
	promKeywords = []string{"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}
)

// promMetricNames lists the metric names a PromQL expression selects, with
// Grafana's variables in it or not: what is left once strings, label
// matchers, ranges, grouping labels, functions and keywords are taken out.
func promMetricNames(expr string) []string {
	s := promString.ReplaceAllString(expr, `""`)
	s = grafanaVar.ReplaceAllString(s, "")
	s = promBraces.ReplaceAllString(s, " ")
	s = promBrackets.ReplaceAllString(s, " ")
	s = promGrouping.ReplaceAllString(s, " ")
	var names []string
	for _, m := range promToken.FindAllStringSubmatch(s, -1) {
		name, call := m[1], m[2] != ""
		if name == "" || call || slices.Contains(promKeywords, name) || slices.Contains(names, name) {
			continue
		}
		names = append(names, name)
	}
	return names
}

func TestPromMetricNames(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
	}{
		{`up{job="rollover"} == 0 or absent(rollover_active_generation)`, []string{"up", "rollover_active_generation"}},
		{`histogram_quantile(0.95, sum by (generation, le) (rate(rollover_request_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))`, []string{"rollover_request_duration_seconds_bucket"}},
		{`max(label_replace(3 * (max(a_total) > bool 0), "phase", "canary", "", "") or b offset $__range) - ignoring(x) group_left () c / 1e3`, []string{"a_total", "b", "c"}},
		{`sum(max_over_time(x[5m]) - ((x offset 5m) + 0 or max_over_time(x[5m]) * 0))`, []string{"x"}},
		{`count(rollover_generation_info{command="rate(x)"}) unless on (instance) y`, []string{"rollover_generation_info", "y"}},
	} {
		if got := promMetricNames(tc.expr); !slices.Equal(got, tc.want) {
			t.Errorf("promMetricNames(%s) = %q, want %q", tc.expr, got, tc.want)
		}
	}
}

// Each kind of mistake, made in a copy of the shipped dashboard, is caught:
// the checks above can fail.
func TestDashboardCheckCatchesMistakes(t *testing.T) {
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	// Indices of a panel with targets, and of a collapsed row with panels.
	var orig map[string]any
	if err := json.Unmarshal(raw, &orig); err != nil {
		t.Fatal(err)
	}
	first, row := -1, -1
	for i, p := range orig["panels"].([]any) {
		p := p.(map[string]any)
		if _, ok := p["targets"]; ok && first < 0 {
			first = i
		}
		if ps, _ := p["panels"].([]any); p["type"] == "row" && len(ps) > 0 && row < 0 {
			row = i
		}
	}
	if first < 0 || row < 0 {
		t.Fatalf("the dashboard needs a panel with targets and a collapsed row with panels for this test (got %d, %d)", first, row)
	}
	panel := func(d map[string]any, i int) map[string]any { return d["panels"].([]any)[i].(map[string]any) }
	target := func(d map[string]any) map[string]any {
		return panel(d, first)["targets"].([]any)[0].(map[string]any)
	}
	nested := func(d map[string]any) map[string]any {
		return panel(d, row)["panels"].([]any)[0].(map[string]any)
	}
	mistakes := []struct {
		name, want string
		edit       func(d map[string]any)
	}{
		{"nested panel without datasource", "datasource (none)", func(d map[string]any) { delete(nested(d), "datasource") }},
		{"panel with a fixed datasource uid", "does not use", func(d map[string]any) {
			panel(d, first)["datasource"] = map[string]any{"type": "prometheus", "uid": "prometheus"}
		}},
		{"legacy datasource name", "parse", func(d map[string]any) { panel(d, first)["datasource"] = "Prometheus" }},
		{"target with a fixed datasource uid", "does not use", func(d map[string]any) {
			target(d)["datasource"] = map[string]any{"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
		}},
		{"target without datasource", "does not use", func(d map[string]any) { delete(target(d), "datasource") }},
		{"empty expr", "no expr", func(d map[string]any) { target(d)["expr"] = " " }},
		{"nested panel without targets", "no targets", func(d map[string]any) { nested(d)["targets"] = []any{} }},
		{"duplicate panel id", "already used", func(d map[string]any) { nested(d)["id"] = panel(d, first)["id"] }},
		{"panel without gridPos", "no gridPos", func(d map[string]any) { delete(panel(d, first), "gridPos") }},
		{"overlapping panels", "overlaps", func(d map[string]any) { panel(d, first+1)["gridPos"] = panel(d, first)["gridPos"] }},
		{"no datasource variable", `no "datasource" variable`, func(d map[string]any) {
			var keep []any
			for _, v := range d["templating"].(map[string]any)["list"].([]any) {
				if v.(map[string]any)["name"] != "datasource" {
					keep = append(keep, v)
				}
			}
			d["templating"].(map[string]any)["list"] = keep
		}},
		{"annotation with a fixed datasource", "annotation", func(d map[string]any) {
			for _, a := range d["annotations"].(map[string]any)["list"].([]any) {
				if a := a.(map[string]any); a["builtIn"] == nil {
					a["datasource"] = map[string]any{"type": "prometheus", "uid": "prometheus"}
				}
			}
		}},
		{"editable", "editable", func(d map[string]any) { d["editable"] = true }},
		{"editable missing", "editable", func(d map[string]any) { delete(d, "editable") }},
		{"uid changed", "uid", func(d map[string]any) { d["uid"] = "abc123" }},
	}
	for _, m := range mistakes {
		t.Run(strings.ReplaceAll(m.name, " ", "_"), func(t *testing.T) {
			var d map[string]any
			if err := json.Unmarshal(raw, &d); err != nil {
				t.Fatal(err)
			}
			m.edit(d)
			broken, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			probs := dashboardProblems(broken)
			if !strings.Contains(strings.Join(probs, "\n"), m.want) {
				t.Errorf("%s: want a problem mentioning %q, got %q", m.name, m.want, probs)
			}
		})
	}
}
