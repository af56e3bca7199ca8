package wire

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"testing/iotest"
	"time"
)

// malformed are seeds that Decode must reject.
var malformed = []string{
	"",
	"\r\n",
	"hello",
	`[{"v":1,"type":"hello"}]`,
	`null`,
	`{"v":0,"type":"hello"}`,
	`{"v":2,"type":"hello"}`,
	`{"v":1,"type":"reboot"}`,
	`{"v":1,"type":"hello"}x`,
	`{"v":1,"type":"hello"}{"v":1,"type":"hello"}`,
	`{"v":1,"type":"hello","pid":"1"}`,
	`{"v":1,"type":"result","status":{"generations":[{"started_at":"10000-01-01T00:00:00Z"}]}}`,
	`{"v":1,"type":"result","status":{"generations":[{"started_at":"2026-01-01T00:00:00+24:00"}]}}`,
}

// tricky are seeds that Decode accepts but that do not encode back to the
// same bytes.
var tricky = []string{
	`{"V":1,"TYPE":"ready","Addrs":[],"argv":null}`,
	`{"v":1,"type":"next","argv":[],"wait":false}`,
	`{"v":1,"type":"event","event":{},"stats":null}`,
	`{"v":1,"type":"hello","secret":"\u003c\ud800\u00e9\n","secret":"last wins"}`,
	"{\"v\":1,\"type\":\"event\",\"event\":{\"text\":\"\xff\xfe invalid utf-8\"}}",
	`{"v":1,"type":"result","status":{"tcp_migrate_req":null,"generations":[]}}`,
	`{"v":1,"type":"result","status":{"generations":[{"argv":[],"started_at":"2026-05-09T14:30:00.123456789+02:00"}]}}`,
	`{"v":1,"type":"result","status":{"generations":[{"argv":null,"started_at":"0000-01-01T00:00:00-23:59"}]}}`,
	`{"v":1,"type":"result","status":{"generations":[{"started_at":"2026-05-09T12:30:00+00:00"}]}}`,
	`{"v":1,"type":"result","status":{"generations":[{"started_at":"9999-12-31T23:59:59.999999999Z"}]}}`,
	`{"v":1,"type":"ack","id":18446744073709551615,"code":-9223372036854775808}`,
}

func FuzzDecode(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "golden", "*.jsonl"))
	if err != nil || len(files) == 0 {
		f.Fatalf("no golden files: %v", err)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range append(malformed, tricky...) {
		f.Add([]byte(s))
	}

	f.Fuzz(func(t *testing.T, line []byte) {
		m1, err := Decode(line)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Decode(%q): %v does not wrap ErrMalformed", line, err)
			}
			return
		}
		if m1.V != Version || !knownTypes[m1.Type] {
			t.Fatalf("Decode(%q) accepted %+v", line, m1)
		}

		b1 := Encode(m1)
		if i := bytes.IndexByte(b1, '\n'); i != len(b1)-1 {
			t.Fatalf("Encode(%+v) = %q: newline at %d, want exactly one, at the end", m1, b1, i)
		}
		m2, err := Decode(b1)
		if err != nil {
			t.Fatalf("Decode(%q) = %+v, but Decode(Encode(that)) = Decode(%q): %v", line, m1, b1, err)
		}
		if !equalMsg(t, m1, m2) {
			t.Fatalf("round trip of %q changed the message:\n%#v\nencoded %s\n%#v", line, m1, b1, m2)
		}
		// Encode's output is canonical: encoding it again is stable.
		if b2 := Encode(m2); !bytes.Equal(b1, b2) {
			t.Fatalf("Encode is not stable on %q:\n%s\n%s", line, b1, b2)
		}
	})
}

// equalMsg reports whether a and b are the same message. It differs from
// reflect.DeepEqual only where JSON cannot tell the difference:
//   - nil and empty slices in omitempty fields (both are omitted);
//   - the *time.Location of StartedAt, which depends on whether the offset
//     was spelt "Z" or "+00:00" and on the machine's local zone. The instant
//     and the offset must be the same.
func equalMsg(t *testing.T, a, b Msg) bool {
	t.Helper()
	a, b = normalize(t, a), normalize(t, b)
	if (a.Status == nil) != (b.Status == nil) {
		return false
	}
	if a.Status != nil {
		ga, gb := a.Status.Generations, b.Status.Generations
		if len(ga) != len(gb) {
			return false
		}
		for i := range ga {
			ta, tb := ga[i].StartedAt, gb[i].StartedAt
			_, oa := ta.Zone()
			_, ob := tb.Zone()
			if !ta.Equal(tb) || oa != ob {
				t.Logf("generation %d started_at: %v != %v", i, ta, tb)
				return false
			}
			ga[i].StartedAt, gb[i].StartedAt = time.Time{}, time.Time{}
		}
	}
	return reflect.DeepEqual(a, b)
}

// normalize returns a deep enough copy of m to clear the differences that
// equalMsg ignores.
func normalize(t *testing.T, m Msg) Msg {
	t.Helper()
	if len(m.Addrs) == 0 {
		m.Addrs = nil
	}
	if len(m.Argv) == 0 {
		m.Argv = nil
	}
	if m.Status != nil {
		st := *m.Status
		if st.Generations != nil {
			st.Generations = append([]GenStatus{}, st.Generations...)
		}
		m.Status = &st
	}
	return m
}

// FuzzReader reads a stream made of data with pad spaces inserted at at (so
// that lines near MaxLine are reachable), through a reader chosen by mode,
// and checks each result against a model: split the stream at '\n', and a
// line decodes as Decode does unless it is longer than MaxLine (ErrTooLong,
// end) or unterminated (io.ErrUnexpectedEOF, end).
func FuzzReader(f *testing.F) {
	var stream []byte
	for _, m := range golden() {
		stream = append(stream, Encode(m)...)
	}
	stop := Encode(Msg{Type: TypeStop})
	f.Add(stream, uint32(0), uint32(0), uint8(0))
	f.Add(stream, uint32(0), uint32(0), uint8(1))
	f.Add([]byte("{\"v\":1,\"type\":\"ack\",\"id\":1}\r\n\n{\"v\":2}\n{\"v\":1,\"type\":"), uint32(0), uint32(0), uint8(2))
	for _, n := range []int{MaxLine - 1, MaxLine, MaxLine + 1} {
		pad := uint32(n - len(stop))
		f.Add(stop, pad, uint32(1), uint8(0))
		f.Add(append(append([]byte{}, stop...), stop...), pad, uint32(1), uint8(3))
	}
	f.Add(bytes.TrimSuffix(stop, []byte("\n")), uint32(MaxLine), uint32(0), uint8(0))
	f.Add([]byte("\n\n\n"), uint32(2*MaxLine), uint32(2), uint8(1))

	f.Fuzz(func(t *testing.T, data []byte, pad, at uint32, mode uint8) {
		if len(data) > 4*MaxLine {
			return
		}
		n := int(pad % (2*MaxLine + 64))
		i := int(at % uint32(len(data)+1))
		stream := make([]byte, 0, len(data)+n)
		stream = append(stream, data[:i]...)
		stream = append(stream, bytes.Repeat([]byte{' '}, n)...)
		stream = append(stream, data[i:]...)

		var src io.Reader = bytes.NewReader(stream)
		switch mode % 4 {
		case 1:
			src = iotest.HalfReader(src)
		case 2:
			src = iotest.DataErrReader(src)
		case 3:
			src = &chunkReader{b: stream, n: 1 + int(mode)}
		}
		r := NewReader(src)

		rest := stream
		for range len(stream) + 2 {
			m, err := r.Read()
			if len(rest) == 0 {
				if err != io.EOF {
					t.Fatalf("at the end of the stream: %+v, %v; want io.EOF", m, err)
				}
				return
			}
			line, terminated := rest, false
			if j := bytes.IndexByte(rest, '\n'); j >= 0 {
				line, terminated = rest[:j+1], true
			}
			rest = rest[len(line):]
			switch {
			case len(line) > MaxLine:
				if err != ErrTooLong {
					t.Fatalf("line of %d bytes: %+v, %v; want ErrTooLong", len(line), m, err)
				}
				return
			case !terminated:
				if err != io.ErrUnexpectedEOF {
					t.Fatalf("unterminated line %q: %+v, %v; want io.ErrUnexpectedEOF", line, m, err)
				}
				return
			}
			want, wantErr := Decode(line)
			if wantErr != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("line %q: %+v, %v; want ErrMalformed (%v)", line, m, err, wantErr)
				}
				continue
			}
			if err != nil || !reflect.DeepEqual(m, want) {
				t.Fatalf("line %q: %+v, %v; want %+v", line, m, err, want)
			}
		}
		t.Fatal("Reader.Read did not reach the end of the stream")
	})
}
