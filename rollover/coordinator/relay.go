package coordinator

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rollover-sh/rollover/rollover/wire"
)

// relay speaks the control protocol for a generation of instances that
// link the library: to the coordinator it is the generation (one hello,
// one ready once all instances are, their counters summed, one done); to
// each instance it is the coordinator, on a socket of the supervisor's
// own. The coordinator steers the generation's sockets from outside, so
// only the drain, the bake's release and resume and the metrics scrape
// reach the instances.
type relay struct {
	up      net.Conn
	upMu    sync.Mutex // writes to up
	secret  string
	ln      net.Listener
	onDrain func() // the coordinator ordered the drain
	onReady func(pid int)

	mu      sync.Mutex
	peers   map[int]*relayPeer // by pid
	retired wire.Stats         // the counters of instances gone
	addrs   []string
	nextID  uint64
}

type relayPeer struct {
	pid     int
	conn    net.Conn
	wmu     sync.Mutex
	stats   wire.Stats
	pending map[uint64]chan wire.Msg
}

// newRelay says hello to the coordinator at socket as generation n and
// listens for the instances at path.
func newRelay(socket string, n int, secret, path string, onDrain func(), onReady func(pid int)) (*relay, error) {
	up, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to the coordinator: %w", err)
	}
	r := &relay{up: up, secret: secret, peers: map[int]*relayPeer{}, onDrain: onDrain, onReady: onReady}
	_ = up.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := up.Write(wire.Encode(wire.Msg{Type: wire.TypeHello, Generation: n, PID: os.Getpid(), Secret: secret})); err != nil {
		up.Close()
		return nil, fmt.Errorf("hello: %w", err)
	}
	rd := wire.NewReader(up)
	m, err := rd.Read()
	if err == nil && (m.Type != wire.TypeWelcome || m.Error != "") {
		err = fmt.Errorf("refused: %s", m.Error)
	}
	if err != nil {
		up.Close()
		return nil, fmt.Errorf("hello: %w", err)
	}
	_ = up.SetDeadline(time.Time{})
	_ = os.Remove(path)
	if r.ln, err = net.Listen("unix", path); err != nil {
		up.Close()
		return nil, err
	}
	go r.readUp(rd)
	go r.accept()
	return r, nil
}

func (r *relay) close() {
	r.ln.Close()
	r.up.Close()
}

func (r *relay) sendUp(m wire.Msg) {
	r.upMu.Lock()
	defer r.upMu.Unlock()
	_ = r.up.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = r.up.Write(wire.Encode(m))
}

// ready tells the coordinator the generation serves, with the addresses
// its instances reported.
func (r *relay) ready() {
	r.mu.Lock()
	addrs := r.addrs
	r.mu.Unlock()
	r.sendUp(wire.Msg{Type: wire.TypeReady, SteerError: "several instances: steered by the coordinator", Addrs: addrs})
}

// done reports the generation's last counters.
func (r *relay) done() {
	r.sendUp(wire.Msg{Type: wire.TypeDone, Stats: new(r.sum())})
}

// retire keeps the counters of an instance that exited.
func (r *relay) retire(pid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.peers[pid]; ok {
		r.retired = addCounters(r.retired, p.stats)
		delete(r.peers, pid)
		p.conn.Close()
	}
}

// sum is the generation's counters: the instances' own, and those of
// instances gone (their gauges at 0).
func (r *relay) sum() wire.Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.retired
	for _, p := range r.peers {
		s = addCounters(s, p.stats)
		s.Inflight += p.stats.Inflight
		s.Connections += p.stats.Connections
		s.InflightPackets += p.stats.InflightPackets
	}
	return s
}

// addCounters adds b's counters (not its gauges) to a.
func addCounters(a, b wire.Stats) wire.Stats {
	a.Requests += b.Requests
	a.R1xx += b.R1xx
	a.R2xx += b.R2xx
	a.R3xx += b.R3xx
	a.R4xx += b.R4xx
	a.R5xx += b.R5xx
	a.Panics += b.Panics
	a.ForcedConnections += b.ForcedConnections
	a.ForcedRequests += b.ForcedRequests
	a.Datagrams += b.Datagrams
	a.DatagramsSent += b.DatagramsSent
	a.DatagramsLost += b.DatagramsLost
	a.Answers += b.Answers
	a.FailedAnswers += b.FailedAnswers
	return a
}

// readUp serves the coordinator's commands.
func (r *relay) readUp(rd *wire.Reader) {
	for {
		m, err := rd.Read()
		if err != nil {
			return
		}
		switch m.Type {
		case wire.TypeDrain:
			r.sendUp(wire.Msg{Type: wire.TypeAck, ID: m.ID, OK: true})
			r.onDrain()
			go r.broadcast(m, nil)
		case wire.TypeRelease, wire.TypeResume, wire.TypeMetrics:
			go r.broadcast(m, func(acks []wire.Msg) {
				ack := wire.Msg{Type: wire.TypeAck, ID: m.ID, OK: true}
				var text []string
				for _, a := range acks {
					if !a.OK && ack.OK {
						ack.OK, ack.Error = false, a.Error
					}
					if a.Metrics != "" {
						text = append(text, a.Metrics)
					}
				}
				if m.Type == wire.TypeMetrics {
					ack.OK, ack.Error, ack.Metrics = true, "", mergeMetrics(text)
				}
				r.sendUp(ack)
			})
		default: // steer, pin: the coordinator steers this generation itself
			r.sendUp(wire.Msg{Type: wire.TypeAck, ID: m.ID, OK: true})
		}
	}
}

// broadcast sends m to every instance and, when then is set, passes it
// their acknowledgements (bounded).
func (r *relay) broadcast(m wire.Msg, then func([]wire.Msg)) {
	r.mu.Lock()
	var waits []chan wire.Msg
	for _, p := range r.peers {
		r.nextID++
		ch := make(chan wire.Msg, 1)
		p.wmu.Lock()
		p.pending[r.nextID] = ch
		fwd := m
		fwd.ID = r.nextID
		_ = p.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, err := p.conn.Write(wire.Encode(fwd))
		p.wmu.Unlock()
		if err == nil {
			waits = append(waits, ch)
		}
	}
	r.mu.Unlock()
	if then == nil {
		return
	}
	var acks []wire.Msg
	deadline := time.NewTimer(4 * time.Second)
	defer deadline.Stop()
	for _, ch := range waits {
		select {
		case a := <-ch:
			acks = append(acks, a)
		case <-deadline.C:
			then(acks)
			return
		}
	}
	then(acks)
}

// mergeMetrics joins the instances' expositions, each family's HELP and
// TYPE once, every sample labeled with its instance (0, 1, … in the order
// given, which is no fixed order: the label tells them apart).
func mergeMetrics(texts []string) string {
	var b strings.Builder
	seen := map[string]bool{}
	for i, t := range texts {
		sc := bufio.NewScanner(strings.NewReader(t))
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		label := `rollover_instance="` + strconv.Itoa(i) + `"`
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "#"):
				if seen[line] {
					continue
				}
				seen[line] = true
			case line == "":
				continue
			default:
				if j := strings.IndexAny(line, "{ "); j >= 0 && line[j] == '{' {
					line = line[:j+1] + label + "," + line[j+1:]
				} else if j >= 0 {
					line = line[:j] + "{" + label + "}" + line[j:]
				}
			}
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// accept serves each instance's connection.
func (r *relay) accept() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		go r.serve(c)
	}
}

func (r *relay) serve(c net.Conn) {
	rd := wire.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	hello, err := rd.Read()
	if err == nil && (hello.Type != wire.TypeHello || hello.Secret != r.secret || hello.PID <= 0) {
		err = errors.New("not an instance's hello")
	}
	if err != nil {
		_, _ = c.Write(wire.Encode(wire.Msg{Type: wire.TypeWelcome, Error: "the supervisor of the instances refused this hello"}))
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	p := &relayPeer{pid: hello.PID, conn: c, pending: map[uint64]chan wire.Msg{}}
	p.wmu.Lock()
	_, err = c.Write(wire.Encode(wire.Msg{Type: wire.TypeWelcome, OK: true}))
	p.wmu.Unlock()
	if err != nil {
		c.Close()
		return
	}
	r.mu.Lock()
	r.peers[p.pid] = p
	r.mu.Unlock()
	for {
		m, err := rd.Read()
		if err != nil {
			return // retire takes it out once the process is gone
		}
		switch m.Type {
		case wire.TypeReady:
			r.mu.Lock()
			if len(r.addrs) == 0 {
				r.addrs = m.Addrs
			}
			r.mu.Unlock()
			r.onReady(p.pid)
		case wire.TypeStats, wire.TypeDone:
			if m.Stats != nil {
				r.mu.Lock()
				p.stats = *m.Stats
				r.mu.Unlock()
				if m.Type == wire.TypeStats {
					r.sendUp(wire.Msg{Type: wire.TypeStats, Stats: new(r.sum())})
				}
			}
		case wire.TypeAck:
			p.wmu.Lock()
			ch := p.pending[m.ID]
			delete(p.pending, m.ID)
			p.wmu.Unlock()
			if ch != nil {
				ch <- m
			}
		}
	}
}
