// Package metrics counts an app's HTTP work cheaply (Counters: atomics only)
// and exposes the coordinator's Prometheus metrics (Coordinator: a custom
// collector built at scrape time from the live generations, so a generation
// that is gone leaves no series behind).
//
// Metric names follow DESIGN.md: prefix rollover_, base units, _total for
// counters, a generation label, and the pid only on rollover_generation_info.
package metrics
