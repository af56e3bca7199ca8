// Package metrics counts an app's HTTP work cheaply (Counters: atomics only)
// and exposes the coordinator's Prometheus metrics (Coordinator: a custom
// collector built at scrape time from the live generations, so a generation
// that is gone leaves no series behind).
//
// Metric names follow Prometheus's naming conventions (base units, _total
// for counters) with the prefix rollover_, a generation label, and the pid
// only on rollover_generation_info. The README's Metrics section lists them.
package metrics
