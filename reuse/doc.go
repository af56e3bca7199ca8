// Package reuse opens SO_REUSEPORT listeners and steers their reuseport
// group, so that two generations of an app can share a port and hand it over
// without dropping a connection.
//
// Guarantees:
//
//   - Socket options are set or Listen fails: a failed SO_REUSEADDR or
//     SO_REUSEPORT is returned as an error, never logged and ignored.
//   - Listen and Config turn Multipath TCP off. Go 1.24 and later listen
//     with MPTCP by default, and the kernel rejects a reuseport BPF program
//     on an MPTCP listener with EOPNOTSUPP.
//   - Steer(ln, i) attaches the one-instruction classic-BPF program "ret i"
//     to the whole reuseport group of ln, replacing any program it had. New
//     connections go to the member at index i. Members are indexed in join
//     order; when a member leaves, the kernel moves the last member into its
//     slot. An index that is out of range falls back to the kernel's hash, so
//     a stale program degrades to ordinary SO_REUSEPORT balancing rather than
//     dropping connections. Rollover keeps the invariant that the group
//     carries "ret 0" and the active generation sits at index 0.
//   - Steer only after listen(): attaching to a socket that is bound but not
//     yet listening creates a group of its own, and listen() then fails with
//     EADDRINUSE. Listen returns listening sockets, so its results are safe.
//   - 0.0.0.0:p and [::]:p are separate reuseport groups. A generation that
//     listens on both must steer each group on its own.
//   - DrainQueue waits until the accept queue reads empty twice in a row,
//     bounded by its context, so a listener can be closed without resetting
//     queued connections.
//
// Everything except Wrap and Config needs Linux; elsewhere the functions
// return an error wrapping ErrUnsupported.
package reuse
