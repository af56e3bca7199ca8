package tests

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// templatePath is the shipped template unit, one coordinator per instance.
const templatePath = "../deploy/systemd/rollover@.service"

// The template passes `systemd-analyze verify` for an instance, and its
// settings and timeouts match the single unit's.
func TestSystemdTemplateVerifies(t *testing.T) {
	analyze := needTool(t, "systemd-analyze")
	raw, err := os.ReadFile(templatePath)
	if err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(string(raw), "/usr/local/bin/rollover ", filepath.Join(bin, "rollover")+" ")
	dir := t.TempDir()
	envDir := filepath.Join(dir, "etc")
	if err := os.Mkdir(envDir, 0o755); err != nil {
		t.Fatal(err)
	}
	unit = strings.ReplaceAll(unit, "/etc/rollover/%i.env", filepath.Join(envDir, "%i.env"))
	if err := os.WriteFile(filepath.Join(envDir, "web.env"), []byte("ROLLOVER_METRICS_ADDR=127.0.0.1:9755\nROLLOVER_COMMAND="+filepath.Join(bin, "demoapp")+" -addr :8081\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tmpl := filepath.Join(dir, "rollover@.service")
	if err := os.WriteFile(tmpl, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	broken := filepath.Join(dir, "rollover-broken@.service")
	if err := os.WriteFile(broken, []byte(strings.Replace(unit, "[Service]\n", "[Service]\nKillMode=not-a-kill-mode\n", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	systemdVerify(t, analyze, filepath.Join(dir, "rollover-broken@web.service"), "rollover-broken@",
		filepath.Join(dir, "rollover@web.service"), "rollover@")

	svc := unitSection(t, unit, "Service")
	for key, want := range map[string]string{
		"Type": "notify", "NotifyAccess": "main", "KillMode": "mixed", "KillSignal": "SIGTERM",
		"RuntimeDirectory": "rollover", "RuntimeDirectoryMode": "0700", "RuntimeDirectoryPreserve": "yes",
	} {
		if got := svc[key]; got != want {
			t.Errorf("%s=%q, want %q", key, got, want)
		}
	}
	start := strings.Fields(svc["ExecStart"])
	reload := strings.Fields(svc["ExecReload"])
	dash := indexOf(start, "--")
	if len(start) < 3 || start[1] != "start" || dash < 0 || len(reload) < 2 || reload[1] != "next" {
		t.Fatalf("ExecStart=%q, ExecReload=%q", svc["ExecStart"], svc["ExecReload"])
	}
	startFlags, reloadFlags := start[2:dash], reload[2:]
	if s, r := flagValue(startFlags, "name"), flagValue(reloadFlags, "name"); s != "%i" || r != "%i" {
		t.Errorf("ExecStart --name %q, ExecReload --name %q: want %%i in both", s, r)
	}
	if m := flagValue(startFlags, "metrics-addr"); m != "${ROLLOVER_METRICS_ADDR}" {
		t.Errorf("--metrics-addr %q: each instance needs its own, from its environment file", m)
	}
	if indexOf(reloadFlags, "--wait") < 0 {
		t.Errorf("ExecReload=%q lacks --wait", svc["ExecReload"])
	}
	drain := durationFlag(t, startFlags, "drain-timeout", coordinator.DefaultDrainTimeout)
	kill := durationFlag(t, startFlags, "kill-grace", coordinator.DefaultKillGrace)
	ready := durationFlag(t, startFlags, "ready-timeout", coordinator.DefaultReadyTimeout)
	grace := durationFlag(t, startFlags, "drain-grace", coordinator.DefaultDrainGrace)
	if stop := unitSeconds(t, svc, "TimeoutStopSec"); stop <= drain+kill {
		t.Errorf("TimeoutStopSec=%v, want more than %v", stop, drain+kill)
	}
	if st := unitSeconds(t, svc, "TimeoutStartSec"); st <= ready+grace+drain+kill {
		t.Errorf("TimeoutStartSec=%v, want more than %v", st, ready+grace+drain+kill)
	}
}

// Two instances of the template's command lines, as systemd would expand
// them (%i, ${VAR} as one word, $VAR split on spaces), run side by side:
// each reloads on its own, and each stops with exit 0.
func TestSystemdTemplateTwoInstances(t *testing.T) {
	raw, err := os.ReadFile(templatePath)
	if err != nil {
		t.Fatal(err)
	}
	svc := unitSection(t, string(raw), "Service")
	runtimeDir := shortDir(t) // stands in for /run: the CLI finds $XDG_RUNTIME_DIR/rollover/NAME.sock
	env := append(os.Environ(), "XDG_RUNTIME_DIR="+runtimeDir)
	expand := func(line, instance string, vars map[string]string) []string {
		var out []string
		for _, w := range strings.Fields(strings.ReplaceAll(line, "%i", instance)) {
			switch {
			case w == "/usr/local/bin/rollover":
				out = append(out, filepath.Join(bin, "rollover"))
			case strings.HasPrefix(w, "${") && strings.HasSuffix(w, "}"):
				out = append(out, vars[w[2:len(w)-1]])
			case strings.HasPrefix(w, "$"):
				out = append(out, strings.Fields(vars[w[1:]])...)
			default:
				out = append(out, w)
			}
		}
		return out
	}
	type instance struct {
		name   string
		vars   map[string]string
		cmd    *exec.Cmd
		out    *syncBuffer
		exited chan struct{}
		err    error
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var insts []*instance
	for _, name := range []string{"api", "web"} {
		app := freePort(t)
		metrics := freePort(t)
		in := &instance{name: name, out: &syncBuffer{}, exited: make(chan struct{}), vars: map[string]string{
			"ROLLOVER_METRICS_ADDR": "127.0.0.1:" + strconv.Itoa(metrics),
			"ROLLOVER_COMMAND":      filepath.Join(bin, "demoapp") + " -addr 127.0.0.1:" + strconv.Itoa(app) + " -version " + name,
		}}
		argv := expand(svc["ExecStart"], name, in.vars)
		// A short drain-grace keeps the test quick; the rest is the unit's.
		argv = append(argv[:2], append([]string{"--drain-grace", "100ms"}, argv[2:]...)...)
		in.cmd = exec.Command(argv[0], argv[1:]...)
		in.cmd.Env = env
		in.cmd.Stdout, in.cmd.Stderr = in.out, in.out
		if err := in.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { in.err = in.cmd.Wait(); close(in.exited) }()
		socket := filepath.Join(runtimeDir, "rollover", name+".sock")
		t.Cleanup(func() {
			st, _ := ctlStatus(context.Background(), socket)
			select {
			case <-in.exited:
			default:
				_ = in.cmd.Process.Kill()
				<-in.exited
			}
			var pids []int
			for _, g := range st.Generations {
				pids = append(pids, g.PID)
				_ = syscall.Kill(g.PID, syscall.SIGKILL)
			}
			if left := harness.WaitGone(pids, 5*time.Second); len(left) > 0 {
				t.Errorf("generations of %s left: %v", name, left)
			}
			checkOutput(t, name, in.out.String())
			if t.Failed() {
				t.Logf("rollover@%s:\n%s", name, tailLines(in.out.String(), 30))
			}
		})
		insts = append(insts, in)
	}
	for _, in := range insts {
		testproc.WaitFor(t, 20*time.Second, "rollover@"+in.name+" active", func() bool {
			st, err := ctlStatus(ctx, filepath.Join(runtimeDir, "rollover", in.name+".sock"))
			return err == nil && st.Active == 1
		})
	}
	for _, in := range insts {
		reload := expand(svc["ExecReload"], in.name, in.vars)
		cmd := exec.CommandContext(ctx, reload[0], reload[1:]...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "gen 2 active") {
			t.Errorf("ExecReload of rollover@%s: %v\n%s", in.name, err, out)
		}
	}
	for _, in := range insts {
		if err := in.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-in.exited:
		case <-ctx.Done():
			t.Fatalf("rollover@%s did not stop", in.name)
		}
		var ee *exec.ExitError
		if in.err != nil && !errors.As(in.err, &ee) {
			t.Fatal(in.err)
		}
		if in.err != nil {
			t.Errorf("rollover@%s stopped with %v, want exit 0", in.name, in.err)
		}
	}
}
