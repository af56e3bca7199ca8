package metrics

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// testLabels are the coordinator's label values, as it derives them.
var testLabels = Labels{
	States:  []string{"starting", "ready", "active", "draining"},
	Results: []string{"ok", "failed", "rolled_back", "aborted"},
	Reasons: []string{"exited", "health", "health-url", "abort"},
}

func sample(gens ...GenSample) func() (Sample, bool) {
	on := true
	return func() (Sample, bool) {
		return Sample{Generations: gens, Active: 2, MigrateReq: &on}, true
	}
}

func TestCoordinatorMetricsLintAndValues(t *testing.T) {
	c := NewCoordinator(sample(
		GenSample{N: 1, PID: 100, Command: "./api -v1", State: "draining", Stats: wire.Stats{Inflight: 3, Connections: 4, Requests: 10}},
		GenSample{N: 2, PID: 200, Command: "./api -v2", State: "active", Stats: wire.Stats{Inflight: 1, Connections: 2, Requests: 5}, Instances: 3},
	), testLabels)
	c.Rollovers.WithLabelValues("ok").Inc()
	c.Ready.Observe(0.2)
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP rollover_inflight_requests Requests the generation is serving now.
# TYPE rollover_inflight_requests gauge
rollover_inflight_requests{generation="1"} 3
rollover_inflight_requests{generation="2"} 1
# HELP rollover_active_generation The generation receiving new connections; 0 when none.
# TYPE rollover_active_generation gauge
rollover_active_generation 2
# HELP rollover_instances Processes of the generation that serve now (--instances; 1 for a generation of one process).
# TYPE rollover_instances gauge
rollover_instances{generation="1"} 0
rollover_instances{generation="2"} 3
# HELP rollover_generation_state 1 for the state the generation is in, 0 for the others.
# TYPE rollover_generation_state gauge
rollover_generation_state{generation="1",state="active"} 0
rollover_generation_state{generation="1",state="draining"} 1
rollover_generation_state{generation="1",state="ready"} 0
rollover_generation_state{generation="1",state="starting"} 0
rollover_generation_state{generation="2",state="active"} 1
rollover_generation_state{generation="2",state="draining"} 0
rollover_generation_state{generation="2",state="ready"} 0
rollover_generation_state{generation="2",state="starting"} 0
# HELP rollover_rollovers_total Rollovers by outcome, each counted once.
# TYPE rollover_rollovers_total counter
rollover_rollovers_total{result="aborted"} 0
rollover_rollovers_total{result="failed"} 0
rollover_rollovers_total{result="ok"} 1
rollover_rollovers_total{result="rolled_back"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"rollover_inflight_requests", "rollover_active_generation", "rollover_instances", "rollover_generation_state", "rollover_rollovers_total"); err != nil {
		t.Error(err)
	}
}

// A generation that is gone leaves no series behind.
func TestNoGhostSeries(t *testing.T) {
	var mu sync.Mutex
	gens := []GenSample{{N: 1, PID: 1, State: "active"}, {N: 2, PID: 2, State: "ready"}}
	c := NewCoordinator(func() (Sample, bool) {
		mu.Lock()
		defer mu.Unlock()
		return Sample{Generations: append([]GenSample(nil), gens...), Active: 1}, true
	}, testLabels)
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	if n := testutil.CollectAndCount(c, "rollover_inflight_requests"); n != 2 {
		t.Fatalf("%d in-flight series, want 2", n)
	}
	mu.Lock()
	gens = gens[1:]
	mu.Unlock()
	if n := testutil.CollectAndCount(c, "rollover_inflight_requests"); n != 1 {
		t.Fatalf("%d in-flight series after gen 1 left, want 1", n)
	}
	if n := testutil.CollectAndCount(c, "rollover_generation_info"); n != 1 {
		t.Fatalf("%d info series after gen 1 left, want 1", n)
	}
}

func TestFederation(t *testing.T) {
	c := NewCoordinator(sample(GenSample{N: 3, PID: 1, State: "active"}), testLabels)
	own := prometheus.NewRegistry()
	own.MustRegister(c)
	appText := `# HELP app_jobs_total Jobs done.
# TYPE app_jobs_total counter
app_jobs_total{generation="mine",queue="a"} 7
# HELP rollover_active_generation clash with the coordinator's own
# TYPE rollover_active_generation gauge
rollover_active_generation 99
`
	slowDone := make(chan struct{})
	defer close(slowDone)
	g := c.Gatherer(own, func() []Source {
		return []Source{
			{Generation: 3, Fetch: func(context.Context) (string, error) { return appText, nil }},
			{Generation: 4, Fetch: func(context.Context) (string, error) { return appText, nil }},
			{Generation: 5, Fetch: func(ctx context.Context) (string, error) {
				select { // unresponsive: must not hold the scrape beyond its bound
				case <-ctx.Done():
					return "", ctx.Err()
				case <-slowDone:
					return "", errors.New("unreachable")
				}
			}},
			{Generation: 6, Fetch: func(context.Context) (string, error) { return "garbage{{{", nil }},
		}
	})
	start := time.Now()
	want := `
# HELP app_jobs_total Jobs done.
# TYPE app_jobs_total counter
app_jobs_total{exported_generation="mine",generation="3",queue="a"} 7
app_jobs_total{exported_generation="mine",generation="4",queue="a"} 7
# HELP rollover_active_generation The generation receiving new connections; 0 when none.
# TYPE rollover_active_generation gauge
rollover_active_generation 2
`
	if err := testutil.GatherAndCompare(g, strings.NewReader(want), "app_jobs_total", "rollover_active_generation"); err != nil {
		t.Error(err)
	}
	if d := time.Since(start); d > DefaultFetchTimeout+time.Second {
		t.Errorf("scrape with an unresponsive generation took %v", d)
	}
	if got := testutil.ToFloat64(c.ScrapeErrors); got != 2 {
		t.Errorf("scrape errors %v, want 2 (one timeout, one garbage)", got)
	}
	if got := testutil.ToFloat64(c.Clashes); got != 2 {
		t.Errorf("clashes %v, want 2 (rollover_active_generation from gens 3 and 4)", got)
	}
	if problems, err := testutil.GatherAndLint(g); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}
