package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// startApp runs demoapp standalone (library) or with -plain (net/http only)
// and waits until it answers.
func startApp(b *testing.B, plain bool) string {
	b.Helper()
	port, err := harness.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := []string{"-addr", addr}
	if plain {
		args = append(args, "-plain")
	}
	cmd := exec.Command(filepath.Join(bin, "demoapp"), args...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return addr
		}
		if time.Now().After(deadline) {
			b.Fatalf("demoapp did not answer: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkOverhead compares the demo app's requests/s under the library with
// the same handler on plain net/http. Each iteration is a pair of 1s rounds,
// one per server, back to back and in alternating order, and the figure is
// the median of the pairs' ratios, so the machine's drift hits both alike.
// The figure to reach: a library/plain ratio of at least 0.97, which
// tests/bench.sh (make bench) checks.
func BenchmarkOverhead(b *testing.B) {
	for _, ka := range []bool{true, false} {
		b.Run(fmt.Sprintf("keepalive=%v", ka), func(b *testing.B) {
			plain, lib := startApp(b, true), startApp(b, false)
			measure := func(addr string) float64 {
				res, err := load.Run(context.Background(), load.Options{
					URL: "http://" + addr + "/", Clients: 32, KeepAlive: ka, Duration: time.Second,
				})
				if err != nil {
					b.Fatal(err)
				}
				if res.Failures > 0 {
					b.Fatalf("%d failed requests: %v", res.Failures, res.Samples)
				}
				return res.RPS()
			}
			measure(plain) // warm up both
			measure(lib)
			var plainRPS, libRPS, ratios []float64
			for i := 0; i < b.N; i++ {
				var p, l float64
				if i%2 == 0 {
					p, l = measure(plain), measure(lib)
				} else {
					l, p = measure(lib), measure(plain)
				}
				plainRPS, libRPS, ratios = append(plainRPS, p), append(libRPS, l), append(ratios, l/p)
			}
			b.ReportMetric(medianF(plainRPS), "plain-req/s")
			b.ReportMetric(medianF(libRPS), "library-req/s")
			b.ReportMetric(medianF(ratios), "ratio")
		})
	}
}

func medianF(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// startBenchService starts a coordinator with demoapp v1 (cfg with this
// run's binaries and a private directory) and stops it at the end.
func startBenchService(b *testing.B, cfg harness.Config) *harness.Service {
	cfg.Rollover, cfg.App, cfg.Dir = filepath.Join(bin, "rollover"), filepath.Join(bin, "demoapp"), testproc.ShortDir(b)
	svc, err := harness.Start(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := svc.Stop(ctx); err != nil {
			b.Error(err)
		}
		svc.Kill()
	})
	return svc
}

// BenchmarkRolloverIdle measures a rollover of an idle service from the new
// generation becoming active to the old one gone. The figure to reach: a p50
// of at most the drain grace plus 100ms, which tests/bench.sh (make bench)
// checks; over-budget counts the single rollovers beyond it.
func BenchmarkRolloverIdle(b *testing.B) {
	const grace, slack = 100 * time.Millisecond, 100 * time.Millisecond
	svc := startBenchService(b, harness.Config{DrainGrace: grace})
	var drains []float64
	over := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r, err := svc.Next(context.Background(), []string{"v2", "v1"}[i%2], true)
		if err != nil {
			b.Fatal(err)
		}
		drains = append(drains, float64(r.Drain.Milliseconds()))
		if r.Drain > grace+slack {
			over++
		}
	}
	b.StopTimer()
	b.ReportMetric(medianF(drains), "drain-ms/p50")
	b.ReportMetric(float64(grace.Milliseconds()), "grace-ms")
	b.ReportMetric(float64((grace + slack).Milliseconds()), "budget-ms")
	b.ReportMetric(float64(over), "over-budget")
}

// BenchmarkTimeToNewCode measures, per iteration, the time from a request
// for new code to its first answer, three ways: a rollover through SIGHUP
// to the coordinator, a rollover through `rollover next` (the CLI as a user
// runs it, from its fork), and the floor: fork + exec of the same demoapp
// binary, standalone, until it answers on a port of its own. A client opens
// new connections back to back on loopback until an answer names the new
// generation (or, for the floor, the new version). The figures are the
// medians (p10, p90) of each, in ms, and the ratios of the rollovers'
// medians to the floor's, which tests/bench.sh (make bench) checks: SIGHUP
// at most 1.3, next at most 1.6.
func BenchmarkTimeToNewCode(b *testing.B) {
	svc := startBenchService(b, harness.Config{})
	var floor, hup, next []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		floor = append(floor, ms(forkToAnswer(b, fmt.Sprintf("f%d", i))))
		hup = append(hup, ms(rollToAnswer(b, svc, func() *exec.Cmd {
			if err := svc.Signal(syscall.SIGHUP); err != nil {
				b.Fatal(err)
			}
			return nil
		})))
		next = append(next, ms(rollToAnswer(b, svc, func() *exec.Cmd {
			args := append([]string{"next", "--socket", svc.Socket, "--bake", "0", "--"}, svc.AppArgv([]string{"v2", "v1"}[i%2])...)
			cmd := exec.Command(filepath.Join(bin, "rollover"), args...)
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			return cmd
		})))
	}
	b.StopTimer()
	for _, f := range []struct {
		name string
		ms   []float64
	}{{"fork", floor}, {"sighup", hup}, {"next", next}} {
		b.ReportMetric(percentile(f.ms, 50), f.name+"-ms/p50")
		b.ReportMetric(percentile(f.ms, 10), f.name+"-ms/p10")
		b.ReportMetric(percentile(f.ms, 90), f.name+"-ms/p90")
	}
	base := percentile(floor, 50)
	b.ReportMetric(percentile(hup, 50)/base, "sighup/fork")
	b.ReportMetric(percentile(next, 50)/base, "next/fork")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// percentile is the p-th percentile of xs, nearest rank.
func percentile(xs []float64, p int) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}

// forkToAnswer starts demoapp standalone at version on a free port and
// returns the time from the fork to its first answer; then it stops it.
func forkToAnswer(b *testing.B, version string) time.Duration {
	port, err := harness.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(filepath.Join(bin, "demoapp"), "-addr", addr, "-version", version)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	at, err := firstAnswer(addr, func(r *http.Response) bool { return r.Header.Get("X-Demoapp-Version") == version })
	took := at.Sub(start)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		b.Fatal("standalone demoapp did not exit within 10s of SIGTERM")
	}
	if err != nil {
		b.Fatal(err)
	}
	return took
}

// rollToAnswer rolls svc over with trigger (which returns the CLI it
// started, if any) and returns the time from the trigger to the first
// answer of a newer generation than the active one; then it waits until the
// rollover is over and the old generation gone.
func rollToAnswer(b *testing.B, svc *harness.Service, trigger func() *exec.Cmd) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := svc.Status(ctx)
	if err != nil {
		b.Fatal(err)
	}
	old := st.Active
	start := time.Now()
	cli := trigger()
	at, err := firstAnswer(svc.Addr, func(r *http.Response) bool {
		n, _ := strconv.Atoi(r.Header.Get("X-Rollover-Generation"))
		return n > old
	})
	if cli != nil {
		if werr := cli.Wait(); werr != nil && err == nil {
			err = fmt.Errorf("rollover next: %w", werr)
		}
	}
	if err != nil {
		b.Fatal(err)
	}
	for {
		st, err := svc.Status(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if st.Active > old && !st.InProgress && len(st.Generations) == 1 {
			break
		}
		select {
		case <-ctx.Done():
			b.Fatalf("the rollover from gen %d did not end: %+v", old, st)
		case <-time.After(10 * time.Millisecond):
		}
	}
	return at.Sub(start)
}

// firstAnswer opens a new connection to addr after another, back to back,
// until an answer passes ok, and returns when that answer was read. It
// gives up after 10s or a million tries.
func firstAnswer(addr string, ok func(*http.Response) bool) (time.Time, error) {
	deadline := time.Now().Add(10 * time.Second)
	req := []byte("GET / HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n")
	var last error
	for range 1_000_000 {
		if time.Now().After(deadline) {
			break
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			last = err
			continue
		}
		_ = c.SetDeadline(time.Now().Add(time.Second))
		resp, err := answer(c, req)
		c.Close()
		if err != nil {
			last = err
			continue
		}
		if ok(resp) {
			return time.Now(), nil
		}
	}
	return time.Time{}, fmt.Errorf("no answer from new code on %s within 10s (last error: %v)", addr, last)
}

func answer(c net.Conn, req []byte) (*http.Response, error) {
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp, err
}
