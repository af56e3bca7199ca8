// Command rollover-stress starts a coordinator with the demo app on a free
// loopback port, puts load on it, rolls it over again and again between two
// versions, and prints a tally: rollovers, requests, failures by kind,
// requests/s, latency, ready and drain times. `make demo` and `make bench`
// run it; the end-to-end tests run it inside network namespaces.
//
// A failure is any request that did not get a complete 2xx answer.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "rollover-stress: %v\n", err)
		var fe failedError
		if errors.As(err, &fe) {
			os.Exit(1)
		}
		os.Exit(2)
	}
}

// failedError means the run completed but something failed.
type failedError struct{ msg string }

func (e failedError) Error() string { return e.msg }

// options are the command line of rollover-stress.
type options struct {
	rollover, app       string
	rollovers, clients  int
	interval            time.Duration
	keepAlive, wait     bool
	naive, asJSON       bool
	grace, drainTimeout time.Duration
	bake                time.Duration
	slow                int
	loadCmd             string
	verbose, netns      bool
	migrate             int
}

func parseOptions(args []string) (*options, error) {
	self, _ := os.Executable()
	bin := filepath.Dir(self)
	var o options
	fs := flag.NewFlagSet("rollover-stress", flag.ContinueOnError)
	fs.StringVar(&o.rollover, "rollover", filepath.Join(bin, "rollover"), "rollover binary")
	fs.StringVar(&o.app, "app", filepath.Join(bin, "demoapp"), "demoapp binary")
	fs.IntVar(&o.rollovers, "rollovers", 6, "number of rollovers")
	fs.DurationVar(&o.interval, "interval", 500*time.Millisecond, "start a rollover this often")
	fs.IntVar(&o.clients, "clients", 32, "concurrent clients")
	fs.BoolVar(&o.keepAlive, "keepalive", false, "clients reuse connections (default: a new connection per request)")
	fs.BoolVar(&o.wait, "wait", false, "next --wait: measure each old generation's drain")
	fs.BoolVar(&o.naive, "naive", false, "naive hand-over (close + Shutdown), to compare")
	fs.DurationVar(&o.grace, "drain-grace", 100*time.Millisecond, "coordinator --drain-grace (loopback RTT is ~0)")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 10*time.Second, "coordinator --drain-timeout")
	fs.DurationVar(&o.bake, "bake", 200*time.Millisecond, "coordinator --bake (0: none)")
	fs.BoolVar(&o.asJSON, "json", false, "print the report as JSON (progress goes to stderr)")
	fs.IntVar(&o.slow, "slow", 0, "clients that keep a 1s request in flight across the rollovers")
	fs.StringVar(&o.loadCmd, "load-cmd", "", `drive load with this command instead (e.g. "wrk -t2 -c32 -d20s {url}"); split on spaces, quotes group, no shell; rollovers run until it exits`)
	fs.BoolVar(&o.verbose, "v", false, "print a line per rollover and the coordinator's log")
	fs.BoolVar(&o.netns, "netns-setup", false, "bring lo up first (run inside `unshare -n`)")
	fs.IntVar(&o.migrate, "migrate-req", -1, "set net.ipv4.tcp_migrate_req to 0 or 1 first (in a namespace of your own)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return &o, nil
}

// setUpNetwork brings lo up and sets tcp_migrate_req, as asked, in the
// network namespace this runs in.
func setUpNetwork(o *options) error {
	if o.netns {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return fmt.Errorf("ip link set lo up: %v: %s", err, strings.TrimSpace(string(out)))
		}
	}
	if o.migrate >= 0 {
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte(fmt.Sprint(o.migrate)), 0o644); err != nil {
			return fmt.Errorf("set tcp_migrate_req: %w", err)
		}
	}
	return nil
}

func run(args []string) error {
	o, err := parseOptions(args)
	if err != nil {
		return err
	}
	if err := setUpNetwork(o); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "rs")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var logw io.Writer
	if o.verbose {
		logw = os.Stderr
	}
	svc, err := harness.Start(ctx, harness.Config{
		Rollover: o.rollover, App: o.app, Dir: dir,
		DrainGrace: o.grace, DrainTimeout: o.drainTimeout, Naive: o.naive, Log: logw, Bake: bakeFlag(o.bake),
	})
	if err != nil {
		return err
	}
	defer svc.Kill()
	handover := "steered hand-over"
	if o.naive {
		handover = "NAIVE hand-over (close + Shutdown)"
	}
	if o.loadCmd != "" {
		fmt.Printf("demoapp on %s: %s, a rollover every %v while it runs: %s\n", svc.Addr, handover, o.interval, o.loadCmd)
		return external(ctx, svc, o.loadCmd, o.interval, o.drainTimeout)
	}
	return stress(ctx, svc, o, handover)
}

// stress rolls svc over under the load of our own clients, stops it, and
// prints the report.
func stress(ctx context.Context, svc *harness.Service, o *options, handover string) error {
	var progress io.Writer = os.Stdout
	if o.asJSON {
		progress = os.Stderr
	}
	mode := "new connection per request"
	if o.keepAlive {
		mode = "keep-alive"
	}
	if !o.asJSON {
		fmt.Printf("demoapp on %s: %d clients, %s, %s, %d rollovers every %v\n", svc.Addr, o.clients, mode, handover, o.rollovers, o.interval)
	}
	rep, err := harness.Stress(ctx, svc, harness.StressConfig{
		Rollovers: o.rollovers, Interval: o.interval, Wait: o.wait, Progress: progress, Slow: o.slow,
		Load: load.Options{Clients: o.clients, KeepAlive: o.keepAlive},
	})
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), o.drainTimeout+10*time.Second)
	defer cancel()
	stopErr := svc.Stop(sctx)
	left := harness.WaitGone(svc.PIDs(), 5*time.Second)
	if o.asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		fmt.Print(rep.String())
	}
	switch {
	case stopErr != nil:
		return failedError{fmt.Sprintf("stop: %v", stopErr)}
	case len(left) > 0:
		return failedError{fmt.Sprintf("processes left behind: %v", left)}
	case rep.Failed > 0 || rep.Load.Failures > 0 || rep.Slow.Failures > 0:
		return failedError{fmt.Sprintf("%d rollovers and %d requests failed", rep.Failed, rep.Load.Failures+rep.Slow.Failures)}
	}
	return nil
}

// external rolls svc over every interval while a load tool no one here wrote
// (wrk, ab) runs against it, then prints the tool's own verdict.
func external(ctx context.Context, svc *harness.Service, line string, interval, drainTimeout time.Duration) error {
	argv := splitArgs(strings.ReplaceAll(line, "{url}", "http://"+svc.Addr+"/"))
	if len(argv) == 0 {
		return fmt.Errorf("-load-cmd is empty")
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	ok, failed := 0, 0
	t := time.NewTicker(interval)
	defer t.Stop()
	var loadErr error
loop:
	for {
		select {
		case loadErr = <-done:
			break loop
		case <-t.C:
			if _, err := svc.Next(ctx, []string{"v2", "v1"}[(ok+failed)%2], false); err != nil {
				failed++
				fmt.Fprintf(os.Stderr, "rollover failed: %v\n", err)
			} else {
				ok++
			}
		}
	}
	fmt.Printf("rollovers during the run: %d ok, %d failed\n", ok, failed)
	sctx, cancel := context.WithTimeout(context.Background(), drainTimeout+10*time.Second)
	defer cancel()
	if err := svc.Stop(sctx); err != nil {
		return failedError{fmt.Sprintf("stop: %v", err)}
	}
	if loadErr != nil {
		return failedError{fmt.Sprintf("%s: %v", argv[0], loadErr)}
	}
	if failed > 0 {
		return failedError{fmt.Sprintf("%d rollovers failed", failed)}
	}
	return nil
}

// splitArgs splits a command line on spaces; single or double quotes group
// words ("-H 'Connection: close'"). There is no shell and no escaping.
func splitArgs(line string) []string {
	var out []string
	var cur strings.Builder
	var quote rune
	inWord := false
	for _, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out
}

// bakeFlag maps -bake to harness.Config.Bake, where 0 means its default.
func bakeFlag(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}
