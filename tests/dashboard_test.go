package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
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
	RefID      string      `json:"refId"`
	Expr       string      `json:"expr"`
	Datasource *grafanaRef `json:"datasource"`
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

// dashboardQuery is one PromQL expression of the dashboard and where it is.
type dashboardQuery struct {
	Panel string // panel title, or "annotation NAME"
	Expr  string
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
				out = append(out, dashboardQuery{Panel: p.Title, Expr: tg.Expr})
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
// drain.
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	titles := map[string]bool{}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			titles[p.Title] = true
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, want := range drainPanels {
		if !titles[want] {
			t.Errorf("no panel titled %q", want)
		}
	}
	if n := len(d.queries()); n < 15 {
		t.Errorf("only %d queries", n)
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
