// Package harness runs the real rollover and demoapp binaries: it starts a
// coordinator with the demo app on a free loopback port, rolls it over with
// the real CLI, and puts load on it while it does. The end-to-end tests,
// `make demo` and `make bench` all use it, so what they report is measured
// the same way.
//
// Guarantees:
//
//   - It runs the binaries it is given (Config.Rollover, Config.App) and
//     builds nothing. The end-to-end tests build rollover, demoapp and
//     rollover-stress once per `go test` run (with -race when the test binary
//     has it) and hand them over; `make demo` and `make bench` use bin/.
//   - Everything goes through the real command line: `rollover start` as a
//     child process, `rollover next --json`, `status --json` and `stop` as a
//     user would type them. The figures of a Rollover (ready, drain) are the
//     ones the CLI's event stream reports.
//   - Addresses are fresh: the app and /metrics listen on loopback ports the
//     kernel handed out a moment before (FreePort), unless Config.Port names
//     the app's (for namespaces of the caller's own), and the control socket
//     lives in the caller's Config.Dir, which must be short (Unix socket paths
//     are limited to 108 bytes).
//   - Start returns only once a generation is active, or fails within
//     Config.ReadyTimeout plus 10s (killing what it started when it gives
//     up), and fails at once if the coordinator exits first.
//   - Kill ends only what the Service started: its coordinator, and the
//     generation pids it saw in status and in `next` events, each by pid,
//     never by name. WaitGone waits, bounded, until given pids are gone.
//   - Stress puts load from package load on the service (every failed request
//     counted and classified), rolls it over at a steady
//     interval, and counts the old generations still alive after the load
//     stopped, since keep-alive clients must be moved, not held until the
//     drain timeout.
//   - Its waits are bounded by a deadline or by the caller's context.
package harness
