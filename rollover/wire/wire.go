package wire

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// ExitCode is an exit status of the rollover CLI: one table, shared by
// the CLI and the coordinator, which sends it in a failed result.
type ExitCode int

// The exit codes.
const (
	ExitOK            ExitCode = 0 // done
	ExitFailed        ExitCode = 1 // a rollover failed, was refused or rolled back
	ExitUsage         ExitCode = 2 // a bad command line or request
	ExitNoCoordinator ExitCode = 3 // nothing answers on the control socket
	ExitLost          ExitCode = 4 // next --wait: the drain cut connections or requests
)

// Signal is a signal number, as the drain signal travels: parsed once,
// where a person typed it. It reads a JSON number, or a string of digits
// as older CLIs sent it.
type Signal int

// UnmarshalJSON reads 3 or "3".
func (s *Signal) UnmarshalJSON(b []byte) error {
	var n int
	if err := json.Unmarshal(b, &n); err != nil {
		var str string
		if json.Unmarshal(b, &str) != nil {
			return fmt.Errorf("drain_signal: %s is not a signal number", b)
		}
		if _, err := fmt.Sscanf(str, "%d", &n); err != nil || fmt.Sprint(n) != str {
			return fmt.Errorf("drain_signal: %q is not a signal number", str)
		}
	}
	if n < 0 || n > 64 {
		return fmt.Errorf("drain_signal: %d is not a signal number", n)
	}
	*s = Signal(n)
	return nil
}

// Version is the protocol version spoken by this package.
const Version = 1

// MaxLine bounds one message, newline included. A generation's metrics
// (TypeMetrics) travel in one message, so it is generous.
const MaxLine = 1 << 20

// StatsInterval is how often a generation reports its counters.
const StatsInterval = 250 * time.Millisecond

// Message types.
const (
	// generation → coordinator
	TypeHello  = "hello"
	TypeReady  = "ready"
	TypeStats  = "stats"
	TypeAck    = "ack"
	TypeClosed = "closed"
	TypeDone   = "done"

	// coordinator → generation
	TypeWelcome = "welcome"
	TypeSteer   = "steer"
	TypePin     = "pin"
	TypeDrain   = "drain"
	// TypeRelease starts the bake: the generation stops keep-alive (every
	// response says Connection: close, HTTP/2 connections get GOAWAY) but
	// keeps its listeners in the group, steered away, so that a rollback can
	// give it the port back at once. TypeResume undoes it: the generation
	// re-pins its groups to itself (index 0) and serves keep-alive again.
	TypeRelease = "release"
	TypeResume  = "resume"
	// TypeMetrics asks for the generation's metrics in the Prometheus text
	// format; the TypeAck carries them in Metrics.
	TypeMetrics = "metrics"

	// CLI → coordinator
	TypeNext     = "next"
	TypeStatus   = "status"
	TypeStop     = "stop"
	TypeRollback = "rollback"
	// TypePromote takes a waiting canary to 100%; TypeAbort rolls it back.
	TypePromote = "promote"
	TypeAbort   = "abort"

	// coordinator → CLI
	TypeEvent  = "event"
	TypeResult = "result"
)

var knownTypes = map[string]bool{
	TypeHello: true, TypeReady: true, TypeStats: true, TypeAck: true, TypeClosed: true, TypeDone: true,
	TypeWelcome: true, TypeSteer: true, TypePin: true, TypeDrain: true, TypeMetrics: true,
	TypeRelease: true, TypeResume: true,
	TypeNext: true, TypeStatus: true, TypeStop: true, TypeRollback: true, TypePromote: true, TypeAbort: true,
	TypeEvent: true, TypeResult: true,
}

// Msg is every message of the protocol. Which fields are set depends on Type.
type Msg struct {
	V    int    `json:"v"`
	Type string `json:"type"`
	// ID pairs a command with its TypeAck.
	ID uint64 `json:"id,omitempty"`

	// Hello. Adopt: the generation lost its coordinator and asks a new one
	// to adopt it; State is then where it stands (starting, ready,
	// draining), with its Steerable, SteerError and Addrs when ready.
	Generation int    `json:"generation,omitempty"`
	PID        int    `json:"pid,omitempty"`
	Secret     string `json:"secret,omitempty"`
	Adopt      bool   `json:"adopt,omitempty"`
	State      string `json:"state,omitempty"`

	// Ready: whether the generation's listeners accept BPF steering, and
	// why not, and the addresses it serves: host:port for a TCP listener,
	// UDPAddr+host:port for a UDP socket.
	Steerable  bool     `json:"steerable,omitempty"`
	SteerError string   `json:"steer_error,omitempty"`
	Addrs      []string `json:"addrs,omitempty"`

	// Stats, Done.
	Stats *Stats `json:"stats,omitempty"`

	// Drain: how long N keeps accepting after the steer, and the bound on the
	// connection drain. Durations are milliseconds.
	GraceMS   int64 `json:"grace_ms,omitempty"`
	TimeoutMS int64 `json:"timeout_ms,omitempty"`

	// Steer: the percent of new connections the generation takes (a
	// canary step; 0 means all), and the health rule of its bake: once its
	// 5xx-or-panic share of at least Health.MinRequests responses reaches
	// Health.MaxErrorRatio, the generation sends TypeStats at once rather
	// than at the next StatsInterval.
	Weight int     `json:"weight,omitempty"`
	Health *Health `json:"health,omitempty"`

	// Next: the command line (empty: the active one's) and --wait; how the
	// new generation reports ready and drains (empty: as the active one).
	Argv []string `json:"argv,omitempty"`
	Wait bool     `json:"wait,omitempty"`
	// ExpectGeneration, when set, makes next refuse unless this generation
	// is still the active one (compare-and-swap for deploy scripts).
	ExpectGeneration int    `json:"expect_generation,omitempty"`
	Ready            string `json:"ready,omitempty"`
	Addr             string `json:"addr,omitempty"`
	DrainSignal      Signal `json:"drain_signal,omitempty"`
	// Instances is how many processes the new generation runs (0: as the
	// active one).
	Instances int `json:"instances,omitempty"`
	// Bake is a duration ("5s"; empty: the coordinator's --bake). Canary
	// lists the weights of a canary's steps in percent; StepMS is how long
	// each lasts (0: wait for TypePromote or TypeAbort). HealthURL is
	// probed during the bake and each step.
	Bake      string `json:"bake,omitempty"`
	Canary    []int  `json:"canary,omitempty"`
	StepMS    int64  `json:"step_ms,omitempty"`
	HealthURL string `json:"health_url,omitempty"`

	// Event.
	Event *Event `json:"event,omitempty"`

	// Ack to TypeMetrics: the Prometheus text exposition format.
	Metrics string `json:"metrics,omitempty"`

	// Result, Ack, Welcome. Error is empty on success. Code is the CLI's exit
	// code for a failed result.
	OK     bool     `json:"ok,omitempty"`
	Error  string   `json:"error,omitempty"`
	Code   ExitCode `json:"code,omitempty"`
	Status *Status  `json:"status,omitempty"`
}

// Stats are a generation's counters.
type Stats struct {
	Inflight    int64  `json:"inflight"`
	Connections int64  `json:"connections"`
	Requests    uint64 `json:"requests"`
	// Responses by status class, and handler panics (recovered, counted
	// and re-panicked by the library).
	R1xx   uint64 `json:"1xx,omitempty"`
	R2xx   uint64 `json:"2xx,omitempty"`
	R3xx   uint64 `json:"3xx,omitempty"`
	R4xx   uint64 `json:"4xx,omitempty"`
	R5xx   uint64 `json:"5xx,omitempty"`
	Panics uint64 `json:"panics,omitempty"`
	// ForcedConnections and ForcedRequests are the connections (hijacked
	// ones included) and requests still open when the generation's own
	// drain deadline cut them; the generation reports them in TypeDone.
	ForcedConnections int64 `json:"forced_connections,omitempty"`
	ForcedRequests    int64 `json:"forced_requests,omitempty"`

	// UDP (rollover.ListenPacket): datagrams read by the app, datagrams
	// it sent, and those read but not answered yet (read minus sent, never
	// below 0). DatagramsLost were still queued on a socket when the
	// library closed it: routed here, never read.
	Datagrams       uint64 `json:"datagrams,omitempty"`
	DatagramsSent   uint64 `json:"datagrams_sent,omitempty"`
	InflightPackets int64  `json:"inflight_packets,omitempty"`
	DatagramsLost   uint64 `json:"datagrams_lost,omitempty"`
	// Answers the app reported outside net/http (rollover.Answer, for a
	// DNS reply say), and how many of them were server failures (a DNS
	// SERVFAIL): the health rule counts those as it counts 5xx.
	Answers       uint64 `json:"answers,omitempty"`
	FailedAnswers uint64 `json:"failed_answers,omitempty"`
}

// Judged are what a health rule counts: the bad ones (5xx, panics and
// failed answers) of all (responses, panics and answers).
func (s Stats) Judged() (bad, total uint64) {
	bad = s.R5xx + s.Panics + s.FailedAnswers
	return bad, s.R1xx + s.R2xx + s.R3xx + s.R4xx + s.R5xx + s.Panics + s.Answers
}

// Classes are the responses by status class: 1xx … 5xx.
func (s Stats) Classes() [5]uint64 { return [5]uint64{s.R1xx, s.R2xx, s.R3xx, s.R4xx, s.R5xx} }

// UDPAddr starts the address of a UDP socket in Msg.Addrs ("udp:host:port"),
// which is no TCP address: a TCP listener and a UDP socket on one port are
// two reuseport groups.
const UDPAddr = "udp:"

// Health is the bake's health rule (see Msg.Health).
type Health struct {
	MinRequests   uint64  `json:"min_requests"`
	MaxErrorRatio float64 `json:"max_error_ratio"`
}

// Failing reports whether s breaks the rule h: a 5xx-or-panic share of at
// least h.MinRequests responses that reaches h.MaxErrorRatio. Panics are
// counted with the responses: a panicking handler may write none.
func (h Health) Failing(s Stats) bool {
	bad, total := s.Judged()
	return total > 0 && total >= h.MinRequests && float64(bad) >= h.MaxErrorRatio*float64(total)
}

// Phases of a rollover, in order, as reported in Event.Phase.
const (
	PhaseStarted    = "started"     // Generation, PID
	PhaseReady      = "ready"       // Generation, Millis: spawn to ready
	PhaseActive     = "active"      // Generation
	PhaseDraining   = "draining"    // Generation (the old one), Stats
	PhaseLeft       = "left"        // Generation (the old one) left the port
	PhaseDrained    = "drained"     // Generation (the old one), Millis: drain start to exit
	PhaseFailed     = "failed"      // Generation, Text
	PhaseInfo       = "info"        // Text
	PhaseBaking     = "baking"      // Generation (the new one), Millis: the bake
	PhaseCanary     = "canary"      // Generation (the new one), Weight: its share now
	PhaseRolledBack = "rolled-back" // Generation (the one active again), Text: why
	PhaseReport     = "report"      // Report
)

// Event is one step of a rollover as shown by `rollover next`.
type Event struct {
	Phase      string  `json:"phase"`
	Generation int     `json:"generation,omitempty"`
	PID        int     `json:"pid,omitempty"`
	Millis     int64   `json:"ms,omitempty"`
	Stats      *Stats  `json:"stats,omitempty"`
	Text       string  `json:"text,omitempty"`
	Weight     int     `json:"weight,omitempty"`
	Report     *Report `json:"report,omitempty"`
}

// Report is what a rollover cost, so that zero is shown rather than
// claimed: what was cut at drain deadlines, the error responses each
// generation gave while it ran, and the kernel's own counters over the
// rollover's window.
type Report struct {
	Generation int `json:"generation"` // the new generation
	Previous   int `json:"previous"`   // the one it replaced (0: none)
	// ForcedConnections and ForcedRequests were cut at a drain deadline.
	ForcedConnections int64 `json:"forced_connections"`
	ForcedRequests    int64 `json:"forced_requests"`
	// Errors are the 5xx responses and panics of each generation during
	// the rollover.
	Errors []GenErrors `json:"errors"`
	// Kernel holds TcpExt counters from /proc/net/netstat over the window:
	// per network namespace, so they include any other traffic in it. Nil
	// when unreadable.
	Kernel     map[string]uint64 `json:"kernel"`
	RolledBack bool              `json:"rolled_back,omitempty"`
	Reason     string            `json:"reason,omitempty"`
	Millis     int64             `json:"ms"` // the window
	// Killed are the generations killed at their drain deadline: their
	// counts are what they last reported (a hung one reports nothing), or
	// what the kernel showed of their connections, whichever is higher.
	Killed []Killed `json:"killed,omitempty"`
	// UDP: a generation of the window read datagrams. DatagramsLost were
	// still queued on a UDP socket of theirs when it closed. Kernel then
	// also holds UdpInErrors and UdpRcvbufErrors from /proc/net/snmp.
	UDP           bool   `json:"udp,omitempty"`
	DatagramsLost uint64 `json:"datagrams_lost,omitempty"`
}

// Killed is a generation killed at its drain deadline.
type Killed struct {
	Generation int `json:"generation"`
	// StatsAgeMS is how old its last report was when it was killed.
	StatsAgeMS int64 `json:"stats_age_ms"`
}

// GenErrors counts one generation's failures in a rollover's window.
type GenErrors struct {
	Generation int    `json:"generation"`
	R5xx       uint64 `json:"5xx"`
	Panics     uint64 `json:"panics"`
	// FailedAnswers were reported through rollover.Answer (DNS SERVFAIL).
	FailedAnswers uint64 `json:"failed_answers,omitempty"`
}

// String is the report as one line.
func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "report: gen %d", r.Generation)
	if r.Previous != 0 {
		fmt.Fprintf(&b, " replacing gen %d", r.Previous)
	}
	fmt.Fprintf(&b, " over %dms: %d connections and %d requests cut at a drain deadline", r.Millis, r.ForcedConnections, r.ForcedRequests)
	for _, k := range r.Killed {
		fmt.Fprintf(&b, "; gen %d killed at its drain deadline (its last report was %dms old)", k.Generation, k.StatsAgeMS)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "; gen %d: %d 5xx, %d panics", e.Generation, e.R5xx, e.Panics)
		if r.UDP {
			fmt.Fprintf(&b, ", %d failed answers", e.FailedAnswers)
		}
	}
	if r.UDP {
		fmt.Fprintf(&b, "; udp: %d datagrams lost in closing sockets", r.DatagramsLost)
	}
	if r.Kernel != nil {
		keys := make([]string, 0, len(r.Kernel))
		for k := range r.Kernel {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteString("; kernel (this network namespace):")
		for _, k := range keys {
			fmt.Fprintf(&b, " %s %d", k, r.Kernel[k])
		}
	}
	if r.RolledBack {
		fmt.Fprintf(&b, "; rolled back: %s", r.Reason)
	}
	return b.String()
}

// Lost reports whether the rollover cut any connection or request.
func (r *Report) Lost() bool {
	return r.ForcedConnections > 0 || r.ForcedRequests > 0 || r.DatagramsLost > 0
}

// String renders an event as the line `rollover next` prints.
func (e Event) String() string {
	switch e.Phase {
	case PhaseStarted:
		return fmt.Sprintf("started gen %d (pid %d)", e.Generation, e.PID)
	case PhaseReady:
		return fmt.Sprintf("ready after %dms", e.Millis)
	case PhaseActive:
		return fmt.Sprintf("gen %d active", e.Generation)
	case PhaseDraining:
		var in, conns int64
		if e.Stats != nil {
			in, conns = e.Stats.Inflight, e.Stats.Connections
		}
		return fmt.Sprintf("draining gen %d: %d in flight, %d connections", e.Generation, in, conns)
	case PhaseLeft:
		return fmt.Sprintf("gen %d left the port", e.Generation)
	case PhaseDrained:
		return fmt.Sprintf("gen %d drained after %dms", e.Generation, e.Millis)
	case PhaseFailed:
		return fmt.Sprintf("gen %d failed: %s", e.Generation, e.Text)
	case PhaseBaking:
		return fmt.Sprintf("baking gen %d for %dms", e.Generation, e.Millis)
	case PhaseCanary:
		return fmt.Sprintf("canary: gen %d takes %d%% of new connections", e.Generation, e.Weight)
	case PhaseRolledBack:
		return fmt.Sprintf("rolled back to gen %d: %s", e.Generation, e.Text)
	case PhaseReport:
		if e.Report != nil {
			return e.Report.String()
		}
		return "report"
	default:
		return e.Text
	}
}

// Status is the coordinator's state as `rollover status --json` prints it.
type Status struct {
	PID        int    `json:"pid"`
	Socket     string `json:"socket"`
	Active     int    `json:"active"`
	InProgress bool   `json:"rollover_in_progress"`
	// ActiveExits counts active generations that exited on their own;
	// RestartPending is true while the next restart waits out its backoff.
	ActiveExits    int  `json:"active_exits"`
	RestartPending bool `json:"restart_pending"`
	// MigrateReq is net.ipv4.tcp_migrate_req in the coordinator's network
	// namespace; nil when it could not be read.
	MigrateReq *bool `json:"tcp_migrate_req"`
	// CanaryWeight is the share, in percent, of new connections a waiting
	// or stepping canary gets (0: no canary). Baking is the generation in
	// its bake (0: none).
	CanaryWeight int `json:"canary_weight,omitempty"`
	Baking       int `json:"baking,omitempty"`
	// Rollout is the rollover in progress (nil: none).
	Rollout     *RolloutStatus `json:"rollout,omitempty"`
	LastReport  *Report        `json:"last_report,omitempty"`
	Generations []GenStatus    `json:"generations"`
}

// RolloutStatus is where the rollover in progress stands.
type RolloutStatus struct {
	Generation int `json:"generation"` // the new generation
	// Phase: spawned, ready, canary, steered, baking, draining,
	// rolled-back.
	Phase string `json:"phase"`
	// Weight is a canary's share of new connections, in percent.
	Weight int `json:"weight,omitempty"`
	// BakeLeftMS is what is left of the bake.
	BakeLeftMS int64 `json:"bake_left_ms,omitempty"`
	// Step of Steps numbers a canary's step among its steps below 100%,
	// from 1 (0: the canary is at 100%, or none). The step ends in
	// StepLeftMS and the next one begins (after the last, 100%), unless it
	// is Waiting: then it holds until rollover promote or rollover abort.
	Step       int   `json:"step,omitempty"`
	Steps      int   `json:"steps,omitempty"`
	StepLeftMS int64 `json:"step_left_ms,omitempty"`
	Waiting    bool  `json:"waiting,omitempty"`
}

// GenStatus is one live generation.
type GenStatus struct {
	Generation int      `json:"generation"`
	PID        int      `json:"pid"`
	State      string   `json:"state"`
	Argv       []string `json:"argv"`
	Steerable  bool     `json:"steerable"`
	// SteerError says why it cannot be steered; Sockets counts the
	// listening sockets the coordinator steers for an app without the
	// library (0: the library steers, or nobody).
	SteerError string `json:"steer_error,omitempty"`
	Sockets    int    `json:"sockets,omitempty"`
	// Instances is how many processes the generation runs (--instances),
	// Serving how many of them serve now; both 0 for one process.
	Instances int       `json:"instances,omitempty"`
	Serving   int       `json:"serving,omitempty"`
	StartedAt time.Time `json:"started_at"`
	Stats     Stats     `json:"stats"`
	// Ready is how the generation reports ready: library, notify or listen.
	Ready string `json:"ready,omitempty"`
	// Notify is the last STATUS= a notify-mode generation sent.
	Notify string `json:"notify_status,omitempty"`
}

// Errors returned by Reader.Read.
var (
	ErrTooLong   = errors.New("wire: message too long")
	ErrMalformed = errors.New("wire: malformed message")
)

// Encode renders m (with V set to Version) as one line.
func Encode(m Msg) []byte {
	m.V = Version
	b, err := json.Marshal(m)
	if err != nil {
		// Only a time.Time that RFC 3339 cannot express fails (year
		// outside [0,9999], offset of 24h or more); Decode rejects those.
		b = []byte(`{"v":1,"type":"result","error":"wire: encode failed"}`)
	}
	return append(b, '\n')
}

// The types a Msg points to encode themselves, so that a process's first
// Encode builds the encoders of Msg's own fields only, not of the whole
// protocol (Status, Report, Event and the rest): that took 0.3-0.8ms of a
// new generation's hello and of the CLI's request. The bytes are the same.
func (s Stats) MarshalJSON() ([]byte, error) {
	type plain Stats
	return json.Marshal(plain(s))
}

// MarshalJSON: see Stats.MarshalJSON.
func (h Health) MarshalJSON() ([]byte, error) {
	type plain Health
	return json.Marshal(plain(h))
}

// MarshalJSON: see Stats.MarshalJSON.
func (e Event) MarshalJSON() ([]byte, error) {
	type plain Event
	return json.Marshal(plain(e))
}

// MarshalJSON: see Stats.MarshalJSON.
func (s Status) MarshalJSON() ([]byte, error) {
	type plain Status
	return json.Marshal(plain(s))
}

// Decode parses one message (without its newline) and checks it.
func Decode(line []byte) (Msg, error) {
	var m Msg
	line = bytes.TrimRight(line, "\r\n")
	if len(line) == 0 {
		return m, fmt.Errorf("%w: empty line", ErrMalformed)
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if m.V != Version {
		return m, fmt.Errorf("%w: version %d, want %d", ErrMalformed, m.V, Version)
	}
	if !knownTypes[m.Type] {
		return m, fmt.Errorf("%w: unknown type %q", ErrMalformed, m.Type)
	}
	// Accept only what Encode can send on: encoding/json parses time offsets
	// of 24h and more that time.Time then refuses to marshal
	// (go.dev/issue/54580). Status holds the only times.
	if m.Status != nil {
		if _, err := json.Marshal(m.Status); err != nil {
			return m, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
	}
	return m, nil
}

// Reader reads messages from a stream, one per line, each at most MaxLine.
type Reader struct {
	r *bufio.Reader
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, 4096)}
}

// Read returns the next message. A line longer than MaxLine is ErrTooLong;
// the stream is then unusable and the caller should close it. A stream that
// ends inside a line returns io.ErrUnexpectedEOF.
func (r *Reader) Read() (Msg, error) {
	var buf []byte
	for {
		chunk, err := r.r.ReadSlice('\n')
		if len(buf)+len(chunk) > MaxLine {
			return Msg{}, ErrTooLong
		}
		buf = append(buf, chunk...)
		switch {
		case err == nil:
			return Decode(buf)
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(buf) > 0:
			return Msg{}, io.ErrUnexpectedEOF
		default:
			return Msg{}, err
		}
	}
}
