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

	"github.com/rollover-sh/rollover/internal/harness"
	"github.com/rollover-sh/rollover/internal/load"
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
	asJSON := fs.Bool("json", false, "print the report as JSON (progress goes to stderr)")
	slow := fs.Int("slow", 0, "clients that keep a 1s request in flight across the rollovers")
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
		DrainGrace: *grace, DrainTimeout: *drainTimeout, Naive: *naive, Log: logw,
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
