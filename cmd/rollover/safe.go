package main

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/rollover-sh/rollover/rollover/coordinator"
	"github.com/rollover-sh/rollover/rollover/wire"
)

// safeOpts are the bake, health and canary flags: start sets the defaults,
// next overrides them for one rollover.
type safeOpts struct {
	bake      time.Duration
	healthURL string
	// start only
	minRequests uint64
	maxErrors   string
	// next only
	canary string
	step   time.Duration
}

func (o *safeOpts) addStart(f *pflag.FlagSet) {
	f.DurationVar(&o.bake, "bake", coordinator.DefaultBake, "after a rollover, the old generation keeps its listener, steered away, this long and takes the port back at once if the new one exits or fails its health (0 turns the bake off)")
	f.Uint64Var(&o.minRequests, "health-min-requests", coordinator.DefaultHealthMinRequests, "a bake's health is judged once the new generation answered `N` requests")
	f.StringVar(&o.maxErrors, "health-max-errors", strconv.Itoa(int(100*coordinator.DefaultHealthMaxErrorRatio))+"%", "the bake fails when this `PERCENT` of the new generation's responses (at least --health-min-requests) are 5xx or panics, or failed answers the app reported (rollover.Answer: a DNS SERVFAIL, say)")
	f.StringVar(&o.healthURL, "health-url", "", "also GET `URL` (through the port) every 250ms during a bake or canary; two failures in a row fail it")
}

func (o *safeOpts) addNext(f *pflag.FlagSet) {
	f.DurationVar(&o.bake, "bake", 0, "this rollover's bake (default: the coordinator's --bake)")
	f.StringVar(&o.canary, "canary", "", "steer only these shares of new connections to the new generation, step by step (`PERCENTS`, e.g. 10% or 5%,25%,100%); each step is judged like a bake")
	f.DurationVar(&o.step, "step", 0, "how long each canary step lasts (default: until rollover promote or rollover abort)")
	f.StringVar(&o.healthURL, "health-url", "", "this rollover's health probe `URL` (default: the coordinator's --health-url)")
}

// startConfig checks the start flags and fills cfg.
func (o *safeOpts) startConfig(fs *pflag.FlagSet, cfg *coordinator.Config) error {
	if err := notNegative(fs, "bake"); err != nil {
		return err
	}
	if o.minRequests == 0 {
		return usageErr("--health-min-requests must be 1 or more")
	}
	p, err := percent("--health-max-errors", o.maxErrors)
	if err != nil {
		return err
	}
	if err := checkURL(o.healthURL); err != nil {
		return err
	}
	cfg.Bake, cfg.HealthMinRequests, cfg.HealthMaxErrorRatio, cfg.HealthURL = o.bake, o.minRequests, float64(p)/100, o.healthURL
	return nil
}

// nextRequest checks the next flags and fills req.
func (o *safeOpts) nextRequest(fs *pflag.FlagSet, req *wire.Msg) error {
	if fs.Changed("bake") {
		if err := notNegative(fs, "bake"); err != nil {
			return err
		}
		req.Bake = o.bake.String()
	}
	if o.canary != "" {
		for _, part := range strings.Split(o.canary, ",") {
			p, err := percent("--canary", part)
			if err != nil {
				return err
			}
			if n := len(req.Canary); n > 0 && p <= req.Canary[n-1] {
				return usageErr("--canary %s: each step must be above the one before", o.canary)
			}
			req.Canary = append(req.Canary, p)
		}
	}
	if fs.Changed("step") {
		if err := positive(fs, "step"); err != nil {
			return err
		}
		if o.canary == "" {
			return usageErr("--step goes with --canary")
		}
		req.StepMS = o.step.Milliseconds()
	}
	if err := checkURL(o.healthURL); err != nil {
		return err
	}
	req.HealthURL = o.healthURL
	return nil
}

// percent reads "10%" or "10": a whole percentage from 1 to 100.
func percent(flag, s string) (int, error) {
	p, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(s), "%"))
	if err != nil || p < 1 || p > 100 {
		return 0, usageErr("%s must be a percentage from 1%% to 100%%, not %q", flag, s)
	}
	return p, nil
}

func checkURL(s string) error {
	if s == "" {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return usageErr("--health-url must be an http:// or https:// URL, not %q", s)
	}
	return nil
}

// newCanaryCmd is `promote` or `abort`.
func newCanaryCmd(g *globals, typ string) *cobra.Command {
	c := &cobra.Command{
		Use:   typ,
		Short: "Take a waiting canary to 100% (its bake follows)",
		Long: `Take the canary of the rollover in progress to 100% of new connections at
once, or end its bake early. The ` + "`rollover next`" + ` that started it carries on and
prints the rest.`,
		Example: `  rollover next --canary 10% -- ./api-v2 -addr :8080   # in one terminal
  rollover promote                                     # in another`,
		Annotations: map[string]string{"exit": `  0  done: the rollover goes on (promote) or rolls back (abort)
  1  no canary or bake is waiting, or refused (permission denied)
` + exitCodesClient},
		Args:              noArgs,
		ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := g.call(wire.Msg{Type: typ}, nil); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), typ+": sent")
			return nil
		},
	}
	if typ == wire.TypeAbort {
		c.Short = "Roll a waiting canary or a bake back to the old generation"
		c.Long = `Roll the rollover in progress back while its canary waits or its new
generation bakes: the old generation takes every new connection back and the
new one drains. The ` + "`rollover next`" + ` that started it exits 1.`
		c.Example = `  rollover abort`
	}
	return c
}
