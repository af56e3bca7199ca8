package metrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// Labels are the label values the coordinator's metrics take, all of
// them present from the start (at 0), so that the first increment of a
// counter is visible to increase(). The coordinator derives them from its
// own types.
type Labels struct {
	// States label rollover_generation_state.
	States []string
	// Results label rollover_rollovers_total: each rollover counts once,
	// under its one outcome.
	Results []string
	// Reasons label rollover_rollbacks_total.
	Reasons []string
}

// GenSample is one live generation as the coordinator sees it at scrape time.
type GenSample struct {
	N       int // the generation's number
	PID     int
	Command string
	State   string
	Stats   wire.Stats // as the generation last reported them
	// Instances is how many of its processes serve now (--instances; 1
	// for a generation of one process).
	Instances int
}

// Sample is what the coordinator knows at scrape time.
type Sample struct {
	Generations []GenSample
	Active      int   // 0 when none
	MigrateReq  *bool // nil when unknown
	// UDP is the kernel's UDP receive errors in this network namespace;
	// nil when unknown.
	UDP *UDPErrors
}

// UDPErrors are /proc/net/snmp's Udp receive error counters.
type UDPErrors struct{ InErrors, RcvbufErrors uint64 }

// Coordinator holds the coordinator's own metrics: the ones that outlive
// generations are ordinary instruments, and the per-generation ones are built
// at scrape time from a Sample so that gone generations leave no series.
type Coordinator struct {
	Rollovers    *prometheus.CounterVec
	ForcedDrains prometheus.Counter
	Ready        prometheus.Histogram
	Drain        prometheus.Histogram
	ScrapeErrors prometheus.Counter
	Clashes      prometheus.Counter
	ActiveExits  prometheus.Counter
	// CanaryWeight is the share of new connections a canary gets now.
	CanaryWeight prometheus.Gauge
	Rollbacks    *prometheus.CounterVec
	// ForcedConnections and ForcedRequests were cut at a drain deadline.
	ForcedConnections prometheus.Counter
	ForcedRequests    prometheus.Counter
	read              func() (Sample, bool)
	states            []string
}

var (
	descInfo      = prometheus.NewDesc("rollover_generation_info", "A live generation of the app; always 1.", []string{"generation", "pid", "command"}, nil)
	descState     = prometheus.NewDesc("rollover_generation_state", "1 for the state the generation is in, 0 for the others.", []string{"generation", "state"}, nil)
	descInflight  = prometheus.NewDesc("rollover_inflight_requests", "Requests the generation is serving now.", []string{"generation"}, nil)
	descConns     = prometheus.NewDesc("rollover_open_connections", "Connections the generation holds open, hijacked ones included.", []string{"generation"}, nil)
	descRequests  = prometheus.NewDesc("rollover_requests_total", "Requests the generation has started serving.", []string{"generation"}, nil)
	descActive    = prometheus.NewDesc("rollover_active_generation", "The generation receiving new connections; 0 when none.", nil, nil)
	descResponses = prometheus.NewDesc("rollover_responses_total", "Responses the generation sent, by status class.", []string{"generation", "code"}, nil)
	descPanics    = prometheus.NewDesc("rollover_panics_total", "Handler panics in the generation (recovered, counted, re-panicked).", []string{"generation"}, nil)
	// UDP (rollover.ListenPacket) and answers reported outside net/http.
	descDatagrams    = prometheus.NewDesc("rollover_datagrams_received_total", "UDP datagrams the generation read.", []string{"generation"}, nil)
	descSent         = prometheus.NewDesc("rollover_datagrams_sent_total", "UDP datagrams the generation sent (its answers).", []string{"generation"}, nil)
	descInflightPkts = prometheus.NewDesc("rollover_inflight_datagrams", "UDP datagrams the generation read and has not answered yet.", []string{"generation"}, nil)
	descLost         = prometheus.NewDesc("rollover_datagrams_lost_total", "UDP datagrams still queued, never read, when the generation's socket closed.", []string{"generation"}, nil)
	descAnswers      = prometheus.NewDesc("rollover_answers_total", "Answers the app reported outside net/http (rollover.Answer), by result; failed ones count against the bake's health as 5xx do.", []string{"generation", "result"}, nil)
	descUDPErrors    = prometheus.NewDesc("rollover_udp_receive_errors_total", "Datagrams the kernel dropped on receive in the coordinator's network namespace (/proc/net/snmp Udp InErrors, RcvbufErrors included), all sockets.", nil, nil)
	descUDPRcvbuf    = prometheus.NewDesc("rollover_udp_receive_buffer_errors_total", "Datagrams the kernel dropped for a full receive buffer in the coordinator's network namespace (/proc/net/snmp Udp RcvbufErrors), all sockets.", nil, nil)
	descInstances    = prometheus.NewDesc("rollover_instances", "Processes of the generation that serve now (--instances; 1 for a generation of one process).", []string{"generation"}, nil)
	descMigrate      = prometheus.NewDesc("rollover_migrate_req_enabled", "1 when net.ipv4.tcp_migrate_req is on in the coordinator's network namespace.", nil, nil)
)

// NewCoordinator returns the coordinator's metrics, with every label value
// of l; read is called at every scrape and returns false when no fresh
// sample could be had in time.
func NewCoordinator(read func() (Sample, bool), l Labels) *Coordinator {
	c := &Coordinator{
		Rollovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rollover_rollovers_total", Help: "Rollovers by outcome, each counted once.",
		}, []string{"result"}),
		ForcedDrains: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_forced_drains_total", Help: "Drains that ran past --drain-timeout and were ended by signal.",
		}),
		Ready: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "rollover_ready_duration_seconds", Help: "Time from spawning a generation to its ready report.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
		Drain: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "rollover_drain_duration_seconds", Help: "Time from telling a generation to drain to its exit.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
		ScrapeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_generation_scrape_errors_total", Help: "Generations that did not answer a metrics scrape in time, or answered garbage.",
		}),
		Clashes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_federation_clashes_total", Help: "App metric families dropped because the coordinator exports the name or generations disagree on its type.",
		}),
		ActiveExits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_active_exits_total", Help: "Times the active generation exited on its own (and was restarted with backoff).",
		}),
		CanaryWeight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rollover_canary_weight", Help: "Percent of new connections the canary generation gets; 0 when no canary runs.",
		}),
		Rollbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rollover_rollbacks_total", Help: "Automatic and manual rollbacks during a bake or canary, by reason.",
		}, []string{"reason"}),
		ForcedConnections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_forced_connections_total", Help: "Connections (hijacked ones included) cut at a drain deadline.",
		}),
		ForcedRequests: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rollover_forced_requests_total", Help: "Requests in flight cut at a drain deadline.",
		}),
		read:   read,
		states: l.States,
	}
	for _, r := range l.Results {
		c.Rollovers.WithLabelValues(r)
	}
	for _, r := range l.Reasons {
		c.Rollbacks.WithLabelValues(r)
	}
	return c
}

// instruments are the metrics that outlive generations.
func (c *Coordinator) instruments() []prometheus.Collector {
	return []prometheus.Collector{c.Rollovers, c.ForcedDrains, c.Ready, c.Drain, c.ScrapeErrors, c.Clashes, c.ActiveExits, c.CanaryWeight, c.Rollbacks, c.ForcedConnections, c.ForcedRequests}
}

// Describe implements prometheus.Collector.
func (c *Coordinator) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.instruments() {
		m.Describe(ch)
	}
	for _, d := range []*prometheus.Desc{descInfo, descState, descInflight, descConns, descRequests, descResponses, descPanics, descActive, descMigrate, descInstances,
		descDatagrams, descSent, descInflightPkts, descLost, descAnswers, descUDPErrors, descUDPRcvbuf} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Coordinator) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.instruments() {
		m.Collect(ch)
	}
	s, ok := c.read()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(s.Active))
	if s.MigrateReq != nil {
		ch <- prometheus.MustNewConstMetric(descMigrate, prometheus.GaugeValue, b2f(*s.MigrateReq))
	}
	if s.UDP != nil {
		ch <- prometheus.MustNewConstMetric(descUDPErrors, prometheus.CounterValue, float64(s.UDP.InErrors))
		ch <- prometheus.MustNewConstMetric(descUDPRcvbuf, prometheus.CounterValue, float64(s.UDP.RcvbufErrors))
	}
	for _, g := range s.Generations {
		n := strconv.Itoa(g.N)
		ch <- prometheus.MustNewConstMetric(descInfo, prometheus.GaugeValue, 1, n, strconv.Itoa(g.PID), g.Command)
		ch <- prometheus.MustNewConstMetric(descInstances, prometheus.GaugeValue, float64(g.Instances), n)
		for _, st := range c.states {
			ch <- prometheus.MustNewConstMetric(descState, prometheus.GaugeValue, b2f(st == g.State), n, st)
		}
		st := g.Stats
		ch <- prometheus.MustNewConstMetric(descInflight, prometheus.GaugeValue, float64(st.Inflight), n)
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(st.Connections), n)
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(st.Requests), n)
		for i, v := range st.Classes() {
			ch <- prometheus.MustNewConstMetric(descResponses, prometheus.CounterValue, float64(v), n, strconv.Itoa(i+1)+"xx")
		}
		ch <- prometheus.MustNewConstMetric(descPanics, prometheus.CounterValue, float64(st.Panics), n)
		ch <- prometheus.MustNewConstMetric(descDatagrams, prometheus.CounterValue, float64(st.Datagrams), n)
		ch <- prometheus.MustNewConstMetric(descSent, prometheus.CounterValue, float64(st.DatagramsSent), n)
		ch <- prometheus.MustNewConstMetric(descInflightPkts, prometheus.GaugeValue, float64(st.InflightPackets), n)
		ch <- prometheus.MustNewConstMetric(descLost, prometheus.CounterValue, float64(st.DatagramsLost), n)
		ch <- prometheus.MustNewConstMetric(descAnswers, prometheus.CounterValue, float64(st.Answers-st.FailedAnswers), n, "ok")
		ch <- prometheus.MustNewConstMetric(descAnswers, prometheus.CounterValue, float64(st.FailedAnswers), n, "failed")
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
