package metrics

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// Counters counts an app's HTTP work with atomics only, so the hot path costs
// a few uncontended atomic operations per request. The zero value is ready.
// It only counts: what a drain does with the counts is the library's call.
type Counters struct {
	// Latency, when set before the first request, observes each request's
	// duration in seconds.
	Latency prometheus.Observer

	inflight atomic.Int64
	conns    atomic.Int64
	requests atomic.Uint64
	classes  [5]atomic.Uint64 // final responses by class: 1xx … 5xx
	panics   atomic.Uint64

	datagrams, sent, lost  atomic.Uint64
	answers, failedAnswers atomic.Uint64
}

// Snapshot returns the current values, in the one shape counters have from
// the library to the metrics: the protocol's Stats (the forced counts are
// the library's to fill in).
func (c *Counters) Snapshot() wire.Stats {
	return wire.Stats{
		Inflight:    c.inflight.Load(),
		Connections: c.conns.Load(),
		Requests:    c.requests.Load(),
		R1xx:        c.classes[0].Load(),
		R2xx:        c.classes[1].Load(),
		R3xx:        c.classes[2].Load(),
		R4xx:        c.classes[3].Load(),
		R5xx:        c.classes[4].Load(),
		Panics:      c.panics.Load(),

		Datagrams:       c.datagrams.Load(),
		DatagramsSent:   c.sent.Load(),
		InflightPackets: c.InflightPackets(),
		DatagramsLost:   c.lost.Load(),
		Answers:         c.answers.Load(),
		FailedAnswers:   c.failedAnswers.Load(),
	}
}

// Datagram counts a datagram the app read.
func (c *Counters) Datagram() { c.datagrams.Add(1) }

// DatagramSent counts a datagram the app sent.
func (c *Counters) DatagramSent() { c.sent.Add(1) }

// DatagramsLost counts n datagrams left unread on a socket that closed.
func (c *Counters) DatagramsLost(n uint64) { c.lost.Add(n) }

// Answer counts an answer the app reported; failed ones count against the
// bake's health as 5xx do.
func (c *Counters) Answer(failed bool) {
	c.answers.Add(1)
	if failed {
		c.failedAnswers.Add(1)
	}
}

// InflightPackets is the datagrams read and not answered yet: read minus
// sent, never below 0 (an app may send more than it read).
func (c *Counters) InflightPackets() int64 {
	sent, read := c.sent.Load(), c.datagrams.Load()
	if sent >= read {
		return 0
	}
	return int64(read - sent)
}

// Response counts a final response with status code; codes outside
// 100–599 are not counted.
func (c *Counters) Response(code int) {
	if i := code/100 - 1; i >= 0 && i < len(c.classes) {
		c.classes[i].Add(1)
	}
}

// Panic counts a handler panic.
func (c *Counters) Panic() { c.panics.Add(1) }

// StartRequest counts a request that starts now, in flight and in total, and
// returns its start for EndRequest.
func (c *Counters) StartRequest() time.Time {
	c.requests.Add(1)
	c.inflight.Add(1)
	return time.Now()
}

// EndRequest counts the end of a request that started at start.
func (c *Counters) EndRequest(start time.Time) {
	c.inflight.Add(-1)
	if c.Latency != nil {
		c.Latency.Observe(time.Since(start).Seconds())
	}
}

// OpenConn counts an accepted connection.
func (c *Counters) OpenConn() { c.conns.Add(1) }

// CloseConn counts a closed connection and returns how many remain open.
// Call it once per connection that OpenConn counted.
func (c *Counters) CloseConn() int64 { return c.conns.Add(-1) }

// NewLatency is the request-duration histogram the library reports; the
// coordinator adds the generation label.
func NewLatency() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "rollover_request_duration_seconds",
		Help:    "Time to serve a request, from the handler's start to its return.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	})
}

// ReadUDPErrors reads the Udp receive error counters of the caller's network
// namespace from /proc/net/snmp.
func ReadUDPErrors() (*UDPErrors, error) { return readUDPErrors("/proc/net/snmp") }

func readUDPErrors(path string) (*UDPErrors, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "Udp:" || len(values) != len(names) || values[0] != "Udp:" {
			continue
		}
		var e UDPErrors
		for j, name := range names {
			v, err := strconv.ParseUint(values[j], 10, 64)
			switch {
			case err != nil:
			case name == "InErrors":
				e.InErrors = v
			case name == "RcvbufErrors":
				e.RcvbufErrors = v
			}
		}
		return &e, nil
	}
	return nil, fmt.Errorf("%s: no Udp counters", path)
}
