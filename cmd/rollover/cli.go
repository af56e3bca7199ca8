package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// Exit codes, as `rollover --help` and the README document them: the one
// table the coordinator also sends its results with.
const (
	exitOK            = wire.ExitOK
	exitFailed        = wire.ExitFailed
	exitUsage         = wire.ExitUsage
	exitNoCoordinator = wire.ExitNoCoordinator
)

// codeError carries an exit code.
type codeError struct {
	code wire.ExitCode
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
		return int(exitOK)
	case errors.As(err, &ce):
		return int(ce.code)
	case errors.Is(err, coordinator.ErrUsage):
		return int(exitUsage)
	default:
		return int(exitFailed)
	}
}

// oneLine keeps an error to the one line the CLI promises.
func oneLine(err error) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
}

// globals are the flags every command takes.
type globals struct {
	name   string
	socket string
}

// socketPath resolves --socket, ROLLOVER_SOCKET and --name, in that order.
// A path too long to bind or dial is a usage error, the same for every
// command: the kernel would only say "invalid argument".
func (g *globals) socketPath() (string, error) {
	path, from := g.resolveSocket()
	if len(path) > maxSocketPath {
		return "", usageErr("control socket %s (from %s) is %d bytes, over the %d-byte limit of a Unix socket path; pass a shorter --socket", path, from, len(path), maxSocketPath)
	}
	return path, nil
}

// maxSocketPath is the longest Unix socket path: sun_path less its NUL.
var maxSocketPath = len(unix.RawSockaddrUnix{}.Path) - 1

// resolveSocket is the socket path and where it came from.
func (g *globals) resolveSocket() (path, from string) {
	if g.socket != "" {
		return g.socket, "--socket"
	}
	if s := os.Getenv("ROLLOVER_SOCKET"); s != "" {
		return s, "$ROLLOVER_SOCKET"
	}
	system := filepath.Join("/run/rollover", g.name+".sock")
	if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" {
		user := filepath.Join(x, "rollover", g.name+".sock")
		// A root login shell has XDG_RUNTIME_DIR set, while the service
		// (systemd, supervisord) runs without it: take the socket that
		// exists.
		if _, err := os.Stat(user); err != nil {
			if _, err := os.Stat(system); err == nil {
				return system, "--name"
			}
		}
		return user, "$XDG_RUNTIME_DIR and --name"
	}
	return system, "--name"
}

// Help text shared by the commands.
const (
	exitCodesClient = `  2  usage: unknown command or flag, bad argument
  3  no coordinator at that socket (is ` + "`rollover start`" + ` running? pass
     --name or --socket)`
	signalsText = `  SIGHUP, SIGUSR2   roll over to the active command line (as ` + "`rollover next`" + ` does)
  SIGINT, SIGTERM   stop: drain every generation, then exit; a second one sends
                    SIGTERM to every generation, a third SIGKILL`
)

// run parses args and runs the command.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		if !c.HasParent() {
			// `rollover statsu --json`: the word is the mistake, not the flag.
			if w := firstWord(args); w != "" && !isCommand(c, w) {
				return unknownCommand(c, w)
			}
		}
		return flagError(c, err)
	})
	return root.ExecuteContext(ctx)
}

// firstWord is the first argument that is neither a flag nor the value of
// a global flag.
func firstWord(args []string) string {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return ""
		case a == "--name" || a == "--socket":
			i++
		case strings.HasPrefix(a, "-"):
		default:
			return a
		}
	}
	return ""
}

func isCommand(root *cobra.Command, word string) bool {
	if word == "help" {
		return true
	}
	for _, c := range root.Commands() {
		if c.Name() == word || c.HasAlias(word) {
			return true
		}
	}
	return false
}

func unknownCommand(c *cobra.Command, word string) error {
	msg := fmt.Sprintf("unknown command %q", word)
	if s := c.SuggestionsFor(word); len(s) > 0 {
		msg += fmt.Sprintf(`; did you mean "%s"?`, strings.Join(s, `" or "`))
	}
	return usageErr(`%s (see "rollover --help")`, msg)
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	cobra.EnableCommandSorting = false
	g := &globals{}
	root := &cobra.Command{
		Use:   "rollover",
		Short: "Zero-downtime rollovers of network services with SO_REUSEPORT",
		Long: `rollover rolls a network service over to a new version without dropping a
request. ` + "`rollover start`" + ` runs a coordinator in the foreground (one stable PID
for systemd or supervisord) that starts the app as generation 1. ` + "`rollover next`" + `
starts generation N+1, waits until it is ready, steers new connections to it,
then drains generation N. Every generation binds the same port with
SO_REUSEPORT; apps that link github.com/rollover-sh/rollover/rollover drop no
request.`,
		Example: `  rollover start -- ./api -addr :8080           # coordinator; ./api is generation 1
  rollover next --wait -- ./api-v2 -addr :8080  # from another terminal
  rollover status --watch                       # live view of the generations
  rollover --name web start --metrics-addr 127.0.0.1:9755 -- ./web  # a second service`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageErr(`no command given (see "rollover --help")`)
			}
			return unknownCommand(cmd, args[0])
		},
		Annotations: map[string]string{
			"exit": `  0  ok
  1  the rollover failed (the old generation keeps serving), was rolled back
     during its bake or canary, or was refused, or a stop had to kill a
     generation that did not drain in time
  2  usage: unknown command or flag, bad argument
  3  no coordinator at that socket
  4  next --wait: the old generation's drain cut connections or requests at
     --drain-timeout (the report line says how many)`,
			"signals": signalsText,
		},
		SuggestionsMinimumDistance: 2,
		SilenceErrors:              true,
		SilenceUsage:               true,
		CompletionOptions:          cobra.CompletionOptions{DisableDefaultCmd: true},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	pf := root.PersistentFlags()
	pf.SortFlags = false
	pf.StringVar(&g.name, "name", "default", "coordinator `NAME`: the default socket is $XDG_RUNTIME_DIR/rollover/NAME.sock, else /run/rollover/NAME.sock")
	pf.StringVar(&g.socket, "socket", "", "control socket `PATH` (default: $ROLLOVER_SOCKET, else derived from --name)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if strings.TrimSpace(g.name) == "" || strings.ContainsRune(g.name, '/') {
			return usageErr("--name must be a non-empty name without '/', not %q", g.name)
		}
		return nil
	}

	root.AddCommand(
		newStartCmd(g),
		newNextCmd(g, "next"),
		newStatusCmd(g),
		newNextCmd(g, "rollback"),
		newStopCmd(g),
		newCanaryCmd(g, "promote"),
		newCanaryCmd(g, "abort"),
		newCompletionCmd(),
		newVersionCmd(),
	)
	helpCmd := newHelpCmd()
	root.SetHelpCommand(helpCmd)
	root.SetFlagErrorFunc(flagError)
	root.SetHelpFunc(func(c *cobra.Command, _ []string) { _ = writeHelp(c.OutOrStdout(), c) })
	root.SetUsageFunc(func(c *cobra.Command) error { return writeHelp(c.ErrOrStderr(), c) })
	root.InitDefaultHelpFlag()
	root.Flags().Lookup("help").Usage = "show this help"
	for _, c := range append(root.Commands(), helpCmd) {
		c.InitDefaultHelpFlag()
		c.Flags().Lookup("help").Usage = "show this help"
	}
	return root
}

var singleDash = regexp.MustCompile(`unknown shorthand flag: '.' in (-[a-zA-Z][a-zA-Z-]+)`)

// flagError makes a flag parse error a usage error (exit 2) on one line,
// and points out a long flag written with one dash (-name), which the
// Go flag package took and pflag does not.
func flagError(c *cobra.Command, err error) error {
	msg := err.Error()
	if m := singleDash.FindStringSubmatch(msg); m != nil {
		name, _, _ := strings.Cut(m[1][1:], "=")
		if c.Flags().Lookup(name) != nil {
			msg = fmt.Sprintf("%s: long flags take two dashes: -%s", m[1], m[1])
		}
	}
	return usageErr(`%s (see "%s --help")`, msg, c.CommandPath())
}

// noArgs rejects positional arguments as a usage error.
func noArgs(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErr("%s takes no arguments, got %q", c.CommandPath(), strings.Join(args, " "))
	}
	return nil
}

// positive checks duration flags that must be above zero.
func positive(fs *pflag.FlagSet, names ...string) error {
	for _, n := range names {
		f := fs.Lookup(n)
		d, err := time.ParseDuration(f.Value.String())
		if err != nil || d <= 0 {
			return usageErr("--%s must be a positive duration such as 30s, not %s", n, f.Value)
		}
	}
	return nil
}

// notNegative checks duration flags where zero makes sense.
func notNegative(fs *pflag.FlagSet, names ...string) error {
	for _, n := range names {
		f := fs.Lookup(n)
		d, err := time.ParseDuration(f.Value.String())
		if err != nil || d < 0 {
			return usageErr("--%s must not be negative, not %s", n, f.Value)
		}
	}
	return nil
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  noArgs,
		Annotations: map[string]string{"exit": `  0  ok
  2  usage`},
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "rollover %s (%s)\n", version, runtime.Version())
			return nil
		},
	}
}

// newHelpCmd replaces cobra's help command, which prints the general help
// with exit 0 for a topic it does not know.
func newHelpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "help [COMMAND]",
		Short: "Show the help of a command",
		Example: `  rollover help start
  rollover start --help   # the same`,
		Annotations: map[string]string{"exit": `  0  ok
  2  no such command`},
		ValidArgsFunction: func(c *cobra.Command, args []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
			if len(args) > 0 {
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
			var names []cobra.Completion
			for _, sub := range c.Root().Commands() {
				if sub.IsAvailableCommand() {
					names = append(names, cobra.CompletionWithDesc(sub.Name(), sub.Short))
				}
			}
			return names, cobra.ShellCompDirectiveNoFileComp
		},
		RunE: func(c *cobra.Command, args []string) error {
			target, rest, err := c.Root().Find(args)
			if err != nil || len(rest) > 0 {
				return usageErr(`no help for %q: not a command (see "rollover --help")`, strings.Join(args, " "))
			}
			return writeHelp(c.OutOrStdout(), target)
		},
	}
}

// writeHelp is every command's help: what it does, usage, examples, flags,
// exit codes and, where they apply, the signals the coordinator takes.
func writeHelp(w io.Writer, c *cobra.Command) error {
	var b strings.Builder
	text := c.Long
	if text == "" {
		text = c.Short
	}
	b.WriteString(strings.TrimSpace(text) + "\n\n")
	b.WriteString("Usage:\n")
	if c.HasAvailableSubCommands() {
		fmt.Fprintf(&b, "  %s COMMAND [flags]\n", c.CommandPath())
	} else {
		fmt.Fprintf(&b, "  %s\n", c.UseLine())
	}
	if c.HasExample() {
		b.WriteString("\nExamples:\n" + strings.TrimRight(c.Example, "\n") + "\n")
	}
	if c.HasAvailableSubCommands() {
		b.WriteString("\nCommands:\n")
		for _, sub := range c.Commands() {
			if sub.IsAvailableCommand() || sub.Name() == "help" {
				fmt.Fprintf(&b, "  %-11s %s\n", sub.Name(), sub.Short)
			}
		}
	}
	if local := localFlags(c); local.HasAvailableFlags() && c.HasParent() {
		b.WriteString("\nFlags:\n" + local.FlagUsagesWrapped(helpWidth) + "")
	}
	global := c.InheritedFlags()
	if !c.HasParent() {
		global = c.Flags()
	}
	if global.HasAvailableFlags() {
		b.WriteString("\nGlobal flags (before or after the command):\n" + global.FlagUsagesWrapped(helpWidth))
	}
	if s := c.Annotations["exit"]; s != "" {
		b.WriteString("\nExit codes:\n" + s + "\n")
	}
	if s := c.Annotations["signals"]; s != "" {
		b.WriteString("\nSignals to the coordinator:\n" + s + "\n")
	}
	if c.HasAvailableSubCommands() {
		fmt.Fprintf(&b, "\nRun \"%s help COMMAND\" for a command's flags and examples.\n", c.CommandPath())
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// localFlags are c's own flags in the order they were defined (cobra's
// LocalNonPersistentFlags sorts them).
func localFlags(c *cobra.Command) *pflag.FlagSet {
	fs := pflag.NewFlagSet(c.Name(), pflag.ContinueOnError)
	fs.SortFlags = false
	persistent := c.PersistentFlags()
	c.LocalFlags().VisitAll(func(f *pflag.Flag) {
		if persistent.Lookup(f.Name) == nil {
			fs.AddFlag(f)
		}
	})
	return fs
}

// helpWidth is where flag descriptions wrap: the same in a terminal and in
// a pipe, so the README can quote --help.
const helpWidth = 80
