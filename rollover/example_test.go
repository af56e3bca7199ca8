package rollover_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/rollover-sh/rollover/rollover"
)

// Serve an HTTP handler on a port shared with the other generations. Without
// a coordinator it runs standalone; canceling ctx drains it gracefully.
func ExampleServe() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ln, err := rollover.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello from generation", rollover.Generation())
	})}
	done := make(chan error, 1)
	go func() { done <- rollover.Serve(ctx, srv, ln) }()

	resp, err := http.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		fmt.Println(err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Print(string(body))

	// The drain waits for connections to go, bounded by the drain timeout:
	// a client's idle keep-alive connection would hold it up.
	http.DefaultClient.CloseIdleConnections()
	cancel() // drain: hand the listener over, finish connections, shut down
	select {
	case err := <-done:
		fmt.Println("drained:", err)
	case <-time.After(10 * time.Second):
		fmt.Println("drain took too long")
	}
	// Output:
	// hello from generation 0
	// drained: <nil>
}
