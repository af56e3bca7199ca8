package tests

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
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

// BenchmarkRolloverIdle measures a rollover of an idle service from the new
// generation becoming active to the old one gone. The figure to reach: a p50
// of at most the drain grace plus 100ms, which tests/bench.sh (make bench)
// checks; over-budget counts the single rollovers beyond it.
func BenchmarkRolloverIdle(b *testing.B) {
	const grace, slack = 100 * time.Millisecond, 100 * time.Millisecond
	dir := shortDir(b)
	svc, err := harness.Start(context.Background(), harness.Config{
		Rollover: filepath.Join(bin, "rollover"), App: filepath.Join(bin, "demoapp"), Dir: dir, DrainGrace: grace,
	})
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
