package coordinator

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rollover-sh/rollover/rollover"
)

// A generation of several processes (--instances N) runs under a small
// supervisor, the rollover binary itself started with InstancesCommand: the
// way einhorn's master or nginx's master runs its workers. To the
// coordinator it is one generation whose process tree holds N listening
// sockets, steered from outside like nginx's workers; the supervisor starts
// the N instances, says READY=1 on the generation's NOTIFY_SOCKET once all
// of them are ready, restarts one that exits after that alone (with
// backoff), and tells the coordinator of each exit, so that an exit in the
// bake rolls the whole generation back.
//
// The supervisor forwards the signals it gets (the drain signal first) to
// every instance. The instances share its process group, so the
// coordinator's SIGKILL of what is left of the group takes them too.

// InstancesCommand is the hidden first argument that makes the rollover
// binary run as a generation's supervisor (see Supervise).
const InstancesCommand = "__instances"

// EnvInstance and EnvInstances tell each instance its index (0 to N-1) and N.
const (
	EnvInstance  = rollover.EnvInstance
	EnvInstances = rollover.EnvInstances
)

// The notify assignments the supervisor adds to systemd's: how many
// instances serve now, and which one exited (its index, pid and status).
const (
	notifyInstances = "X_ROLLOVER_INSTANCES"
	notifyExited    = "X_ROLLOVER_INSTANCE_EXITED"
)

// Restart backoff of an instance that exits after its generation was ready:
// 100ms, doubling up to 10s; an instance that ran for restartReset starts
// over at 100ms.
const (
	restartFirst = 100 * time.Millisecond
	restartMax   = 10 * time.Second
	restartReset = 10 * time.Second
)

type instancesArgs struct {
	n     int
	ready string // how each instance says it is ready
	addr  string
	drain syscall.Signal
	argv  []string
}

// args renders a as the supervisor's command line after InstancesCommand.
func (a instancesArgs) args() []string {
	return append([]string{InstancesCommand, "-n", strconv.Itoa(a.n), "-ready", a.ready, "-addr", a.addr,
		"-drain-signal", strconv.Itoa(int(a.drain)), "--"}, a.argv...)
}

func parseInstancesArgs(args []string) (instancesArgs, error) {
	var a instancesArgs
	var sig int
	fs := flag.NewFlagSet(InstancesCommand, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.IntVar(&a.n, "n", 0, "")
	fs.StringVar(&a.ready, "ready", ReadyNotify, "")
	fs.StringVar(&a.addr, "addr", "", "")
	fs.IntVar(&sig, "drain-signal", int(syscall.SIGTERM), "")
	if err := fs.Parse(args); err != nil {
		return a, err
	}
	a.drain, a.argv = syscall.Signal(sig), fs.Args()
	switch {
	case a.n < 1 || a.n > maxGroup:
		return a, fmt.Errorf("-n must be 1 to %d, not %d", maxGroup, a.n)
	case a.ready != ReadyNotify && a.ready != ReadyListen && a.ready != ReadyLibrary:
		return a, fmt.Errorf("-ready must be library, notify or listen, not %q", a.ready)
	case a.ready == ReadyListen && a.addr == "":
		return a, errors.New("-ready=listen needs -addr")
	case len(a.argv) == 0:
		return a, errors.New("no command given")
	}
	return a, nil
}

// Supervise runs a generation of N instances of a command (args as
// instancesArgs.args renders them, after InstancesCommand) until all of
// them have exited after a drain signal. It returns nil when all exited 0
// then, and an error saying which did not, or which exited before the
// generation was ready.
func Supervise(args []string) error {
	a, err := parseInstancesArgs(args)
	if err != nil {
		return fmt.Errorf("%s: %w", InstancesCommand, err)
	}
	s := &supervisor{a: a, up: os.Getenv("NOTIFY_SOCKET"), stderr: os.Stderr, events: make(chan instEvent, 4*a.n), restart: make(chan int, a.n),
		ordered: make(chan struct{}, 1), byPID: map[int][2]int{}}
	// The instances' notify sockets: a short path (a socket's is bounded
	// at 108 bytes), private to the supervisor.
	dir, err := os.MkdirTemp("", "rollover-instances-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	s.dir = dir
	if a.ready == ReadyLibrary {
		// The instances link the library: the supervisor speaks its
		// protocol to the coordinator for them.
		n, _ := strconv.Atoi(os.Getenv(rollover.EnvGeneration))
		onDrain := func() {
			select {
			case s.ordered <- struct{}{}:
			default:
			}
		}
		onReady := func(pid int) {
			// Its ready may come before start has noted its pid.
			for range 1000 {
				s.mu.Lock()
				in, ok := s.byPID[pid]
				s.mu.Unlock()
				if ok {
					s.events <- instEvent{i: in[0], inc: in[1], ready: true}
					return
				}
				time.Sleep(time.Millisecond)
			}
		}
		// The callbacks are set before the relay's goroutines start.
		s.relay, err = newRelay(os.Getenv(rollover.EnvSocket), n, os.Getenv(rollover.EnvSecret), filepath.Join(dir, "relay.sock"), onDrain, onReady)
		if err != nil {
			return fmt.Errorf("%s: %w", InstancesCommand, err)
		}
		defer s.relay.close()
	}
	// Its stdout and stderr are pipes to the coordinator: if that dies, a
	// write must fail, not kill the supervisor (Notify, not Ignore: an
	// ignored SIGPIPE would pass on to the instances through exec).
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, a.drain, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	return s.run(sigs)
}

type supervisor struct {
	a        instancesArgs
	up       string // the generation's NOTIFY_SOCKET, when there is one
	dir      string // the instances' own notify sockets
	stderr   io.Writer
	events   chan instEvent
	restart  chan int // an instance's backoff passed
	insts    []*instance
	relay    *relay        // the instances link the library
	ordered  chan struct{} // the relay got the drain order
	mu       sync.Mutex
	byPID    map[int][2]int // an instance's index and incarnation, by pid (the relay asks)
	ready    bool           // all instances were ready once: the generation is
	draining bool
	failure  error
}

// instance is one of the N processes; inc counts its incarnations, so
// that the events of a dead one are told from its successor's.
type instance struct {
	i        int
	inc      int
	pid      int
	started  time.Time
	ready    bool
	running  bool
	restarts int
	notify   *notifySocket
	done     chan struct{} // closed when this incarnation exited
}

type instEvent struct {
	i, inc int
	ready  bool  // else exited
	err    error // how it exited
}

func (s *supervisor) run(sigs <-chan os.Signal) error {
	s.insts = make([]*instance, s.a.n)
	for i := range s.insts {
		s.insts[i] = &instance{i: i}
	}
	for _, in := range s.insts {
		if err := s.start(in); err != nil {
			s.stopAll()
			s.wait(sigs)
			return err
		}
	}
	for !s.draining || s.running() > 0 {
		select {
		case <-s.ordered:
			s.draining = true // the relay passes the order on
		case sig := <-sigs:
			if sig == s.a.drain || sig == syscall.SIGTERM || sig == syscall.SIGINT || sig == syscall.SIGQUIT {
				s.draining = true
			}
			s.forward(sig.(syscall.Signal))
		case e := <-s.events:
			s.event(e)
		case i := <-s.restart:
			if !s.draining {
				if err := s.start(s.insts[i]); err != nil {
					fmt.Fprintf(s.stderr, "rollover: instance %d: %v\n", i, err)
					s.backoff(s.insts[i])
				}
			}
		}
	}
	if s.relay != nil {
		s.relay.done()
	}
	return s.failure
}

// wait waits for every instance to exit, after a failure.
func (s *supervisor) wait(sigs <-chan os.Signal) {
	for s.running() > 0 {
		select {
		case <-sigs:
		case e := <-s.events:
			s.event(e)
		}
	}
}

func (s *supervisor) running() int {
	n := 0
	for _, in := range s.insts {
		if in.running {
			n++
		}
	}
	return n
}

func (s *supervisor) serving() int {
	n := 0
	for _, in := range s.insts {
		if in.running && in.ready {
			n++
		}
	}
	return n
}

func (s *supervisor) event(e instEvent) {
	in := s.insts[e.i]
	if e.inc != in.inc {
		return // a dead incarnation's readiness
	}
	if e.ready {
		if in.ready || !in.running {
			return
		}
		in.ready = true
		switch {
		case !s.ready && s.serving() == s.a.n && s.relay != nil:
			s.ready = true
			s.tell(fmt.Sprintf("STATUS=%d instances ready (pids %s)\n%s=%d", s.a.n, s.pids(), notifyInstances, s.a.n))
			s.relay.ready()
		case !s.ready && s.serving() == s.a.n:
			s.ready = true
			s.tell(fmt.Sprintf("READY=1\nSTATUS=%d instances ready (pids %s)\n%s=%d", s.a.n, s.pids(), notifyInstances, s.a.n))
		case s.ready:
			s.tell(fmt.Sprintf("STATUS=instance %d restarted (pid %d): %d of %d instances serve\n%s=%d", in.i, in.pid, s.serving(), s.a.n, notifyInstances, s.serving()))
		}
		return
	}
	in.running, in.ready = false, false
	if in.notify != nil {
		in.notify.close()
	}
	if s.relay != nil {
		s.relay.retire(in.pid)
	}
	s.mu.Lock()
	delete(s.byPID, in.pid)
	s.mu.Unlock()
	close(in.done)
	what := fmt.Sprintf("instance %d of %d, pid %d: %s", in.i, s.a.n, in.pid, exitText(e.err))
	switch {
	case s.draining:
		if e.err != nil && s.failure == nil {
			s.failure = errors.New(what)
		}
	case !s.ready:
		// Before the generation was ready: it fails as a whole, the way
		// one process that exits before its ready does.
		fmt.Fprintf(s.stderr, "rollover: %s, before all instances were ready; stopping the others\n", what)
		s.failure = fmt.Errorf("%s, before all instances were ready", what)
		s.stopAll()
	default:
		if time.Since(in.started) >= restartReset {
			in.restarts = 0
		}
		d := s.backoff(in)
		fmt.Fprintf(s.stderr, "rollover: %s; restarting it in %v\n", what, d)
		s.tell(fmt.Sprintf("%s=%s\n%s=%d\nSTATUS=%s; restarting it in %v", notifyExited, what, notifyInstances, s.serving(), what, d))
	}
}

// backoff schedules in's restart and returns its delay.
func (s *supervisor) backoff(in *instance) time.Duration {
	d := min(restartFirst<<min(in.restarts, 10), restartMax)
	in.restarts++
	time.AfterFunc(d, func() { s.restart <- in.i }) // buffered: one pending per instance
	return d
}

// forward passes sig to every running instance: the coordinator sends the
// drain signal to the generation's process, this one.
func (s *supervisor) forward(sig syscall.Signal) {
	for _, in := range s.insts {
		if in.running {
			_ = syscall.Kill(in.pid, sig)
		}
	}
}

// stopAll starts the drain of every instance itself: the generation failed
// before the coordinator knew it.
func (s *supervisor) stopAll() {
	s.draining = true
	for _, in := range s.insts {
		if in.running {
			_ = syscall.Kill(in.pid, s.a.drain)
		}
	}
}

func (s *supervisor) pids() string {
	var p []string
	for _, in := range s.insts {
		p = append(p, strconv.Itoa(in.pid))
	}
	return strings.Join(p, " ")
}

// tell sends a notify message to the coordinator, on a new datagram
// socket each time (as sd_notify does): the coordinator's socket may have
// been made anew.
func (s *supervisor) tell(msg string) {
	if s.up == "" {
		return
	}
	if c, err := net.Dial("unixgram", s.up); err == nil {
		_ = c.SetWriteDeadline(time.Now().Add(time.Second)) // a stopped coordinator must not stop the supervisor
		_, _ = c.Write([]byte(msg))
		c.Close()
	}
}

// start starts a new incarnation of in, with its own notify socket, and
// watches for its readiness and its exit.
func (s *supervisor) start(in *instance) error {
	in.inc++
	env := make([]string, 0, len(os.Environ())+3)
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		// The coordinator knows one process per generation: the
		// instances speak the control protocol to the relay, if at all.
		case "NOTIFY_SOCKET", rollover.EnvSocket, rollover.EnvSecret, EnvInstance, EnvInstances:
			continue
		}
		env = append(env, kv)
	}
	env = append(env, EnvInstance+"="+strconv.Itoa(in.i), EnvInstances+"="+strconv.Itoa(s.a.n))
	if s.relay != nil {
		env = append(env, rollover.EnvSocket+"="+s.relay.ln.Addr().String(), rollover.EnvSecret+"="+s.relay.secret)
	}
	var ns *notifySocket
	if s.a.ready == ReadyNotify {
		var err error
		if ns, err = openNotifyAt(filepath.Join(s.dir, fmt.Sprintf("%d.%d.notify", in.i, in.inc))); err != nil {
			return err
		}
		env = append(env, "NOTIFY_SOCKET="+ns.path)
	}
	cmd := exec.Command(s.a.argv[0], s.a.argv[1:]...)
	cmd.Env, cmd.Stdin, cmd.Stdout, cmd.Stderr = env, nil, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		if ns != nil {
			ns.close()
		}
		return fmt.Errorf("%s: %w", s.a.argv[0], err)
	}
	in.pid, in.started, in.running, in.ready, in.notify = cmd.Process.Pid, time.Now(), true, false, ns
	in.done = make(chan struct{})
	i, inc, done := in.i, in.inc, in.done
	s.mu.Lock()
	s.byPID[in.pid] = [2]int{i, inc}
	s.mu.Unlock()
	go func() {
		err := cmd.Wait()
		var exit error
		if ps := cmd.ProcessState; ps != nil && !ps.Success() {
			exit = errors.New(ps.String())
		} else if ps == nil {
			exit = err
		}
		s.events <- instEvent{i: i, inc: inc, err: exit}
	}()
	switch {
	case s.relay != nil: // its ready comes through the relay
	case ns != nil:
		go ns.read(func(kv map[string]string) {
			if kv["READY"] == "1" {
				s.events <- instEvent{i: i, inc: inc, ready: true}
			}
		})
	default:
		go func() {
			if waitListening(in.pid, s.a.addr, true, 24*time.Hour, done) {
				s.events <- instEvent{i: i, inc: inc, ready: true}
			}
		}()
	}
	return nil
}

// instanceCount reads the notify assignment of how many instances serve.
func instanceCount(kv map[string]string) (int, bool) {
	v, ok := kv[notifyInstances]
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(v)
	return n, err == nil && n >= 0
}
