package wire

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the run if a test leaves a goroutine behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var update = flag.Bool("update", false, "rewrite testdata/golden from Encode")

// golden holds one representative message per type. Its encodings are
// committed in testdata/golden/<type>.jsonl; a change to them is a change to
// the protocol and needs a look from a human (and maybe a Version bump).
func golden() []Msg {
	yes := true
	return []Msg{
		{Type: TypeHello, Generation: 4, PID: 123, Secret: "3f9a1c"},
		{Type: TypeReady, Steerable: true, Addrs: []string{"0.0.0.0:8080", "[::]:8080"}},
		{Type: TypeStats, Stats: &Stats{Inflight: 17, Connections: 2, Requests: 90210, R2xx: 90100, R4xx: 3, R5xx: 2, Panics: 1}},
		{Type: TypeAck, ID: 7},
		{Type: TypeClosed},
		{Type: TypeDone, Stats: &Stats{Requests: 90311, ForcedConnections: 2, ForcedRequests: 1}},
		{Type: TypeWelcome, OK: true},
		{Type: TypeSteer, ID: 8, Weight: 10, Health: &Health{MinRequests: 20, MaxErrorRatio: 0.1}},
		{Type: TypeRelease, ID: 12},
		{Type: TypeResume, ID: 13},
		{Type: TypePromote},
		{Type: TypeAbort},
		{Type: TypePin, ID: 9},
		{Type: TypeDrain, ID: 10, GraceMS: 100, TimeoutMS: 30000},
		{Type: TypeMetrics, ID: 11},
		{Type: TypeNext, Argv: []string{"./app", "-addr", ":8080"}, Wait: true, Bake: "5s", Canary: []int{5, 25, 100}, StepMS: 30000, HealthURL: "http://127.0.0.1:8080/healthz"},
		{Type: TypeStatus},
		{Type: TypeStop},
		{Type: TypeRollback, Wait: true},
		{Type: TypeEvent, Event: &Event{Phase: PhaseDraining, Generation: 3, Stats: &Stats{Inflight: 17, Connections: 2, Requests: 4000}}},
		{Type: TypeResult, OK: true, Status: &Status{
			PID:        42,
			Socket:     "/run/rollover/app.sock",
			Active:     4,
			MigrateReq: &yes,
			LastReport: &Report{Generation: 4, Previous: 3, ForcedConnections: 1, Errors: []GenErrors{{Generation: 4, R5xx: 2, Panics: 1}},
				Kernel: map[string]uint64{"ListenDrops": 0, "TCPAbortOnClose": 3}, Millis: 5120},
			Generations: []GenStatus{{
				Generation: 4,
				PID:        123,
				State:      "active",
				Argv:       []string{"./app", "-addr", ":8080"},
				Steerable:  true,
				StartedAt:  time.Date(2026, 5, 9, 12, 30, 0, 250_000_000, time.UTC),
				Stats:      Stats{Inflight: 1, Connections: 3, Requests: 12},
			}},
		}},
	}
}

func goldenPath(typ string) string {
	return filepath.Join("testdata", "golden", typ+".jsonl")
}

func TestGoldenCoversEveryType(t *testing.T) {
	seen := map[string]bool{}
	for _, m := range golden() {
		if seen[m.Type] {
			t.Errorf("type %q twice in golden()", m.Type)
		}
		seen[m.Type] = true
	}
	for typ := range knownTypes {
		if !seen[typ] {
			t.Errorf("no golden message for type %q", typ)
		}
	}
}

func TestEncodeGolden(t *testing.T) {
	for _, m := range golden() {
		t.Run(m.Type, func(t *testing.T) {
			got := Encode(m)
			path := goldenPath(m.Type)
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("Encode(%s):\n got %s\nwant %s", m.Type, got, want)
			}
			if !bytes.HasPrefix(got, []byte(`{"v":1,"type":"`+m.Type+`"`)) {
				t.Errorf("Encode(%s) = %s, want it to start with the version and the type", m.Type, got)
			}
			if bytes.IndexByte(got, '\n') != len(got)-1 {
				t.Errorf("Encode(%s) = %q, want exactly one newline, at the end", m.Type, got)
			}
		})
	}
}

// TestDecodeGolden reads the committed bytes, not Encode's output, so that
// what older peers send keeps decoding after a change to Msg.
func TestDecodeGolden(t *testing.T) {
	for _, m := range golden() {
		t.Run(m.Type, func(t *testing.T) {
			b, err := os.ReadFile(goldenPath(m.Type))
			if err != nil {
				t.Fatal(err)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode(%s): %v", b, err)
			}
			m.V = Version
			if !reflect.DeepEqual(got, m) {
				t.Errorf("Decode(%s) =\n %#v\nwant\n %#v", b, got, m)
			}
		})
	}
}

func TestEncodeSetsVersion(t *testing.T) {
	for _, v := range []int{0, 2, -1} {
		got, err := Decode(Encode(Msg{V: v, Type: TypeStop}))
		if err != nil || got.V != Version {
			t.Errorf("Decode(Encode(V: %d)) = %+v, %v; want V %d", v, got, err, Version)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	msgs := append(golden(),
		Msg{Type: TypeReady, SteerError: "attach: operation not supported"},
		Msg{Type: TypeAck, ID: 1<<64 - 1, Error: "steer: verify: gen 5 is not at index 0"},
		Msg{Type: TypeWelcome, Error: "pid 99 was not spawned by the coordinator"},
		Msg{Type: TypeResult, Error: "gen 5 failed: exit status 1", Code: 1},
		Msg{Type: TypeResult, OK: true, Status: &Status{Generations: []GenStatus{}}},
		Msg{Type: TypeEvent, Event: &Event{Phase: PhaseInfo, Text: "tcp_migrate_req is 0 <see docs> & \"quotes\"\n\x00é"}},
	)
	for _, m := range msgs {
		b := Encode(m)
		got, err := Decode(b)
		if err != nil {
			t.Errorf("Decode(%s): %v", b, err)
			continue
		}
		m.V = Version
		if !reflect.DeepEqual(got, m) {
			t.Errorf("Decode(Encode(m)) =\n %#v\nwant\n %#v", got, m)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct{ name, line string }{
		{"empty", ""},
		{"newline only", "\n"},
		{"crlf only", "\r\n"},
		{"spaces", "   "},
		{"not json", "hello"},
		{"truncated", `{"v":1,"type":"hello"`},
		{"no version", `{"type":"hello"}`},
		{"version 0", `{"v":0,"type":"hello"}`},
		{"version 2", `{"v":2,"type":"hello"}`},
		{"version as string", `{"v":"1","type":"hello"}`},
		{"version as float", `{"v":1.0,"type":"hello"}`},
		{"duplicate version, last wins", `{"v":1,"type":"hello","v":2}`},
		{"no type", `{"v":1}`},
		{"empty type", `{"v":1,"type":""}`},
		{"unknown type", `{"v":1,"type":"reboot"}`},
		{"type in upper case", `{"v":1,"type":"HELLO"}`},
		{"array", `[{"v":1,"type":"hello"}]`},
		{"null", `null`},
		{"number", `1`},
		{"string", `"hello"`},
		{"trailing garbage", `{"v":1,"type":"hello"}x`},
		{"two objects", `{"v":1,"type":"hello"}{"v":1,"type":"hello"}`},
		{"two lines", "{\"v\":1,\"type\":\"hello\"}\n{\"v\":1,\"type\":\"hello\"}"},
		{"wrong field type", `{"v":1,"type":"hello","pid":"123"}`},
		{"negative id", `{"v":1,"type":"ack","id":-1}`},
		{"year 10000", `{"v":1,"type":"result","status":{"generations":[{"started_at":"10000-01-01T00:00:00Z"}]}}`},
		// encoding/json parses these; Encode could not send them back.
		{"offset +24:00", `{"v":1,"type":"result","status":{"generations":[{"started_at":"2026-01-01T00:00:00+24:00"}]}}`},
		{"offset -99:59", `{"v":1,"type":"result","status":{"generations":[{"started_at":"2026-01-01T00:00:00-99:59"}]}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Decode([]byte(tc.line))
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("Decode(%q) = %+v, %v; want an error wrapping ErrMalformed", tc.line, m, err)
			}
		})
	}
}

func TestDecodeLenient(t *testing.T) {
	for _, tc := range []struct {
		name, line string
		want       Msg
	}{
		{"unknown field", `{"v":1,"type":"ack","id":3,"added_in_v1_1":{"x":[1,2]}}`, Msg{V: 1, Type: TypeAck, ID: 3}},
		{"trailing newline", "{\"v\":1,\"type\":\"stop\"}\n", Msg{V: 1, Type: TypeStop}},
		{"trailing crlf", "{\"v\":1,\"type\":\"stop\"}\r\n", Msg{V: 1, Type: TypeStop}},
		{"surrounding space", " {\"type\":\"stop\", \"v\": 1}\t", Msg{V: 1, Type: TypeStop}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Decode([]byte(tc.line))
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Decode(%q) = %+v, %v; want %+v", tc.line, got, err, tc.want)
			}
		})
	}
}

// padded returns a valid stop message of exactly n bytes, newline included
// (eol is "\n" or "\r\n").
func padded(t *testing.T, n int, eol string) []byte {
	t.Helper()
	const head, tail = `{"v":1,`, `"type":"stop"}`
	pad := n - len(head) - len(tail) - len(eol)
	if pad < 0 {
		t.Fatalf("padded(%d) is too short", n)
	}
	return []byte(head + strings.Repeat(" ", pad) + tail + eol)
}

func readAll(t *testing.T, r *Reader) ([]Msg, error) {
	t.Helper()
	var msgs []Msg
	for range 1000 {
		m, err := r.Read()
		if err != nil {
			return msgs, err
		}
		msgs = append(msgs, m)
	}
	t.Fatal("Reader.Read did not stop")
	return nil, nil
}

func TestReaderStream(t *testing.T) {
	var stream []byte
	var want []Msg
	for _, m := range golden() {
		stream = append(stream, Encode(m)...)
		m.V = Version
		want = append(want, m)
	}
	for name, r := range map[string]io.Reader{
		"whole":    bytes.NewReader(stream),
		"one byte": &chunkReader{b: stream, n: 1},
		"7 bytes":  &chunkReader{b: stream, n: 7},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := readAll(t, NewReader(r))
			if err != io.EOF {
				t.Errorf("after the last message: %v, want io.EOF", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("read %d messages:\n %+v\nwant %d:\n %+v", len(got), got, len(want), want)
			}
		})
	}
}

func TestReaderCRLF(t *testing.T) {
	stream := "{\"v\":1,\"type\":\"ack\",\"id\":1}\r\n{\"v\":1,\"type\":\"ack\",\"id\":2}\r\n"
	got, err := readAll(t, NewReader(strings.NewReader(stream)))
	want := []Msg{{V: 1, Type: TypeAck, ID: 1}, {V: 1, Type: TypeAck, ID: 2}}
	if err != io.EOF || !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, %v; want %+v, io.EOF", got, err, want)
	}
}

func TestReaderEOF(t *testing.T) {
	for _, tc := range []struct {
		name, stream string
		msgs         int
		err          error
	}{
		{"empty stream", "", 0, io.EOF},
		{"between messages", "{\"v\":1,\"type\":\"stop\"}\n", 1, io.EOF},
		{"mid line", "{\"v\":1,\"type\":\"stop\"}\n{\"v\":1,\"type\":", 1, io.ErrUnexpectedEOF},
		{"complete object, no newline", "{\"v\":1,\"type\":\"stop\"}", 0, io.ErrUnexpectedEOF},
		{"after cr", "{\"v\":1,\"type\":\"stop\"}\r", 0, io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readAll(t, NewReader(strings.NewReader(tc.stream)))
			if len(got) != tc.msgs || err != tc.err {
				t.Errorf("got %d messages, %v; want %d, %v", len(got), err, tc.msgs, tc.err)
			}
		})
	}
}

// A malformed line is reported and consumed; the caller decides whether to
// go on (the coordinator does not).
func TestReaderMalformedLine(t *testing.T) {
	r := NewReader(strings.NewReader("{\"v\":2,\"type\":\"stop\"}\n\n{\"v\":1,\"type\":\"stop\"}\n"))
	for i := range 2 {
		if _, err := r.Read(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("line %d: %v, want ErrMalformed", i+1, err)
		}
	}
	if m, err := r.Read(); err != nil || m.Type != TypeStop {
		t.Fatalf("line 3: %+v, %v; want a stop", m, err)
	}
}

func TestReaderMaxLine(t *testing.T) {
	for _, eol := range []string{"\n", "\r\n"} {
		line := padded(t, MaxLine, eol)
		stream := append(append([]byte{}, line...), line...)
		got, err := readAll(t, NewReader(bytes.NewReader(stream)))
		if err != io.EOF || len(got) != 2 {
			t.Errorf("two lines of exactly MaxLine bytes ending in %q: got %d messages, %v; want 2, io.EOF", eol, len(got), err)
		}

		r := NewReader(bytes.NewReader(padded(t, MaxLine+1, eol)))
		if m, err := r.Read(); err != ErrTooLong {
			t.Errorf("a line of MaxLine+1 bytes ending in %q: %+v, %v; want ErrTooLong", eol, m, err)
		}
	}
}

// TestReaderTooLongIsBounded feeds a line that never ends: the Reader must
// give up after about MaxLine bytes instead of buffering them all.
func TestReaderTooLongIsBounded(t *testing.T) {
	for _, name := range []string{"10*MaxLine", "endless"} {
		t.Run(name, func(t *testing.T) {
			src := &spaceReader{left: 10 * MaxLine}
			if name == "endless" {
				src.left = -1
			}
			m, err := NewReader(src).Read()
			if err != ErrTooLong {
				t.Fatalf("Read = %+v, %v; want ErrTooLong", m, err)
			}
			// bufio may read one buffer (4096 bytes) ahead.
			if src.read > MaxLine+4096 {
				t.Errorf("Read consumed %d bytes before giving up; want at most MaxLine+4096 = %d", src.read, MaxLine+4096)
			}
		})
	}
	allocs := testing.AllocsPerRun(10, func() {
		_, _ = NewReader(&spaceReader{left: -1}).Read()
	})
	// Doubling a slice up to MaxLine is ~20 allocations; unbounded growth is not.
	if allocs > 40 {
		t.Errorf("Read of an endless line made %v allocations", allocs)
	}
}

func TestEventString(t *testing.T) {
	for _, tc := range []struct {
		e    Event
		want string
	}{
		{Event{Phase: PhaseStarted, Generation: 4, PID: 123}, "started gen 4 (pid 123)"},
		{Event{Phase: PhaseReady, Generation: 4, Millis: 180}, "ready after 180ms"},
		{Event{Phase: PhaseActive, Generation: 4}, "gen 4 active"},
		{Event{Phase: PhaseDraining, Generation: 3, Stats: &Stats{Inflight: 17, Connections: 2, Requests: 99}}, "draining gen 3: 17 in flight, 2 connections"},
		{Event{Phase: PhaseDraining, Generation: 3}, "draining gen 3: 0 in flight, 0 connections"},
		{Event{Phase: PhaseLeft, Generation: 3}, "gen 3 left the port"},
		{Event{Phase: PhaseDrained, Generation: 3, Millis: 2150}, "gen 3 drained after 2150ms"},
		{Event{Phase: PhaseFailed, Generation: 5, Text: "exit status 1"}, "gen 5 failed: exit status 1"},
		{Event{Phase: PhaseInfo, Text: "net.ipv4.tcp_migrate_req is 0"}, "net.ipv4.tcp_migrate_req is 0"},
		{Event{Phase: "from-the-future", Text: "something new"}, "something new"},
	} {
		if got := tc.e.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.e, got, tc.want)
		}
	}
}

// chunkReader returns at most n bytes per Read.
type chunkReader struct {
	b []byte
	n int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.n)], r.b)
	r.b = r.b[n:]
	return n, nil
}

// spaceReader produces left spaces and then io.EOF, or spaces forever when
// left is negative, and counts what it produced.
type spaceReader struct {
	left, read int
}

func (r *spaceReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := len(p)
	if r.left > 0 {
		n = min(n, r.left)
		r.left -= n
	}
	for i := range p[:n] {
		p[i] = ' '
	}
	r.read += n
	return n, nil
}

func TestHealthFailing(t *testing.T) {
	h := Health{MinRequests: 20, MaxErrorRatio: 0.1}
	for _, tc := range []struct {
		s    Stats
		want bool
	}{
		{Stats{}, false},
		{Stats{R5xx: 5}, false},                       // too few to judge
		{Stats{R2xx: 18, R5xx: 2}, true},              // 10% of 20
		{Stats{R2xx: 19, R5xx: 1}, false},             // 5%
		{Stats{Panics: 20}, true},                     // panics without responses
		{Stats{R2xx: 10, R4xx: 80, R5xx: 9}, false},   // 4xx is the client's
		{Stats{R2xx: 100, R3xx: 100, R5xx: 30}, true}, // 13%
	} {
		if got := h.Failing(tc.s); got != tc.want {
			t.Errorf("%+v: Failing = %v, want %v", tc.s, got, tc.want)
		}
	}
}
