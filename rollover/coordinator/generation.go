package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// gen is one generation. The fields above "owner" are set before the
// machine knows the generation and never change after; the owner fields are
// written only by machine.step. Its channels are closed once, by step.
type gen struct {
	n      int
	launch Launch
	secret string
	start  time.Time
	pid    int
	proc   *os.Process
	// end, for a spawned generation, cancels its command: SIGTERM to its
	// process group, SIGKILL after the kill grace (exec.Cmd's Cancel and
	// WaitDelay). Nil for an adopted one, which is not our child.
	end    context.CancelFunc
	tail   *tail
	notify *notifySocket // ReadyNotify, or a supervisor of instances
	exe    fileID        // the program file, as it was at spawn

	// owner: other goroutines learn them through a genView (qGen)
	state        genState
	conn         *peerConn
	stats        wire.Stats
	statsAt      time.Time // its last report
	steerable    bool
	steerErr     string
	readyAt      time.Time
	activeAt     time.Time
	drainStart   time.Time
	exitAt       time.Time
	adopting     bool   // left by a crashed coordinator; expecting its hello
	wasActive    bool   // the predecessor's active generation
	notifyStatus string // last STATUS= (ReadyNotify)
	exitErr      error
	addrs        []string     // the listeners' addresses, as the library reported them at ready
	released     bool         // in the bake of its successor: steered away, keeping its listener
	health       *wire.Health // the rule its bake or canary step judges it by
	unhealthy    bool         // it broke that rule (and the rollover was told)
	killed       bool         // by its drain deadline or a forced stop
	forcedConns  int64        // cut at its drain deadline
	forcedReqs   int64
	instances    int            // of its instances, how many serve now (supervised)
	remote       []remoteSocket // its listening sockets, when the coordinator steers them
	held         bool           // the coordinator holds its sockets until they leave their groups in order
	repinDue     bool           // its instances changed during a rollover: re-pin once it ends

	// Closed once, by the owner; a closed channel says only that the
	// moment passed, and the rest is asked for (qGen).
	hello chan struct{} // hello accepted
	ready chan struct{} // ready
	left  chan struct{} // listeners closed, or exited
	gone  chan struct{} // the process is gone
}

func newGen(n int, l Launch) *gen {
	g := &gen{
		n:      n,
		launch: l,
		secret: newSecret(),
		tail:   newTail(10),
		state:  stateStarting,
		hello:  make(chan struct{}),
		ready:  make(chan struct{}),
		left:   make(chan struct{}),
		gone:   make(chan struct{}),
	}
	if l.Ready != ReadyLibrary {
		g.steerErr = "the app does not link the rollover library (--ready=" + l.Ready + ")"
	}
	return g
}

// serving is how many of g's processes serve now: its supervisor's count
// of its instances, or 1 for one process. Owner only.
func (g *gen) serving() int {
	switch {
	case g.state == stateGone:
		return 0
	case g.launch.supervised():
		return g.instances
	}
	return 1
}

// port is the port g serves (0: unknown): from its listeners' addresses,
// or its --addr. Owner only.
func (g *gen) port() int {
	for _, a := range append(slices.Clone(g.addrs), g.launch.Addr) {
		if _, p, err := net.SplitHostPort(a); err == nil {
			if n, err := strconv.Atoi(p); err == nil && n > 0 {
				return n
			}
		}
	}
	return 0
}

func closeOnce(ch chan struct{}) {
	if !isDone(ch) {
		close(ch)
	}
}

// isDone reports whether ch is closed. Only the owner closes these
// channels, so on the owner goroutine the answer stays true.
func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// checkCommand says, in one line, why argv[0] cannot be run.
func checkCommand(argv []string) error {
	if len(argv) == 0 || argv[0] == "" {
		return fmt.Errorf("%w: no command given", ErrUsage)
	}
	name := argv[0]
	if strings.ContainsRune(name, '/') {
		fi, err := os.Stat(name)
		switch {
		case errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("%w: %s does not exist", ErrCommand, name)
		case err != nil:
			return fmt.Errorf("%w: %s: %v", ErrCommand, name, err)
		case fi.IsDir():
			return fmt.Errorf("%w: %s is a directory, not a program", ErrCommand, name)
		case fi.Mode()&0o111 == 0:
			return fmt.Errorf("%w: %s is not executable (chmod +x it)", ErrCommand, name)
		}
		return nil
	}
	if _, err := exec.LookPath(name); err != nil {
		return fmt.Errorf("%w: %s not found in PATH", ErrCommand, name)
	}
	return nil
}

func newSecret() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// childEnv is the coordinator's environment minus what must not leak into a
// generation (the coordinator's own identity when it runs under another
// coordinator, systemd's notify socket), plus this generation's identity.
func childEnv(socket string, n int, secret, notifyPath string, adoptTimeout time.Duration) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case rollover.EnvSocket, rollover.EnvGeneration, rollover.EnvSecret, "NOTIFY_SOCKET", rollover.EnvAdoptTimeout:
			continue
		}
		env = append(env, kv)
	}
	if notifyPath != "" {
		env = append(env, "NOTIFY_SOCKET="+notifyPath)
	}
	if adoptTimeout > 0 {
		env = append(env, rollover.EnvAdoptTimeout+"="+adoptTimeout.String())
	}
	return append(env,
		rollover.EnvSocket+"="+socket,
		rollover.EnvGeneration+"="+strconv.Itoa(n),
		rollover.EnvSecret+"="+secret,
	)
}

// spawner starts generations as exec.Cmds: argv (never a shell), in their
// own process group, stdout and stderr logged line by line.
type spawner struct {
	socket       string
	adoptTimeout time.Duration
	killGrace    time.Duration
	log          *slog.Logger
	wait         func(func(context.Context)) // runs the process's waiter, owned
	ended        func(g *gen, err error)     // reports the process's end
}

func (s *spawner) spawn(g *gen) error {
	if err := checkCommand(g.launch.Argv); err != nil {
		return err
	}
	path, err := exec.LookPath(g.launch.Argv[0])
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCommand, err)
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	g.exe = identify(path)
	name, args, argv0 := g.program(path)
	notifyPath := ""
	if g.launch.Ready == ReadyNotify || g.launch.supervised() {
		ns, err := openNotify(filepath.Dir(s.socket), g.n)
		if err != nil {
			return err
		}
		g.notify, notifyPath = ns, ns.path
	}
	ctx, end := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Args[0] = argv0
	cmd.Env = childEnv(s.socket, g.n, g.secret, notifyPath, s.adoptTimeout)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Polite first: SIGTERM to the whole group (a supervisor passes it on
	// to its instances: once each). Past WaitDelay, exec kills the
	// process, and exited kills what is left of its group.
	cmd.Cancel = func() error {
		if g.launch.supervised() {
			return cmd.Process.Signal(syscall.SIGTERM)
		}
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	}
	cmd.WaitDelay = s.killGrace
	l := s.log.With("gen", g.n)
	stdout := &lineLog{log: l, stream: "stdout"}
	stderr := &lineLog{log: l, stream: "stderr", tail: g.tail}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// Hold the streams until they know the pid: the first line may come
	// before Start returns.
	stdout.mu.Lock()
	stderr.mu.Lock()
	g.start = time.Now()
	err = cmd.Start()
	if err == nil {
		stdout.log = stdout.log.With("pid", cmd.Process.Pid, "stream", stdout.stream)
		stderr.log = stderr.log.With("pid", cmd.Process.Pid, "stream", stderr.stream)
	}
	stdout.mu.Unlock()
	stderr.mu.Unlock()
	if err != nil {
		end()
		if g.notify != nil {
			g.notify.close()
		}
		return fmt.Errorf("%w: %s: %v", ErrCommand, g.launch.Argv[0], err)
	}
	g.proc, g.pid, g.end = cmd.Process, cmd.Process.Pid, end
	// The waiter ends with the process, which Run outlives: every
	// generation is gone before it returns.
	s.wait(func(context.Context) {
		_ = cmd.Wait() // its error may be the context's; the process state tells how it ended
		end()
		stdout.flush()
		stderr.flush()
		var err error
		if ps := cmd.ProcessState; ps != nil && !ps.Success() {
			err = errors.New(ps.String())
		}
		s.ended(g, err)
	})
	return nil
}

// program is what g's process runs, given the app's path: the app, or,
// for several instances, this very binary as their supervisor
// (/proc/self/exe, even once a package upgrade replaced the file), which
// reports ready once all of them are. argv0 is what ps shows.
func (g *gen) program(path string) (name string, args []string, argv0 string) {
	if !g.launch.supervised() {
		return path, g.launch.Argv[1:], g.launch.Argv[0]
	}
	a := instancesArgs{n: g.launch.Instances, ready: g.launch.Ready, addr: g.launch.Addr, drain: g.launch.DrainSignal,
		argv: append([]string{path}, g.launch.Argv[1:]...)}
	return "/proc/self/exe", a.args(), "rollover"
}

// signal sends sig to the generation's process group.
func (g *gen) signal(sig syscall.Signal) {
	if g.pid > 0 {
		_ = syscall.Kill(-g.pid, sig)
	}
}

// lineLog logs a stream of output one line at a time, tagged with the
// generation, its pid and the stream.
type lineLog struct {
	mu     sync.Mutex
	log    *slog.Logger
	stream string
	tail   *tail
	buf    []byte
}

// maxLine bounds a line that never ends.
const maxLine = 64 << 10

func (w *lineLog) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) >= maxLine {
				w.line(w.buf)
				w.buf = w.buf[:0]
			}
			return len(p), nil
		}
		w.line(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
}

func (w *lineLog) line(b []byte) {
	s := string(bytes.TrimSuffix(b, []byte("\r")))
	// The log line has its own time: drop the app's.
	if loc := appTime.FindStringIndex(s); loc != nil && loc[1] < len(s) {
		s = s[loc[1]:]
	}
	w.log.Info(s)
	if w.tail != nil {
		w.tail.add(s)
	}
}

// flush logs a last line that had no newline.
func (w *lineLog) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.line(w.buf)
		w.buf = nil
	}
}

// appTime matches a timestamp at the start of an app's line: Go's log
// (2006/01/02 15:04:05.000000), RFC 3339, Python's logging (2006-01-02
// 15:04:05,000) and slog's text (time=…), with the space after it.
var appTime = regexp.MustCompile(`^(time=)?\d{4}[-/]\d\d[-/]\d\d[T ]\d\d:\d\d:\d\d([.,]\d+)?(Z|[+-]\d\d:?\d\d)?\s+`)

// fileID tells whether a program file was replaced: a deploy that writes a
// new file changes the inode, one that writes in place the mtime or size.
type fileID struct {
	path      string
	dev, ino  uint64
	mtime     time.Time
	size      int64
	available bool
}

func identify(path string) fileID {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{path: path}
	}
	id := fileID{path: path, mtime: fi.ModTime(), size: fi.Size(), available: true}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = st.Dev, st.Ino
	}
	return id
}

// same reports whether a and b are known to be the same, unchanged file.
func (a fileID) same(b fileID) bool {
	return a.available && b.available && a == b
}

// tail keeps the last lines of a stream.
type tail struct {
	mu    sync.Mutex
	lines []string
	max   int
}

func newTail(max int) *tail { return &tail{max: max} }

func (t *tail) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(line) > 300 {
		line = line[:300] + "…"
	}
	t.lines = append(t.lines, line)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, " | ")
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}
