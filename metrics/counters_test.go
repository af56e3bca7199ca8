package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCounters(t *testing.T) {
	var c Counters
	lat := NewLatency()
	c.Latency = lat
	c.OpenConn()
	c.OpenConn()
	start := c.StartRequest()
	if s := c.Snapshot(); s.Inflight != 1 || s.Connections != 2 || s.Requests != 1 {
		t.Errorf("during a request: %+v, want 1 in flight, 2 connections, 1 request", s)
	}
	c.EndRequest(start)
	c.EndRequest(c.StartRequest())
	if n := c.CloseConn(); n != 1 {
		t.Errorf("CloseConn left %d open, want 1", n)
	}
	if n := c.CloseConn(); n != 0 {
		t.Errorf("CloseConn left %d open, want 0", n)
	}
	if s := c.Snapshot(); s.Inflight != 0 || s.Connections != 0 || s.Requests != 2 {
		t.Errorf("after: %+v, want 0 in flight, 0 connections, 2 requests", s)
	}
	if n := testutil.CollectAndCount(lat); n != 1 {
		t.Errorf("latency histogram: %d series", n)
	}
	if problems, err := testutil.CollectAndLint(lat); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// The zero value counts without a latency histogram.
func TestCountersZero(t *testing.T) {
	var c Counters
	c.EndRequest(c.StartRequest())
	if s := c.Snapshot(); s.Requests != 1 || s.Inflight != 0 {
		t.Errorf("%+v, want 1 request, 0 in flight", s)
	}
}

func TestCountersClasses(t *testing.T) {
	var c Counters
	for _, code := range []int{101, 200, 204, 302, 404, 499, 500, 503, 99, 600, 0} {
		c.Response(code)
	}
	c.Panic()
	s := c.Snapshot()
	if s.Classes() != [5]uint64{1, 2, 1, 2, 2} || s.Panics != 1 {
		t.Errorf("classes %v panics %d, want [1 2 1 2 2] and 1 (codes out of range not counted)", s.Classes(), s.Panics)
	}
}
