// Command demoapp is the app the demo and the tests roll over: a tiny HTTP
// server built with the rollover library.
//
//	GET /          200, "demoapp VERSION gen N", header X-Rollover-Generation: N
//	GET /slow?d=2s the same after sleeping d (at most a minute)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rollover-sh/rollover/rollover"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	version := flag.String("version", "v1", "version to report")
	naive := flag.Bool("naive", false, "use the naive hand-over (close + Shutdown) to show what rollover prevents")
	plain := flag.Bool("plain", false, "serve the same handler on plain net/http, without the library (for the overhead benchmark)")
	flag.Parse()
	if *plain {
		// MPTCP off as in the library, so the benchmark measures only the
		// library's own cost.
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", *addr)
		if err == nil {
			srv := &http.Server{Handler: handler(*version), ReadHeaderTimeout: 10 * time.Second}
			err = srv.Serve(ln)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "demoapp: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if *naive {
		os.Setenv(rollover.EnvHandover, "naive")
	}
	if err := rollover.ListenAndServe(*addr, handler(*version)); err != nil {
		fmt.Fprintf(os.Stderr, "demoapp: %v\n", err)
		os.Exit(1)
	}
}

func handler(version string) http.Handler {
	gen := strconv.Itoa(rollover.Generation())
	// Fixed width, so that tools like ab, which count a body of another
	// length as a failure, see the same length from every generation.
	body := fmt.Sprintf("demoapp %s gen %06d\n", version, rollover.Generation())
	answer := func(w http.ResponseWriter) {
		w.Header().Set("X-Rollover-Generation", gen)
		w.Header().Set("X-Demoapp-Version", version)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte(body))
	}
	// The app's own metric, federated by the coordinator with a generation
	// label: one scrape target shows every generation.
	answers := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "demoapp_answers_total", Help: "Answers by endpoint.",
	}, []string{"endpoint"})
	rollover.Registry().MustRegister(answers)
	root, slow := answers.WithLabelValues("/"), answers.WithLabelValues("/slow")
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		root.Inc()
		answer(w)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil || d < 0 || d > time.Minute {
			http.Error(w, errors.New("d must be a duration up to 1m, like 2s").Error(), http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
		slow.Inc()
		answer(w)
	})
	return mux
}
