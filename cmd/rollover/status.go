package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/rollover-sh/rollover/rollover/wire"
)

type statusOpts struct {
	asJSON, watch bool
	interval      time.Duration
}

func newStatusCmd(g *globals) *cobra.Command {
	o := &statusOpts{}
	c := &cobra.Command{
		Use:   "status [flags]",
		Short: "Show generations, states, pids, in-flight counts and tcp_migrate_req",
		Long: `Show the coordinator and its live generations: state (starting, ready, active,
draining), pid, in-flight requests, open connections, requests served, whether
the generation can be steered, uptime and command line. While a rollover is
under way, a phase line says where it stands: the generation starting; a
canary, its share of new connections and its step, with the time to the next
step or the rollover promote it waits for; or a bake, its time left, and
which generation takes the port back if it fails.

With --watch, keep showing it every --interval until Ctrl-C: in a terminal the
screen is redrawn in place, with a bar for each draining generation's
connections falling to zero and the last rollovers this watch saw (their ready
and drain times, to within --interval, and results); in a pipe, one line per
interval and one per rollover phase seen.`,
		Example: `  rollover status
  rollover --name web status --json
  rollover status --watch
  rollover status --watch --interval 2s | tee status.log`,
		Annotations: map[string]string{"exit": `  0  ok (--watch: stopped with Ctrl-C)
  1  refused (permission denied)
` + exitCodesClient + `; with --watch, also when the coordinator goes away`},
		Args:              noArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := positive(cmd.Flags(), "interval"); err != nil {
				return err
			}
			if cmd.Flags().Changed("interval") && !o.watch {
				return usageErr("--interval goes with --watch")
			}
			if o.watch {
				socket, err := g.socketPath()
				if err != nil {
					return err
				}
				ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
				defer stop()
				return watch(ctx, socket, o, cmd.OutOrStdout())
			}
			st, err := g.status()
			if err != nil {
				return err
			}
			if o.asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return printStatus(cmd.OutOrStdout(), st, time.Now())
		},
	}
	f := c.Flags()
	f.SortFlags = false
	f.BoolVar(&o.asJSON, "json", false, "print JSON (with --watch: one object per line)")
	f.BoolVarP(&o.watch, "watch", "w", false, "keep watching: redraw in a terminal, one line per interval in a pipe")
	f.DurationVar(&o.interval, "interval", 500*time.Millisecond, "how often --watch asks the coordinator")
	return c
}

func migrateReq(st *wire.Status) string {
	if st.MigrateReq == nil {
		return "unknown"
	}
	if *st.MigrateReq {
		return "1"
	}
	return "0"
}

func printStatus(w io.Writer, st *wire.Status, now time.Time) error {
	fmt.Fprintf(w, "coordinator pid %d, socket %s, active gen %d, rollover in progress: %s, tcp_migrate_req=%s\n",
		st.PID, st.Socket, st.Active, yesNo(st.InProgress), migrateReq(st))
	if p := phase(st); p != "" {
		fmt.Fprintf(w, "phase: %s\n", p)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	udp := servesUDP(st)
	fmt.Fprintln(tw, "GEN\tPID\tSTATE\tIN-FLIGHT\tCONNS\tREQUESTS\t"+udpHeader(udp)+"STEERED\tUPTIME\tCOMMAND")
	for _, g := range st.Generations {
		steer := "yes"
		if g.Sockets > 1 {
			steer = fmt.Sprintf("yes, %d sockets", g.Sockets) // one per worker, steered from outside
		}
		if !g.Steerable {
			steer = "no (tcp_migrate_req)"
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%d\t%s%s\t%s\t%s\n", g.Generation, g.PID, stateCell(g),
			g.Stats.Inflight, g.Stats.Connections, g.Stats.Requests, udpCell(udp, g.Stats), steer,
			fmtAge(now.Sub(g.StartedAt)), strings.Join(g.Argv, " "))
	}
	return tw.Flush()
}

// stateCell is a generation's state, with how many of its instances serve
// when it runs several (--instances): "active, 3/4 instances".
func stateCell(g wire.GenStatus) string {
	if g.Instances == 0 {
		return g.State
	}
	return fmt.Sprintf("%s, %d/%d instances", g.State, g.Serving, g.Instances)
}

// servesUDP reports whether a generation of st has read datagrams: only
// then do the tables show their UDP column.
func servesUDP(st *wire.Status) bool {
	for _, g := range st.Generations {
		if g.Stats.Datagrams > 0 || g.Stats.DatagramsLost > 0 {
			return true
		}
	}
	return false
}

func udpHeader(udp bool) string {
	if !udp {
		return ""
	}
	return "UDP READ/SENT/IN-FLIGHT\t"
}

// udpCell is a generation's datagrams read, sent and in flight, and lost
// when any were.
func udpCell(udp bool, s wire.Stats) string {
	if !udp {
		return ""
	}
	c := fmt.Sprintf("%d/%d/%d", s.Datagrams, s.DatagramsSent, s.InflightPackets)
	if s.DatagramsLost > 0 {
		c += fmt.Sprintf(" (%d lost)", s.DatagramsLost)
	}
	return c + "\t"
}

// phase says where the rollover under way stands, from what the status
// holds: a canary's weight and step, a bake and its time left, a
// generation starting or ready, or the old one leaving the port. "" when
// none is under way.
func phase(st *wire.Status) string {
	if !st.InProgress && st.Baking == 0 && st.CanaryWeight == 0 {
		return ""
	}
	old := 0 // the generation the rollover replaces
	for _, g := range st.Generations {
		if g.State == "draining" && (st.Baking == 0 || g.Generation < st.Baking) {
			old = max(old, g.Generation)
		}
	}
	r := st.Rollout // nil from a coordinator before rollout status
	switch {
	case st.CanaryWeight > 0 && st.CanaryWeight < 100 && st.Baking > 0:
		return canaryPhase(st.Baking, st.CanaryWeight, st.Active, r)
	case st.Baking > 0 && st.Baking == st.Active:
		s := fmt.Sprintf("baking gen %d", st.Baking)
		if r != nil && r.Phase == "baking" {
			s += fmt.Sprintf(" (%s left)", fmtDur(millis(r.BakeLeftMS)))
		}
		if old > 0 {
			s += fmt.Sprintf(": gen %d takes the port back if it fails", old)
		}
		return s
	}
	for _, g := range st.Generations {
		switch g.State {
		case "starting":
			return fmt.Sprintf("starting gen %d, waiting until it is ready", g.Generation)
		case "ready":
			return fmt.Sprintf("gen %d ready, steering new connections to it", g.Generation)
		}
	}
	if old > 0 {
		return fmt.Sprintf("handing over: gen %d leaves the port to gen %d", old, st.Active)
	}
	return "rolling over"
}

// canaryPhase is a canary's share of new connections, its step, and what
// comes next: the next step or 100% in so long, or a promote it waits for.
func canaryPhase(n, weight, old int, r *wire.RolloutStatus) string {
	step := ""
	if r != nil && r.Steps > 1 {
		step = fmt.Sprintf(" step %d/%d", r.Step, r.Steps)
	}
	s := fmt.Sprintf("canary%s: gen %d takes %d%% of new connections, gen %d the rest", step, n, weight, old)
	switch {
	case r == nil || r.Step == 0:
	case r.Waiting:
		s += "; waiting for rollover promote (to 100%) or rollover abort"
	case r.Step < r.Steps:
		s += "; next step in " + fmtDur(millis(r.StepLeftMS))
	default:
		s += "; 100% in " + fmtDur(millis(r.StepLeftMS))
	}
	return s
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// terminalWidth is w's width in columns, 0 when w is not a terminal.
func terminalWidth(w io.Writer) int {
	wd, _ := terminalSize(w)
	return wd
}

func terminalSize(w io.Writer) (width, height int) {
	f, ok := w.(*os.File)
	if !ok {
		return 0, 0
	}
	wd, ht, err := term.GetSize(int(f.Fd()))
	if err != nil {
		return 0, 0
	}
	return wd, ht
}

func newStopCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "stop [flags]",
		Short: "Drain every generation, then make the coordinator exit",
		Long: `Tell the coordinator to stop, as SIGTERM or SIGINT to it would: every
generation drains (up to --drain-timeout, then it is killed), then the
coordinator exits. stop returns once it has.`,
		Example: `  rollover stop
  rollover --name web stop`,
		Annotations: map[string]string{"exit": `  0  stopped
  1  refused (permission denied)
` + exitCodesClient},
		Args:              noArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := g.call(wire.Msg{Type: wire.TypeStop}, nil); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "stopped: every generation drained")
			return nil
		},
	}
}
