// Command rollover rolls a network service over to a new generation without
// dropping a request. `rollover --help` lists the commands; the README has
// the rest.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/rollover-sh/rollover/rollover/coordinator"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == coordinator.InstancesCommand {
		// A generation of several instances: its supervisor.
		if err := coordinator.Supervise(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "rollover: %v\n", err)
			os.Exit(1)
		}
		return
	}
	err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rollover: %v\n", oneLine(err))
	}
	os.Exit(exitCode(err))
}
