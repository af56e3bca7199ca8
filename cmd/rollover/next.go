package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// launchOpts are --ready, --addr and --drain-signal, for start and next.
// Empty values mean the coordinator's defaults (next: the active
// generation's).
type launchOpts struct {
	ready, addr, drainSignal string
	instances                int
}

func (l *launchOpts) add(f *pflag.FlagSet, next bool) {
	dflt := func(s string) string {
		if next {
			return "the active generation's"
		}
		return s
	}
	f.StringVar(&l.ready, "ready", "", "how the app reports ready (`MODE`): library (links github.com/rollover-sh/rollover), notify (READY=1 on $NOTIFY_SOCKET), listen (listens on --addr) (default "+dflt("library")+")")
	f.StringVar(&l.addr, "addr", "", "`HOST:PORT` the app listens on; needed by --ready=listen, and tells when an app without the library has left the port")
	f.StringVar(&l.drainSignal, "drain-signal", "", "`SIGNAL` that makes an app without the library drain; nginx wants SIGQUIT (default "+dflt("SIGTERM")+")")
	f.IntVar(&l.instances, "instances", 0, "`N` processes per generation, each binding the port on its own with $ROLLOVER_INSTANCE set to 0..N-1; new connections spread over them (default "+dflt("1")+")")
}

func (l *launchOpts) resolve() (coordinator.Launch, error) {
	var out coordinator.Launch
	if l.drainSignal != "" {
		s, err := coordinator.ParseSignal(l.drainSignal)
		if err != nil {
			return out, err
		}
		out.DrainSignal = s
	}
	switch l.ready {
	case "", coordinator.ReadyLibrary, coordinator.ReadyNotify, coordinator.ReadyListen:
	default:
		return out, usageErr("--ready must be library, notify or listen, not %q", l.ready)
	}
	if l.addr != "" {
		if _, _, err := net.SplitHostPort(l.addr); err != nil {
			return out, usageErr("--addr must be HOST:PORT, not %q", l.addr)
		}
	}
	if l.instances < 0 || l.instances > 64 {
		return out, usageErr("--instances must be 1 to 64, not %d", l.instances)
	}
	out.Ready, out.Addr, out.Instances = l.ready, l.addr, l.instances
	return out, nil
}

func fixedCompletions(words ...string) func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
	return func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return words, cobra.ShellCompDirectiveNoFileComp
	}
}

type nextOpts struct {
	wait, asJSON bool
	expect       int
	launch       launchOpts
	safe         safeOpts
}

// newNextCmd is `next` or, with typ rollback, `rollback`.
func newNextCmd(g *globals, typ string) *cobra.Command {
	o := &nextOpts{}
	exit := `  0  the new generation is active and baked (with --wait: and the old one has
     exited, cutting nothing)
  1  the rollover failed (the old generation keeps serving; the reason and the
     new generation's last stderr lines follow), was rolled back during its
     bake or canary, or was refused: another rollover is in progress,
     --expect-generation did not match, permission denied%s
` + exitCodesClient + `
  4  with --wait: the old generation's drain cut connections or requests at
     --drain-timeout (the report line says how many)`
	c := &cobra.Command{
		Use:   "next [flags] [--] [CMD [ARGS...]]",
		Short: "Roll over to a new command line (default: the active one again)",
		Long: `Roll over: start generation N+1 with CMD (default: the active generation's
command line again, e.g. after overwriting its binary), wait until it is
ready, steer every new connection to it, then drain generation N. Each phase
is printed as it happens. Until N+1 is active, any failure ends N+1 and
leaves N serving untouched.

After the steer comes the bake (the coordinator's --bake, or --bake here):
N keeps its listener, steered away, while its connections already drain; if
N+1 exits or fails its health (5xx and panics, --health-url) in that time,
N takes the port back at once and next exits 1. With --canary, N+1 first
gets only a share of new connections per step (--step each, or until
` + "`rollover promote`" + `); every step is judged the same way.

With --wait, also wait until N has drained and exited; in a terminal the
drain is one progress line that updates in place. The last line is the
rollover's loss report: what its drain deadline cut, the 5xx and panics of
each generation, and the kernel's TcpExt counters over the rollover.

Flags end at CMD (or at --). A relative CMD path is made absolute here,
since the coordinator may run in another directory. How the new generation
reports ready and drains (--ready, --addr, --drain-signal) carries over from
the active generation unless given.`,
		Example: `  rollover next -- ./api-v2 -addr :8080
  rollover next --wait                       # the same command line again
  rollover --name web next --wait --json     # one JSON event per line
  rollover next --expect-generation 4 -- ./api-v3 -addr :8080
  rollover next --bake 30s --health-url http://127.0.0.1:8080/healthz -- ./api-v2
  rollover next --canary 5%,25%,100% --step 1m -- ./api-v2 -addr :8080
  rollover next --canary 10% -- ./api-v2 -addr :8080   # then: rollover promote`,
		Annotations: map[string]string{"exit": fmt.Sprintf(exit, ""), "signals": signalsText},
		ValidArgsFunction: func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
			return nil, cobra.ShellCompDirectiveDefault
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runNext(g, o, typ, cmd, args)
		},
	}
	if typ == wire.TypeRollback {
		c.Use = "rollback [flags]"
		c.Short = "Roll over to the previous generation's command line"
		c.Long = `Roll over to the command line of the generation before the active one, the
way ` + "`rollover next`" + ` does: the previous command starts as a new generation,
becomes active once ready, and the active one drains. Right after "started
gen N", a line names the command line it restores.`
		c.Example = `  rollover rollback --wait`
		c.Annotations["exit"] = fmt.Sprintf(exit, ", no previous generation")
		c.Args = noArgs
		c.ValidArgsFunction = cobra.NoFileCompletions
	}
	f := c.Flags()
	f.SetInterspersed(false)
	f.SortFlags = false
	f.BoolVar(&o.wait, "wait", false, "also wait until the old generation has drained and exited")
	f.BoolVar(&o.asJSON, "json", false, "print the events as JSON lines")
	f.IntVar(&o.expect, "expect-generation", 0, "roll over only if generation `N` is still the active one (a compare-and-swap for deploy scripts)")
	if typ == wire.TypeNext {
		o.launch.add(f, true)
		o.safe.addNext(f)
		_ = c.RegisterFlagCompletionFunc("ready", fixedCompletions(coordinator.ReadyLibrary, coordinator.ReadyNotify, coordinator.ReadyListen))
		_ = c.RegisterFlagCompletionFunc("drain-signal", fixedCompletions("SIGTERM", "SIGQUIT", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH"))
	}
	_ = c.RegisterFlagCompletionFunc("expect-generation", cobra.NoFileCompletions)
	return c
}

func runNext(g *globals, o *nextOpts, typ string, cmd *cobra.Command, argv []string) error {
	if cmd.Flags().Changed("expect-generation") && o.expect < 1 {
		return usageErr("--expect-generation must be a generation number (1 or more), not %d", o.expect)
	}
	req := wire.Msg{Type: typ, Wait: o.wait, ExpectGeneration: o.expect}
	if typ == wire.TypeNext {
		if err := o.safe.nextRequest(cmd.Flags(), &req); err != nil {
			return err
		}
		launch, err := o.launch.resolve()
		if err != nil {
			return err
		}
		req.Ready, req.Addr, req.Instances = launch.Ready, launch.Addr, launch.Instances
		if launch.DrainSignal != 0 {
			req.DrainSignal = wire.Signal(launch.DrainSignal)
		}
	}
	if len(argv) > 0 && strings.ContainsRune(argv[0], '/') && !filepath.IsAbs(argv[0]) {
		// The coordinator runs elsewhere; a relative path means ours.
		abs, err := filepath.Abs(argv[0])
		if err != nil {
			return err
		}
		argv[0] = abs
	}
	req.Argv = argv
	stdout := cmd.OutOrStdout()
	if o.asJSON {
		enc := json.NewEncoder(stdout)
		_, err := g.call(req, restores(typ, g, func(e wire.Event) { _ = enc.Encode(e) }))
		return err
	}
	p := newPhasePrinter(stdout, o.wait && isTerminal(stdout))
	_, err := g.call(req, restores(typ, g, p.event))
	p.finish()
	if err == nil {
		fmt.Fprintln(stdout, "done")
	}
	return err
}

// restores wraps onEvent for a rollback: right after "started gen N" it
// adds an info event naming the command line gen N runs, the previous
// generation's, which only the coordinator knew. Its status still lists
// gen N then; if gen N is already gone, the failure says so instead.
func restores(typ string, g *globals, onEvent func(wire.Event)) func(wire.Event) {
	if typ != wire.TypeRollback {
		return onEvent
	}
	return func(e wire.Event) {
		onEvent(e)
		if e.Phase != wire.PhaseStarted {
			return
		}
		st, err := g.status()
		if err != nil {
			return
		}
		for _, g := range st.Generations {
			if g.Generation == e.Generation {
				onEvent(wire.Event{Phase: wire.PhaseInfo, Generation: g.Generation,
					Text: fmt.Sprintf("gen %d restores the previous command line: %s", g.Generation, strings.Join(g.Argv, " "))})
			}
		}
	}
}

// phasePrinter prints a rollover's events one line each. In live mode (a
// terminal, with --wait) the drain is one line redrawn in place with \r:
// a bar of the old generation's connections falling to zero.
type phasePrinter struct {
	w    io.Writer
	live bool

	mu    sync.Mutex
	drain *drainProgress // the live line, nil when none is shown
	stop  chan struct{}
	done  sync.WaitGroup
}

type drainProgress struct {
	gen             int
	inflight, conns int64
	maxConns        int64
	since           time.Time
}

func newPhasePrinter(w io.Writer, live bool) *phasePrinter {
	p := &phasePrinter{w: w, live: live, stop: make(chan struct{})}
	if live {
		// Redraw the elapsed time between the coordinator's updates,
		// which come only when the counts change.
		p.done.Add(1)
		go func() {
			defer p.done.Done()
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					p.mu.Lock()
					p.redraw()
					p.mu.Unlock()
				case <-p.stop:
					return
				}
			}
		}()
	}
	return p
}

func (p *phasePrinter) event(e wire.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.live {
		fmt.Fprintln(p.w, eventLine(e))
		return
	}
	switch {
	case e.Phase == wire.PhaseDraining:
		if p.drain == nil || p.drain.gen != e.Generation {
			p.endLine()
			p.drain = &drainProgress{gen: e.Generation, since: time.Now()}
		}
		if e.Stats != nil {
			p.drain.inflight, p.drain.conns = e.Stats.Inflight, e.Stats.Connections
			p.drain.maxConns = max(p.drain.maxConns, e.Stats.Connections)
		}
		p.redraw()
	case e.Phase == wire.PhaseDrained && p.drain != nil && p.drain.gen == e.Generation:
		p.drain.inflight, p.drain.conns = 0, 0
		p.redraw()
		fmt.Fprintln(p.w)
		fmt.Fprintln(p.w, eventLine(e))
		p.drain = nil
	default:
		// A line of its own above the live one.
		if p.drain != nil {
			fmt.Fprint(p.w, "\r\x1b[K")
		}
		fmt.Fprintln(p.w, eventLine(e))
		p.redraw()
	}
}

// eventLine is e in the coordinator's words, except the bake: a setting,
// often seconds or an hour, written as fmtDur writes it ("baking gen 3 for
// 1h"). The measured times (ready, drained, the report's window) stay in
// milliseconds.
func eventLine(e wire.Event) string {
	if e.Phase == wire.PhaseBaking {
		return fmt.Sprintf("baking gen %d for %s", e.Generation, fmtDur(millis(e.Millis)))
	}
	return e.String()
}

// redraw rewrites the live line; p.mu is held.
func (p *phasePrinter) redraw() {
	if p.drain == nil {
		return
	}
	line := p.drain.line(time.Now())
	if w := terminalWidth(p.w); w > 0 && len(line) >= w {
		line = line[:w-1]
	}
	fmt.Fprint(p.w, "\r\x1b[K"+line)
}

// endLine leaves the live line as it stands; p.mu is held.
func (p *phasePrinter) endLine() {
	if p.drain != nil {
		fmt.Fprintln(p.w)
		p.drain = nil
	}
}

// finish stops the redraws and ends a live line.
func (p *phasePrinter) finish() {
	close(p.stop)
	p.done.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLine()
}

// line is the drain progress as a person reads it, e.g.
// "draining gen 3: 2 in flight, 5 connections [###############-----]  5/20  1.2s".
func (d *drainProgress) line(now time.Time) string {
	return fmt.Sprintf("draining gen %d: %d in flight, %d connections %s %d/%d  %s",
		d.gen, d.inflight, d.conns, bar(d.maxConns-d.conns, d.maxConns, 20), d.conns, d.maxConns,
		fmtDur(now.Sub(d.since)))
}

// bar draws done of total as [####----]; total 0 is a full bar.
func bar(done, total int64, width int) string {
	n := width
	if total > 0 {
		n = int(done * int64(width) / total)
	}
	n = min(max(n, 0), width)
	return "[" + strings.Repeat("#", n) + strings.Repeat("-", width-n) + "]"
}
