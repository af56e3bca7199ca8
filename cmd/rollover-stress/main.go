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

func run(args []string) error {
	self, _ := os.Executable()
	bin := filepath.Dir(self)
	fs := flag.NewFlagSet("rollover-stress", flag.ContinueOnError)
	rolloverBin := fs.String("rollover", filepath.Join(bin, "rollover"), "rollover binary")
	appBin := fs.String("app", filepath.Join(bin, "demoapp"), "demoapp binary")
	rollovers := fs.Int("rollovers", 6, "number of rollovers")
	interval := fs.Duration("interval", 500*time.Millisecond, "start a rollover this often")
	clients := fs.Int("clients", 32, "concurrent clients")
	keepAlive := fs.Bool("keepalive", false, "clients reuse connections (default: a new connection per request)")
	wait := fs.Bool("wait", false, "next --wait: measure each old generation's drain")
	naive := fs.Bool("naive", false, "naive hand-over (close + Shutdown), to compare")
	grace := fs.Duration("drain-grace", 100*time.Millisecond, "coordinator --drain-grace (loopback RTT is ~0)")
	drainTimeout := fs.Duration("drain-timeout", 10*time.Second, "coordinator --drain-timeout")
	bake := fs.Duration("bake", 200*time.Millisecond, "coordinator --bake (0: none)")
	asJSON := fs.Bool("json", false, "print the report as JSON (progress goes to stderr)")
	slow := fs.Int("slow", 0, "clients that keep a 1s request in flight across the rollovers")
	loadCmd := fs.String("load-cmd", "", `drive load with this command instead (e.g. "wrk -t2 -c32 -d20s {url}"); split on spaces, quotes group, no shell; rollovers run until it exits`)
	verbose := fs.Bool("v", false, "print a line per rollover and the coordinator's log")
	netns := fs.Bool("netns-setup", false, "bring lo up first (run inside `unshare -n`)")
	migrate := fs.Int("migrate-req", -1, "set net.ipv4.tcp_migrate_req to 0 or 1 first (in a namespace of your own)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *netns {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			return fmt.Errorf("ip link set lo up: %v: %s", err, strings.TrimSpace(string(out)))
		}
	}
	if *migrate >= 0 {
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte(fmt.Sprint(*migrate)), 0o644); err != nil {
			return fmt.Errorf("set tcp_migrate_req: %w", err)
		}
	}
	dir, err := os.MkdirTemp("", "rs")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var logw io.Writer
	if *verbose {
		logw = os.Stderr
	}
	svc, err := harness.Start(ctx, harness.Config{
		Rollover: *rolloverBin, App: *appBin, Dir: dir,
		DrainGrace: *grace, DrainTimeout: *drainTimeout, Naive: *naive, Log: logw, Bake: bakeFlag(*bake),
	})
	if err != nil {
		return err
	}
	defer svc.Kill()
	var progress io.Writer = os.Stdout
	if *asJSON {
		progress = os.Stderr
	}
	mode := "new connection per request"
	if *keepAlive {
		mode = "keep-alive"
	}
	handover := "steered hand-over"
	if *naive {
		handover = "NAIVE hand-over (close + Shutdown)"
	}
	if *loadCmd != "" {
		fmt.Printf("demoapp on %s: %s, a rollover every %v while it runs: %s\n", svc.Addr, handover, *interval, *loadCmd)
		return external(ctx, svc, *loadCmd, *interval, *drainTimeout)
	}
	if !*asJSON {
		fmt.Printf("demoapp on %s: %d clients, %s, %s, %d rollovers every %v\n", svc.Addr, *clients, mode, handover, *rollovers, *interval)
	}
	rep, err := harness.Stress(ctx, svc, harness.StressConfig{
		Rollovers: *rollovers, Interval: *interval, Wait: *wait, Progress: progress, Slow: *slow,
		Load: load.Options{Clients: *clients, KeepAlive: *keepAlive},
	})
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(context.Background(), *drainTimeout+10*time.Second)
	defer cancel()
	stopErr := svc.Stop(sctx)
	left := harness.WaitGone(svc.PIDs(), 5*time.Second)
	if *asJSON {
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
