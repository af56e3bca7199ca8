package tests

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/rollover-sh/rollover/rollover/wire"
	"github.com/rollover-sh/rollover/tests/harness"
	"github.com/rollover-sh/rollover/tests/testproc"
)

// The UDP tests roll cmd/demodns, a DNS server on github.com/miekg/dns
// written as the README's "Serving UDP" pattern, serving UDP and TCP on one
// port, under real dnsperf and a Go client that counts every query.

// startDNS starts a coordinator with demodns v1 (appArgs more flags for it)
// and a 50ms drain grace.
func startDNS(t *testing.T, appArgs ...string) *harness.Service {
	t.Helper()
	return startDNSConfig(t, harness.Config{AppArgs: appArgs, DrainGrace: 50 * time.Millisecond})
}

func startDNSConfig(t *testing.T, cfg harness.Config) *harness.Service {
	t.Helper()
	cfg.App = filepath.Join(bin, "demodns")
	return startService(t, cfg)
}

// dnsQuery is one query the Go client sent.
type dnsQuery struct {
	sent    time.Time
	answers int // answers received for it (more than 1: answered twice)
	gen     int // the generation that answered first (0: none, or no TXT)
	rcode   int
}

// dnsClient sends DNS queries to addr until stopped: udp workers over UDP,
// each with its own socket and one query in flight, and tcp workers over a
// new TCP connection per query. Each query's name is unique, so that every
// answer is matched to its query whatever its ID.
type dnsClient struct {
	addr    string
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	udp     [][]dnsQuery // per worker, by sequence number
	tcp     []dnsQuery
	tcpErrs []string
}

var txtGen = regexp.MustCompile(`gen (\d+) pid`)

func startDNSClient(t *testing.T, addr string, udpWorkers, tcpWorkers int, limit time.Duration) *dnsClient {
	t.Helper()
	c := &dnsClient{addr: addr, stop: make(chan struct{}), udp: make([][]dnsQuery, udpWorkers)}
	deadline := time.Now().Add(limit) // bounded even if the test forgets to stop it
	for w := range udpWorkers {
		conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		c.wg.Go(func() { c.udpWorker(conn, w, deadline) })
	}
	for w := range tcpWorkers {
		c.wg.Go(func() { c.tcpWorker(w, deadline) })
	}
	t.Cleanup(c.finish)
	return c
}

// finish stops the client and waits for its workers.
func (c *dnsClient) finish() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	c.wg.Wait()
}

func (c *dnsClient) running(deadline time.Time) bool {
	select {
	case <-c.stop:
		return false
	default:
		return time.Now().Before(deadline)
	}
}

func answerGen(m *dns.Msg) int {
	for _, rr := range m.Answer {
		if txt, ok := rr.(*dns.TXT); ok && len(txt.Txt) > 0 {
			if g := txtGen.FindStringSubmatch(txt.Txt[0]); g != nil {
				n, _ := strconv.Atoi(g[1])
				return n
			}
		}
	}
	return 0
}

// seqOf is the sequence number in a query name "qSEQ.wWORKER.example.".
func seqOf(m *dns.Msg, worker int) (int, bool) {
	if len(m.Question) != 1 {
		return 0, false
	}
	var seq, w int
	if _, err := fmt.Sscanf(m.Question[0].Name, "q%d.w%d.example.", &seq, &w); err != nil || w != worker {
		return 0, false
	}
	return seq, true
}

func (c *dnsClient) udpWorker(conn *net.UDPConn, w int, deadline time.Time) {
	defer conn.Close()
	to, _ := net.ResolveUDPAddr("udp4", c.addr)
	buf := make([]byte, 1500)
	for seq := 0; c.running(deadline); seq++ {
		q := new(dns.Msg)
		q.SetQuestion(fmt.Sprintf("q%d.w%d.example.", seq, w), dns.TypeA)
		q.Id = uint16(seq)
		raw, _ := q.Pack()
		c.mu.Lock()
		c.udp[w] = append(c.udp[w], dnsQuery{sent: time.Now()})
		c.mu.Unlock()
		if _, err := conn.WriteToUDP(raw, to); err != nil {
			continue
		}
		// Read until this query's answer, or 2s; earlier queries' late
		// answers are recorded on the way.
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		for {
			n, _, err := conn.ReadFromUDP(buf)
			if err != nil {
				break
			}
			var m dns.Msg
			if m.Unpack(buf[:n]) != nil {
				continue
			}
			got, ok := seqOf(&m, w)
			if !ok {
				continue
			}
			c.mu.Lock()
			if got < len(c.udp[w]) {
				r := &c.udp[w][got]
				if r.answers++; r.answers == 1 {
					r.gen, r.rcode = answerGen(&m), m.Rcode
				}
			}
			c.mu.Unlock()
			if got == seq {
				break
			}
		}
	}
}

func (c *dnsClient) tcpWorker(w int, deadline time.Time) {
	client := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	for seq := 0; c.running(deadline); seq++ {
		q := new(dns.Msg)
		q.SetQuestion(fmt.Sprintf("q%d.w%d.example.", seq, 1000+w), dns.TypeA)
		sent := time.Now()
		m, _, err := client.Exchange(q, c.addr) // a new connection per query
		r := dnsQuery{sent: sent}
		if err == nil {
			r.answers, r.gen, r.rcode = 1, answerGen(m), m.Rcode
		}
		c.mu.Lock()
		c.tcp = append(c.tcp, r)
		if err != nil {
			c.tcpErrs = append(c.tcpErrs, err.Error())
		}
		c.mu.Unlock()
	}
}

// waitAnswers waits until gen has answered n of the client's UDP queries.
func (c *dnsClient) waitAnswers(t *testing.T, gen, n int) {
	t.Helper()
	testproc.WaitFor(t, 10*time.Second, fmt.Sprintf("%d udp answers from gen %d", n, gen), func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		got := 0
		for _, qs := range c.udp {
			for _, q := range qs {
				if q.gen == gen {
					got++
				}
			}
		}
		return got >= n
	})
}

// dnsTally is what the client saw.
type dnsTally struct {
	UDP, TCP                int
	Unanswered, Twice       int
	TCPFailed               int
	ByGen                   map[int]int
	ByRcode                 map[string]int
	WrongGen                int
	FirstWrong, FirstErrors []string
	FirstUnanswered         []string // worker, sequence number and send time
}

func (d dnsTally) String() string {
	return fmt.Sprintf("%d udp queries (%d unanswered %v, %d answered twice), %d tcp queries (%d failed), answers by generation %v, by rcode %v, %d from a generation the group did not point at",
		d.UDP, d.Unanswered, d.FirstUnanswered, d.Twice, d.TCP, d.TCPFailed, d.ByGen, d.ByRcode, d.WrongGen)
}

// window is a rollover as the client's clock saw it: queries sent from
// start to active may be answered by from or to; before, by from only;
// after, by to only.
type window struct {
	start, active time.Time
	from, to      int
}

// tally counts the queries; with windows, it checks each answer's
// generation against them (the first generation, before any window, is
// first).
func (c *dnsClient) tally(first int, windows []window) dnsTally {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := dnsTally{ByGen: map[int]int{}, ByRcode: map[string]int{}}
	allowed := func(sent time.Time) (int, int) {
		gen := first
		for _, w := range windows {
			switch {
			case sent.Before(w.start):
				return gen, gen
			case sent.Before(w.active):
				return w.from, w.to
			}
			gen = w.to
		}
		return gen, gen
	}
	check := func(q dnsQuery) {
		d.ByRcode[dns.RcodeToString[q.rcode]]++
		if q.gen == 0 {
			return
		}
		d.ByGen[q.gen]++
		if windows == nil {
			return
		}
		if a, b := allowed(q.sent); q.gen != a && q.gen != b {
			d.WrongGen++
			if len(d.FirstWrong) < 5 {
				d.FirstWrong = append(d.FirstWrong, fmt.Sprintf("sent %s answered by gen %d, want %d or %d", q.sent.Format("15:04:05.000000"), q.gen, a, b))
			}
		}
	}
	for w, qs := range c.udp {
		for seq, q := range qs {
			d.UDP++
			switch {
			case q.answers == 0:
				d.Unanswered++
				if len(d.FirstUnanswered) < 10 {
					d.FirstUnanswered = append(d.FirstUnanswered, fmt.Sprintf("q%d.w%d sent %s", seq, w, q.sent.Format("15:04:05.000000")))
				}
				continue
			case q.answers > 1:
				d.Twice++
			}
			check(q)
		}
	}
	for _, q := range c.tcp {
		d.TCP++
		if q.answers == 0 {
			d.TCPFailed++
			continue
		}
		check(q)
	}
	d.FirstErrors = c.tcpErrs[:min(5, len(c.tcpErrs))]
	return d
}

// dnsperf runs Debian's dnsperf against addr until stopped, with its default
// 100 queries in flight: as fast as the server answers.
type dnsperf struct {
	cmd *exec.Cmd
	out syncBuffer
}

func startDNSPerf(t *testing.T, addr string, limit time.Duration) *dnsperf {
	t.Helper()
	path := needTool(t, "dnsperf")
	host, port, _ := net.SplitHostPort(addr)
	data := filepath.Join(t.TempDir(), "queries")
	if err := os.WriteFile(data, []byte("example.com A\nwww.example.com A\nexample.org TXT\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &dnsperf{}
	p.cmd = exec.Command(path, "-s", host, "-p", port, "-d", data, "-l", strconv.Itoa(int(limit.Seconds())), "-t", "5")
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			_ = p.cmd.Wait()
		}
	})
	return p
}

var perfLine = regexp.MustCompile(`Queries (sent|completed|lost|interrupted):\s+(\d+)`)

// finish interrupts dnsperf (queries in flight then count as interrupted,
// not lost) and returns its counts by name.
func (p *dnsperf) finish(t *testing.T) map[string]int {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("dnsperf: %v\n%s", err, p.out.String())
	}
	got := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(p.out.String()))
	for sc.Scan() {
		if m := perfLine.FindStringSubmatch(sc.Text()); m != nil {
			got[m[1]], _ = strconv.Atoi(m[2])
		}
	}
	if _, ok := got["lost"]; !ok || got["sent"] == 0 {
		t.Fatalf("dnsperf printed no counts:\n%s", p.out.String())
	}
	return got
}

// rollDNS rolls svc over n times under whatever load runs, each rollover
// to its app at version vN (with the service's app flags), and returns the
// windows the client's clock saw.
func rollDNS(t *testing.T, svc *harness.Service, n int) []window {
	t.Helper()
	var ws []window
	from := 1
	for i := range n {
		w := window{start: time.Now(), from: from}
		r := startNext(t, svc, nil, svc.AppArgv(fmt.Sprintf("v%d", i+2)))
		w.active = r.waitPhase(t, wire.PhaseActive, 30*time.Second).At
		if code := r.wait(t, 30*time.Second); code != 0 {
			t.Fatalf("rollover %d: next exited %d: %s", i+1, code, r.stderr.String())
		}
		started, _ := r.find(wire.PhaseStarted)
		w.to = started.Generation
		ws = append(ws, w)
		from = w.to
	}
	return ws
}

// checkDNS fails t unless the client and dnsperf lost nothing and every
// answer came from a generation the group pointed at.
func checkDNS(t *testing.T, d dnsTally, perf map[string]int) {
	t.Helper()
	t.Logf("go client: %s", d)
	if perf != nil {
		t.Logf("dnsperf: queries sent %d, completed %d, lost %d, interrupted %d", perf["sent"], perf["completed"], perf["lost"], perf["interrupted"])
		if perf["lost"] != 0 {
			t.Errorf("dnsperf: Queries lost: %d, want 0", perf["lost"])
		}
	}
	if d.UDP == 0 || d.TCP == 0 {
		t.Fatalf("the go client sent %d udp and %d tcp queries: no load", d.UDP, d.TCP)
	}
	if d.Unanswered != 0 || d.Twice != 0 || d.TCPFailed != 0 {
		t.Errorf("%d udp queries unanswered, %d answered twice, %d tcp queries failed (%v): want 0", d.Unanswered, d.Twice, d.TCPFailed, d.FirstErrors)
	}
	if d.WrongGen != 0 {
		t.Errorf("%d answers from a generation the group did not point at: %v", d.WrongGen, d.FirstWrong)
	}
}

// 20 rollovers of a DNS server over UDP and TCP on one port, under dnsperf
// at saturating load and a Go client that counts every query: dnsperf loses
// none, the client has none unanswered or answered twice, and every answer
// comes from the generation the group pointed at when its query was sent,
// or from its predecessor while that one drained.
func TestDNSRollovers(t *testing.T) {
	svc := startDNS(t)
	perf := startDNSPerf(t, svc.Addr, 2*time.Minute)
	c := startDNSClient(t, svc.Addr, 8, 2, 2*time.Minute)
	ws := rollDNS(t, svc, 20)
	c.waitAnswers(t, 21, 100) // load on the last generation too
	c.finish()
	checkDNS(t, c.tally(1, ws), perf.finish(t))
	checkDNSLeft(t, svc, 21)
}

// 20 rollovers of a server whose answers take 20ms each: the replies to
// what a generation read before its drain still go out after its reads
// ended. No bake and a 1ms grace, so that the old generation's reads end
// while its answers to the last datagrams it read are still on their way.
func TestDNSRolloversSlowAnswers(t *testing.T) {
	svc := startDNSConfig(t, harness.Config{AppArgs: []string{"-delay", "20ms"}, DrainGrace: time.Millisecond, Bake: -1})
	perf := startDNSPerf(t, svc.Addr, 2*time.Minute)
	c := startDNSClient(t, svc.Addr, 8, 2, 2*time.Minute)
	ws := rollDNS(t, svc, 20)
	c.waitAnswers(t, 21, 100)
	c.finish()
	checkDNS(t, c.tally(1, ws), perf.finish(t))
	checkDNSLeft(t, svc, 21)
}

// checkDNSLeft checks that gen alone is left, that the coordinator counted
// no datagram lost, and stops it.
func checkDNSLeft(t *testing.T, svc *harness.Service, gen int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := waitSvcStatus(t, svc, fmt.Sprintf("gen %d alone, its datagrams reported", gen), 10*time.Second, func(st wire.Status) bool {
		return st.Active == gen && len(st.Generations) == 1 && st.Generations[0].Stats.Datagrams > 0
	})
	if s := st.Generations[0].Stats; s.Datagrams == 0 || s.DatagramsLost != 0 {
		t.Errorf("gen %d reports %d datagrams read, %d lost: want some read, none lost", gen, s.Datagrams, s.DatagramsLost)
	}
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// since counts the queries sent at or after t0: all of them, and those that
// got no answer, or one with another generation or rcode than want (want
// NOERROR).
func (c *dnsClient) since(t0 time.Time, gen int) (total, bad int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, qs := range append(slices.Clone(c.udp), c.tcp) {
		for _, q := range qs {
			if q.sent.Before(t0) {
				continue
			}
			total++
			if q.answers == 0 || q.gen != gen || q.rcode != dns.RcodeSuccess {
				bad++
			}
		}
	}
	return total, bad
}

// A bad UDP deploy is rolled back in its bake with the figures of TCP's
// (TestSafeCrashOnFirstRequest, TestSafePanickingHandlers): a build that
// crashes on its first query loses only what it had read or queued when it
// died, at most two queries per client; one that answers SERVFAIL to
// everything, reported through rollover.Answer, fails its health at the
// 20th answer and loses none. After each, gen 1 answers everything again.
func TestDNSBadDeployRolledBack(t *testing.T) {
	const bake = 3 * time.Second
	const udpClients, tcpClients = 8, 2
	svc := startDNS(t)
	for i, mode := range []string{"crash", "servfail"} {
		gen := i + 2
		c := startDNSClient(t, svc.Addr, udpClients, tcpClients, time.Minute)
		n := startNext(t, svc, []string{"--wait", "--bake", bake.String()}, append(svc.AppArgv("v2"), "-fail="+mode))
		code := n.wait(t, bake+30*time.Second)
		active, wasActive := n.find(wire.PhaseActive)
		rb, rolledBack := n.find(wire.PhaseRolledBack)
		// A crash may also come during the steering, from a query that
		// reached the new generation's first socket before the steer of
		// its second was verified: the rollover then fails before it was
		// active, and gen 1 keeps the port (pinned back) as it would after
		// a rollback.
		failedAtSteer := !wasActive && mode == "crash" && strings.Contains(n.stderr.String(), "failed the steering verification")
		if !rolledBack && !failedAtSteer {
			t.Fatalf("-fail=%s: next exited %d without a rollback: %s (events %s)", mode, code, n.stderr.String(), n.phases())
		}
		since := rb.At
		if failedAtSteer {
			since = n.ended
		}
		testproc.WaitFor(t, 10*time.Second, "500 queries after the rollback", func() bool { n, _ := c.since(since, 1); return n >= 500 })
		c.finish()
		d := c.tally(1, nil)
		after, wrong := c.since(since, 1)
		t.Logf("-fail=%s: active %v at %s, rolled back %v at %s, failed at the steering %v; %s; after it %d of %d queries not answered NOERROR by gen 1",
			mode, wasActive, active.At.Format("15:04:05.000000"), rolledBack, rb.At.Format("15:04:05.000000"), failedAtSteer, d, wrong, after)
		t.Logf("next: %s", strings.TrimSpace(n.stderr.String()))
		if code != 1 {
			t.Errorf("-fail=%s: next exited %d, want 1", mode, code)
		}
		if rolledBack && rb.Generation != 1 {
			t.Errorf("-fail=%s: rolled back to gen %d, want gen 1", mode, rb.Generation)
		}
		if rolledBack && rb.At.Sub(active.At) >= bake {
			t.Errorf("-fail=%s: rolled back %v after active: not within the %v bake", mode, rb.At.Sub(active.At), bake)
		}
		if wrong != 0 {
			t.Errorf("-fail=%s: %d queries sent after the rollback were not answered NOERROR by gen 1", mode, wrong)
		}
		if d.Twice != 0 {
			t.Errorf("-fail=%s: %d queries answered twice", mode, d.Twice)
		}
		switch mode {
		case "crash":
			if want := fmt.Sprintf("gen %d exited", gen); !strings.Contains(n.stderr.String(), want) {
				t.Errorf("next's error does not say %q: %s", want, n.stderr.String())
			}
			if lost, bound := d.Unanswered+d.TCPFailed, 2*(udpClients+tcpClients); lost > bound {
				t.Errorf("-fail=crash: %d queries lost, over %d (two per client)", lost, bound)
			}
		case "servfail":
			if want := fmt.Sprintf("gen %d failed its health", gen); !strings.Contains(n.stderr.String(), want) {
				t.Errorf("next's error does not say %q: %s", want, n.stderr.String())
			}
			if d.Unanswered != 0 || d.TCPFailed != 0 {
				t.Errorf("-fail=servfail: %d udp queries unanswered, %d tcp failed: want 0", d.Unanswered, d.TCPFailed)
			}
			rep, _ := n.find(wire.PhaseReport)
			var failed uint64
			if rep.Report != nil {
				for _, e := range rep.Report.Errors {
					if e.Generation == gen {
						failed = e.FailedAnswers
					}
				}
			}
			if rep.Report == nil || !rep.Report.RolledBack || failed < 20 {
				t.Errorf("report %v: want a rolled-back report that counts gen %d's 20 or more failed answers", rep.Report, gen)
			}
			// As TestSafePanickingHandlers: every bad answer a client got is
			// one the report counts, and the health acts within moments.
			if sf := d.ByRcode["SERVFAIL"]; sf == 0 || uint64(sf) > failed {
				t.Errorf("-fail=servfail: the clients got %d SERVFAIL answers, the report counts %d: want 1 to the report's", sf, failed)
			}
			if d := rb.At.Sub(active.At); d > time.Second {
				t.Errorf("-fail=servfail: rolled back %v after active: the health should act within moments", d)
			}
		}
	}
	checkDNSLeft(t, svc, 1)
}

// copyPython copies testdata/name, and the sdnotify module it imports,
// into dir, and returns the interpreter's own path (no wrapper such as
// pyenv's shims, so that the pid the coordinator spawns is the server's)
// and the copy's.
func copyPython(t *testing.T, dir, name string) (python, script string) {
	t.Helper()
	needTool(t, "python3")
	out, err := exec.Command("python3", "-c", "import sys; print(sys.executable)").Output()
	if err != nil {
		t.Fatalf("python3: %v", err)
	}
	for _, f := range []string{name, "sdnotify.py"} {
		src, err := os.ReadFile(filepath.Join("testdata", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), src, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return strings.TrimSpace(string(out)), filepath.Join(dir, name)
}

// pythonScript is copyPython with the interpreter's path in the copy's
// first line, so that the script runs as a command of its own.
func pythonScript(t *testing.T, dir, name string) string {
	t.Helper()
	python, script := copyPython(t, dir, name)
	src, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	_, body, _ := strings.Cut(string(src), "\n")
	if err := os.WriteFile(script, []byte("#!"+python+"\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return script
}

// A UDP server in Python (testdata/dnsapp.py: SO_REUSEPORT, READY=1 after a
// warm-up, one query at a time taking 5ms, SIGTERM closes its socket) is
// steered by the coordinator from outside, as TCP apps are: the drain
// signal comes only once the old generation's receive queue reads empty.
// 20 rollovers under the Go client: none of its queries unanswered, none
// answered by a generation still warming up (every answer from the
// generation the group pointed at when it was sent, or its predecessor
// while that one drained), and each generation's one socket steerable.
func TestDNSForeignApp(t *testing.T) {
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	svc := startService(t, harness.Config{
		App: pythonScript(t, t.TempDir(), "dnsapp.py"), Port: port, DrainGrace: 50 * time.Millisecond, Bake: -1,
		AppArgs:    []string{"-warmup", "0.2", "-delay", "0.005"},
		StartFlags: []string{"--ready=notify", "--addr", addr},
	})
	st := waitSvcStatus(t, svc, "gen 1 steered from outside", 10*time.Second, func(st wire.Status) bool {
		return len(st.Generations) == 1 && st.Generations[0].Steerable && st.Generations[0].Sockets == 1
	})
	t.Logf("gen 1: steerable %v, %d socket", st.Generations[0].Steerable, st.Generations[0].Sockets)
	c := startDNSClient(t, svc.Addr, 8, 0, 2*time.Minute)
	ws := rollDNS(t, svc, 20)
	c.waitAnswers(t, 21, 20)
	c.finish()
	d := c.tally(1, ws)
	t.Logf("go client: %s", d)
	if d.UDP == 0 || d.Unanswered != 0 || d.Twice != 0 || d.WrongGen != 0 {
		t.Errorf("%d udp queries: %d unanswered, %d answered twice, %d from a generation the group did not point at (%v): want some, and 0 of each", d.UDP, d.Unanswered, d.Twice, d.WrongGen, d.FirstWrong)
	}
	st = waitSvcStatus(t, svc, "gen 21 alone", 10*time.Second, func(st wire.Status) bool { return st.Active == 21 && len(st.Generations) == 1 })
	if g := st.Generations[0]; !g.Steerable || g.Sockets != 1 {
		t.Errorf("gen 21: steerable %v (%s), %d sockets: want steered from outside, 1 socket", g.Steerable, g.SteerError, g.Sockets)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := svc.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// byGenSince counts the UDP answers to queries sent at or after t0, by the
// generation that answered.
func (c *dnsClient) byGenSince(t0 time.Time) map[int]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[int]int{}
	for _, qs := range c.udp {
		for _, q := range qs {
			if !q.sent.Before(t0) && q.answers > 0 {
				out[q.gen]++
			}
		}
	}
	return out
}

// A canary at 10% sends 10% ± 3% of datagrams to the new generation (each
// datagram is steered on its own), and promote takes it to all of them.
func TestDNSCanary(t *testing.T) {
	svc := startDNS(t)
	c := startDNSClient(t, svc.Addr, 8, 0, time.Minute)
	n := startNext(t, svc, []string{"--canary", "10%", "--bake", "100ms"}, svc.AppArgv("v2"))
	n.waitFor(t, "canary at 10%", 30*time.Second, func(e wire.Event) bool { return e.Phase == wire.PhaseCanary && e.Weight == 10 })
	t0 := time.Now()
	var share map[int]int
	testproc.WaitFor(t, 20*time.Second, "4,000 answers during the canary", func() bool { share = c.byGenSince(t0); return share[1]+share[2] >= 4000 })
	got := float64(share[2]) / float64(share[1]+share[2])
	t.Logf("canary 10%%: gen 2 answered %d of %d datagrams (%.1f%%), others %v", share[2], share[1]+share[2], 100*got, share)
	if got < 0.07 || got > 0.13 || len(share) != 2 {
		t.Errorf("gen 2 answered %.1f%% of the datagrams during its 10%% canary (%v): want 10%% ± 3%%, from gens 1 and 2 only", 100*got, share)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, errOut, code, err := svc.CLI(ctx, "promote"); err != nil || code != 0 {
		t.Fatalf("promote: exit %d, %v: %s", code, err, errOut)
	}
	n.waitPhase(t, wire.PhaseActive, 30*time.Second)
	t1 := time.Now()
	testproc.WaitFor(t, 10*time.Second, "500 answers after the promote", func() bool { s := c.byGenSince(t1); return s[1]+s[2] >= 500 })
	if s := c.byGenSince(t1); s[1] != 0 {
		t.Errorf("after the promote gen 1 still answered %d of %d datagrams", s[1], s[1]+s[2])
	}
	if code := n.wait(t, 30*time.Second); code != 0 {
		t.Errorf("next exited %d: %s", code, n.stderr.String())
	}
	c.finish()
	if d := c.tally(1, nil); d.Unanswered != 0 || d.Twice != 0 {
		t.Errorf("%s: want none unanswered or answered twice", d)
	}
	checkDNSLeft(t, svc, 2)
}
