package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// watch polls the coordinator every o.interval until ctx is done: a screen
// redrawn in place on a terminal, plain lines otherwise.
func watch(ctx context.Context, socket string, o *statusOpts, out io.Writer) error {
	tty := isTerminal(out) && !o.asJSON
	w := newWatcher(o.interval, time.Now())
	enc := json.NewEncoder(out)
	t := time.NewTimer(o.interval)
	defer t.Stop()
	// Polls come faster while a rollover is under way; lines (and JSON
	// objects) still come once per interval, plus one per phase seen.
	var printed time.Time
	for first := true; ; first = false {
		st, err := status(socket)
		if err != nil {
			if !first {
				return &codeError{exitNoCoordinator, fmt.Errorf("the coordinator stopped answering: %w", err)}
			}
			return err
		}
		now := time.Now()
		events := w.observe(st, now)
		due := first || len(events) > 0 || now.Sub(printed) >= o.interval
		switch {
		case !due && !tty:
		case o.asJSON:
			printed = now
			if err := enc.Encode(st); err != nil {
				return err
			}
		case tty:
			width, height := terminalSize(out)
			var b strings.Builder
			if first {
				b.WriteString("\x1b[H\x1b[2J")
			} else {
				b.WriteString("\x1b[H")
			}
			lines := w.frame(st, now)
			if height > 1 && len(lines) > height-1 {
				lines = lines[:height-1]
			}
			for _, l := range lines {
				b.WriteString(truncate(l, width-1) + "\x1b[K\n")
			}
			b.WriteString("\x1b[J")
			if _, err := io.WriteString(out, b.String()); err != nil {
				return err
			}
		default:
			stamp := now.Format("15:04:05")
			for _, e := range events {
				fmt.Fprintf(out, "%s %s\n", stamp, e)
			}
			if now.Sub(printed) >= o.interval {
				printed = now
				if _, err := fmt.Fprintf(out, "%s %s\n", stamp, w.summary(st, now)); err != nil {
					return err
				}
			}
		}
		// While a rollover is under way, look more often, so its ready
		// time and activation are seen to within rolloverPoll.
		next := o.interval
		if w.following(st) {
			next = min(next, rolloverPoll)
		}
		t.Reset(next)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// rolloverPoll is how often the watch looks while a rollover is in progress.
const rolloverPoll = 25 * time.Millisecond

// following reports whether a rollover is under way in st.
func (w *watcher) following(st *wire.Status) bool {
	if st.InProgress {
		return true
	}
	for _, g := range st.Generations {
		if g.State == "starting" || g.State == "ready" {
			return true
		}
	}
	return false
}

// watcher keeps what the watch has seen across polls: the status has each
// live generation, not the history, so the last rollovers, their ready and
// drain times (to within the interval) and results are pieced together
// here from the state changes between polls.
type watcher struct {
	interval time.Duration
	since    time.Time
	polls    int
	active   int
	gens     map[int]*seenGen
	recent   []*rolloverSeen // newest first
}

type seenGen struct {
	drainSince time.Time // first seen draining
	maxConns   int64     // most connections seen while draining
	rollover   *rolloverSeen
}

// rolloverSeen is one rollover: the generation it started and the one it
// replaced.
type rolloverSeen struct {
	gen, from  int
	started    time.Time // the coordinator's spawn time
	ready      time.Duration
	activeAt   time.Time
	result     string // "in progress", "ok" (became active), "failed", "rolled back"
	drainStart time.Time
	drain      time.Duration
	drained    bool
}

// maxRecent is how many rollovers the screen lists.
const maxRecent = 5

func newWatcher(interval time.Duration, now time.Time) *watcher {
	return &watcher{interval: interval, since: now, gens: map[int]*seenGen{}}
}

// observe takes one status and returns what changed since the last, as
// lines for a log.
// observeGone forgets the generations no longer live and says how each
// one ended: a failed rollover, or a drain that is over.
func (w *watcher) observeGone(live map[int]bool, now time.Time) []string {
	var events []string
	var gone []int
	for n := range w.gens {
		if !live[n] {
			gone = append(gone, n)
		}
	}
	slices.Sort(gone)
	for _, n := range gone {
		sg := w.gens[n]
		delete(w.gens, n)
		if r := sg.rollover; r != nil && r.result == "in progress" {
			r.result = "failed"
			events = append(events, fmt.Sprintf("gen %d failed: gone before it was active", n))
		}
		for _, r := range w.recent {
			if r.from == n && !r.drained {
				start := r.activeAt
				if !sg.drainSince.IsZero() && sg.drainSince.Before(start) {
					start = sg.drainSince
				}
				r.drainStart, r.drained = start, true
				r.drain = max(now.Sub(start), time.Millisecond)
				events = append(events, fmt.Sprintf("gen %d drained after ≤%s", n, fmtDur(r.drain)))
			}
		}
	}
	return events
}

func (w *watcher) observe(st *wire.Status, now time.Time) []string {
	var events, drains []string
	live := map[int]bool{}
	for _, g := range st.Generations {
		live[g.Generation] = true
		sg, known := w.gens[g.Generation]
		if !known {
			sg = &seenGen{}
			w.gens[g.Generation] = sg
			// Generations already serving when the watch starts came
			// before it; one still starting is a rollover it can follow.
			if w.polls > 0 || g.State == "starting" || g.State == "ready" {
				r := &rolloverSeen{gen: g.Generation, started: g.StartedAt, result: "in progress"}
				sg.rollover = r
				w.recent = append([]*rolloverSeen{r}, w.recent...)
				events = append(events, fmt.Sprintf("gen %d started (pid %d)", g.Generation, g.PID))
			}
		}
		if r := sg.rollover; r != nil {
			if r.ready == 0 && g.State != "starting" {
				r.ready = max(now.Sub(r.started), time.Millisecond)
				events = append(events, fmt.Sprintf("gen %d ready after ≤%s", g.Generation, fmtDur(r.ready)))
			}
			if g.State == "active" && r.result != "ok" {
				r.result, r.activeAt = "ok", now
				r.from = w.active
				if _, ok := w.gens[r.from]; !ok || r.from == g.Generation {
					r.from, r.drained = 0, true
				}
				events = append(events, fmt.Sprintf("gen %d active", g.Generation))
			}
		}
		if g.State == "draining" {
			if sg.drainSince.IsZero() {
				sg.drainSince = now
				drains = append(drains, fmt.Sprintf("draining gen %d: %d in flight, %d connections", g.Generation, g.Stats.Inflight, g.Stats.Connections))
			}
			sg.maxConns = max(sg.maxConns, g.Stats.Connections)
		}
	}
	events = append(events, drains...)
	events = append(events, w.observeGone(live, now)...)
	if r := st.LastReport; r != nil && r.RolledBack {
		for _, seen := range w.recent {
			if seen.gen == r.Generation && seen.result != "rolled back" {
				seen.result = "rolled back"
				events = append(events, fmt.Sprintf("gen %d rolled back: %s", r.Generation, r.Reason))
			}
		}
	}
	if len(w.recent) > maxRecent {
		w.recent = w.recent[:maxRecent]
	}
	w.active = st.Active
	w.polls++
	return events
}

// frame is the terminal screen for st.
func (w *watcher) frame(st *wire.Status, now time.Time) []string {
	var b strings.Builder
	fmt.Fprintf(&b, "rollover status --watch   coordinator pid %d   %s   %s\n", st.PID, st.Socket, now.Format("15:04:05"))
	fmt.Fprintf(&b, "active gen %d   rollover in progress: %s%s   tcp_migrate_req=%s   active exits %d\n\n",
		st.Active, yesNo(st.InProgress), bakeCanary(st), migrateReq(st), st.ActiveExits)
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	udp := servesUDP(st)
	fmt.Fprintln(tw, "GEN\tPID\tSTATE\tIN-FLIGHT\tCONNS\t"+udpHeader(udp)+"AGE\tDRAIN\tCOMMAND")
	for _, g := range st.Generations {
		drain := ""
		if sg := w.gens[g.Generation]; sg != nil && g.State == "draining" {
			drain = fmt.Sprintf("%s %d/%d", bar(sg.maxConns-g.Stats.Connections, sg.maxConns, 20), g.Stats.Connections, sg.maxConns)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%s%s\t%s\t%s\n", g.Generation, g.PID, stateCell(g),
			g.Stats.Inflight, g.Stats.Connections, udpCell(udp, g.Stats), fmtAge(now.Sub(g.StartedAt)), drain, strings.Join(g.Argv, " "))
	}
	_ = tw.Flush()
	fmt.Fprintf(&b, "\nLast rollovers (seen by this watch since %s; times to within %s):\n", w.since.Format("15:04:05"), w.interval)
	if len(w.recent) == 0 {
		b.WriteString("  none yet\n")
	} else {
		tw = tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GEN\tFROM\tRESULT\tREADY\tDRAIN\tSTARTED")
		for _, r := range w.recent {
			from, ready, drain := "-", "-", "-"
			if r.from > 0 {
				from = fmt.Sprint(r.from)
			}
			if r.ready > 0 {
				ready = "≤" + fmtDur(r.ready)
			}
			switch {
			case r.drained && r.from > 0:
				drain = "≤" + fmtDur(r.drain)
			case r.result == "ok" && r.from > 0:
				drain = "draining " + fmtDur(now.Sub(r.activeAt))
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", r.gen, from, r.result, ready, drain, r.started.Local().Format("15:04:05"))
		}
		_ = tw.Flush()
	}
	if st.LastReport != nil {
		b.WriteString("\nLast " + st.LastReport.String() + "\n")
	}
	b.WriteString("\nCtrl-C to quit")
	return strings.Split(b.String(), "\n")
}

// summary is one plain line for st.
func (w *watcher) summary(st *wire.Status, now time.Time) string {
	parts := []string{fmt.Sprintf("active gen %d, rollover in progress: %s%s", st.Active, yesNo(st.InProgress), bakeCanary(st))}
	for _, g := range st.Generations {
		s := fmt.Sprintf("gen %d %s pid %d: %d in flight, %d connections, up %s", g.Generation, stateCell(g), g.PID,
			g.Stats.Inflight, g.Stats.Connections, fmtAge(now.Sub(g.StartedAt)))
		if servesUDP(st) {
			s += fmt.Sprintf(", udp %d read, %d sent, %d in flight, %d lost", g.Stats.Datagrams, g.Stats.DatagramsSent, g.Stats.InflightPackets, g.Stats.DatagramsLost)
		}
		if sg := w.gens[g.Generation]; sg != nil && g.State == "draining" {
			s += fmt.Sprintf(", %d/%d left", g.Stats.Connections, sg.maxConns)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, " | ")
}

// bakeCanary is the phase after a comma, "" when no rollover is under way.
func bakeCanary(st *wire.Status) string {
	if p := phase(st); p != "" {
		return ", " + p
	}
	return ""
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// fmtDur is a duration as a person reads it, and the only way the CLI
// writes one: 12ms below a second, else to a tenth of a second without
// zero units: 1.3s, 5s, 1m30s, 1h, 1h0m5s.
func fmtDur(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%dms", d.Milliseconds())
	}
	s := d.Round(100 * time.Millisecond).String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// millis is a wire field in milliseconds as a duration.
func millis(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }

// fmtAge is 12s, 4m03s, 2h05m.
func fmtAge(d time.Duration) string {
	switch d = max(d, 0); {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	default:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
}

// truncate cuts s to n runes (n <= 0: no limit).
func truncate(s string, n int) string {
	if n <= 0 || utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n])
}
