package tests

// deploy/ansible/ run by the real ansible-playbook. The fleet is three hosts
// on this machine: each is a network namespace of its own (ip netns add),
// with its own coordinator (its own --socket, since namespaces share the
// filesystem) and demo app on the same port, under light load from inside
// the namespace. Ansible reaches them with ansible_connection=local and
// ansible_python_interpreter="ip netns exec NS python3", so the module and
// the CLI it runs are in the host's namespace, as on a real host.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/load"
	"github.com/rollover-sh/rollover/tests/testproc"
)

const (
	ansibleDir = "../deploy/ansible"
	// Light load per host: keep-alive clients and as many that open a
	// connection per request, each pausing between requests.
	ansibleClients = 2
	ansiblePause   = 5 * time.Millisecond
)

// TestAnsibleRollout rolls the fleet with deploy/ansible/rollout.yml, one
// host per batch ([1, "25%", "100%"] of three hosts), case after case on the
// same hosts:
//
//  0. one host without a coordinator: the plan fails before any host rolls;
//  1. a good build: every host rolls (changed=1 each), generation 2, and no
//     request fails anywhere; host 1, the first batch, through a canary;
//  2. the same play again: changed=0, nothing rolls;
//  3. --check after the build's binary was replaced at the same path (the
//     same argv): 3 hosts would change, nothing changes;
//  4. a build that crashes on its first request: host 1 rolls back in its
//     bake and serves generation 2 again, the play fails, hosts 2 and 3 are
//     untouched;
//  5. a good build while someone rolls host 2 by hand between the first and
//     the second batch: host 2 fails on --expect-generation and is not rolled
//     twice; host 3 is untouched.
func TestAnsibleRollout(t *testing.T) {
	f := startFleet(t, 3)
	start := time.Now()
	f.install(t, nil)
	v2 := f.command("v2")

	t.Run("no coordinator on h3", func(t *testing.T) {
		inv := f.writeInventory(t, "h3-down.yml", func(h *ansibleHost) string {
			if h.name == "h3" {
				return filepath.Join(f.dir, "none.sock")
			}
			return h.svc.Socket
		})
		p := f.rollWith(t, inv, nil, map[string]any{"rollover_command": v2, "rollover_bake": "300ms"})
		p.wantCode(t, 2)
		for _, h := range f.hosts {
			p.wantRecap(t, h.name, 0, map[string]int{"h3": 1}[h.name])
			h.wantOnly(t, h.status(t), 1, h.svc.AppArgv("v1"))
			h.wantNoLoss(t, p)
		}
		p.wantLines(t, "no coordinator at "+filepath.Join(f.dir, "none.sock"))
	})

	t.Run("good build", func(t *testing.T) {
		p := f.roll(t, map[string]any{"rollover_command": v2, "rollover_bake": "300ms", "rollover_canary": "50%", "rollover_canary_step": "200ms"})
		p.wantCode(t, 0)
		// The canary is the first batch's alone.
		for i, h := range f.hosts {
			if got := strings.Contains(h.log.String(), "canary: gen 2 takes 50% of new connections"); got != (i == 0) {
				t.Errorf("%s: a 50%% canary in the coordinator's log: %v, want %v", h.name, got, i == 0)
			}
		}
		for _, h := range f.hosts {
			p.wantRecap(t, h.name, 1, 0)
			st := h.status(t)
			h.wantOnly(t, st, 2, v2)
			h.wantNoLoss(t, p)
			if p.loads[h.name].ByGeneration["2"] == 0 {
				t.Errorf("%s: the load never reached gen 2: %v", h.name, p.loads[h.name].ByGeneration)
			}
			h.wantEnv(t, v2)
		}
		p.wantLines(t, "h1: gen 1 -> 2; loss: 0 connections and 0 requests cut, 0 5xx, 0 panics",
			"h3: gen 1 -> 2; loss: 0 connections and 0 requests cut")
	})
	pids := f.activePIDs(t)

	t.Run("same play again", func(t *testing.T) {
		p := f.roll(t, map[string]any{"rollover_command": v2, "rollover_bake": "300ms"})
		p.wantCode(t, 0)
		for _, h := range f.hosts {
			p.wantRecap(t, h.name, 0, 0)
			h.wantOnly(t, h.status(t), 2, v2)
			h.wantNoLoss(t, p)
		}
		f.wantPIDs(t, pids)
		p.wantLines(t, "h2: gen 2, already on this build")
	})
	if t.Failed() {
		return
	}

	t.Run("check mode", func(t *testing.T) {
		// Another build at the same path: the argv is the same, only the
		// binary's contents tell it apart.
		f.install(t, []byte("build 2"))
		p := f.roll(t, map[string]any{"rollover_command": v2, "rollover_bake": "300ms"}, "--check")
		p.wantCode(t, 0)
		for _, h := range f.hosts {
			p.wantRecap(t, h.name, 1, 0)
			h.wantOnly(t, h.status(t), 2, v2)
			h.wantNoLoss(t, p)
			h.wantEnv(t, v2)
		}
		f.wantPIDs(t, pids)
	})

	t.Run("crash on first request", func(t *testing.T) {
		crash := f.command("v3", "-fail=crash")
		p := f.roll(t, map[string]any{"rollover_command": crash, "rollover_bake": "1s"})
		p.wantCode(t, 2)
		p.wantRecap(t, "h1", 0, 1)
		p.wantRecap(t, "h2", 0, 0)
		p.wantRecap(t, "h3", 0, 0)
		p.wantLines(t, "h1: FAILED, on gen 2: rollover failed: gen 3 exited (exit status 2)",
			"(during the 1s bake): rolled back to gen 2", "h2: untouched, on gen 2", "h3: untouched, on gen 2")
		for _, h := range f.hosts {
			h.wantOnly(t, h.status(t), 2, v2)
			h.wantEnv(t, v2)
		}
		f.wantPIDs(t, pids)
		h1 := f.hosts[0]
		if body := h1.get(t); !strings.HasPrefix(body, "demoapp v2 gen 000002") {
			t.Errorf("h1 answers %q after the rollback: want demoapp v2 gen 2", body)
		}
		// The crash costs what it held: it dies at its first request, and each
		// client has at most one in flight (tcp_migrate_req=1 migrates the
		// connections queued on it).
		if res := p.loads["h1"]; res.Failures > 2*ansibleClients || res.OK == 0 {
			t.Errorf("h1: %d requests failed, %d ok: over the %d clients' one each (%v %v)", res.Failures, res.OK, 2*ansibleClients, res.ByKind, res.Samples)
		}
		f.hosts[1].wantNoLoss(t, p)
		f.hosts[2].wantNoLoss(t, p)
	})

	t.Run("expect-generation", func(t *testing.T) {
		v3 := f.command("v3")
		h2 := f.hosts[1]
		out := filepath.Join(f.dir, "by-hand.json")
		// By hand on h2: the same command line again, while the play runs.
		byHand := []string{filepath.Join(bin, "rollover"), "next", "--socket", h2.svc.Socket, "--wait", "--bake", "100ms"}
		spec, _ := json.Marshal(map[string]any{"argv": byHand, "out": out})
		p := f.rollWith(t, f.inventory, []string{"ROLLOVER_TEST_BETWEEN_BATCHES=" + string(spec)}, map[string]any{"rollover_command": v3, "rollover_bake": "300ms"})
		raw, err := os.ReadFile(out)
		if err != nil {
			t.Fatalf("the rollover by hand between the batches did not run: %v", err)
		}
		var hand struct {
			RC             int
			Stdout, Stderr string
		}
		if err := json.Unmarshal(raw, &hand); err != nil || hand.RC != 0 {
			t.Fatalf("the rollover by hand on h2: %v %s", err, raw)
		}
		t.Logf("by hand on h2 between the batches: %s", strings.Join(strings.Fields(hand.Stdout), " "))
		p.wantCode(t, 2)
		p.wantRecap(t, "h1", 1, 0)
		p.wantRecap(t, "h2", 0, 1)
		p.wantRecap(t, "h3", 0, 0)
		p.wantLines(t, "h1: gen 2 -> 4; loss: 0 connections and 0 requests cut",
			"h2: FAILED, on gen 3: refused: the active generation is 3, not 2 (--expect-generation)",
			// The coordinator's refusal, not the module's guess.
			`"stderr": "rollover: refused: the active generation is 3, not 2 (--expect-generation)`,
			"h3: untouched, on gen 2")
		f.hosts[0].wantOnly(t, f.hosts[0].status(t), 4, v3)
		f.hosts[0].wantEnv(t, v3)
		h2.wantOnly(t, h2.status(t), 3, v2)
		h2.wantEnv(t, v2)
		f.hosts[2].wantOnly(t, f.hosts[2].status(t), 2, v2)
		if st := f.hosts[2].status(t); st.Generations[0].PID != pids[2] {
			t.Errorf("h3: gen 2 has pid %d, was %d", st.Generations[0].PID, pids[2])
		}
		for _, h := range f.hosts {
			h.wantNoLoss(t, p)
		}
	})
	t.Logf("TestAnsibleRollout: %v of plays and checks", time.Since(start).Round(100*time.Millisecond))
	f.stop(t)
}

// TestAnsibleRole stages the role with deploy/ansible/install.yml into a
// directory (rollover_root, as make install's DESTDIR; no systemd, no user,
// no sysctl load here) and checks every file against what it installs, then
// runs it again: nothing changes.
func TestAnsibleRole(t *testing.T) {
	needTool(t, "ansible-playbook")
	dir := testproc.ShortDir(t)
	root := filepath.Join(dir, "root")
	inv := writeInventory(t, dir, "hosts.yml", map[string]map[string]any{
		"stage": {"ansible_connection": "local", "ansible_python_interpreter": python3(t)},
	}, nil)
	vars := map[string]any{
		"rollover_name": "api", "rollover_binary": filepath.Join(bin, "rollover"), "rollover_root": root,
		"rollover_service": false, "ansible_become": false, "rollover_metrics_addr": "127.0.0.1:9755",
		"rollover_command": []string{"/usr/local/bin/api", "-addr", ":8080"},
	}
	first := runPlaybook(t, dir, inv, "install.yml", vars, nil)
	first.wantCode(t, 0)
	if first.recap["stage"]["changed"] == 0 {
		t.Errorf("the first install changed nothing: %v", first.recap)
	}
	same := func(staged, want string) {
		t.Helper()
		a, err := os.ReadFile(filepath.Join(root, staged))
		if err != nil {
			t.Error(err)
			return
		}
		b, err := os.ReadFile(want)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs from %s", staged, want)
		}
	}
	same("usr/local/bin/rollover", filepath.Join(bin, "rollover"))
	same("etc/systemd/system/rollover@.service", "../deploy/systemd/rollover@.service")
	same("etc/sysctl.d/90-rollover.conf", "../deploy/sysctl/90-rollover.conf")
	for shell, path := range map[string]string{
		"bash": "usr/local/share/bash-completion/completions/rollover",
		"zsh":  "usr/local/share/zsh/site-functions/_rollover",
		"fish": "usr/local/share/fish/vendor_completions.d/rollover.fish",
	} {
		want, err := exec.Command(filepath.Join(bin, "rollover"), "completion", shell).Output()
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(root, path))
		if err != nil || strings.TrimRight(string(got), "\n") != strings.TrimRight(string(want), "\n") {
			t.Errorf("%s: not `rollover completion %s` (%v)", path, shell, err)
		}
	}
	env, err := os.ReadFile(filepath.Join(root, "etc/rollover/api.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"ROLLOVER_METRICS_ADDR=127.0.0.1:9755", "ROLLOVER_COMMAND=/usr/local/bin/api -addr :8080"} {
		if !slices.Contains(strings.Split(string(env), "\n"), line) {
			t.Errorf("api.env has no line %q:\n%s", line, env)
		}
	}
	again := runPlaybook(t, dir, inv, "install.yml", vars, nil)
	again.wantCode(t, 0)
	again.wantRecap(t, "stage", 0, 0)
}

// TestAnsibleLint runs ansible-lint (the production profile, warnings
// fatal) over deploy/ansible/, and ansible-doc over the module, which
// parses its documentation.
func TestAnsibleLint(t *testing.T) {
	lint := needTool(t, "ansible-lint")
	doc := needTool(t, "ansible-doc")
	dir := testproc.ShortDir(t)
	for _, c := range [][]string{
		{lint, "--offline", "--strict", "--profile", "production", "-p", "install.yml", "rollout.yml", "roles/rollover"},
		{doc, "-M", "roles/rollover/library", "rollover_next"},
	} {
		cmd := exec.Command(c[0], c[1:]...)
		cmd.Dir = ansibleDir
		cmd.Env = append(ansibleEnv(dir), "XDG_CACHE_HOME="+filepath.Join(dir, "cache"))
		out, err := cmd.CombinedOutput()
		if err != nil || bytes.Contains(out, []byte("[WARNING]")) {
			t.Errorf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
}

// ansibleHost is one host of the fleet.
type ansibleHost struct {
	name  string // in the inventory: h1, h2, h3
	netns string // ip netns name
	svc   *harness.Service
	env   string // its rollover@.service environment file
	addr  string // the app, 127.0.0.1:PORT, inside the namespace
	log   *syncBuffer
}

type ansibleFleet struct {
	dir       string
	addr      string
	hosts     []*ansibleHost
	inventory string
}

// startFleet makes n hosts, each a network namespace with lo up and the
// shipped sysctl file applied, a coordinator with demoapp v1 on the same
// port, and an environment file.
func startFleet(t *testing.T, n int) *ansibleFleet {
	t.Helper()
	needTool(t, "ansible-playbook")
	ip := needTool(t, "ip")
	if os.Geteuid() != 0 {
		foreignNeed(t, "the Ansible test runs as root: its hosts are namespaces made with ip netns add")
	}
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	f := &ansibleFleet{dir: testproc.ShortDir(t), addr: "127.0.0.1:" + strconv.Itoa(port)}
	for i := 1; i <= n; i++ {
		h := &ansibleHost{name: fmt.Sprintf("h%d", i), netns: fmt.Sprintf("ro%d-h%d", os.Getpid(), i), addr: f.addr, log: &syncBuffer{}}
		addNetns(t, ip, h.netns)
		h.svc = startServiceLog(t, harness.Config{Port: port, Wrap: []string{ip, "netns", "exec", h.netns}}, h.log, false)
		if st := h.status(t); st.PID != h.svc.PID() {
			t.Fatalf("%s: the coordinator is pid %d, not the pid started (%d)", h.name, st.PID, h.svc.PID())
		}
		h.env = filepath.Join(f.dir, h.name+".env")
		env := "ROLLOVER_METRICS_ADDR=127.0.0.1:9754\nROLLOVER_COMMAND=" + strings.Join(h.svc.AppArgv("v1"), " ") + "\n"
		if err := os.WriteFile(h.env, []byte(env), 0o644); err != nil {
			t.Fatal(err)
		}
		f.hosts = append(f.hosts, h)
	}
	f.inventory = f.writeInventory(t, "hosts.yml", nil)
	return f
}

// writeInventory writes the fleet's inventory as dir/name; socket, when
// set, gives a host another control socket.
func (f *ansibleFleet) writeInventory(t *testing.T, name string, socket func(*ansibleHost) string) string {
	t.Helper()
	py := python3(t)
	hosts := map[string]map[string]any{}
	for _, h := range f.hosts {
		sock := h.svc.Socket
		if socket != nil {
			sock = socket(h)
		}
		hosts[h.name] = map[string]any{
			"ansible_python_interpreter": "ip netns exec " + h.netns + " " + py,
			"rollover_socket":            sock,
			"rollover_env_file":          h.env,
		}
	}
	return writeInventory(t, f.dir, name, hosts, map[string]any{
		"ansible_connection": "local", "rollover_bin": filepath.Join(bin, "rollover"),
	})
}

// addNetns adds the network namespace name, brings lo up and applies
// deploy/sysctl/90-rollover.conf in it, as the role does on a host. At
// cleanup it kills whatever still runs in it, failing t if anything did,
// and deletes it.
func addNetns(t *testing.T, ip, name string) {
	t.Helper()
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	path := filepath.Join("/run/netns", name)
	var fi os.FileInfo
	t.Cleanup(func() {
		if fi != nil {
			ns := procfs.Namespace{Type: "net", Inode: uint32(fi.Sys().(*syscall.Stat_t).Ino)}
			if left := foreignKillAll(foreignInNetns(ns)); len(left) > 0 {
				t.Errorf("processes left in namespace %s (killed): %v", name, left)
			}
		}
		if out, err := exec.Command(ip, "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", name, err, out)
		}
	})
	var err error
	if fi, err = os.Stat(path); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(ip, "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	conf, err := os.ReadFile("../deploy/sysctl/90-rollover.conf")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(conf), "\n") {
		key, value, ok := strings.Cut(line, "=")
		if line = strings.TrimSpace(line); !ok || strings.HasPrefix(line, "#") {
			continue
		}
		file := "/proc/sys/" + strings.ReplaceAll(strings.TrimSpace(key), ".", "/")
		err := inNetns(path, func() error {
			if err := os.WriteFile(file, []byte(strings.TrimSpace(value)), 0o644); err != nil {
				return err
			}
			got, err := os.ReadFile(file)
			if err == nil && strings.TrimSpace(string(got)) != strings.TrimSpace(value) {
				err = fmt.Errorf("%s reads %q after writing %q", file, got, value)
			}
			return err
		})
		if err != nil {
			t.Fatalf("sysctl in %s: %v", name, err)
		}
	}
}

// inNetns runs fn on a thread of its own inside the network namespace at
// path: sockets fn opens live there. The thread never serves another
// goroutine: one that exits locked to its thread takes the thread with it.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// dial connects from inside the host's namespace.
func (h *ansibleHost) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(filepath.Join("/run/netns", h.netns), func() error {
		var err error
		c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// get is GET / on the host's app, from inside its namespace.
func (h *ansibleHost) get(t *testing.T) string {
	t.Helper()
	tr := &http.Transport{DialContext: h.dial, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + h.addr + "/")
	if err != nil {
		t.Fatalf("%s: GET /: %v", h.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s: GET /: %v", h.name, err)
	}
	return string(b)
}

func (h *ansibleHost) status(t *testing.T) wire.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := h.svc.Status(ctx)
	if err != nil {
		t.Fatalf("%s: %v", h.name, err)
	}
	return st
}

// wantOnly checks that gen alone lives on the host, active, running argv.
func (h *ansibleHost) wantOnly(t *testing.T, st wire.Status, gen int, argv []string) {
	t.Helper()
	if st.Active != gen || len(st.Generations) != 1 || !slices.Equal(st.Generations[0].Argv, argv) {
		var live []string
		for _, g := range st.Generations {
			live = append(live, fmt.Sprintf("gen %d %s %q", g.Generation, g.State, g.Argv))
		}
		t.Errorf("%s: active gen %d, live %v; want gen %d alone running %q", h.name, st.Active, live, gen, argv)
	}
}

// wantEnv checks the ROLLOVER_COMMAND= line of the host's environment file.
func (h *ansibleHost) wantEnv(t *testing.T, argv []string) {
	t.Helper()
	b, err := os.ReadFile(h.env)
	if err != nil {
		t.Fatal(err)
	}
	want := "ROLLOVER_COMMAND=" + strings.Join(argv, " ")
	if !slices.Contains(strings.Split(string(b), "\n"), want) {
		t.Errorf("%s: %s has no line %q:\n%s", h.name, h.env, want, b)
	}
}

func (h *ansibleHost) wantNoLoss(t *testing.T, p ansiblePlay) {
	t.Helper()
	if res := p.loads[h.name]; res.Failures != 0 || res.OK == 0 {
		t.Errorf("%s: %d requests failed, %d ok (%v %v)", h.name, res.Failures, res.OK, res.ByKind, res.Samples)
	}
}

// install puts a build of the demo app at dir/app, the way a deploy
// should: a new file renamed over the old one, so the running generation
// keeps its binary. extra is appended to the executable, making another
// build with the same behaviour.
func (f *ansibleFleet) install(t *testing.T, extra []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(bin, "demoapp"))
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, extra...)
	tmp := filepath.Join(f.dir, "app.new")
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(f.dir, "app")); err != nil {
		t.Fatal(err)
	}
}

// command is the demo app's command line on every host.
func (f *ansibleFleet) command(version string, extra ...string) []string {
	return append([]string{filepath.Join(f.dir, "app"), "-addr", f.addr, "-version", version}, extra...)
}

func (f *ansibleFleet) activePIDs(t *testing.T) []int {
	t.Helper()
	var pids []int
	for _, h := range f.hosts {
		st := h.status(t)
		if len(st.Generations) == 0 {
			t.Fatalf("%s: no generation", h.name)
		}
		pids = append(pids, st.Generations[0].PID)
	}
	return pids
}

func (f *ansibleFleet) wantPIDs(t *testing.T, want []int) {
	t.Helper()
	if got := f.activePIDs(t); !slices.Equal(got, want) {
		t.Errorf("the generations' pids are %v, were %v: something rolled", got, want)
	}
}

// roll runs rollout.yml against the fleet under load, with vars as extra
// vars and more ansible-playbook flags, and returns the play with each
// host's load.
func (f *ansibleFleet) roll(t *testing.T, vars map[string]any, flags ...string) ansiblePlay {
	t.Helper()
	return f.rollWith(t, f.inventory, nil, vars, flags...)
}

// rollWith is roll with another inventory, and env added to
// ansible-playbook's environment.
func (f *ansibleFleet) rollWith(t *testing.T, inventory string, env []string, vars map[string]any, flags ...string) ansiblePlay {
	t.Helper()
	type hostLoad struct{ keepAlive, newConn *load.Runner }
	loads := map[string]hostLoad{}
	for _, h := range f.hosts {
		var hl hostLoad
		for _, ka := range []bool{true, false} {
			r, err := load.Start(context.Background(), load.Options{
				URL: "http://" + h.addr + "/", Clients: ansibleClients, KeepAlive: ka, Pause: ansiblePause,
				Duration: 2 * time.Minute, Dial: h.dial,
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Stop() })
			if ka {
				hl.keepAlive = r
			} else {
				hl.newConn = r
			}
		}
		loads[h.name] = hl
	}
	// The load is answered everywhere before the play starts.
	testproc.WaitFor(t, 10*time.Second, "the load to be answered on every host", func() bool {
		for _, hl := range loads {
			if hl.keepAlive.Snapshot().OK < 5 || hl.newConn.Snapshot().OK < 5 {
				return false
			}
		}
		return true
	})
	p := runPlaybook(t, f.dir, inventory, "rollout.yml", vars, env, flags...)
	p.loads = map[string]load.Result{}
	for _, h := range f.hosts {
		hl := loads[h.name]
		res := sumResults(hl.keepAlive.Stop(), hl.newConn.Stop())
		p.loads[h.name] = res
		t.Logf("%s load: %s", h.name, res)
	}
	return p
}

// stop stops every coordinator: each drains its generations and exits 0.
func (f *ansibleFleet) stop(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, h := range f.hosts {
		if err := h.svc.Stop(ctx); err != nil {
			t.Errorf("%s: stop: %v", h.name, err)
		}
	}
}

// ansiblePlay is one ansible-playbook run.
type ansiblePlay struct {
	code  int
	out   string
	took  time.Duration
	recap map[string]map[string]int // host: ok, changed, failed, ...
	lines []string                  // the recap lines as printed
	loads map[string]load.Result    // roll: each host's load during the play
}

var recapLine = regexp.MustCompile(`^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$`)

// runPlaybook runs the playbook of deploy/ansible/ against inventory with
// vars as extra vars, env added to its environment and more flags, and
// parses its recap.
func runPlaybook(t *testing.T, dir, inventory, playbook string, vars map[string]any, env []string, flags ...string) ansiblePlay {
	t.Helper()
	book, err := filepath.Abs(filepath.Join(ansibleDir, playbook))
	if err != nil {
		t.Fatal(err)
	}
	extra, err := json.Marshal(vars)
	if err != nil {
		t.Fatal(err)
	}
	argv := append(append([]string{"-i", inventory, "-e", string(extra)}, flags...), book)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ansible-playbook", argv...)
	cmd.Dir, cmd.Env = dir, append(ansibleEnv(dir), env...)
	// Its workers and modules are its process group, ended with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	p := ansiblePlay{out: out.String(), took: time.Since(start), recap: map[string]map[string]int{}}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		p.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("ansible-playbook: %v\n%s", err, p.out)
	}
	recap := false
	for _, line := range strings.Split(p.out, "\n") {
		if strings.HasPrefix(line, "PLAY RECAP") {
			recap = true
			continue
		}
		m := recapLine.FindStringSubmatch(strings.TrimSpace(line))
		if !recap || m == nil {
			continue
		}
		p.lines = append(p.lines, strings.Join(strings.Fields(line), " "))
		counts := map[string]int{}
		for _, kv := range strings.Fields(m[2]) {
			k, v, _ := strings.Cut(kv, "=")
			counts[k], _ = strconv.Atoi(v)
		}
		p.recap[m[1]] = counts
	}
	t.Logf("ansible-playbook %s: exit %d in %v", strings.Join(append(flags, playbook), " "), p.code, p.took.Round(100*time.Millisecond))
	for _, l := range p.lines {
		t.Logf("  %s", l)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("ansible-playbook output:\n%s", tailLines(p.out, 120))
		}
	})
	return p
}

func (p ansiblePlay) wantCode(t *testing.T, code int) {
	t.Helper()
	if p.code != code {
		t.Errorf("ansible-playbook exited %d, want %d", p.code, code)
	}
}

func (p ansiblePlay) wantRecap(t *testing.T, host string, changed, failed int) {
	t.Helper()
	r, ok := p.recap[host]
	if !ok {
		t.Errorf("no recap line for %s in %q", host, p.lines)
		return
	}
	if r["changed"] != changed || r["failed"] != failed || r["unreachable"] != 0 {
		t.Errorf("%s: changed=%d failed=%d unreachable=%d; want changed=%d failed=%d", host, r["changed"], r["failed"], r["unreachable"], changed, failed)
	}
}

// wantLines checks that the play's output says each of these.
func (p ansiblePlay) wantLines(t *testing.T, says ...string) {
	t.Helper()
	for _, s := range says {
		if !strings.Contains(p.out, s) {
			t.Errorf("the play's output does not say %q", s)
		}
	}
}

// ansibleEnv keeps Ansible to dir: no configuration, home or temporary
// files of this machine's; the test's callback between batches available.
func ansibleEnv(dir string) []string {
	cfg := filepath.Join(dir, "ansible.cfg")
	_ = os.WriteFile(cfg, nil, 0o644)
	callbacks, _ := filepath.Abs("testdata/ansible/callback_plugins")
	return append(os.Environ(),
		"ANSIBLE_CONFIG="+cfg,
		"ANSIBLE_HOME="+filepath.Join(dir, "ansible-home"),
		"ANSIBLE_LOCAL_TEMP="+filepath.Join(dir, "ansible-tmp"),
		"ANSIBLE_REMOTE_TMP="+filepath.Join(dir, "ansible-remote"),
		"ANSIBLE_NOCOLOR=1",
		"ANSIBLE_PIPELINING=1",
		"ANSIBLE_CALLBACK_PLUGINS="+callbacks,
		"ANSIBLE_CALLBACKS_ENABLED=between_batches",
	)
}

// writeInventory writes a YAML (here JSON) inventory with the group
// rollover.
func writeInventory(t *testing.T, dir, name string, hosts map[string]map[string]any, vars map[string]any) string {
	t.Helper()
	b, err := json.MarshalIndent(map[string]any{"rollover": map[string]any{"hosts": hosts, "vars": vars}}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// python3 is the interpreter for the modules: Debian's, else python3 on
// PATH.
func python3(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return needTool(t, "python3")
}
