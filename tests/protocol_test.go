package tests

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// The protocol matrix: each protocol a real service speaks, served by
// tests/protoapp as the README shows, with real clients under concurrent
// load across protoRollovers rollovers. Every case must fail no request
// (failures are counted by kind; clients do not retry: POST without a body
// to replay, gRPC with retries off, and HTTP/2 retries of streams a GOAWAY
// refused are counted as "retried", which must be 0 too), every old
// generation must be gone within the grace plus the longest request plus
// 1s, and the connection counts that status reports must match the
// kernel's (ss).

const (
	protoRollovers = 20
	protoInterval  = 300 * time.Millisecond
	protoGrace     = 100 * time.Millisecond
	protoSlow      = 300 * time.Millisecond // the slow requests in flight across rollovers
)

// client kinds
const (
	cH1KeepAlive = "http1.1 keep-alive"
	cH1New       = "http1.1 new connection per request"
	cH2          = "h2 (shared connections)"
	cGRPCShared  = "grpc shared ClientConn"
	cGRPCNew     = "grpc new connection per RPC"
	cWebSocket   = "websocket"
)

type protoCase struct {
	name    string
	mode    string   // protoapp -mode
	tls     bool     // clients speak TLS
	h2c     bool     // h2 clients speak h2c
	clients []string // client kinds, run at once
	slow    bool     // slow requests in flight across the rollovers
}

var protoCases = []protoCase{
	{name: "http1.1", mode: "http", clients: []string{cH1KeepAlive, cH1New}, slow: true},
	{name: "https1.1", mode: "tls", tls: true, clients: []string{cH1KeepAlive, cH1New}, slow: true},
	{name: "h2-tls-serve", mode: "tls", tls: true, clients: []string{cH2}, slow: true},
	{name: "h2-tls-wrapped-listener", mode: "tls-wrap", tls: true, clients: []string{cH2, cH1New}, slow: true},
	{name: "h2c-protocols", mode: "h2c", h2c: true, clients: []string{cH2, cH1KeepAlive}, slow: true},
	{name: "h2c-xnet", mode: "h2c-xnet", h2c: true, clients: []string{cH2}, slow: true},
	{name: "grpc", mode: "grpc", clients: []string{cGRPCShared, cGRPCNew}},
	{name: "websocket", mode: "ws", clients: []string{cWebSocket, cH1KeepAlive}},
}

// protoResult is what one case measured.
type protoResult struct {
	Case      string
	Rollovers int
	Requests  int64
	OK        int64
	Failures  map[string]int64 // by kind
	Samples   []string
	Retried   int64
	Gens      int // generations that answered
	Drains    []time.Duration
	Budget    time.Duration
	Longest   time.Duration
	Counts    string // ss vs status in the hold phase
	Errors    []string
}

func (r protoResult) failed() int64 {
	var n int64
	for _, v := range r.Failures {
		n += v
	}
	return n
}

func (r protoResult) String() string {
	ds := slices.Clone(r.Drains)
	slices.Sort(ds)
	var p50, maxd time.Duration
	if len(ds) > 0 {
		p50, maxd = ds[len(ds)/2], ds[len(ds)-1]
	}
	return fmt.Sprintf("%s: %d rollovers, %d requests, %d ok, %d failed %v, %d retried, %d generations answered; old generation gone after p50 %v max %v (budget %v, longest request %v); %s",
		r.Case, r.Rollovers, r.Requests, r.OK, r.failed(), r.Failures, r.Retried, r.Gens,
		p50.Round(time.Millisecond), maxd.Round(time.Millisecond), r.Budget.Round(time.Millisecond), r.Longest.Round(time.Millisecond), r.Counts)
}

func TestProtocolMatrix(t *testing.T) {
	needTool(t, "ss")
	certs := writeCerts(t)
	for _, pc := range protoCases {
		t.Run(pc.name, func(t *testing.T) {
			res := runProtoCase(t, pc, certs, false)
			checkProto(t, res)
		})
	}
}

// The HTTP/1.1 and h2 cases in a network namespace with IPv6 off (the
// Docker default), the app listening on ":PORT".
func TestProtocolMatrixIPv6Off(t *testing.T) {
	needTool(t, "ss")
	prefix := unshareArgs(t)
	dir := testproc.ShortDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd, out := helperCommand(t, ctx, prefix, "TestProtocolIPv6OffHelper", 3*time.Minute, envProtoHelper+"="+dir)
	runErr := cmd.Run()
	checkOutput(t, "helper", out.String())
	b, err := os.ReadFile(filepath.Join(dir, "report.json"))
	if err != nil {
		t.Fatalf("helper: %v; no report: %v\n%s", runErr, err, tailLines(out.String(), 80))
	}
	var rep ipv6OffReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Error != "" {
		t.Fatalf("helper: %s\n%s", rep.Error, tailLines(out.String(), 80))
	}
	if runErr != nil {
		t.Errorf("helper: %v\n%s", runErr, tailLines(out.String(), 80))
	}
	t.Logf("namespace: disable_ipv6=%s, ::1 %s", rep.DisableIPv6, rep.Loopback6)
	if len(rep.Results) == 0 {
		t.Fatal("no case ran")
	}
	for _, res := range rep.Results {
		t.Run(res.Case, func(t *testing.T) { checkProto(t, res) })
	}
}

const envProtoHelper = "ROLLOVER_TEST_PROTO_IPV6OFF"

type ipv6OffReport struct {
	DisableIPv6 string
	Loopback6   string
	Results     []protoResult
	Error       string
}

// TestProtocolIPv6OffHelper is not a test of its own: TestProtocolMatrixIPv6Off
// runs it in a network namespace it creates.
func TestProtocolIPv6OffHelper(t *testing.T) {
	dir := os.Getenv(envProtoHelper)
	if dir == "" {
		t.Skip("helper: runs only inside the network namespace that TestProtocolMatrixIPv6Off creates")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	var rep ipv6OffReport
	write := func() {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "report.json"), b, 0o644); err != nil {
			t.Error(err)
		}
	}
	defer write()
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		rep.Error = fmt.Sprintf("ip link set lo up: %v: %s", err, out)
		return
	}
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/all/disable_ipv6", []byte("1"), 0o644); err != nil {
		rep.Error = fmt.Sprintf("sysctl net.ipv6.conf.all.disable_ipv6=1: %v", err)
		return
	}
	v, _ := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6")
	rep.DisableIPv6 = strings.TrimSpace(string(v))
	if c, err := net.Listen("tcp", "[::1]:0"); err == nil {
		c.Close()
		rep.Loopback6 = "is still there"
	} else {
		rep.Loopback6 = "is gone (" + err.Error() + ")"
	}
	certs := writeCerts(t)
	for _, pc := range protoCases {
		if pc.mode != "http" && pc.mode != "tls" && pc.mode != "h2c" {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		pc.name += "/ipv6-off"
		rep.Results = append(rep.Results, runProtoCase(t, pc, certs, true))
	}
}

func checkProto(t *testing.T, res protoResult) {
	t.Helper()
	t.Log(res.String())
	for _, e := range res.Errors {
		t.Error(e)
	}
	if res.Rollovers != protoRollovers {
		t.Errorf("%d of %d rollovers succeeded", res.Rollovers, protoRollovers)
	}
	if res.OK == 0 || res.failed() != 0 {
		t.Errorf("%d requests failed %v, %d ok; samples: %q", res.failed(), res.Failures, res.OK, res.Samples)
	}
	if res.Retried != 0 {
		t.Errorf("%d requests were retried by the client after a GOAWAY refused their stream", res.Retried)
	}
	if res.Gens < protoRollovers/2 {
		t.Errorf("only %d generations answered: clients were not moved to new code", res.Gens)
	}
	for i, d := range res.Drains {
		if d > res.Budget {
			t.Errorf("old generation %d was gone %v after its drain began, over the budget %v (grace + longest request + 1s)", i, d.Round(time.Millisecond), res.Budget)
		}
	}
	if len(res.Drains) < protoRollovers {
		t.Errorf("%d drains logged, want %d", len(res.Drains), protoRollovers)
	}
}

type certFiles struct {
	cert, key string
	pool      *x509.CertPool
}

func writeCerts(t *testing.T) certFiles {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "rollover test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := testproc.ShortDir(t)
	c := certFiles{cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem"), pool: x509.NewCertPool()}
	if err := os.WriteFile(c.cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	c.pool.AddCert(cert)
	return c
}

// bakeFlags returns a short --bake when the CLI has the flag, so that the
// release (the bake) is part of every rollover without slowing it much.
var bakeFlags = sync.OnceValue(func() []string {
	out, _ := exec.Command(filepath.Join(bin, "rollover"), "start", "--help").CombinedOutput()
	if strings.Contains(string(out), "--bake") {
		return []string{"--bake", "200ms"}
	}
	return nil
})

// runProtoCase runs one case: start, load, rollovers, the hold phase, stop.
func runProtoCase(t *testing.T, pc protoCase, certs certFiles, listenAll bool) (res protoResult) {
	t.Helper()
	res = protoResult{Case: pc.name, Failures: map[string]int64{}}
	fail := func(format string, a ...any) { res.Errors = append(res.Errors, fmt.Sprintf(format, a...)) }
	cfg := harness.Config{
		DrainGrace: protoGrace, DrainTimeout: 10 * time.Second,
		AppArgs:    []string{"-mode", pc.mode, "-cert", certs.cert, "-key", certs.key},
		ListenAll:  listenAll,
		StartFlags: bakeFlags(),
	}
	out := &syncBuffer{}
	cfg.Rollover = filepath.Join(bin, "rollover")
	cfg.App = filepath.Join(bin, "protoapp")
	cfg.Dir = testproc.ShortDir(t)
	cfg.Log = out
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	svc, err := harness.Start(ctx, cfg)
	if err != nil {
		fail("start: %v\n%s", err, out.String())
		return res
	}
	defer func() {
		svc.Kill()
		if left := harness.WaitGone(append(svc.PIDs(), svc.PID()), 5*time.Second); len(left) > 0 {
			fail("processes left behind: %v", left)
		}
		checkOutput(t, "coordinator", out.String())
		if strings.Contains(out.String(), "force-closed") {
			fail("a drain deadline force-closed connections:\n%s", grepLines(out.String(), "force-closed"))
		}
		if len(res.Errors) > 0 || res.failed() > 0 {
			t.Logf("coordinator log (tail):\n%s", tailLines(out.String(), 60))
		}
	}()

	d := newDriver(svc.Addr, pc, certs)
	loadCtx, stopLoad := context.WithTimeout(ctx, 90*time.Second)
	defer stopLoad()
	var wg sync.WaitGroup
	per := 16 / len(pc.clients)
	for _, kind := range pc.clients {
		for w := range per {
			wg.Go(func() { d.work(loadCtx, kind, w, "/") })
		}
	}
	if pc.slow {
		kind := pc.clients[0]
		for w := range 2 {
			wg.Go(func() { d.work(loadCtx, kind, 100+w, "/slow?d="+protoSlow.String()) })
		}
	}
	// Rollovers at a steady pace while the load runs.
	tick := time.NewTicker(protoInterval)
	for i := range protoRollovers {
		<-tick.C
		if _, err := svc.Next(ctx, []string{"v2", "v1"}[i%2], false); err != nil {
			fail("rollover %d: %v", i+1, err)
			continue
		}
		res.Rollovers++
	}
	tick.Stop()
	// Every old generation leaves while the load still runs.
	st, err := svc.Status(ctx)
	if err != nil {
		fail("status: %v", err)
	}
	var old []int
	for _, p := range svc.PIDs() {
		if len(st.Generations) == 0 || p != st.Generations[len(st.Generations)-1].PID {
			old = append(old, p)
		}
	}
	if left := harness.WaitGone(old, cfg.DrainTimeout); len(left) > 0 {
		fail("old generations still alive %v after the drain timeout", left)
	}
	stopLoad()
	wg.Wait()
	d.fill(&res)
	res.Budget = protoGrace + res.Longest + time.Second
	// The coordinator logs a drain once it has reaped the generation: a
	// moment after its pid is gone.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if res.Drains = drainTimes(out.String()); len(res.Drains) >= protoRollovers || time.Now().After(deadline) {
			break
		}
	}

	// The hold phase: connections held open, idle; status counts what ss
	// sees.
	closeHeld := d.hold(ctx, pc.clients, 4)
	res.Counts = compareCounts(ctx, svc, &res)
	closeHeld()

	if err := svc.Stop(ctx); err != nil {
		fail("stop: %v", err)
	}
	return res
}

var drainedRE = regexp.MustCompile(`msg="generation drained" gen=(\d+) pid=\d+ after=(\S+)`)

// drainTimes reads each drained generation's drain time (drain start to
// exit) from the coordinator log, leaving out the last one (drained by
// stop).
func drainTimes(log string) []time.Duration {
	var out []time.Duration
	for _, m := range drainedRE.FindAllStringSubmatch(log, -1) {
		if d, err := time.ParseDuration(m[2]); err == nil {
			out = append(out, d)
		}
	}
	return out
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// compareCounts waits until status's connection count (all generations)
// equals the established connections that ss shows on the port.
func compareCounts(ctx context.Context, svc *harness.Service, res *protoResult) string {
	_, port, _ := net.SplitHostPort(svc.Addr)
	var lib, kernel int64
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := svc.Status(ctx)
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("status: %v", err))
			return ""
		}
		lib = 0
		for _, g := range st.Generations {
			lib += g.Stats.Connections
		}
		out, err := exec.CommandContext(ctx, "ss", "-Htn", "state", "established", "( sport = :"+port+" )").Output()
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("ss: %v", err))
			return ""
		}
		kernel = 0
		for _, l := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(l) != "" {
				kernel++
			}
		}
		if lib == kernel && lib > 0 {
			return fmt.Sprintf("connections: status %d = ss %d", lib, kernel)
		}
		if time.Now().After(deadline) {
			res.Errors = append(res.Errors, fmt.Sprintf("connection counts: status says %d, ss shows %d established on port %s", lib, kernel, port))
			return fmt.Sprintf("connections: status %d != ss %d", lib, kernel)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// driver runs the clients of a case and tallies their outcomes.
type driver struct {
	addr  string
	pc    protoCase
	certs certFiles

	mu      sync.Mutex
	ok      int64
	fails   map[string]int64
	samples []string
	gens    map[string]bool
	longest time.Duration
	retried atomic.Int64
	shared  map[string]*http.Transport
}

func newDriver(addr string, pc protoCase, certs certFiles) *driver {
	return &driver{addr: addr, pc: pc, certs: certs, fails: map[string]int64{}, gens: map[string]bool{}}
}

func (d *driver) fill(res *protoResult) {
	d.mu.Lock()
	defer d.mu.Unlock()
	res.OK = d.ok
	for k, v := range d.fails {
		res.Failures[k] = v
	}
	res.Samples = d.samples
	res.Gens = len(d.gens)
	res.Longest = d.longest
	res.Retried = d.retried.Load()
	res.Requests = d.ok + res.failed()
}

func (d *driver) record(kind, gen string, lat time.Duration, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		d.ok++
		d.gens[gen] = true
		d.longest = max(d.longest, lat)
		return
	}
	k := classifyProto(err)
	d.fails[k]++
	if len(d.samples) < 10 {
		d.samples = append(d.samples, kind+": "+k+": "+err.Error())
	}
}

func classifyProto(err error) string {
	if s, ok := status.FromError(err); ok && s.Code() != 0 {
		return "grpc " + s.Code().String()
	}
	msg := err.Error()
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), strings.Contains(msg, "connection refused"):
		return "connect"
	case errors.Is(err, syscall.ECONNRESET), strings.Contains(msg, "connection reset"), strings.Contains(msg, "broken pipe"):
		return "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), strings.Contains(msg, "EOF"):
		return "eof"
	case strings.Contains(msg, "GOAWAY"):
		return "goaway"
	case strings.Contains(msg, "status "):
		return "status"
	case strings.Contains(msg, "timeout"), strings.Contains(msg, "deadline exceeded"):
		return "timeout"
	case strings.Contains(msg, "websocket"):
		return "websocket"
	}
	return "other"
}

func (d *driver) scheme() string {
	if d.pc.tls {
		return "https://"
	}
	return "http://"
}

func (d *driver) transport(kind string) *http.Transport {
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: d.certs.pool},
		DisableCompression:  true,
		MaxIdleConnsPerHost: 4,
		Proxy:               nil,
	}
	tr.Protocols = new(http.Protocols)
	switch kind {
	case cH2:
		if d.pc.h2c {
			tr.Protocols.SetUnencryptedHTTP2(true)
		} else {
			tr.Protocols.SetHTTP2(true)
		}
	default:
		tr.Protocols.SetHTTP1(true)
		tr.DisableKeepAlives = kind == cH1New
	}
	return tr
}

// work runs one client until ctx ends: HTTP, gRPC or WebSocket.
func (d *driver) work(ctx context.Context, kind string, w int, path string) {
	switch kind {
	case cGRPCShared, cGRPCNew:
		d.workGRPC(ctx, kind)
	case cWebSocket:
		d.workWS(ctx, w)
	default:
		d.workHTTP(ctx, kind, w, path)
	}
}

// sharedTransport returns the i-th transport of kind, made once: h2
// clients share a few connections, several streams on each.
func (d *driver) sharedTransport(kind string, i int) *http.Transport {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.shared == nil {
		d.shared = map[string]*http.Transport{}
	}
	k := kind + "#" + strconv.Itoa(i)
	if d.shared[k] == nil {
		d.shared[k] = d.transport(kind)
	}
	return d.shared[k]
}

func (d *driver) workHTTP(ctx context.Context, kind string, w int, path string) {
	tr := d.transport(kind)
	if kind == cH2 {
		tr = d.sharedTransport(kind, w%3)
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := 0; i < 1_000_000 && ctx.Err() == nil; i++ {
		var wrote atomic.Int32
		trace := &httptrace.ClientTrace{WroteHeaders: func() { wrote.Add(1) }}
		// POST with no body and no GetBody: never replayed by net/http.
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodPost, d.scheme()+d.addr+path, nil)
		if err != nil {
			panic(err)
		}
		start := time.Now()
		resp, err := c.Do(req)
		var gen string
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			gen = resp.Header.Get("X-Rollover-Generation")
			if err == nil && resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %s", resp.Status)
			}
			if err == nil && kind == cH2 && resp.ProtoMajor != 2 {
				err = fmt.Errorf("status: answered over %s, want HTTP/2", resp.Proto)
			}
		}
		if wrote.Load() > 1 {
			d.retried.Add(1)
		}
		if ctx.Err() != nil && err != nil {
			return // cut short by the end of the run
		}
		d.record(kind, gen, time.Since(start), err)
	}
}

func (d *driver) grpcConn() (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///"+d.addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDisableRetry())
}

func (d *driver) workGRPC(ctx context.Context, kind string) {
	var shared *grpc.ClientConn
	if kind == cGRPCShared {
		var err error
		if shared, err = d.grpcConn(); err != nil {
			d.record(kind, "", 0, err)
			return
		}
		defer shared.Close()
	}
	for i := 0; i < 1_000_000 && ctx.Err() == nil; i++ {
		cc := shared
		if cc == nil {
			var err error
			if cc, err = d.grpcConn(); err != nil {
				d.record(kind, "", 0, err)
				continue
			}
		}
		start := time.Now()
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var md metadata.MD
		_, err := healthpb.NewHealthClient(cc).Check(rctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		cancel()
		if shared == nil {
			cc.Close()
		}
		if ctx.Err() != nil && err != nil {
			return
		}
		var gen string
		if v := md.Get("x-rollover-generation"); len(v) > 0 {
			gen = v[0]
		}
		d.record(kind, gen, time.Since(start), err)
	}
}

func (d *driver) workWS(ctx context.Context, w int) {
	for i := 0; i < 1000 && ctx.Err() == nil; i++ {
		c, _, err := websocket.Dial(ctx, "ws://"+d.addr+"/ws", nil)
		if err != nil {
			if ctx.Err() == nil {
				d.record(cWebSocket, "", 0, err)
			}
			continue
		}
		// Echo round trips until the server says it goes away (1001).
		for ctx.Err() == nil {
			start := time.Now()
			msg := fmt.Sprintf("hello %d", w)
			err := c.Write(context.Background(), websocket.MessageText, []byte(msg))
			var got []byte
			if err == nil {
				_, got, err = c.Read(context.Background())
			}
			if websocket.CloseStatus(err) == websocket.StatusGoingAway {
				break // the generation drains: reconnect, to the new one
			}
			if err == nil && !strings.HasSuffix(string(got), msg) {
				err = fmt.Errorf("websocket: echo %q for %q", got, msg)
			}
			gen, _, _ := strings.Cut(string(got), " ")
			d.record(cWebSocket, gen, time.Since(start), err)
			if err != nil {
				break
			}
		}
		_ = c.CloseNow()
	}
}

// hold opens n idle connections per client kind and returns what closes
// them: an idle keep-alive pool, an h2 connection, a gRPC ClientConn, an
// open WebSocket.
func (d *driver) hold(ctx context.Context, kinds []string, n int) func() {
	var closers []func()
	for _, kind := range kinds {
		for w := range n {
			switch kind {
			case cH1New:
				continue // nothing to hold
			case cGRPCShared, cGRPCNew:
				cc, err := d.grpcConn()
				if err == nil {
					_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
					closers = append(closers, func() { cc.Close() })
				}
				if err != nil {
					d.record(kind+" hold", "", 0, err)
				}
			case cWebSocket:
				c, _, err := websocket.Dial(ctx, "ws://"+d.addr+"/ws", nil)
				if err != nil {
					d.record(kind+" hold", "", 0, err)
					continue
				}
				_ = c.Write(ctx, websocket.MessageText, []byte(strconv.Itoa(w)))
				_, _, _ = c.Read(ctx)
				closers = append(closers, func() { _ = c.CloseNow() })
			default:
				tr := d.transport(kind)
				resp, err := (&http.Client{Transport: tr}).Post(d.scheme()+d.addr+"/", "text/plain", nil)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil {
					d.record(kind+" hold", "", 0, err)
				}
				closers = append(closers, tr.CloseIdleConnections)
			}
		}
	}
	return func() {
		for _, c := range closers {
			c()
		}
	}
}
