package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// DefaultMetricsAddr is where the coordinator serves /metrics unless told.
const DefaultMetricsAddr = "127.0.0.1:9754"

// Exit codes, as the README documents them (CLI).
const (
	exitOK            = 0
	exitFailed        = 1
	exitUsage         = 2
	exitNoCoordinator = 3
)

// codeError carries an exit code.
type codeError struct {
	code int
	err  error
}

func (e *codeError) Error() string { return e.err.Error() }
func (e *codeError) Unwrap() error { return e.err }

func usageErr(format string, a ...any) error {
	return &codeError{exitUsage, fmt.Errorf(format, a...)}
}

func exitCode(err error) int {
	var ce *codeError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ce):
		return ce.code
	case errors.Is(err, coordinator.ErrUsage):
		return exitUsage
	default:
		return exitFailed
	}
}

const usage = `usage:
  rollover start [flags] [--] CMD [ARGS...]   run the coordinator; CMD is generation 1
  rollover next [flags] [--] [CMD [ARGS...]]  roll over (default: the active command line)
  rollover status [--json]                    generations, states, pids, in-flight counts
  rollover rollback                           roll to the previous generation's command
  rollover stop                               drain every generation, then exit
  rollover version
Every command takes --name or --socket (env ROLLOVER_SOCKET). "rollover CMD -h" lists flags.`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usageErr("no command\n%s", usage)
	}
	switch args[0] {
	case "start":
		return runStart(ctx, args[1:], stderr)
	case "next":
		return runNext(ctx, args[1:], stdout, stderr, wire.TypeNext)
	case "rollback":
		return runNext(ctx, args[1:], stdout, stderr, wire.TypeRollback)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "stop":
		return runStop(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "rollover %s (%s)\n", version, runtime.Version())
		return nil
	case "help", "-h", "--help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		return usageErr("unknown command %q\n%s", args[0], usage)
	}
}

// socketFlags adds --name and --socket and returns the resolver.
func socketFlags(fs *flag.FlagSet) func() string {
	name := fs.String("name", "default", "coordinator name; picks the default socket path")
	sock := fs.String("socket", "", "control socket path (default: env ROLLOVER_SOCKET, else $XDG_RUNTIME_DIR/rollover/NAME.sock or /run/rollover/NAME.sock)")
	return func() string {
		if *sock != "" {
			return *sock
		}
		if s := os.Getenv("ROLLOVER_SOCKET"); s != "" {
			return s
		}
		system := filepath.Join("/run/rollover", *name+".sock")
		if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" {
			user := filepath.Join(x, "rollover", *name+".sock")
			// A root login shell has XDG_RUNTIME_DIR set, while the service
			// (systemd, supervisord) runs without it: take the socket that
			// exists.
			if _, err := os.Stat(user); err != nil {
				if _, err := os.Stat(system); err == nil {
					return system
				}
			}
			return user
		}
		return system
	}
}

func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &codeError{exitOK, err}
		}
		return &codeError{exitUsage, err}
	}
	return nil
}

func runStart(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("rollover start", flag.ContinueOnError)
	socket := socketFlags(fs)
	readyTimeout := fs.Duration("ready-timeout", coordinator.DefaultReadyTimeout, "how long a new generation may take to become ready")
	drainTimeout := fs.Duration("drain-timeout", coordinator.DefaultDrainTimeout, "how long an old generation may drain before it is killed")
	drainGrace := fs.Duration("drain-grace", coordinator.DefaultDrainGrace, "how long the old generation keeps accepting after the steer; cover the clients' round-trip time")
	killGrace := fs.Duration("kill-grace", coordinator.DefaultKillGrace, "SIGTERM to SIGKILL when a generation must be killed")
	adoptWait := fs.Duration("adopt-wait", coordinator.DefaultAdoptWait, "at start, how long to wait for the generations of a coordinator that crashed to be adopted")
	adoptTimeout := fs.Duration("adopt-timeout", 30*time.Second, "how long generations keep serving if this coordinator dies, waiting to be adopted by a new one")
	metricsAddr := fs.String("metrics-addr", DefaultMetricsAddr, `serve /metrics here; "" turns it off`)
	logFormat := fs.String("log-format", "text", "log format: text or json")
	launch := launchFlags(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	argv := fs.Args()
	if len(argv) == 0 {
		return usageErr("start needs a command: rollover start [flags] -- CMD [ARGS...]")
	}
	var h slog.Handler
	switch *logFormat {
	case "text":
		h = slog.NewTextHandler(stderr, nil)
	case "json":
		h = slog.NewJSONHandler(stderr, nil)
	default:
		return usageErr("--log-format must be text or json, not %q", *logFormat)
	}
	log := slog.New(h)

	ready, addr, drainSig, err := launch()
	if err != nil {
		return err
	}
	c, err := coordinator.New(coordinator.Config{
		Argv: argv, Socket: socket(), ReadyTimeout: *readyTimeout, DrainTimeout: *drainTimeout,
		DrainGrace: *drainGrace, KillGrace: *killGrace, Log: log, AdoptWait: *adoptWait, AdoptTimeout: *adoptTimeout,
		Ready: ready, Addr: addr, DrainSignal: drainSig, Notify: systemdNotifier(log),
	})
	if err != nil {
		return err
	}
	if *metricsAddr != "" {
		srv, err := serveMetrics(*metricsAddr, c)
		if err != nil {
			return err
		}
		defer srv.Close()
		log.Info("metrics", "addr", "http://"+*metricsAddr+"/metrics")
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	reload := make(chan os.Signal, 1)
	signal.Notify(reload, syscall.SIGHUP, syscall.SIGUSR2)
	defer signal.Stop(reload)
	go func() {
		for {
			select {
			case <-reload:
				log.Info("signal: rolling over to the active command line")
				c.Reload()
			case <-ctx.Done():
				return
			}
		}
	}()
	if os.Getpid() == 1 {
		// As a container's init, orphans are ours to reap.
		go c.ReapOrphans(ctx)
	}
	log.Info("coordinator started", "pid", os.Getpid(), "socket", socket(), "command", strings.Join(argv, " "))
	return c.Run(ctx)
}

func serveMetrics(addr string, c *coordinator.Coordinator) (*http.Server, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		c.Metrics(),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "rollover_build_info", Help: "The coordinator's version; always 1.",
			ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
		}, func() float64 { return 1 }),
	)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w (pass --metrics-addr ADDR, or --metrics-addr \"\" to turn it off)", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(c.Gatherer(reg), promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv, nil
}

// client is one request on the control socket.
type client struct {
	conn net.Conn
	r    *wire.Reader
}

func dial(path string) (*client, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, &codeError{exitNoCoordinator, fmt.Errorf("no coordinator at %s (is `rollover start` running? pass --name or --socket): %w", path, unwrapSyscall(err))}
	}
	return &client{conn: conn, r: wire.NewReader(conn)}, nil
}

func unwrapSyscall(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// do sends m and calls onEvent for each event until the result.
func (c *client) do(m wire.Msg, onEvent func(wire.Event)) (wire.Msg, error) {
	defer c.conn.Close()
	if _, err := c.conn.Write(wire.Encode(m)); err != nil {
		return wire.Msg{}, fmt.Errorf("send request: %w", err)
	}
	for {
		resp, err := c.r.Read()
		if err != nil {
			return wire.Msg{}, fmt.Errorf("coordinator closed the connection before answering: %w", err)
		}
		switch resp.Type {
		case wire.TypeEvent:
			if resp.Event != nil && onEvent != nil {
				onEvent(*resp.Event)
			}
		case wire.TypeResult:
			if !resp.OK {
				code := resp.Code
				if code == 0 {
					code = exitFailed
				}
				return resp, &codeError{code, errors.New(resp.Error)}
			}
			return resp, nil
		}
	}
}

func runNext(_ context.Context, args []string, stdout, stderr io.Writer, typ string) error {
	fs := flag.NewFlagSet("rollover "+typ, flag.ContinueOnError)
	socket := socketFlags(fs)
	wait := fs.Bool("wait", false, "also wait until the old generation has drained and exited")
	asJSON := fs.Bool("json", false, "print events as JSON lines")
	expect := fs.Int("expect-generation", 0, "roll over only if this generation is still the active one")
	var launch func() (string, string, syscall.Signal, error)
	if typ == wire.TypeNext {
		launch = launchFlags(fs)
	}
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	req := wire.Msg{Type: typ, Wait: *wait, ExpectGeneration: *expect}
	if launch != nil {
		ready, addr, sig, err := launch()
		if err != nil {
			return err
		}
		req.Ready, req.Addr = ready, addr
		if sig != 0 {
			req.DrainSignal = fmt.Sprint(int(sig))
		}
	}
	argv := fs.Args()
	if typ == wire.TypeRollback && len(argv) > 0 {
		return usageErr("rollback takes no command; it rolls to the previous generation's")
	}
	if len(argv) > 0 && strings.ContainsRune(argv[0], '/') && !filepath.IsAbs(argv[0]) {
		// The coordinator runs elsewhere; a relative path means ours.
		abs, err := filepath.Abs(argv[0])
		if err != nil {
			return err
		}
		argv[0] = abs
	}
	c, err := dial(socket())
	if err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	req.Argv = argv
	_, err = c.do(req, func(e wire.Event) {
		if *asJSON {
			_ = enc.Encode(e)
			return
		}
		fmt.Fprintln(stdout, e.String())
	})
	if err == nil && !*asJSON {
		fmt.Fprintln(stdout, "done")
	}
	return err
}

func runStatus(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rollover status", flag.ContinueOnError)
	socket := socketFlags(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErr("status takes no arguments")
	}
	c, err := dial(socket())
	if err != nil {
		return err
	}
	resp, err := c.do(wire.Msg{Type: wire.TypeStatus}, nil)
	if err != nil {
		return err
	}
	st := resp.Status
	if st == nil {
		return errors.New("coordinator sent no status")
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	mr := "unknown"
	if st.MigrateReq != nil {
		mr = map[bool]string{true: "1", false: "0"}[*st.MigrateReq]
	}
	fmt.Fprintf(stdout, "coordinator pid %d, socket %s, active gen %d, rollover in progress: %v, tcp_migrate_req=%s\n",
		st.PID, st.Socket, st.Active, st.InProgress, mr)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GEN\tPID\tSTATE\tIN-FLIGHT\tCONNS\tREQUESTS\tSTEERED\tUPTIME\tCOMMAND")
	for _, g := range st.Generations {
		steer := "yes"
		if !g.Steerable {
			steer = "no (tcp_migrate_req)"
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%d\t%s\t%s\t%s\n", g.Generation, g.PID, g.State,
			g.Stats.Inflight, g.Stats.Connections, g.Stats.Requests, steer,
			time.Since(g.StartedAt).Round(time.Second), strings.Join(g.Argv, " "))
	}
	return tw.Flush()
}

func runStop(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rollover stop", flag.ContinueOnError)
	socket := socketFlags(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	c, err := dial(socket())
	if err != nil {
		return err
	}
	if _, err := c.do(wire.Msg{Type: wire.TypeStop}, nil); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "stopped: every generation drained")
	return nil
}

// launchFlags adds --ready, --addr and --drain-signal, for start and next.
// Empty values mean the coordinator's defaults (next: the active
// generation's).
func launchFlags(fs *flag.FlagSet) func() (ready, addr string, sig syscall.Signal, err error) {
	ready := fs.String("ready", "", "how the app reports ready: library (links github.com/rollover-sh/rollover), notify (READY=1 on $NOTIFY_SOCKET), listen (listens on --addr) (default library)")
	addr := fs.String("addr", "", "host:port the app listens on; needed by --ready=listen, and tells when an app without the library has left the port")
	drain := fs.String("drain-signal", "", "signal that makes an app without the library drain (default SIGTERM; nginx wants SIGQUIT)")
	return func() (string, string, syscall.Signal, error) {
		var sig syscall.Signal
		if *drain != "" {
			s, err := coordinator.ParseSignal(*drain)
			if err != nil {
				return "", "", 0, err
			}
			sig = s
		}
		switch *ready {
		case "", coordinator.ReadyLibrary, coordinator.ReadyNotify, coordinator.ReadyListen:
		default:
			return "", "", 0, usageErr("--ready must be library, notify or listen, not %q", *ready)
		}
		return *ready, *addr, sig, nil
	}
}

// systemdNotifier returns a sender for sd_notify messages when the service
// manager gave us NOTIFY_SOCKET (a path, or "@name" for the abstract
// namespace), else nil.
func systemdNotifier(log *slog.Logger) func(string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	addr := &net.UnixAddr{Name: path, Net: "unixgram"}
	return func(msg string) {
		conn, err := net.DialUnix("unixgram", nil, addr)
		if err != nil {
			log.Warn("sd_notify", "err", err)
			return
		}
		defer conn.Close()
		if _, err := conn.Write([]byte(msg)); err != nil {
			log.Warn("sd_notify", "err", err)
		}
	}
}
