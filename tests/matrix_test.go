package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// The failure matrix end to end: under load, every bad deploy fails with one
// clear line and exit 1, the active generation keeps answering (zero failed
// requests), nothing the bad deploys started is left, and the next good
// rollover works.
func TestFailureMatrixUnderLoad(t *testing.T) {
	svc := startService(t, harness.Config{ReadyTimeout: 2 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := testproc.ShortDir(t)
	notExec := filepath.Join(dir, "not-executable")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	crasher := filepath.Join(dir, "crasher")
	if err := os.WriteFile(crasher, []byte("#!/bin/sh\necho 'fatal: config /etc/api.yml missing' >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	runner := startLoad(t, svc, false)

	cases := []struct {
		name string
		argv []string
		want []string
	}{
		{"missing binary", []string{filepath.Join(dir, "api-v2")}, []string{"api-v2 does not exist"}},
		{"not executable", []string{notExec}, []string{"is not executable"}},
		{"a directory", []string{dir}, []string{"is a directory"}},
		{"exits before ready", []string{crasher}, []string{"exited before it was ready", "exit status 3", "fatal: config /etc/api.yml missing"}},
		{"never ready", []string{"/bin/sleep", "60"}, []string{"was not ready within 2s", "--ready-timeout"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := svc.Status(ctx)
			args := append([]string{"next", "--"}, tc.argv...)
			out, stderr, code, err := svc.CLI(ctx, args...)
			if err != nil {
				t.Fatal(err)
			}
			if code != 1 {
				t.Errorf("exit %d, want 1; stderr %q", code, stderr)
			}
			if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 1 {
				t.Errorf("stderr has %d lines, want one: %q", len(lines), stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("error %q does not say %q", stderr, w)
				}
			}
			after, err := svc.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if after.Active != before.Active || after.InProgress {
				t.Errorf("active %d→%d, in progress %v: the failed rollover changed the service", before.Active, after.Active, after.InProgress)
			}
			// Whatever the failed rollover started is gone.
			started := 0
			for _, line := range strings.Split(out, "\n") {
				if strings.HasPrefix(line, "started gen ") {
					var gen, pid int
					if _, err := fmtSscanf(line, &gen, &pid); err == nil {
						started++
						if left := harness.WaitGone([]int{pid}, 5*time.Second); len(left) > 0 {
							t.Errorf("gen %d (pid %d) of the failed rollover is still running", gen, pid)
						}
					}
				}
			}
			// A program that exists is spawned (and must then be gone).
			if spawned := !strings.Contains(tc.name, "binary") && !strings.Contains(tc.name, "not executable") && !strings.Contains(tc.name, "directory"); spawned && started != 1 {
				t.Errorf("next printed %d started lines, want 1: %q", started, out)
			}
		})
	}
	r, err := svc.Next(ctx, "v2", false)
	if err != nil {
		t.Fatalf("good rollover after the failures: %v", err)
	}
	if _, gen, _, err := svc.Get(ctx, "/"); err != nil || gen != itoa(r.Generation) {
		t.Fatalf("after the good rollover: gen %q, %v; want %d", gen, err, r.Generation)
	}
	requireNoFailures(t, runner.Stop())
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// fmtSscanf reads "started gen N (pid P)".
func fmtSscanf(line string, gen, pid *int) (int, error) {
	return fmt.Sscanf(line, "started gen %d (pid %d)", gen, pid)
}

func itoa(n int) string { return strconv.Itoa(n) }
