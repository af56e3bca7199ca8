package harness

import (
	"bufio"
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
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// Config says which binaries to run and how.
type Config struct {
	Rollover string // path to the rollover binary
	App      string // path to the demoapp binary
	Dir      string // private directory for the control socket (keep it short)

	DrainGrace   time.Duration // default 100ms
	DrainTimeout time.Duration // default 10s
	ReadyTimeout time.Duration // default 10s
	// Bake is the coordinator's --bake: default 100ms, so that every test
	// rolls over through a bake; negative turns it off.
	Bake       time.Duration
	Naive      bool      // demoapp -naive: listener close + Shutdown, no steering
	Metrics    bool      // serve /metrics on a free port
	Log        io.Writer // coordinator output (nil: discarded)
	StartFlags []string  // more `rollover start` flags, e.g. --log-format json
	AppArgs    []string  // more flags for the app, after -addr and -version
	ListenAll  bool      // the app listens on ":PORT" (every address); clients still use Addr
	// Port is the app's port (0: a free one). Wrap runs the coordinator
	// through a command that execs it, e.g. ip netns exec NAME, so that the
	// pid Start sees is the coordinator's.
	Port int
	Wrap []string
}

// Service is a running coordinator with its generations.
type Service struct {
	cfg         Config
	Socket      string
	Addr        string // the app's address, 127.0.0.1:port
	MetricsAddr string // "" unless Config.Metrics
	cmd         *exec.Cmd
	args        []string
	exited      chan struct{}
	exitErr     error

	mu   sync.Mutex
	pids map[int]bool // every generation pid seen
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Start runs `rollover start` with demoapp v1 and waits until it answers.
func Start(ctx context.Context, cfg Config) (*Service, error) {
	if cfg.DrainGrace == 0 {
		cfg.DrainGrace = 100 * time.Millisecond
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 10 * time.Second
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 10 * time.Second
	}
	switch {
	case cfg.Bake == 0:
		cfg.Bake = 100 * time.Millisecond
	case cfg.Bake < 0:
		cfg.Bake = 0
	}
	port := cfg.Port
	if port == 0 {
		p, err := FreePort()
		if err != nil {
			return nil, err
		}
		port = p
	}
	s := &Service{
		cfg:    cfg,
		Socket: cfg.Dir + "/ctl.sock",
		Addr:   "127.0.0.1:" + strconv.Itoa(port),
		exited: make(chan struct{}),
		pids:   map[int]bool{},
	}
	args := []string{"start", "--socket", s.Socket,
		"--drain-grace", cfg.DrainGrace.String(), "--drain-timeout", cfg.DrainTimeout.String(),
		"--ready-timeout", cfg.ReadyTimeout.String(), "--kill-grace", "2s", "--bake", cfg.Bake.String(), "--metrics-addr", ""}
	if cfg.Metrics {
		mp, err := FreePort()
		if err != nil {
			return nil, err
		}
		s.MetricsAddr = "127.0.0.1:" + strconv.Itoa(mp)
		args[len(args)-1] = s.MetricsAddr
	}
	args = append(args, cfg.StartFlags...)
	args = append(args, "--")
	args = append(args, s.AppArgv("v1")...)
	s.args = args
	if err := s.launch(); err != nil {
		return nil, err
	}
	if err := s.waitActive(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Service) launch() error {
	argv := append(append(slices.Clone(s.cfg.Wrap), s.cfg.Rollover), s.args...)
	s.cmd = exec.Command(argv[0], argv[1:]...)
	s.cmd.Stdout, s.cmd.Stderr = s.cfg.Log, s.cfg.Log
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.exited = make(chan struct{})
	cmd, exited := s.cmd, s.exited
	go func() { s.exitErr = cmd.Wait(); close(exited) }()
	return nil
}

// Crash kills the coordinator with SIGKILL, leaving its generations behind.
func (s *Service) Crash() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// Restart starts a new coordinator with the same command line on the same
// socket, as an operator would after a crash, and waits until a generation
// is active (adopted or new).
func (s *Service) Restart(ctx context.Context) error {
	if err := s.launch(); err != nil {
		return err
	}
	return s.waitActive(ctx)
}

// Signal sends sig to the coordinator.
func (s *Service) Signal(sig os.Signal) error { return s.cmd.Process.Signal(sig) }

func (s *Service) waitActive(ctx context.Context) error {
	cfg := s.cfg
	deadline := time.Now().Add(cfg.ReadyTimeout + 10*time.Second)
	for {
		st, err := s.Status(ctx)
		if err == nil && st.Active > 0 {
			for _, g := range st.Generations {
				s.addPID(g.PID)
			}
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("harness: coordinator exited during start: %v", s.exitErr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Kill()
			return fmt.Errorf("harness: no active generation after %v: %v", cfg.ReadyTimeout, err)
		}
	}
}

// AppArgv is the demo app's command line for a version.
func (s *Service) AppArgv(version string) []string {
	listen := s.Addr
	if s.cfg.ListenAll {
		_, port, _ := net.SplitHostPort(s.Addr)
		listen = ":" + port
	}
	argv := []string{s.cfg.App, "-addr", listen, "-version", version}
	argv = append(argv, s.cfg.AppArgs...)
	if s.cfg.Naive {
		argv = append(argv, "-naive")
	}
	return argv
}

// PID is the coordinator's pid.
func (s *Service) PID() int { return s.cmd.Process.Pid }

// Exited is closed when the coordinator has exited.
func (s *Service) Exited() <-chan struct{} { return s.exited }

// ExitCode is the coordinator's exit code once Exited is closed (-1 when
// a signal ended it).
func (s *Service) ExitCode() int {
	<-s.exited
	if s.exitErr == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(s.exitErr, &ee) {
		return ee.ExitCode()
	}
	return -1
}

func (s *Service) addPID(pid int) {
	if pid <= 0 {
		return
	}
	s.mu.Lock()
	s.pids[pid] = true
	s.mu.Unlock()
}

// PIDs are every generation pid seen so far.
func (s *Service) PIDs() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for p := range s.pids {
		out = append(out, p)
	}
	return out
}

// CLI runs the rollover binary with args against this service's socket and
// returns its stdout, stderr and exit code.
func (s *Service) CLI(ctx context.Context, args ...string) (stdout, stderr string, code int, err error) {
	return CLI(ctx, s.cfg.Rollover, s.Socket, args...)
}

// CLI runs the rollover binary at path with args against the control socket
// and returns its stdout, stderr and exit code; err only when it could not
// run.
func CLI(ctx context.Context, path, socket string, args ...string) (stdout, stderr string, code int, err error) {
	full := append([]string{args[0], "--socket", socket}, args[1:]...)
	cmd := exec.CommandContext(ctx, path, full...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return o.String(), e.String(), ee.ExitCode(), nil
	}
	return o.String(), e.String(), 0, err
}

// Status runs `rollover status --json`.
func (s *Service) Status(ctx context.Context) (wire.Status, error) {
	return Status(ctx, s.cfg.Rollover, s.Socket)
}

// Status runs `rollover status --json` with the rollover binary at path
// against the control socket: for coordinators that a Service did not start.
func Status(ctx context.Context, path, socket string) (wire.Status, error) {
	var st wire.Status
	out, errOut, code, err := CLI(ctx, path, socket, "status", "--json")
	if err != nil {
		return st, err
	}
	if code != 0 {
		return st, fmt.Errorf("status: exit %d: %s", code, errOut)
	}
	err = json.Unmarshal([]byte(out), &st)
	return st, err
}

// Rollover is what one `rollover next` reported.
type Rollover struct {
	Generation int
	PID        int
	Old        int           // the generation it replaced
	Ready      time.Duration // spawn to ready
	Took       time.Duration // the CLI's wall time until it returned
	Drain      time.Duration // drain start to the old one's exit (with wait)
	Events     []wire.Event
	Stderr     string
	Code       int
}

// Next rolls over to the demo app at version with `rollover next --json`.
func (s *Service) Next(ctx context.Context, version string, wait bool) (Rollover, error) {
	args := []string{"next", "--json"}
	if wait {
		args = append(args, "--wait")
	}
	args = append(args, "--")
	args = append(args, s.AppArgv(version)...)
	start := time.Now()
	out, errOut, code, err := s.CLI(ctx, args...)
	r := Rollover{Took: time.Since(start), Stderr: errOut, Code: code}
	if err != nil {
		return r, err
	}
	sc := bufio.NewScanner(bytes.NewReader([]byte(out)))
	for sc.Scan() {
		var e wire.Event
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		r.Events = append(r.Events, e)
		switch e.Phase {
		case wire.PhaseStarted:
			r.Generation, r.PID = e.Generation, e.PID
			s.addPID(e.PID)
		case wire.PhaseReady:
			r.Ready = time.Duration(e.Millis) * time.Millisecond
		case wire.PhaseDraining:
			r.Old = e.Generation
		case wire.PhaseDrained:
			r.Drain = time.Duration(e.Millis) * time.Millisecond
		}
	}
	if code != 0 {
		return r, fmt.Errorf("next: exit %d: %s", code, bytes.TrimSpace([]byte(errOut)))
	}
	return r, nil
}

// Get fetches path on a fresh connection and returns the status, the
// generation header and the body.
func (s *Service) Get(ctx context.Context, path string) (int, string, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.Addr+path, nil)
	if err != nil {
		return 0, "", "", err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Rollover-Generation"), string(b), err
}

// Stop runs `rollover stop` and waits for the coordinator to exit.
func (s *Service) Stop(ctx context.Context) error {
	_, errOut, code, err := s.CLI(ctx, "stop")
	if err != nil {
		return err
	}
	if code != 0 {
		return fmt.Errorf("stop: exit %d: %s", code, errOut)
	}
	select {
	case <-s.exited:
		return s.exitErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Kill ends the coordinator and every generation seen, by pid. For cleanup
// after a failure; it leaves nothing behind that this Service started.
func (s *Service) Kill() {
	select {
	case <-s.exited:
	default:
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	for _, p := range s.PIDs() {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
}

// Alive returns the pids among pids that still exist.
func Alive(pids []int) []int {
	var out []int
	for _, p := range pids {
		if err := syscall.Kill(p, 0); err == nil || !errors.Is(err, syscall.ESRCH) {
			out = append(out, p)
		}
	}
	return out
}

// WaitGone waits until none of pids exists, or the deadline passes.
func WaitGone(pids []int, d time.Duration) []int {
	deadline := time.Now().Add(d)
	for {
		left := Alive(pids)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(10 * time.Millisecond)
	}
}
