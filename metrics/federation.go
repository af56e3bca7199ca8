package metrics

import (
	"context"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/proto"
)

// DefaultFetchTimeout bounds how long a scrape waits for one generation.
var DefaultFetchTimeout = 500 * time.Millisecond

// Source is one live generation's metrics, fetched at scrape time.
type Source struct {
	Generation int
	// Fetch returns the generation's metrics in the Prometheus text format.
	Fetch func(ctx context.Context) (string, error)
}

// Gatherer returns what the coordinator's /metrics serves: own (the
// coordinator's registry) plus every live generation's metrics with a
// generation label added. Generations are asked concurrently and each gets
// at most DefaultFetchTimeout, so an unresponsive one costs a scrape that
// long and shows up in rollover_generation_scrape_errors_total. A family
// whose name the coordinator already exports is dropped (counted in
// rollover_federation_clashes_total), and a generation label the app set
// itself is kept as exported_generation.
func (c *Coordinator) Gatherer(own prometheus.Gatherer, sources func() []Source) prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		mfs, err := own.Gather()
		taken := map[string]bool{}
		for _, mf := range mfs {
			taken[mf.GetName()] = true
		}
		for _, mf := range c.federate(sources(), taken) {
			mfs = append(mfs, mf)
		}
		sort.Slice(mfs, func(i, j int) bool { return mfs[i].GetName() < mfs[j].GetName() })
		return mfs, err
	})
}

type fetched struct {
	gen  int
	text string
	err  error
}

func (c *Coordinator) federate(srcs []Source, taken map[string]bool) map[string]*dto.MetricFamily {
	results := make([]fetched, len(srcs))
	var wg sync.WaitGroup
	for i, s := range srcs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), DefaultFetchTimeout)
			defer cancel()
			text, err := s.Fetch(ctx)
			results[i] = fetched{s.Generation, text, err}
		}()
	}
	wg.Wait()
	out := map[string]*dto.MetricFamily{}
	for _, r := range results {
		if r.err != nil {
			c.ScrapeErrors.Inc()
			continue
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		parsed, err := parser.TextToMetricFamilies(strings.NewReader(r.text))
		if err != nil {
			c.ScrapeErrors.Inc()
			continue
		}
		for name, mf := range parsed {
			if taken[name] {
				c.Clashes.Inc()
				continue
			}
			labelGeneration(mf, r.gen)
			if have, ok := out[name]; ok {
				if have.GetType() != mf.GetType() {
					c.Clashes.Inc()
					continue
				}
				have.Metric = append(have.Metric, mf.Metric...)
				continue
			}
			out[name] = mf
		}
	}
	return out
}

// labelGeneration adds generation="n" to every metric of mf.
func labelGeneration(mf *dto.MetricFamily, gen int) {
	value := strconv.Itoa(gen)
	for _, m := range mf.Metric {
		for _, lp := range m.Label {
			if lp.GetName() == "generation" {
				lp.Name = proto.String("exported_generation")
			}
		}
		m.Label = append(m.Label, &dto.LabelPair{Name: proto.String("generation"), Value: proto.String(value)})
		sort.Slice(m.Label, func(i, j int) bool { return m.Label[i].GetName() < m.Label[j].GetName() })
	}
}
