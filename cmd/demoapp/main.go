// Command demoapp is the app the demo and the tests roll over: a tiny HTTP
// server built with the rollover library.
//
//	GET /          200, "demoapp VERSION gen N", header X-Rollover-Generation: N
//	GET /slow?d=2s the same after sleeping d (at most a minute)
//
// A bad deploy on purpose, for the bake's and the canary's tests:
//
//	-fail=panic    every handler panics (net/http aborts the connection)
//	-fail=crash    the process exits with status 2 on its first request
//	-fail=500      every request answers 500 (any status: -fail=503, …)
//
// It is ready and steerable as usual; only its answers are bad.
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
	fail := flag.String("fail", "", "a bad deploy: panic (every handler panics), crash (exit 2 on the first request), or a status code such as 500 (every answer)")
	flag.Parse()
	h, err := failing(*fail, handler(*version))
	if err != nil {
		fmt.Fprintf(os.Stderr, "demoapp: %v\n", err)
		os.Exit(2)
	}
	if *plain {
		// MPTCP off as in the library, so the benchmark measures only the
		// library's own cost.
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		ln, err := lc.Listen(context.Background(), "tcp", *addr)
		if err == nil {
			srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
			err = srv.Serve(ln)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "demoapp: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if *naive {
		// The library's benchmark knob; no API, so set by its name.
		os.Setenv("ROLLOVER_HANDOVER", "naive")
	}
	if err := rollover.ListenAndServe(*addr, h); err != nil {
		fmt.Fprintf(os.Stderr, "demoapp: %v\n", err)
		os.Exit(1)
	}
}

// failing wraps h in the bad behaviour that mode names ("" is none).
func failing(mode string, h http.Handler) (http.Handler, error) {
	switch mode {
	case "":
		return h, nil
	case "panic":
		return http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
			panic("demoapp: -fail=panic")
		}), nil
	case "crash":
		return http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
			fmt.Fprintln(os.Stderr, "demoapp: -fail=crash: exiting on the first request")
			os.Exit(2)
		}), nil
	}
	code, err := strconv.Atoi(mode)
	if err != nil || code < 100 || code > 599 {
		return nil, fmt.Errorf("-fail=%q: want panic, crash or a status code 100-599", mode)
	}
	gen := strconv.Itoa(rollover.Generation())
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("X-Rollover-Generation", gen)
		http.Error(w, fmt.Sprintf("demoapp: -fail=%d", code), code)
	}), nil
}

func handler(version string) http.Handler {
	gen := strconv.Itoa(rollover.Generation())
	// Fixed width, so that tools like ab, which count a body of another
	// length as a failure, see the same length from every generation.
	// The pid tells the instances of a generation apart (--instances).
	body := fmt.Sprintf("demoapp %s gen %06d pid %07d\n", version, rollover.Generation(), os.Getpid())
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
