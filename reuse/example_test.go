//go:build linux

package reuse_test

import (
	"context"
	"fmt"

	"github.com/rollover-sh/rollover/reuse"
)

func ExampleListen() {
	ctx := context.Background()
	old, err := reuse.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer old.Close()

	// The next generation binds the same port and joins the group at index 1.
	next, err := reuse.Listen(ctx, "tcp", old.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer next.Close()

	// Send every new connection to the next generation.
	if err := reuse.Steer(next, 1); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(old.Addr().String() == next.Addr().String())
	// Output: true
}
