package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/rollover-sh/rollover/rollover/coordinator"
)

// DefaultMetricsAddr is where the coordinator serves /metrics unless told.
const DefaultMetricsAddr = "127.0.0.1:9754"

// DefaultAdoptTimeout is how long generations wait for a new coordinator
// after theirs died.
const DefaultAdoptTimeout = 30 * time.Second

type startOpts struct {
	readyTimeout, drainTimeout, drainGrace, killGrace time.Duration
	adoptWait, adoptTimeout                           time.Duration
	metricsAddr, logFormat                            string
	launch                                            launchOpts
	safe                                              safeOpts
	allowForeign                                      bool
}

func newStartCmd(g *globals) *cobra.Command {
	o := &startOpts{}
	c := &cobra.Command{
		Use:   "start [flags] [--] CMD [ARGS...]",
		Short: "Run the coordinator in the foreground; CMD is generation 1",
		Long: `Run the coordinator in the foreground: it starts CMD as generation 1, serves
the control socket that the other commands talk to, and /metrics. It never
serves app traffic itself, and its PID stays the same across rollovers, so
systemd, supervisord or a container runtime can own it. CMD is exec'd as argv,
never through a shell, in its own process group, and its stdout and stderr are
logged line by line, tagged with gen, pid and stream.

Flags end at CMD (or at --): everything after it is CMD's own arguments.`,
		Example: `  rollover start -- ./api -addr :8080
  rollover start --drain-timeout 1m --log-format json -- ./api -addr :8080
  rollover --name web start --metrics-addr 127.0.0.1:9755 -- ./web -addr :8081
  rollover start --ready=notify -- ./server.py 0.0.0.0 8080
  rollover start --ready=listen --addr 127.0.0.1:8080 --drain-signal=SIGQUIT \
      -- nginx -e stderr -c /etc/nginx/v1.conf`,
		Annotations: map[string]string{
			"exit": `  0  stopped: every generation drained
  1  generation 1 never got ready, the control socket or the metrics address
     could not be used, or a stop had to kill a generation (forced)
  2  usage: unknown flag, bad value, no CMD`,
			"signals": signalsText,
		},
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageErr("start needs a command: rollover start [flags] -- CMD [ARGS...]")
			}
			return nil
		},
		ValidArgsFunction: func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
			return nil, cobra.ShellCompDirectiveDefault
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runStart(cmd.Context(), g, o, cmd, args)
		},
	}
	f := c.Flags()
	f.SetInterspersed(false)
	f.SortFlags = false
	f.DurationVar(&o.readyTimeout, "ready-timeout", coordinator.DefaultReadyTimeout, "how long a new generation may take to report ready")
	f.DurationVar(&o.drainTimeout, "drain-timeout", coordinator.DefaultDrainTimeout, "how long an old generation may drain; then SIGTERM, then SIGKILL, counted as a forced drain")
	f.DurationVar(&o.drainGrace, "drain-grace", coordinator.DefaultDrainGrace, "how long the old generation keeps accepting after the steer; cover the clients' round-trip time (about 0 on loopback)")
	f.DurationVar(&o.killGrace, "kill-grace", coordinator.DefaultKillGrace, "SIGTERM to SIGKILL when a generation must be killed")
	f.StringVar(&o.metricsAddr, "metrics-addr", DefaultMetricsAddr, "serve /metrics on `HOST:PORT`; \"\" turns it off")
	f.StringVar(&o.logFormat, "log-format", "text", "log `FORMAT`: text or json (slog; in JSON, durations are seconds in keys ending in _s)")
	o.launch.add(f, false)
	o.safe.addStart(f)
	f.DurationVar(&o.adoptWait, "adopt-wait", coordinator.DefaultAdoptWait, "at start, how long to wait for the generations of a coordinator that crashed")
	f.DurationVar(&o.adoptTimeout, "adopt-timeout", DefaultAdoptTimeout, "how long generations keep serving after this coordinator dies, waiting to be adopted")
	f.BoolVar(&o.allowForeign, "allow-foreign", false, "let processes that are no generation listen on the app's port (refused by default: they would take new connections and never be rolled over)")
	_ = c.RegisterFlagCompletionFunc("log-format", fixedCompletions("text", "json"))
	return c
}

func (o *startOpts) validate(c *cobra.Command) error {
	fs := c.Flags()
	if err := positive(fs, "ready-timeout", "drain-timeout", "kill-grace", "adopt-wait", "adopt-timeout"); err != nil {
		return err
	}
	if err := notNegative(fs, "drain-grace"); err != nil {
		return err
	}
	if o.metricsAddr != "" {
		_, port, err := net.SplitHostPort(o.metricsAddr)
		if err != nil {
			return usageErr("--metrics-addr must be HOST:PORT (or \"\" to turn it off), not %q", o.metricsAddr)
		}
		if _, err := net.LookupPort("tcp", port); err != nil {
			return usageErr("--metrics-addr %s: %q is not a port (0 to 65535; 0 picks a free one)", o.metricsAddr, port)
		}
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return usageErr("--log-format must be text or json, not %q", o.logFormat)
	}
	return nil
}

func runStart(ctx context.Context, g *globals, o *startOpts, cmd *cobra.Command, argv []string) error {
	if err := o.validate(cmd); err != nil {
		return err
	}
	launch, err := o.launch.resolve()
	if err != nil {
		return err
	}
	log := slog.New(logHandler(cmd.ErrOrStderr(), o.logFormat))
	socket, err := g.socketPath()
	if err != nil {
		return err
	}
	cfg := coordinator.Config{
		Argv: argv, Socket: socket, ReadyTimeout: o.readyTimeout, DrainTimeout: o.drainTimeout,
		DrainGrace: o.drainGrace, KillGrace: o.killGrace, Log: log, AdoptWait: o.adoptWait, AdoptTimeout: o.adoptTimeout,
		Ready: launch.Ready, Addr: launch.Addr, DrainSignal: launch.DrainSignal, Instances: launch.Instances, Notify: systemdNotifier(log),
		AllowForeign: o.allowForeign,
	}
	if err := o.safe.startConfig(cmd.Flags(), &cfg); err != nil {
		return err
	}
	c, err := coordinator.New(cfg)
	if err != nil {
		return err
	}
	if o.metricsAddr != "" {
		srv, err := serveMetrics(o.metricsAddr, c)
		if err != nil {
			// The socket exists by now: leave none behind for `status` to
			// find dead.
			_ = c.Close()
			return err
		}
		defer srv.Close()
		log.Info("metrics", "addr", "http://"+srv.Addr+"/metrics")
	}

	stopSignals := make(chan os.Signal, 3)
	signal.Notify(stopSignals, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(stopSignals)
	reload := make(chan os.Signal, 1)
	signal.Notify(reload, syscall.SIGHUP, syscall.SIGUSR2)
	defer signal.Stop(reload)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		stops := 0
		for {
			select {
			case <-reload:
				log.Info("signal: rolling over to the active command line")
				c.Reload()
			case sig := <-stopSignals:
				stops++
				if stops == 1 {
					// The coordinator logs "draining N generations" at once.
					log.Info("signal: stopping", "signal", sig.String())
					c.Stop()
					continue
				}
				if c.Force() == 1 {
					log.Warn("forcing the stop: SIGTERM to every generation, SIGKILL after --kill-grace (Ctrl-C again: SIGKILL now)", "signal", sig.String())
				} else {
					log.Warn("forcing the stop: SIGKILL to every generation", "signal", sig.String())
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	if os.Getpid() == 1 {
		// As a container's init, orphans are ours to reap.
		go c.ReapOrphans(ctx)
	}
	log.Info("coordinator started", "pid", os.Getpid(), "socket", socket, "command", strings.Join(argv, " "))
	return c.Run(ctx)
}

// logHandler is the coordinator's slog handler. In JSON, durations are
// seconds as floats, with the unit in the key ("after_s": 1.006), not
// slog's default integer nanoseconds; text keeps Go's "1.006s".
func logHandler(w io.Writer, format string) slog.Handler {
	if format == "json" {
		return slog.NewJSONHandler(w, &slog.HandlerOptions{ReplaceAttr: secondsAttr})
	}
	return slog.NewTextHandler(w, nil)
}

func secondsAttr(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.Float64(a.Key+"_s", a.Value.Duration().Seconds())
	}
	return a
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
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("metrics: listen on %s: %w (another coordinator there? give each its own --metrics-addr, or --metrics-addr \"\" to turn it off)", addr, unwrapSyscall(err))
	}
	if err != nil {
		return nil, fmt.Errorf("metrics: listen on %s: %w", addr, unwrapSyscall(err))
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(c.Gatherer(reg), promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	// Addr is where it listens: with port 0, the one the kernel picked.
	srv := &http.Server{Addr: ln.Addr().String(), Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv, nil
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
