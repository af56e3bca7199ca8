package tests

import (
	"context"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
)

// A new generation that does not listen on every address the active one
// serves is refused before it gets a connection: next exits 1 with one line
// naming both address sets, the active generation keeps serving, and not one
// request fails.
func TestWrongAddressRefused(t *testing.T) {
	svc := startService(t, harness.Config{ListenAll: true}) // gen 1 on [::]:PORT
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, port, _ := net.SplitHostPort(svc.Addr)
	other := freePort(t)
	app := svc.AppArgv("v2")[0]
	var runner *load.Runner
	defer func() {
		if runner != nil {
			runner.Stop()
		}
	}()
	for _, tc := range []struct {
		name, addr string
		want       []string
		load       bool // count the requests of clients on the active address
	}{
		// No load here: 127.0.0.1:PORT is not in the wildcard's reuseport
		// group and the kernel prefers the exact address, so the refused
		// generation takes IPv4 clients from its bind until its drain, and
		// its own listener's close can reset one of them.
		{"one address of the wildcard", "127.0.0.1:" + port, []string{"gen 2 listens on 127.0.0.1:" + port, "not on every address gen 1 serves ([::]:" + port + ")", "gen 1 keeps serving"}, false},
		{"another port", "127.0.0.1:" + strconv.Itoa(other), []string{"listens on 127.0.0.1:" + strconv.Itoa(other), "([::]:" + port + ")"}, true},
	} {
		if tc.load && runner == nil {
			waitAlone(ctx, t, svc)
			r, err := load.Start(ctx, load.Options{URL: "http://" + svc.Addr + "/", Clients: 8, Duration: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			runner = r
		}
		_, stderr, code, err := svc.CLI(ctx, "next", "--", app, "-addr", tc.addr, "-version", "v2")
		if err != nil {
			t.Fatal(err)
		}
		line := strings.TrimSpace(stderr)
		if code != 1 || strings.Count(line, "\n") != 0 {
			t.Errorf("%s: next exited %d with %q, want exit 1 and one line", tc.name, code, stderr)
		}
		for _, w := range tc.want {
			if !strings.Contains(line, w) {
				t.Errorf("%s: %q lacks %q", tc.name, line, w)
			}
		}
		st, err := svc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Active != 1 {
			t.Fatalf("%s: active generation %d, want 1 still", tc.name, st.Active)
		}
	}
	waitAlone(ctx, t, svc) // the refused generations are gone
	res := runner.Stop()
	runner = nil
	t.Logf("load across the refused deploy on another port: %s", res)
	if res.OK == 0 || res.Failures != 0 {
		t.Errorf("%d requests failed (%v): %v", res.Failures, res.ByKind, res.Samples)
	}
	if len(res.ByGeneration) != 1 || res.ByGeneration["1"] == 0 {
		t.Errorf("requests reached generations %v, want only gen 1", res.ByGeneration)
	}
	// A deploy on the same addresses still rolls over.
	if _, err := svc.Next(ctx, "v2", false); err != nil {
		t.Fatalf("next on the right address: %v", err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// waitAlone waits until generation 1 is the only one left.
func waitAlone(ctx context.Context, t *testing.T, svc *harness.Service) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := svc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Generations) == 1 && st.Generations[0].Generation == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("generations after the refusals: %+v, want gen 1 alone", st.Generations)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
