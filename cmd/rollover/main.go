// Command rollover rolls a network service over to a new generation without
// dropping a request. `rollover --help` lists the commands; the README has
// the rest.
package main

import (
	"context"
	"fmt"
	"os"
)

func main() {
	err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rollover: %v\n", oneLine(err))
	}
	os.Exit(exitCode(err))
}
