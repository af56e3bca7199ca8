package tests

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// pane is a command running in a tmux pane of its own tmux server: a real
// terminal, read the way a person sees it (capture-pane).
type pane struct {
	t    *testing.T
	tmux string
	sock string
}

// startPane runs shellCmd with bash in a width x height tmux pane. When
// shellCmd ends, the pane shows "[exit N]" and stays. bash, like a
// person's shell, waits out a command that handles Ctrl-C itself.
func startPane(t *testing.T, width, height int, shellCmd string) *pane {
	t.Helper()
	dir := testproc.ShortDir(t)
	p := &pane{t: t, tmux: needTool(t, "tmux"), sock: filepath.Join(dir, "tmux")}
	conf := filepath.Join(dir, "tmux.conf")
	if err := os.WriteFile(conf, []byte("set -g default-shell "+needTool(t, "bash")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := shellCmd + `; echo "[exit $?]"; exec sleep 600`
	cmd := exec.Command(p.tmux, "-S", p.sock, "-f", conf, "new-session", "-d", "-s", "t",
		"-x", strconv.Itoa(width), "-y", strconv.Itoa(height), script)
	cmd.Env = append(os.Environ(), "TERM=xterm-256color")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tmux new-session: %v\n%s", err, out)
	}
	pidOut, err := exec.Command(p.tmux, "-S", p.sock, "display-message", "-p", "-t", "t", "#{pane_pid}").Output()
	if err != nil {
		t.Fatalf("tmux display-message: %v", err)
	}
	panePID, _ := strconv.Atoi(strings.TrimSpace(string(pidOut)))
	serverPID := 0
	if out, err := exec.Command(p.tmux, "-S", p.sock, "display-message", "-p", "#{pid}").Output(); err == nil {
		serverPID, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("screen at the end:\n%s", p.screen())
		}
		_ = exec.Command(p.tmux, "-S", p.sock, "kill-server").Run()
		pids := []int{}
		for _, pid := range []int{panePID, serverPID} {
			if pid > 0 {
				pids = append(pids, pid)
			}
		}
		if left := harness.WaitGone(pids, 5*time.Second); len(left) > 0 {
			for _, pid := range left {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			t.Errorf("tmux processes left after kill-server: %v", left)
		}
	})
	return p
}

// screen is what the pane shows now, trailing blank lines dropped.
func (p *pane) screen() string {
	out, err := exec.Command(p.tmux, "-S", p.sock, "capture-pane", "-p", "-t", "t").Output()
	if err != nil {
		return fmt.Sprintf("(capture-pane: %v)", err)
	}
	return strings.TrimRight(string(out), "\n ")
}

// waitScreen waits until the screen satisfies ok and returns it.
func (p *pane) waitScreen(what string, ok func(string) bool) string {
	p.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := p.screen()
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("the screen never showed %s:\n%s", what, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *pane) keys(keys ...string) {
	p.t.Helper()
	args := append([]string{"-S", p.sock, "send-keys", "-t", "t"}, keys...)
	if out, err := exec.Command(p.tmux, args...).CombinedOutput(); err != nil {
		p.t.Fatalf("tmux send-keys: %v\n%s", err, out)
	}
}

func shellQuote(args ...string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// matches reports whether some line of screen matches re.
func matches(re string) func(string) bool {
	r := regexp.MustCompile("(?m)" + re)
	return func(s string) bool { return r.MatchString(s) }
}

// `rollover status --watch` in a terminal redraws one screen in place: the
// generations with a bar for the draining one's connections falling to
// zero, and the rollovers it saw with their ready and drain times.
func TestStatusWatchInTmux(t *testing.T) {
	svc := startService(t, harness.Config{DrainTimeout: time.Minute})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conns := holdConns(t, svc.Addr, 4)
	p := startPane(t, 110, 24, shellQuote(filepath.Join(bin, "rollover"), "status", "--watch", "--interval", "200ms", "--socket", svc.Socket))
	p.waitScreen("gen 1 active and no rollover yet", func(s string) bool {
		return matches(`^1 +\d+ +active +0 +4 `)(s) && strings.Contains(s, "none yet")
	})

	if _, err := svc.Next(ctx, "v2", false); err != nil {
		t.Fatal(err)
	}
	screen := p.waitScreen("gen 1 draining 4 connections with an empty bar", func(s string) bool {
		return matches(`^1 +\d+ +draining +0 +4 +\S+ +\[-{20}\] 4/4`)(s) &&
			matches(`^2 +\d+ +active `)(s) &&
			matches(`^2 +1 +ok +≤\d+ms +draining \d`)(s)
	})
	t.Logf("status --watch, gen 1 draining:\n%s", screen)

	conns[0].Close()
	conns[1].Close()
	screen = p.waitScreen("half the bar", matches(`^1 +\d+ +draining +0 +2 +\S+ +\[#{10}-{10}\] 2/4`))
	t.Logf("status --watch, half drained:\n%s", screen)

	conns[2].Close()
	conns[3].Close()
	screen = p.waitScreen("gen 1 gone and its drain time", func(s string) bool {
		return !strings.Contains(s, "draining") && matches(`^2 +1 +ok +≤\d+ms +≤[\d.]+m?s `)(s)
	})
	t.Logf("status --watch, drained:\n%s", screen)
	if first, _, _ := strings.Cut(screen, "\n"); !strings.HasPrefix(first, "rollover status --watch") || strings.Count(screen, "rollover status --watch") != 1 {
		t.Errorf("the screen was not redrawn in place:\n%s", screen)
	}
	p.keys("C-c")
	p.waitScreen("exit 0 after Ctrl-C", matches(`\[exit 0\]$`))

	if _, err := svc.Status(ctx); err != nil { // record gen 2
		t.Fatal(err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// `rollover next --wait` in a terminal shows the drain as one progress line
// that updates in place.
func TestNextWaitProgressInTmux(t *testing.T) {
	svc := startService(t, harness.Config{DrainTimeout: time.Minute})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conns := holdConns(t, svc.Addr, 3)
	argv := append([]string{filepath.Join(bin, "rollover"), "next", "--wait", "--socket", svc.Socket, "--"}, svc.AppArgv("v2")...)
	p := startPane(t, 120, 20, shellQuote(argv...))
	p.waitScreen("the drain's progress line", func(s string) bool {
		return strings.Contains(s, "gen 2 active") && matches(`^draining gen 1: 0 in flight, 3 connections \[-{20}\] 3/3 `)(s)
	})
	conns[0].Close()
	screen := p.waitScreen("one connection fewer on the same line", matches(`^draining gen 1: 0 in flight, 2 connections \[#{6}-{14}\] 2/3 `))
	t.Logf("next --wait, draining:\n%s", screen)
	conns[1].Close()
	conns[2].Close()
	screen = p.waitScreen("the drain done", func(s string) bool {
		return matches(`^gen 1 drained after \d+ms$`)(s) && matches(`^done$`)(s) && matches(`^\[exit 0\]$`)(s)
	})
	t.Logf("next --wait, done:\n%s", screen)
	if n := strings.Count(screen, "draining gen 1:"); n != 1 {
		t.Errorf("%d draining lines, want the one progress line:\n%s", n, screen)
	}
	if !matches(`^draining gen 1: 0 in flight, 0 connections \[#{20}\] 0/3 `)(screen) {
		t.Errorf("the progress line does not end full:\n%s", screen)
	}
	for _, want := range []string{"started gen 2 (pid ", "ready after ", "gen 2 active", "gen 1 left the port"} {
		if !strings.Contains(screen, want) {
			t.Errorf("screen lacks %q:\n%s", want, screen)
		}
	}
	if _, err := svc.Status(ctx); err != nil { // record gen 2
		t.Fatal(err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// Without a terminal, status --watch prints plain lines: one per interval
// and one per phase it sees, no escape sequences; next --wait prints a
// line per phase, as before.
func TestStatusWatchPlain(t *testing.T) {
	svc := startService(t, harness.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "rollover"), "status", "--watch", "--interval", "100ms", "--socket", svc.Socket)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1000)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var seen []string
	expect := func(re string) {
		t.Helper()
		r := regexp.MustCompile(re)
		timeout := time.After(20 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("watch ended before %q:\n%s", re, strings.Join(seen, "\n"))
				}
				seen = append(seen, l)
				if strings.Contains(l, "\x1b") || strings.Contains(l, "\r") {
					t.Fatalf("terminal control in a plain line: %q", l)
				}
				if r.MatchString(l) {
					return
				}
			case <-timeout:
				t.Fatalf("no line %q:\n%s", re, strings.Join(seen, "\n"))
			}
		}
	}
	expect(`^\d\d:\d\d:\d\d active gen 1, rollover in progress: no \| gen 1 active pid \d+: 0 in flight, 0 connections, up \d+s$`)
	r, err := svc.Next(ctx, "v2", false)
	if err != nil {
		t.Fatal(err)
	}
	expect(fmt.Sprintf(`^\d\d:\d\d:\d\d gen 2 started \(pid %d\)$`, r.PID))
	expect(`^\d\d:\d\d:\d\d gen 2 active$`)
	expect(`^\d\d:\d\d:\d\d gen 1 drained after ≤\d+ms$`)
	expect(`^\d\d:\d\d:\d\d active gen 2, rollover in progress: no \| gen 2 active pid`)
	_ = cmd.Process.Signal(syscall.SIGINT)
	for l := range lines {
		seen = append(seen, l)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("watch after SIGINT: %v, want exit 0", err)
	}

	// next --wait in a pipe: one line per phase, no \r.
	out, stderr, code, err := svc.CLI(ctx, append([]string{"next", "--wait", "--"}, svc.AppArgv("v3")...)...)
	if err != nil || code != 0 {
		t.Fatalf("next --wait: exit %d %v: %s", code, err, stderr)
	}
	if !regexp.MustCompile(`^started gen 3 \(pid \d+\)\nready after \d+ms\ngen 3 active\n(baking gen 3 for \d+ms\n)?draining gen 2: \d+ in flight, \d+ connections\n(.*\n)*gen 2 drained after \d+ms\nreport: gen 3 replacing gen 2 [^\n]*\ndone\n$`).MatchString(out) || strings.Contains(out, "\r") {
		t.Errorf("next --wait in a pipe:\n%q", out)
	}
	if _, err := svc.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// Ctrl-C in the coordinator's terminal: the first one shows the drain at
// once, the second forces it; the coordinator exits 1 and its generation is
// gone.
func TestCtrlCInTmux(t *testing.T) {
	dir := testproc.ShortDir(t)
	socket := filepath.Join(dir, "ctl.sock")
	addr := testproc.FreeAddr(t)
	argv := []string{filepath.Join(bin, "rollover"), "start", "--socket", socket, "--metrics-addr", "",
		"--drain-grace", "100ms", "--drain-timeout", "1m", "--", filepath.Join(bin, "demoapp"), "-addr", addr}
	p := startPane(t, 160, 30, shellQuote(argv...))
	var gen int
	t.Cleanup(func() {
		if gen > 0 {
			_ = syscall.Kill(gen, syscall.SIGKILL)
		}
	})
	testproc.WaitFor(t, 20*time.Second, "gen 1 active", func() bool {
		st, err := ctlStatus(context.Background(), socket)
		if err != nil || st.Active != 1 || len(st.Generations) != 1 {
			return false
		}
		gen = st.Generations[0].PID
		return true
	})
	holdConns(t, addr, 1)
	p.keys("C-c")
	p.waitScreen("the drain line at once", func(s string) bool {
		return strings.Contains(s, `msg="draining 1 generation (max 1m0s; Ctrl-C again to force)"`)
	})
	if strings.Contains(p.screen(), "[exit ") || len(harness.Alive([]int{gen})) != 1 {
		t.Fatalf("the first Ctrl-C ended the coordinator or its generation:\n%s", p.screen())
	}
	p.keys("C-c")
	screen := p.waitScreen("the forced stop and exit 1", func(s string) bool {
		return strings.Contains(s, "forcing the stop") && matches(`^rollover: forced: `)(s) && matches(`^\[exit 1\]$`)(s)
	})
	t.Logf("Ctrl-C twice:\n%s", screen)
	if left := harness.WaitGone([]int{gen}, 5*time.Second); len(left) > 0 {
		t.Errorf("generation left: %v", left)
	}
}
