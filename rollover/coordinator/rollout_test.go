package coordinator

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// The rollout's decisions, without processes.

func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		stage stage
		cause cause
		want  step
	}{
		{stageCanary, causeElapsed, goOn},
		{stageCanary, causePromote, proceed},
		{stageCanary, causeAbort, revert},
		{stageCanary, causeStop, revert}, // the old one is still active: it keeps the port
		{stageCanary, causeExited, revert},
		{stageCanary, causeHealth, revert},
		{stageCanary, causeHealthURL, revert},
		{stageBake, causeElapsed, proceed},
		{stageBake, causePromote, proceed},
		{stageBake, causeStop, proceed}, // the new one serves; the stop drains both
		{stageBake, causeAbort, revert},
		{stageBake, causeExited, revert},
		{stageBake, causeHealth, revert},
		{stageBake, causeHealthURL, revert},
	} {
		if got := decide(tc.stage, tc.cause); got != tc.want {
			t.Errorf("decide(%d, %d) = %d, want %d", tc.stage, tc.cause, got, tc.want)
		}
	}
}

func TestTakeBack(t *testing.T) {
	for _, tc := range []struct {
		steerable, released bool
		cmd                 string
		ok                  bool
	}{
		{true, true, wire.TypeResume, true}, // in the bake: it resumes
		{true, false, wire.TypePin, true},   // a canary: it only re-pins
		{false, true, "", false},            // the kernel gives it the port when the new socket leaves
		{false, false, "", false},
	} {
		if cmd, ok := takeBack(tc.steerable, tc.released); cmd != tc.cmd || ok != tc.ok {
			t.Errorf("takeBack(%v, %v) = %q %v, want %q %v", tc.steerable, tc.released, cmd, ok, tc.cmd, tc.ok)
		}
	}
}

// Each rollback counts once under its outcome and its reason; the label
// values come from the types.
func TestCauseCounts(t *testing.T) {
	for _, tc := range []struct {
		cause   cause
		reason  string
		outcome outcome
	}{
		{causeExited, "exited", outcomeRolledBack},
		{causeHealth, "health", outcomeRolledBack},
		{causeHealthURL, "health-url", outcomeRolledBack},
		{causeAbort, "abort", outcomeAborted},
		{causeStop, "abort", outcomeAborted},
	} {
		if r, o := tc.cause.reason(), tc.cause.outcome(); r != tc.reason || o != tc.outcome {
			t.Errorf("cause %d: reason %q outcome %v, want %q %v", tc.cause, r, o, tc.reason, tc.outcome)
		}
	}
	l := metricLabels()
	if want := []string{"ok", "failed", "rolled_back", "aborted"}; !slices.Equal(l.Results, want) {
		t.Errorf("results %q, want %q", l.Results, want)
	}
	if want := []string{"exited", "health", "health-url", "abort"}; !slices.Equal(l.Reasons, want) {
		t.Errorf("reasons %q, want %q", l.Reasons, want)
	}
	if want := []string{"starting", "ready", "active", "draining"}; !slices.Equal(l.States, want) {
		t.Errorf("states %q, want %q", l.States, want)
	}
	for _, s := range liveStates {
		if s != stateActive && parseState(s.String()) != s {
			t.Errorf("parseState(%q) = %v", s, parseState(s.String()))
		}
	}
}

func TestRollbackText(t *testing.T) {
	for _, tc := range []struct {
		v    verdict
		want string
	}{
		{verdict{causeExited, "exit status 2"}, "gen 3 exited (exit status 2) 7ms after activation"},
		{verdict{causeHealth, "3 of 20 responses"}, "gen 3 failed its health 7ms after activation: 3 of 20 responses"},
		{verdict{causeHealthURL, "GET /h: 500"}, "gen 3 failed the health probe 7ms after activation: GET /h: 500"},
		{verdict{causeAbort, "by hand"}, "gen 3 was aborted (by hand) 7ms after activation"},
		{verdict{causeStop, "the coordinator is stopping"}, "gen 3 was aborted (the coordinator is stopping) 7ms after activation"},
	} {
		if got := rollbackText(3, tc.v, humanDuration(7*time.Millisecond)+" after activation"); got != tc.want {
			t.Errorf("rollbackText(%+v) = %q, want %q", tc.v, got, tc.want)
		}
	}
}

// Below a second a person reads milliseconds ("7ms", not "0s").
func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		7 * time.Millisecond:                      "7ms",
		999 * time.Millisecond:                    "999ms",
		1234 * time.Millisecond:                   "1.2s",
		90*time.Second + 40*time.Millisecond:      "1m30s",
		7*time.Millisecond + 400*time.Microsecond: "7ms",
	} {
		if got := humanDuration(d); got != want {
			t.Errorf("humanDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestSameAddrs(t *testing.T) {
	if err := sameAddrs(1, []string{"0.0.0.0:80", "[::]:80"}, 2, []string{"[::]:80", "0.0.0.0:80"}); err != nil {
		t.Errorf("the same addresses refused: %v", err)
	}
	if err := sameAddrs(1, nil, 2, []string{"0.0.0.0:80"}); err != nil {
		t.Errorf("an app without the library refused: %v", err)
	}
	err := sameAddrs(1, []string{"0.0.0.0:80", "[::]:80"}, 2, []string{"0.0.0.0:80"})
	if err == nil || !strings.Contains(err.Error(), "gen 2 listens on 0.0.0.0:80, not on every address gen 1 serves (0.0.0.0:80, [::]:80): refused, gen 1 keeps serving") {
		t.Errorf("a missing address: %v", err)
	}
}
