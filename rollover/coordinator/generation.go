package coordinator

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// Generation states.
const (
	stateStarting = "starting"
	stateReady    = "ready"
	stateActive   = "active"
	stateDraining = "draining"
)

// gen is one spawned generation. Fields marked "owner" are touched only by
// the owner goroutine; the channels are closed once, by the owner.
type gen struct {
	n      int
	launch Launch
	argv   []string // launch.Argv
	secret string
	pid    int
	start  time.Time
	proc   *os.Process
	tail   *tail
	pumps  sync.WaitGroup
	notify *notifySocket // ReadyNotify only

	// owner
	state        string
	conn         *genConn
	stats        wire.Stats
	steerable    bool
	steerErr     string
	drainStart   time.Time
	activeAt     time.Time
	pending      map[uint64]chan wire.Msg
	adopting     bool   // left by a crashed coordinator; expecting its hello
	wasActive    bool   // the predecessor's active generation
	notifyStatus string // last STATUS= (ReadyNotify)

	hello   chan struct{} // hello accepted
	ready   chan struct{} // ready received
	left    chan struct{} // listeners closed, or exited
	exited  chan struct{} // process gone; exitErr set before
	exitErr error
}

func newGen(l Launch) *gen {
	return &gen{
		launch:  l,
		argv:    l.Argv,
		secret:  newSecret(),
		tail:    newTail(10),
		state:   stateStarting,
		pending: map[uint64]chan wire.Msg{},
		hello:   make(chan struct{}),
		ready:   make(chan struct{}),
		left:    make(chan struct{}),
		exited:  make(chan struct{}),
	}
}

func closeOnce(ch chan struct{}) {
	select {
	case <-ch:
	default:
		close(ch)
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

// spawnProcess starts g in its own process group with its output forwarded
// to log. It never goes through a shell.
func spawnProcess(g *gen, socket string, adoptTimeout time.Duration, log *slog.Logger) error {
	if err := checkCommand(g.argv); err != nil {
		return err
	}
	path, err := exec.LookPath(g.argv[0])
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCommand, err)
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return err
	}
	notifyPath := ""
	if g.launch.Ready == ReadyNotify {
		ns, err := openNotify(filepath.Dir(socket), g.n)
		if err != nil {
			outR.Close()
			outW.Close()
			errR.Close()
			errW.Close()
			return err
		}
		g.notify, notifyPath = ns, ns.path
	}
	attr := &os.ProcAttr{
		Env:   childEnv(socket, g.n, g.secret, notifyPath, adoptTimeout),
		Files: []*os.File{nil, outW, errW},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	}
	devnull, err := os.Open(os.DevNull)
	if err == nil {
		attr.Files[0] = devnull
		defer devnull.Close()
	}
	g.start = time.Now()
	p, err := os.StartProcess(path, g.argv, attr)
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		if g.notify != nil {
			g.notify.close()
		}
		return fmt.Errorf("%w: %s: %v", ErrCommand, g.argv[0], err)
	}
	g.proc, g.pid = p, p.Pid
	l := log.With("gen", g.n, "pid", g.pid)
	g.pumps.Add(2)
	go g.pump(outR, l.With("stream", "stdout"), nil)
	go g.pump(errR, l.With("stream", "stderr"), g.tail)
	return nil
}

func (g *gen) pump(r io.ReadCloser, log *slog.Logger, t *tail) {
	defer g.pumps.Done()
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		log.Info(line)
		if t != nil {
			t.add(line)
		}
	}
}

// signal sends sig to the generation's process group.
func (g *gen) signal(sig syscall.Signal) {
	if g.pid > 0 {
		_ = syscall.Kill(-g.pid, sig)
	}
}

// kill ends the generation: SIGTERM to its group, SIGKILL after grace.
func (g *gen) kill(grace time.Duration) {
	g.signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(grace):
		g.signal(syscall.SIGKILL)
		<-g.exited
	}
}

// stderrTail returns the last stderr lines once the pumps caught up (bounded).
func (g *gen) stderrTail() string {
	done := make(chan struct{})
	go func() { g.pumps.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(500 * time.Millisecond):
	}
	return g.tail.String()
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
