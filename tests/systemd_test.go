package tests

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// unitPath is the shipped systemd unit.
const unitPath = "../deploy/systemd/rollover-api.service"

// systemdVerify runs `systemd-analyze verify` on good and fails t for every
// line about the unit (a line that names goodName). First the control:
// broken, a copy with a bad setting, must draw a complaint that names
// brokenName, or verify checks nothing in this environment.
func systemdVerify(t *testing.T, analyze, broken, brokenName, good, goodName string) {
	t.Helper()
	out, err := exec.Command(analyze, "verify", broken).CombinedOutput()
	if about, _ := splitVerifyOutput(out, brokenName); len(about) == 0 {
		envProblem(t, "systemd-analyze verify did not complain about a broken unit (%v); it cannot check units here:\n%s", err, out)
	}
	out, err = exec.Command(analyze, "verify", good).CombinedOutput()
	about, host := splitVerifyOutput(out, goodName)
	for _, l := range host {
		t.Logf("systemd-analyze (not about the unit): %s", l)
	}
	for _, l := range about {
		t.Errorf("systemd-analyze verify: %s", l)
	}
	if err != nil && len(about) == 0 {
		envProblem(t, "systemd-analyze verify failed for reasons outside the unit: %v\n%s", err, out)
	}
}

// The shipped unit, with the real binaries in place of /usr/local/bin,
// passes `systemd-analyze verify`. Its command lines parse, and its timeouts
// leave the coordinator time to drain.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze := needTool(t, "systemd-analyze")
	raw, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(raw)
	for _, r := range []struct{ old, new string }{
		{"/usr/local/bin/rollover ", filepath.Join(bin, "rollover") + " "},
		{"/usr/local/bin/api ", filepath.Join(bin, "demoapp") + " "},
	} {
		if !strings.Contains(unit, r.old) {
			t.Fatalf("%s has no %q to replace", unitPath, r.old)
		}
		unit = strings.ReplaceAll(unit, r.old, r.new)
	}
	dir := t.TempDir()
	good := filepath.Join(dir, "rollover-api.service")
	broken := filepath.Join(dir, "rollover-broken.service")
	brokenUnit := strings.Replace(unit, "[Service]\n", "[Service]\nKillMode=not-a-kill-mode\n", 1)
	for path, text := range map[string]string{good: unit, broken: brokenUnit} {
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	systemdVerify(t, analyze, broken, broken, good, good)

	svc := unitSection(t, unit, "Service")
	startFlags, reloadFlags := checkService(t, svc, nil)
	if s, r := flagValue(startFlags, "name"), flagValue(reloadFlags, "name"); s == "" || s != r {
		t.Errorf("ExecStart --name %q and ExecReload --name %q: the reload would miss the coordinator", s, r)
	}
}

// checkService checks what every shipped unit's [Service] section needs: the
// settings a coordinator relies on (and those in extra), `rollover start …
// -- CMD` and `rollover next … --wait` command lines that parse with the real
// binary, and timeouts that leave the coordinator time to drain. It returns
// the flags of both command lines.
func checkService(t *testing.T, svc, extra map[string]string) (startFlags, reloadFlags []string) {
	t.Helper()
	settings := map[string]string{
		"Type": "notify", "NotifyAccess": "main", "KillMode": "mixed", "KillSignal": "SIGTERM",
		"RuntimeDirectory": "rollover", "RuntimeDirectoryMode": "0700",
	}
	maps.Copy(settings, extra)
	for key, want := range settings {
		if got := svc[key]; got != want {
			t.Errorf("%s=%q, want %q", key, got, want)
		}
	}

	// Both command lines parse with the real binary: flags are parsed in
	// order, so a trailing -h exits 0 only if every flag before it is known
	// and well formed.
	start := startCommand(t, "ExecStart", svc["ExecStart"])
	reload := strings.Fields(svc["ExecReload"])
	if len(reload) < 2 || reload[1] != "next" {
		t.Fatalf("ExecReload=%q: want `rollover next …`", svc["ExecReload"])
	}
	startFlags, reloadFlags = start[2:], reload[2:]
	for _, argv := range [][]string{start, reload} {
		cmd := exec.Command(argv[0], append(argv[1:], "-h")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s -h: %v (a flag the binary does not take?)\n%s", strings.Join(argv, " "), err, out)
		}
	}
	if !slices.Contains(reloadFlags, "--wait") {
		t.Errorf("ExecReload=%q: without --wait, `systemctl reload` returns before the old generation drained", svc["ExecReload"])
	}

	// systemd's SIGKILL must only ever end a coordinator that hangs: a full
	// drain (and, for a reload, a full start) fits in its timeouts.
	drain := durationFlag(t, startFlags, "drain-timeout", coordinator.DefaultDrainTimeout)
	kill := durationFlag(t, startFlags, "kill-grace", coordinator.DefaultKillGrace)
	ready := durationFlag(t, startFlags, "ready-timeout", coordinator.DefaultReadyTimeout)
	grace := durationFlag(t, startFlags, "drain-grace", coordinator.DefaultDrainGrace)
	bake := durationFlag(t, startFlags, "bake", coordinator.DefaultBake)
	if stop := unitSeconds(t, svc, "TimeoutStopSec"); stop <= drain+kill {
		t.Errorf("TimeoutStopSec=%v, want more than --drain-timeout + --kill-grace = %v", stop, drain+kill)
	}
	if st := unitSeconds(t, svc, "TimeoutStartSec"); st <= ready+bake+grace+drain+kill {
		t.Errorf("TimeoutStartSec=%v (it bounds ExecReload too), want more than ready + bake + grace + drain + kill = %v", st, ready+bake+grace+drain+kill)
	}
	return startFlags, reloadFlags
}

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
	startFlags, reloadFlags := checkService(t, svc, map[string]string{"RuntimeDirectoryPreserve": "yes"})
	if s, r := flagValue(startFlags, "name"), flagValue(reloadFlags, "name"); s != "%i" || r != "%i" {
		t.Errorf("ExecStart --name %q, ExecReload --name %q: want %%i in both", s, r)
	}
	if m := flagValue(startFlags, "metrics-addr"); m != "${ROLLOVER_METRICS_ADDR}" {
		t.Errorf("--metrics-addr %q: each instance needs its own, from its environment file", m)
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
	runtimeDir := testproc.ShortDir(t) // stands in for /run: the CLI finds $XDG_RUNTIME_DIR/rollover/NAME.sock
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

// startCommand splits the command line `rollover start FLAGS -- CMD` that
// the setting key holds and returns it without `-- CMD`.
func startCommand(t *testing.T, key, line string) []string {
	t.Helper()
	argv := strings.Fields(line)
	dash := slices.Index(argv, "--")
	if len(argv) < 3 || argv[1] != "start" || dash < 0 || dash == len(argv)-1 {
		t.Fatalf("%s=%q: want `rollover start … -- CMD`", key, line)
	}
	return argv[:dash]
}

// envProblem skips outside CI and fails in CI.
func envProblem(t *testing.T, format string, args ...any) {
	t.Helper()
	if inCI() {
		t.Fatalf(format, args...)
	}
	t.Skipf("skipping: "+format, args...)
}

// splitVerifyOutput separates the lines about the unit at path from those
// about the host (other units, missing man pages and the like).
func splitVerifyOutput(out []byte, path string) (about, host []string) {
	for l := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		switch {
		case l == "":
		case strings.Contains(l, filepath.Base(path)):
			about = append(about, l)
		default:
			host = append(host, l)
		}
	}
	return about, host
}

// unitSection reads one section of a unit: the last value of each key, with
// backslash continuations joined and comments dropped.
func unitSection(t *testing.T, unit, name string) map[string]string {
	t.Helper()
	kv := map[string]string{}
	in := false
	var cont strings.Builder
	for line := range strings.SplitSeq(unit, "\n") {
		line = strings.TrimSpace(line)
		if cont.Len() == 0 && (line == "" || line[0] == '#' || line[0] == ';') {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cont.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cont.WriteString(line)
		line = cont.String()
		cont.Reset()
		if strings.HasPrefix(line, "[") {
			in = line == "["+name+"]"
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && in {
			kv[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	if len(kv) == 0 {
		t.Fatalf("unit has no [%s] section", name)
	}
	return kv
}

// flagValue returns the value of --name or --name=value in args.
func flagValue(args []string, name string) string {
	for i, a := range args {
		a = "-" + strings.TrimLeft(a, "-")
		if a == "-"+name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, "-"+name+"="); ok {
			return v
		}
	}
	return ""
}

func durationFlag(t *testing.T, args []string, name string, def time.Duration) time.Duration {
	t.Helper()
	v := flagValue(args, name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("--%s %q: %v", name, v, err)
	}
	return d
}

// unitSeconds reads a systemd time span written as seconds ("60") or as a
// Go-style duration ("60s", "1m30s").
func unitSeconds(t *testing.T, kv map[string]string, key string) time.Duration {
	t.Helper()
	v, ok := kv[key]
	if !ok {
		t.Fatalf("the unit sets no %s", key)
	}
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second
	}
	d, err := time.ParseDuration(strings.ReplaceAll(v, " ", ""))
	if err != nil {
		t.Fatalf("%s=%q: write it as seconds or like 1m30s: %v", key, v, err)
	}
	return d
}

// Under systemd (NOTIFY_SOCKET set), the coordinator tells the service
// manager what it does: READY=1 once generation 1 serves, RELOADING=1 and
// READY=1 around a rollover, STOPPING=1 on stop, every time from its own pid
// (NotifyAccess=main). The generations never see systemd's socket.
func TestCoordinatorNotifiesSystemd(t *testing.T) {
	t.Run("path", func(t *testing.T) {
		testNotify(t, filepath.Join(testproc.ShortDir(t), "notify.sock"))
	})
	t.Run("abstract", func(t *testing.T) {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		// Go maps a leading @ to the abstract namespace, as systemd does.
		testNotify(t, "@rollover-test-"+hex.EncodeToString(b))
	})
}

func testNotify(t *testing.T, notifyAddr string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const msgTimeout = 15 * time.Second
	sd := listenNotify(t, notifyAddr)
	before := binProcesses()

	dir := testproc.ShortDir(t)
	socket := filepath.Join(dir, "ctl.sock")
	addr := testproc.FreeAddr(t)
	cmd := exec.Command(filepath.Join(bin, "rollover"), "start", "--socket", socket,
		"--metrics-addr", "", "--drain-grace", "100ms",
		"--", filepath.Join(bin, "demoapp"), "-addr", addr, "-version", "v1")
	cmd.Env = append(envWithout("NOTIFY_SOCKET"), "NOTIFY_SOCKET="+notifyAddr)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	coord := cmd.Process.Pid
	exited := make(chan struct{})
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(exited) }()
	var gens []int
	t.Cleanup(func() {
		tree := descendantsOf(coord)
		select {
		case <-exited:
		default:
			_ = cmd.Process.Kill()
			<-exited
		}
		left := append(append(tree, gens...), coord)
		for _, p := range left {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		if l := waitAlive(left, 5*time.Second); len(l) > 0 {
			t.Errorf("processes left behind: %v", l)
		}
		if l := newBinProcesses(before); len(l) > 0 {
			t.Errorf("rollover or demoapp processes left behind: %v", l)
		}
		checkOutput(t, "coordinator", out.String())
		if t.Failed() {
			t.Logf("coordinator log:\n%s", tailLines(out.String(), 60))
		}
	})

	// Generation 1 serves, and only then does systemd hear READY=1.
	st := waitStatus(t, ctx, socket, exited, func(st wire.Status) bool { return st.Active == 1 && !st.InProgress })
	gen1 := genPID(t, st, 1)
	gens = append(gens, gen1)
	m := sd.next(t, "READY=1 after generation 1 is ready", msgTimeout)
	sd.check(t, m, coord, "READY", fmt.Sprintf("active generation 1 (pid %d)", gen1))
	checkNoNotifySocket(t, gen1, 1)

	// A rollover: RELOADING=1 with the time it began, then READY=1.
	monoBefore := monotonicUsec(t)
	next := exec.CommandContext(ctx, filepath.Join(bin, "rollover"), "next", "--socket", socket)
	if b, err := next.CombinedOutput(); err != nil {
		t.Fatalf("rollover next: %v\n%s", err, b)
	}
	m = sd.next(t, "RELOADING=1 when the rollover starts", msgTimeout)
	monoAfter := monotonicUsec(t)
	sd.check(t, m, coord, "RELOADING", "rolling over to generation 2")
	if v, err := strconv.ParseUint(m.vars["MONOTONIC_USEC"], 10, 64); err != nil {
		t.Errorf("RELOADING=1 without a valid MONOTONIC_USEC (systemd needs it to order the reload): %q", m.raw)
	} else if slack := uint64(2 * time.Second / time.Microsecond); v+slack < monoBefore || v > monoAfter+slack {
		t.Errorf("MONOTONIC_USEC=%d, want CLOCK_MONOTONIC in microseconds, between %d and %d", v, monoBefore, monoAfter)
	}
	st = waitStatus(t, ctx, socket, exited, func(st wire.Status) bool { return st.Active == 2 && !st.InProgress })
	gen2 := genPID(t, st, 2)
	gens = append(gens, gen2)
	m = sd.next(t, "READY=1 when the rollover is done", msgTimeout)
	sd.check(t, m, coord, "READY", fmt.Sprintf("active generation 2 (pid %d)", gen2))
	checkNoNotifySocket(t, gen2, 2)

	// SIGTERM: STOPPING=1, every generation drains, exit 0.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	m = sd.next(t, "STOPPING=1 on SIGTERM", msgTimeout)
	sd.check(t, m, coord, "STOPPING", "stopping: draining every generation")
	select {
	case <-exited:
		if exitErr != nil {
			t.Errorf("coordinator after SIGTERM: %v, want exit 0", exitErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("coordinator still running 30s after SIGTERM")
	}
	if l := waitAlive(gens, 5*time.Second); len(l) > 0 {
		t.Errorf("generations still running after the coordinator exited: %v", l)
	}
}

// notifyMsg is one sd_notify datagram.
type notifyMsg struct {
	raw  string
	vars map[string]string
	pid  int32 // the sender, from SCM_CREDENTIALS
}

// notifyListener plays systemd's side of NOTIFY_SOCKET.
type notifyListener struct {
	addr string
	msgs chan notifyMsg
}

func listenNotify(t *testing.T, addr string) *notifyListener {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatalf("notify socket %s: %v", addr, err)
	}
	// Like systemd, have the kernel attach each sender's credentials.
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	l := &notifyListener{addr: addr, msgs: make(chan notifyMsg, 64)}
	done := make(chan struct{})
	t.Cleanup(func() { close(done); conn.Close() })
	go func() {
		defer close(l.msgs)
		buf := make([]byte, 64<<10)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			m := notifyMsg{raw: string(buf[:n]), vars: map[string]string{}}
			for line := range strings.SplitSeq(m.raw, "\n") {
				if k, v, ok := strings.Cut(line, "="); ok {
					m.vars[k] = v
				}
			}
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if cred, err := unix.ParseUnixCredentials(&c); err == nil {
						m.pid = cred.Pid
					}
				}
			}
			select {
			case l.msgs <- m:
			case <-done:
				return
			}
		}
	}()
	return l
}

// stateKeys are the assignments that change a unit's state.
var stateKeys = []string{"READY", "RELOADING", "STOPPING"}

// next returns the next datagram that changes the unit's state, logging
// STATUS-only ones on the way.
func (l *notifyListener) next(t *testing.T, what string, d time.Duration) notifyMsg {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case m, ok := <-l.msgs:
			if !ok {
				t.Fatalf("notify socket closed while waiting for %s", what)
			}
			for _, k := range stateKeys {
				if m.vars[k] == "1" {
					return m
				}
			}
			t.Logf("sd_notify: %q", m.raw)
		case <-timer.C:
			t.Fatalf("no sd_notify datagram for %s within %v on NOTIFY_SOCKET=%s: does the coordinator speak sd_notify?", what, d, l.addr)
		}
	}
}

// check says m sets key=1 and no other state key, with STATUS=status, sent
// by the coordinator itself.
func (l *notifyListener) check(t *testing.T, m notifyMsg, coord int, key, status string) {
	t.Helper()
	for _, k := range stateKeys {
		if want := map[bool]string{true: "1", false: ""}[k == key]; m.vars[k] != want {
			t.Errorf("sd_notify %q: %s=%q, want %q", m.raw, k, m.vars[k], want)
		}
	}
	if m.vars["STATUS"] != status {
		t.Errorf("sd_notify %q: STATUS=%q, want %q", m.raw, m.vars["STATUS"], status)
	}
	if int(m.pid) != coord {
		t.Errorf("sd_notify %q came from pid %d, not the coordinator (%d): NotifyAccess=main would drop it", m.raw, m.pid, coord)
	}
}

// checkNoNotifySocket fails if generation n (pid) inherited NOTIFY_SOCKET.
func checkNoNotifySocket(t *testing.T, pid, n int) {
	t.Helper()
	env, err := procEnviron(pid)
	if err != nil {
		t.Errorf("generation %d's environment: %v", n, err)
		return
	}
	if !slices.Contains(env, fmt.Sprintf("ROLLOVER_GENERATION=%d", n)) {
		t.Errorf("pid %d has no ROLLOVER_GENERATION=%d: not generation %d's environment?", pid, n, n)
	}
	for _, kv := range env {
		if strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			t.Errorf("generation %d (pid %d) inherited %s: it could talk to systemd behind the coordinator's back", n, pid, kv)
		}
	}
}

func monotonicUsec(t *testing.T) uint64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano() / 1000)
}

func envWithout(key string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, key+"=") {
			env = append(env, kv)
		}
	}
	return env
}

// ctlStatus runs `rollover status --json` against socket.
func ctlStatus(ctx context.Context, socket string) (wire.Status, error) {
	return harness.Status(ctx, filepath.Join(bin, "rollover"), socket)
}

// waitStatus polls the coordinator's status until ok, for 30s at most, and
// fails at once when exited (the coordinator's, or its supervisor's) is
// closed.
func waitStatus(t *testing.T, ctx context.Context, socket string, exited <-chan struct{}, ok func(wire.Status) bool) wire.Status {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := ctlStatus(ctx, socket)
		if err == nil && ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("coordinator status not as expected after 30s: %+v (%v)", st, err)
		}
		select {
		case <-exited:
			t.Fatalf("exited while waiting for the coordinator; last status %+v (%v)", st, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func genPID(t *testing.T, st wire.Status, n int) int {
	t.Helper()
	for _, g := range st.Generations {
		if g.Generation == n && g.PID > 0 {
			return g.PID
		}
	}
	t.Fatalf("status has no generation %d: %+v", n, st)
	return 0
}

// procStat reads a process's /proc/PID/stat.
func procStat(pid int) (procfs.ProcStat, error) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return procfs.ProcStat{}, err
	}
	return p.Stat()
}

// running reports whether pid exists and is not a zombie (a dead process
// its parent has not reaped yet).
func running(pid int) bool {
	st, err := procStat(pid)
	return err == nil && st.State != "Z"
}

// procEnviron is a process's environment, one KEY=value per entry.
func procEnviron(pid int) ([]string, error) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return nil, err
	}
	return p.Environ()
}

// allProcs lists the processes now; none when /proc cannot be read.
func allProcs() procfs.Procs {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return nil
	}
	procs, _ := fs.AllProcs()
	return procs
}

// descendantsOf lists root's descendants now.
func descendantsOf(root int) []int {
	children := map[int][]int{}
	for _, p := range allProcs() {
		if st, err := p.Stat(); err == nil {
			children[st.PPID] = append(children[st.PPID], p.PID)
		}
	}
	var out []int
	queue := []int{root}
	for len(queue) > 0 && len(out) < 10000 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// waitAlive waits until none of pids runs (zombies count as gone: whoever
// reaps orphans here may not), for at most d, and returns those that still do.
func waitAlive(pids []int, d time.Duration) []int {
	deadline := time.Now().Add(d)
	for {
		var left []int
		for _, p := range pids {
			if running(p) {
				left = append(left, p)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// binProcesses maps the pid of every live process running a binary built
// for this run to the binary's name.
func binProcesses() map[int]string {
	out := map[int]string{}
	for _, p := range allProcs() {
		exe, err := p.Executable()
		if err != nil || filepath.Dir(exe) != filepath.Clean(bin) {
			continue
		}
		if running(p.PID) {
			out[p.PID] = filepath.Base(exe)
		}
	}
	return out
}

// newBinProcesses lists the processes of this run's binaries that were not
// there before, after giving them up to 5s to go.
func newBinProcesses(before map[int]string) []string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		for pid, name := range binProcesses() {
			if _, ok := before[pid]; !ok {
				left = append(left, fmt.Sprintf("%s (pid %d)", name, pid))
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readLines returns the lines of a file, or nil.
func readLines(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}
