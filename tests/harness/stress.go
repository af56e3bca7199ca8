package harness

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/rollover-sh/rollover/tests/load"
)

// StressConfig is a stress run: load on the service while it rolls over.
type StressConfig struct {
	Rollovers int           // how many rollovers
	Interval  time.Duration // start one every Interval (default 500ms)
	Wait      bool          // next --wait: measure each drain to the old one's exit
	Load      load.Options  // URL defaults to the service; Duration is set to cover the run
	Versions  []string      // cycled through; default v2, v1
	Settle    time.Duration // load keeps running this long after the last rollover (default 300ms)
	Slow      int           // clients that keep a 1s request in flight across the rollovers
	Progress  io.Writer     // one line per rollover when set
}

// Report is what a stress run measured.
type Report struct {
	Rollovers  int // succeeded
	Failed     int // rollovers that failed
	Errors     []string
	Load       load.Result
	Slow       load.Result // the 1s requests, when StressConfig.Slow > 0
	Ready      []time.Duration
	Took       []time.Duration // wall time of each `next`
	Drain      []time.Duration // with Wait
	Generation int             // the last active generation
	// Lingering counts old generations still alive a few seconds after the
	// last rollover: keep-alive clients must be moved, not kept until the
	// drain timeout.
	Lingering int
}

// Stress drives load against s and rolls it over sc.Rollovers times.
func Stress(ctx context.Context, s *Service, sc StressConfig) (Report, error) {
	var rep Report
	if sc.Interval <= 0 {
		sc.Interval = 500 * time.Millisecond
	}
	if sc.Settle <= 0 {
		sc.Settle = 300 * time.Millisecond
	}
	if len(sc.Versions) == 0 {
		sc.Versions = []string{"v2", "v1"}
	}
	lo := sc.Load
	if lo.URL == "" {
		lo.URL = "http://" + s.Addr + "/"
	}
	// Bound the load by time even if a rollover hangs.
	lo.Duration = time.Duration(sc.Rollovers+4)*(sc.Interval+s.cfg.DrainTimeout/4) + 30*time.Second
	runner, err := load.Start(ctx, lo)
	if err != nil {
		return rep, err
	}
	defer runner.Stop()
	var slow *load.Runner
	if sc.Slow > 0 {
		slow, err = load.Start(ctx, load.Options{URL: "http://" + s.Addr + "/slow?d=1s", Clients: sc.Slow, Duration: lo.Duration, Timeout: 30 * time.Second})
		if err != nil {
			return rep, err
		}
		defer slow.Stop()
	}
	time.Sleep(200 * time.Millisecond) // let the clients reach full speed
	next := time.Now()
	for i := 0; i < sc.Rollovers; i++ {
		if ctx.Err() != nil {
			break
		}
		time.Sleep(time.Until(next))
		next = time.Now().Add(sc.Interval)
		v := sc.Versions[i%len(sc.Versions)]
		r, err := s.Next(ctx, v, sc.Wait)
		if err != nil {
			rep.Failed++
			if len(rep.Errors) < 10 {
				rep.Errors = append(rep.Errors, err.Error())
			}
			continue
		}
		rep.Rollovers++
		rep.Generation = r.Generation
		rep.Ready = append(rep.Ready, r.Ready)
		rep.Took = append(rep.Took, r.Took)
		if sc.Wait {
			rep.Drain = append(rep.Drain, r.Drain)
		}
		if sc.Progress != nil {
			snap := runner.Snapshot()
			fmt.Fprintf(sc.Progress, "rollover %3d: gen %d (%s) ready %v, next took %v%s; requests so far %d, failed %d\n",
				i+1, r.Generation, v, r.Ready, r.Took.Round(time.Millisecond), drainText(sc.Wait, r.Drain), snap.Requests, snap.Failures)
		}
	}
	time.Sleep(sc.Settle)
	rep.Load = runner.Stop()
	if slow != nil {
		// Let the last slow requests finish instead of cutting them off.
		time.Sleep(1200 * time.Millisecond)
		rep.Slow = slow.Stop()
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := s.Status(ctx)
		if err == nil {
			rep.Lingering = len(st.Generations) - 1
		}
		if rep.Lingering <= 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return rep, nil
}

func drainText(wait bool, d time.Duration) string {
	if !wait {
		return ""
	}
	return fmt.Sprintf(", old drained in %v", d)
}

// String is the tally `make demo` and `make bench` print.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "rollovers:  %d ok, %d failed\n", r.Rollovers, r.Failed)
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "  rollover error: %s\n", e)
	}
	l := r.Load
	fmt.Fprintf(&b, "requests:   %d, ok %d, failed %d\n", l.Requests, l.OK, l.Failures)
	kinds := []load.Kind{load.KindConnect, load.KindReset, load.KindEOF, load.KindTimeout, load.KindStatus, load.KindOther}
	var parts []string
	for _, k := range kinds {
		parts = append(parts, fmt.Sprintf("%s=%d", k, l.ByKind[k]))
	}
	fmt.Fprintf(&b, "failures:   %s\n", strings.Join(parts, " "))
	for _, s := range l.Samples {
		fmt.Fprintf(&b, "  sample: %s\n", s)
	}
	if r.Slow.Requests > 0 {
		fmt.Fprintf(&b, "slow (1s):  %d, ok %d, failed %d\n", r.Slow.Requests, r.Slow.OK, r.Slow.Failures)
	}
	fmt.Fprintf(&b, "throughput: %.0f requests/s, p50 %v, p99 %v\n", l.RPS(), l.P50, l.P99)
	fmt.Fprintf(&b, "ready:      %s\n", durStats(r.Ready))
	fmt.Fprintf(&b, "next took:  %s\n", durStats(r.Took))
	if len(r.Drain) > 0 {
		fmt.Fprintf(&b, "drain:      %s\n", durStats(r.Drain))
	}
	var gens []string
	for g, n := range l.ByGeneration {
		gens = append(gens, fmt.Sprintf("%s:%d", g, n))
	}
	sort.Strings(gens)
	if r.Lingering > 0 {
		fmt.Fprintf(&b, "lingering:  %d old generations still alive 3s after the load stopped\n", r.Lingering)
	}
	fmt.Fprintf(&b, "answered by generation: %s\n", strings.Join(gens, " "))
	return b.String()
}

func durStats(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	q := func(p float64) time.Duration { return s[int(p*float64(len(s)-1))].Round(time.Millisecond) }
	return fmt.Sprintf("min %v, p50 %v, p95 %v, max %v (n=%d)", s[0].Round(time.Millisecond), q(0.5), q(0.95), s[len(s)-1].Round(time.Millisecond), len(s))
}
