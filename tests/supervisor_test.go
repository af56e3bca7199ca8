package tests

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// supervisorPath is the shipped supervisord program.
const supervisorPath = "../deploy/supervisor/rollover-api.conf"

// supervisord runs the shipped program: `supervisorctl signal HUP` rolls it
// over three times under load with no failed request while the PID
// supervisord watches stays the same, and `supervisorctl stop` drains every
// generation and sees the coordinator exit 0.
func TestSupervisord(t *testing.T) {
	supervisord := needTool(t, "supervisord")
	supervisorctl := needTool(t, "supervisorctl")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	before := binProcesses()

	sock := testproc.ShortDir(t) // sockets: short paths
	logs := t.TempDir()
	ctl := filepath.Join(sock, "ctl.sock")
	addr := testproc.FreeAddr(t)
	appLog := filepath.Join(logs, "api.log")
	program := supervisorProgram(t, addr, ctl, appLog)
	conf := filepath.Join(logs, "supervisord.conf")
	// A private supervisord: its own socket, pid file and logs, so a system
	// one (the package may start it) is never involved.
	text := fmt.Sprintf(`[unix_http_server]
file=%[1]s/sv.sock
chmod=0700

[supervisord]
nodaemon=true
logfile=%[2]s/supervisord.log
pidfile=%[2]s/supervisord.pid
childlogdir=%[2]s
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%[1]s/sv.sock

%[3]s
`, sock, logs, program)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}

	svOut := &syncBuffer{}
	sv := exec.Command(supervisord, "-c", conf, "-n")
	sv.Dir = logs
	sv.Stdout, sv.Stderr = svOut, svOut
	if err := sv.Start(); err != nil {
		t.Fatal(err)
	}
	svExited := make(chan struct{})
	go func() { _ = sv.Wait(); close(svExited) }()
	seen := map[int]bool{} // every coordinator and generation pid seen
	t.Cleanup(func() {
		// Freeze supervisord so it restarts nothing, then kill what it runs.
		_ = sv.Process.Signal(syscall.SIGSTOP)
		tree := descendantsOf(sv.Process.Pid)
		_ = sv.Process.Kill()
		<-svExited
		for _, p := range tree {
			seen[p] = true
		}
		var pids []int
		for p := range seen {
			pids = append(pids, p)
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		if l := waitAlive(pids, 5*time.Second); len(l) > 0 {
			t.Errorf("processes left behind: %v", l)
		}
		if l := newBinProcesses(before); len(l) > 0 {
			t.Errorf("rollover or demoapp processes left behind: %v", l)
		}
		app, _ := os.ReadFile(appLog)
		checkOutput(t, "coordinator", string(app))
		if t.Failed() {
			t.Logf("supervisord output:\n%s", tailLines(svOut.String(), 40))
			t.Logf("coordinator log:\n%s", tailLines(string(app), 60))
		}
	})
	sctl := func(args ...string) (string, error) {
		c, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		out, err := exec.CommandContext(c, supervisorctl, append([]string{"-c", conf}, args...)...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	coordPID := func() int {
		t.Helper()
		out, err := sctl("pid", "api")
		pid, perr := strconv.Atoi(out)
		if err != nil || perr != nil || pid <= 0 {
			t.Fatalf("supervisorctl pid api: %q %v", out, err)
		}
		seen[pid] = true
		return pid
	}
	record := func(st wire.Status) {
		for _, g := range st.Generations {
			seen[g.PID] = true
		}
	}

	// RUNNING, and the app answers.
	waitUntil(t, 30*time.Second, svExited, "api RUNNING", func() error {
		out, err := sctl("status", "api")
		if strings.Contains(out, "RUNNING") {
			return nil
		}
		if strings.Contains(out, "FATAL") {
			t.Fatalf("supervisord gave up on api: %s", out)
		}
		return fmt.Errorf("%s (%v)", out, err)
	})
	pid := coordPID()
	st := waitStatus(t, ctx, ctl, svExited, func(st wire.Status) bool { return st.Active == 1 && !st.InProgress })
	record(st)
	if st.PID != pid {
		t.Errorf("the coordinator says pid %d, supervisord watches %d", st.PID, pid)
	}
	waitUntil(t, 10*time.Second, svExited, "the app answers", func() error {
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	})

	runner, err := load.Start(ctx, load.Options{URL: "http://" + addr + "/", Clients: 8, Duration: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer runner.Stop()
	waitServed := func(gen int) {
		t.Helper()
		waitUntil(t, 10*time.Second, svExited, fmt.Sprintf("generation %d answers the load", gen), func() error {
			if n := runner.Snapshot().ByGeneration[strconv.Itoa(gen)]; n == 0 {
				return fmt.Errorf("no answer from generation %d yet: %s", gen, runner.Snapshot())
			}
			return nil
		})
	}
	waitServed(1)

	for gen := 2; gen <= 4; gen++ {
		start := time.Now()
		if out, err := sctl("signal", "HUP", "api"); err != nil || !strings.Contains(out, "signalled") {
			t.Fatalf("supervisorctl signal HUP api: %q %v", out, err)
		}
		st := waitStatus(t, ctx, ctl, svExited, func(st wire.Status) bool {
			if st.Active > gen {
				t.Fatalf("one SIGHUP made more than one rollover: generation %d active, want %d", st.Active, gen)
			}
			return st.Active == gen && !st.InProgress
		})
		record(st)
		t.Logf("SIGHUP: generation %d active after %v", gen, time.Since(start).Round(time.Millisecond))
		waitServed(gen)
		if p := coordPID(); p != pid {
			t.Fatalf("after rollover to generation %d supervisord watches pid %d, was %d", gen, p, pid)
		}
	}

	res := runner.Stop()
	t.Logf("load: %s; by generation %v", res, res.ByGeneration)
	if res.Failures != 0 || res.OK == 0 {
		t.Errorf("load during the rollovers: %d failed of %d (%v), want 0 failed: %v", res.Failures, res.Requests, res.ByKind, res.Samples)
	}

	// Stop: SIGTERM to the coordinator alone, which drains every generation
	// and exits 0 well within stopwaitsecs.
	stopStart := time.Now()
	if out, err := sctl("stop", "api"); err != nil || !strings.Contains(out, "stopped") {
		t.Fatalf("supervisorctl stop api: %q %v", out, err)
	}
	t.Logf("supervisorctl stop api took %v", time.Since(stopStart).Round(time.Millisecond))
	var all []int
	for p := range seen {
		all = append(all, p)
	}
	if l := waitAlive(all, 5*time.Second); len(l) > 0 {
		t.Errorf("still running after supervisorctl stop: %v", l)
	}
	svLog := filepath.Join(logs, "supervisord.log")
	waitUntil(t, 10*time.Second, svExited, "supervisord logs api's exit", func() error {
		for _, l := range readLines(svLog) {
			if strings.Contains(l, "stopped: api (") {
				if !strings.Contains(l, "(exit status 0)") {
					t.Errorf("the coordinator did not exit 0 on SIGTERM: %s", l)
				}
				return nil
			}
		}
		return fmt.Errorf("no \"stopped: api\" line in %s", svLog)
	})

	if out, err := sctl("shutdown"); err != nil {
		t.Errorf("supervisorctl shutdown: %q %v", out, err)
	}
	select {
	case <-svExited:
	case <-time.After(30 * time.Second):
		t.Errorf("supervisord still running 30s after shutdown")
	}
}

// supervisorProgram returns the shipped [program:api] section with this
// run's binaries, app address, control socket and log file.
func supervisorProgram(t *testing.T, addr, ctl, logFile string) string {
	t.Helper()
	raw, err := os.ReadFile(supervisorPath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	i := strings.Index(text, "[program:api]")
	if i < 0 {
		t.Fatalf("%s has no [program:api]", supervisorPath)
	}
	section := text[i:]
	kv := map[string]string{}
	for line := range strings.SplitSeq(section, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, ";") {
			kv[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	for key, want := range map[string]string{
		"stopsignal": "TERM", "stopasgroup": "false", "killasgroup": "true",
		"autorestart": "true", "redirect_stderr": "true",
	} {
		if kv[key] != want {
			t.Errorf("%s: %s=%q, want %q", supervisorPath, key, kv[key], want)
		}
	}
	if _, ok := kv["stdout_logfile"]; ok {
		t.Fatalf("%s sets stdout_logfile; the test sets its own", supervisorPath)
	}
	// supervisord's SIGKILL must only ever end a coordinator that hangs.
	flags := startCommand(t, supervisorPath+": command", kv["command"])[2:]
	drain := durationFlag(t, flags, "drain-timeout", coordinator.DefaultDrainTimeout)
	kill := durationFlag(t, flags, "kill-grace", coordinator.DefaultKillGrace)
	if wait, err := strconv.Atoi(kv["stopwaitsecs"]); err != nil || time.Duration(wait)*time.Second <= drain+kill {
		t.Errorf("%s: stopwaitsecs=%q, want more than --drain-timeout + --kill-grace = %v", supervisorPath, kv["stopwaitsecs"], drain+kill)
	}

	for _, r := range []struct{ old, new string }{
		{"/usr/local/bin/rollover start --name api ", filepath.Join(bin, "rollover") + " start --socket " + ctl + " "},
		{"--metrics-addr 127.0.0.1:9754", `--metrics-addr ""`},
		{"/usr/local/bin/api -addr :8080", filepath.Join(bin, "demoapp") + " -addr " + addr + " -version v1"},
	} {
		if !strings.Contains(section, r.old) {
			t.Fatalf("%s has no %q to replace", supervisorPath, r.old)
		}
		section = strings.ReplaceAll(section, r.old, r.new)
	}
	return section + "\nstdout_logfile=" + logFile + "\n"
}

// waitUntil polls f every 20ms until it returns nil, for at most d; it fails
// with f's last error, or at once when stop is closed.
func waitUntil(t *testing.T, d time.Duration, stop <-chan struct{}, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %v", what, d, err)
		}
		select {
		case <-stop:
			t.Fatalf("%s: supervisord exited: %v", what, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
