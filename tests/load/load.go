package load

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Options configure a run. Zero values take the documented defaults.
type Options struct {
	URL       string // e.g. "http://127.0.0.1:41234/"; required
	Clients   int    // concurrent workers; default 16
	KeepAlive bool   // true: each worker reuses one connection; false: a new TCP connection per request
	// Method defaults to POST, sent with a nil body and no GetBody, so that
	// net/http never silently replays it after a connection broke (it does
	// replay GET, HEAD, OPTIONS and TRACE, which would hide failures).
	Method      string
	Duration    time.Duration // stop after this long; default 10s
	MaxRequests int64         // stop after this many requests in total; 0: only Duration bounds
	Timeout     time.Duration // per request, including reading the body; default 5s
	Pause       time.Duration // sleep between a worker's requests; 0 saturates
	// Dial opens the connections (nil: a net.Dialer with Timeout), e.g.
	// from inside a network namespace.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Kind classifies a failed request.
type Kind string

// Failure kinds.
const (
	KindConnect Kind = "connect" // dial failed (e.g. ECONNREFUSED)
	KindReset   Kind = "reset"   // ECONNRESET / EPIPE / "connection reset by peer"
	KindEOF     Kind = "eof"     // io.EOF / io.ErrUnexpectedEOF / "server closed connection"
	KindTimeout Kind = "timeout" // per-request timeout
	KindStatus  Kind = "status"  // a complete answer that is not 2xx
	KindOther   Kind = "other"
)

var kinds = [...]Kind{KindConnect, KindReset, KindEOF, KindTimeout, KindStatus, KindOther}

func kindIndex(k Kind) int {
	for i, x := range kinds {
		if x == k {
			return i
		}
	}
	return len(kinds) - 1
}

// GenerationHeader is the response header counted in Result.ByGeneration.
const GenerationHeader = "X-Rollover-Generation"

const maxSamples = 10

// Result is the tally of a run.
type Result struct {
	Requests     int64            // finished while the run was live (OK + Failures)
	OK           int64            // complete 2xx answers with the body fully read
	Failures     int64            // Requests - OK
	ByKind       map[Kind]int64   // failures by kind (only kinds that occurred)
	Samples      []string         // up to 10 example errors, "kind: error"
	ByGeneration map[string]int64 // OK answers per X-Rollover-Generation value ("" when absent)
	Elapsed      time.Duration
	P50, P99     time.Duration // latency of OK requests (about 1% precision)
	Max          time.Duration // the slowest OK request (same precision)
}

// RPS is finished requests per second.
func (r Result) RPS() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests) / r.Elapsed.Seconds()
}

// String renders the result on one line.
func (r Result) String() string {
	return fmt.Sprintf("requests=%d ok=%d failed=%d (connect=%d reset=%d eof=%d timeout=%d status=%d other=%d) rps=%.1f p50=%s p99=%s",
		r.Requests, r.OK, r.Failures,
		r.ByKind[KindConnect], r.ByKind[KindReset], r.ByKind[KindEOF],
		r.ByKind[KindTimeout], r.ByKind[KindStatus], r.ByKind[KindOther],
		r.RPS(), r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond))
}

// Run drives load until ctx is done, Duration passes or MaxRequests is
// reached, and returns the tally. The error reports bad options only, never
// failed requests.
func Run(ctx context.Context, o Options) (Result, error) {
	r, err := Start(ctx, o)
	if err != nil {
		return Result{}, err
	}
	<-r.done
	return r.final, nil
}

// Runner is a run in the background.
type Runner struct {
	o       Options
	tmpl    *http.Request
	cancel  context.CancelFunc
	done    chan struct{}
	start   time.Time
	issued  atomic.Int64
	tallies []*tally
	samples sampler
	final   Result // written before done is closed
}

// errReqTimeout is the cause of a request context whose own Timeout fired,
// which tells it apart from the end of the run.
var errReqTimeout = errors.New("request timeout")

// Start runs Run in the background.
func Start(ctx context.Context, o Options) (*Runner, error) {
	o, tmpl, err := o.normalize()
	if err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithTimeout(ctx, o.Duration)
	r := &Runner{o: o, tmpl: tmpl, cancel: cancel, done: make(chan struct{}), start: time.Now()}
	clients := make([]*http.Client, o.Clients)
	var transports []*http.Transport
	for i := range clients {
		if i == 0 || o.KeepAlive {
			transports = append(transports, newTransport(o))
		}
		clients[i] = &http.Client{
			Transport:     transports[len(transports)-1],
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		r.tallies = append(r.tallies, &tally{gen: map[string]int64{}})
	}
	go func() {
		defer close(r.done)
		var wg sync.WaitGroup
		for i, c := range clients {
			wg.Go(func() { r.worker(runCtx, c, r.tallies[i]) })
		}
		wg.Wait()
		elapsed := time.Since(r.start)
		cancel()
		for _, t := range transports {
			t.CloseIdleConnections()
		}
		r.final = r.merge(elapsed)
	}()
	return r, nil
}

// Snapshot returns the tally so far without stopping the run.
func (r *Runner) Snapshot() Result {
	select {
	case <-r.done:
		return r.final
	default:
		return r.merge(time.Since(r.start))
	}
}

// Stop ends the run (requests in flight are dropped, not counted) and
// returns the final Result. It may be called more than once.
func (r *Runner) Stop() Result {
	r.cancel()
	<-r.done
	return r.final
}

// Done is closed when the run has ended by itself or by Stop.
func (r *Runner) Done() <-chan struct{} { return r.done }

func (o Options) normalize() (Options, *http.Request, error) {
	if o.URL == "" {
		return o, nil, errors.New("load: URL is required")
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		return o, nil, fmt.Errorf("load: bad URL: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return o, nil, fmt.Errorf("load: URL %q must be http(s)://host[:port]/path", o.URL)
	}
	if o.Clients < 0 || o.Duration < 0 || o.MaxRequests < 0 || o.Timeout < 0 || o.Pause < 0 {
		return o, nil, errors.New("load: Clients, Duration, MaxRequests, Timeout and Pause must not be negative")
	}
	if o.Clients == 0 {
		o.Clients = 16
	}
	if o.Method == "" {
		o.Method = http.MethodPost
	}
	if o.Duration == 0 {
		o.Duration = 10 * time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Second
	}
	// Body nil and GetBody nil: a POST is then never replayed by the Transport.
	req, err := http.NewRequestWithContext(context.Background(), o.Method, o.URL, nil)
	if err != nil {
		return o, nil, fmt.Errorf("load: %w", err)
	}
	req.Header.Set("User-Agent", "rollover-load")
	return o, req, nil
}

func newTransport(o Options) *http.Transport {
	dial := o.Dial
	if dial == nil {
		dial = (&net.Dialer{Timeout: o.Timeout, KeepAlive: 30 * time.Second}).DialContext
	}
	return &http.Transport{
		Proxy:               nil, // only ever talk to o.URL
		DialContext:         dial,
		DisableKeepAlives:   !o.KeepAlive,
		MaxIdleConnsPerHost: o.Clients,
		DisableCompression:  true,
		TLSHandshakeTimeout: o.Timeout,
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 only
	}
}

func (r *Runner) worker(ctx context.Context, c *http.Client, t *tally) {
	tmpl := r.tmpl.Clone(context.Background())
	var pause *time.Timer
	for {
		if ctx.Err() != nil {
			return
		}
		if r.o.MaxRequests > 0 && r.issued.Add(1) > r.o.MaxRequests {
			return
		}
		r.one(ctx, c, tmpl, t)
		if r.o.Pause > 0 {
			if pause == nil {
				pause = time.NewTimer(r.o.Pause)
			} else {
				pause.Reset(r.o.Pause)
			}
			select {
			case <-ctx.Done():
				return
			case <-pause.C:
			}
		}
	}
}

// one sends a request and records its outcome, unless the run ended first.
func (r *Runner) one(ctx context.Context, c *http.Client, tmpl *http.Request, t *tally) {
	reqCtx, cancel := context.WithTimeoutCause(ctx, r.o.Timeout, errReqTimeout)
	defer cancel()
	start := time.Now()
	resp, err := c.Do(tmpl.WithContext(reqCtx))
	var status int
	var gen string
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		status, gen = resp.StatusCode, resp.Header.Get(GenerationHeader)
	}
	lat := time.Since(start)
	switch {
	case err == nil && status >= 200 && status <= 299:
		t.addOK(lat, gen)
	case err == nil:
		r.fail(t, KindStatus, fmt.Sprintf("%d %s", status, http.StatusText(status)))
	case errors.Is(context.Cause(reqCtx), errReqTimeout):
		// The request's own deadline fired, so it failed before the run ended.
		r.fail(t, KindTimeout, err.Error())
	case ctx.Err() != nil:
		// Cut short by the end of the run: neither a request nor a failure.
	default:
		r.fail(t, classify(err), err.Error())
	}
}

func (r *Runner) fail(t *tally, k Kind, msg string) {
	t.mu.Lock()
	t.fail[kindIndex(k)]++
	t.mu.Unlock()
	r.samples.add(string(k) + ": " + msg)
}

// classify maps a transport or body-read error to a Kind.
func classify(err error) Kind {
	var op *net.OpError
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.As(err, &op) && op.Op == "dial":
		return KindConnect
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return KindReset
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return KindEOF
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return KindTimeout
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "connection refused"):
		return KindConnect
	case strings.Contains(msg, "connection reset"), strings.Contains(msg, "broken pipe"):
		return KindReset
	case strings.Contains(msg, "server closed"), strings.Contains(msg, "EOF"):
		return KindEOF
	case strings.Contains(msg, "timeout"), strings.Contains(msg, "deadline exceeded"):
		return KindTimeout
	}
	return KindOther
}

// tally is one worker's counters; only its worker writes, Snapshot reads.
type tally struct {
	mu   sync.Mutex
	ok   int64
	fail [len(kinds)]int64
	gen  map[string]int64
	hist histogram
}

func (t *tally) addOK(lat time.Duration, gen string) {
	t.mu.Lock()
	t.ok++
	t.gen[gen]++
	t.hist.add(lat)
	t.mu.Unlock()
}

type sampler struct {
	full atomic.Bool
	mu   sync.Mutex
	list []string
}

func (s *sampler) add(msg string) {
	if s.full.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.list) < maxSamples {
		s.list = append(s.list, msg)
	}
	s.full.Store(len(s.list) >= maxSamples)
}

func (r *Runner) merge(elapsed time.Duration) Result {
	res := Result{ByKind: map[Kind]int64{}, ByGeneration: map[string]int64{}, Elapsed: elapsed}
	var h histogram
	for _, t := range r.tallies {
		t.mu.Lock()
		res.OK += t.ok
		for i, n := range t.fail {
			if n > 0 {
				res.ByKind[kinds[i]] += n
				res.Failures += n
			}
		}
		for g, n := range t.gen {
			res.ByGeneration[g] += n
		}
		h.merge(&t.hist)
		t.mu.Unlock()
	}
	res.Requests = res.OK + res.Failures
	res.P50, res.P99, res.Max = h.quantile(0.50), h.quantile(0.99), h.quantile(1)
	r.samples.mu.Lock()
	res.Samples = append([]string(nil), r.samples.list...)
	r.samples.mu.Unlock()
	return res
}
