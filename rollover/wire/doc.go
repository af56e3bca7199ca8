// Package wire is the control protocol between the rollover coordinator, its
// generations and the rollover CLI. It is the only description of the
// protocol: every message that crosses the control socket is a Msg, and
// every message type, field and phase is declared in one file, wire.go.
//
// Framing: one JSON object per line ('\n'-terminated), at most MaxLine bytes
// (1 MiB, newline included). Every message carries the protocol version V and
// a Type. Unknown fields are ignored, so fields can be added without a version
// bump; a message with an unknown version or type is an error.
//
// A generation connects and sends TypeHello (generation, pid, secret), then
// TypeReady once it serves, then TypeStats every StatsInterval. The
// coordinator sends commands (TypeSteer, TypePin, TypeRelease, TypeResume,
// TypeDrain, TypeMetrics) with an ID; the generation answers each with
// TypeAck carrying the same ID (and Error when it failed). While draining,
// the generation sends TypeClosed once its listeners are closed and TypeDone
// right before it exits.
//
// The CLI connects, sends one request (TypeNext, TypeStatus, TypeStop,
// TypeRollback, TypePromote, TypeAbort) and reads TypeEvent messages until
// one TypeResult.
//
// Guarantees:
//
//   - Encode never fails and always returns exactly one line, with V set to
//     Version. Every message that Decode accepts, Encode sends back as a line
//     that decodes to the same message, and encoding that again gives the
//     same bytes.
//   - Decode accepts only what Encode can send on: a line that is not one
//     JSON object, or has another version, an unknown type or a time that
//     cannot be encoded again, is an error wrapping ErrMalformed.
//   - Reader buffers at most about MaxLine bytes, however long the line the
//     peer sends: a longer line is ErrTooLong, and the stream must then be
//     closed. A malformed line is reported and consumed, so the caller decides
//     whether to go on. A stream that ends inside a line is
//     io.ErrUnexpectedEOF.
//   - The bytes on the wire are fixed by golden files (testdata/golden, one
//     per message type, every type covered), so a change to the protocol shows
//     up as a diff. Decode and Reader are fuzzed (FuzzDecode, FuzzReader,
//     run by make fuzz) against Encode and against a model of the framing,
//     lines near MaxLine included.
package wire
