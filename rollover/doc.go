// Package rollover is the library a Go app links so that the rollover
// coordinator can replace it with a new generation without dropping a
// request.
//
//	err := rollover.ListenAndServe(":8080", handler)   // the one-liner
//	ln, err := rollover.Listen(ctx, "tcp", ":8080")     // SO_REUSEPORT, MPTCP off
//	err = rollover.Serve(ctx, srv, ln)                  // ready when serving; drains when told
//
// What it guarantees:
//   - Every generation binds the same port on its own (SO_REUSEPORT); no file
//     descriptor is passed between processes.
//   - A generation gets no connection before it is ready: on ready it pins
//     the port's reuseport group to the active generation (classic BPF
//     "ret 0"), so a new generation listens dark until the coordinator steers
//     new connections to it, and it proves the steer with a probe connection.
//   - A drain never resets a connection: the old generation keeps accepting
//     for the grace, empties its accept queue, closes its listener, answers
//     every further request with "Connection: close", waits (bounded) until
//     its connections are gone, and only then calls http.Server.Shutdown,
//     which would otherwise close idle keep-alive connections under clients'
//     feet.
//   - A listener from Listen is always safe to close. While the generation
//     has a successor (a drain or a release was ordered), the app's Close,
//     http.Server.Shutdown or gRPC's GracefulStop never closes the socket
//     under the connections queued on it: Close waits for the hand-over
//     (grace, queue drain, close). Once the hand-over has closed the socket,
//     Accept does not fail until the app closes the listener or the
//     generation holds no connection, so an accept loop (gRPC's Serve in a
//     canonical main) does not end while its connections are still served.
//   - HTTP/1.1 connections keep the Connection: close path; HTTP/2
//     connections (TLS h2, h2c through http.Server.Protocols, h2c through an
//     x/net h2c handler) get GOAWAY at once, in two steps (last stream ID
//     2^31-1, then the real one), so that no new stream races it, while
//     their streams in flight finish. Idle connections are never closed
//     first.
//   - Serve serves TLS when srv.TLSConfig holds a certificate (ALPN h2 and
//     http/1.1), or through ServeTLS. Connections are counted below TLS, so
//     net/http still sees *tls.Conn; an app's own tls.NewListener around a
//     listener from Listen is steered, handed over and counted once.
//   - In-flight requests, open connections (hijacked ones included until
//     they close; a hijacked request stops being in flight at the hijack),
//     final responses by status class and handler panics (recovered, counted
//     and re-panicked; http.ErrAbortHandler is not one) are counted with
//     atomics and reported to the coordinator.
//   - What is still open at the drain deadline (the drain timeout less
//     min(2s, a tenth of it)) is closed, reported as forced
//     (wire.Stats.ForcedConnections, ForcedRequests) and said on stderr.
//
// When each signal fires, for a generation that the coordinator replaces:
//
//	steer          this generation takes new connections (a canary: a share of them)
//	release        the bake: Connection: close and GOAWAY begin; the listeners
//	               stay open, Draining does not fire; resume undoes it
//	drain ordered  Connection: close and GOAWAY (if not released yet); the
//	               grace starts; Serve's context, SIGTERM/SIGINT standalone,
//	               and a lost coordinator not replaced in time order it too
//	Draining()     closed once the grace has passed, every accept queue is
//	               empty and every socket closed: no new connection comes;
//	               stop taking new work and finish (GracefulStop, WebSocket
//	               close 1001, return from a raw accept loop)
//	drain deadline what is left is cut and counted as forced
//	Serve returns  once the connections are gone (then srv.Shutdown); nil
//
// Serve takes srv over: it replaces srv.Handler with a counting handler
// around the app's (http.DefaultServeMux when nil) and sets
// srv.TLSNextProto when nil, to serve HTTP/2 itself.
//
// If the library cannot start (a ROLLOVER_* variable it cannot read, a
// coordinator that is unreachable or refuses the generation), Listen,
// Serve, ServeTLS and Ready return the error, and Draining, which then never
// closes, says so on stderr.
//
// The functions of this package share one agent per process, made from the
// coordinator's environment variables on first use: the coordinator sees a
// generation as a process.
//
// UDP services (DNS, syslog, statsd, RADIUS) take a socket from
// ListenPacket instead ("udp", "udp4", "udp6"). It joins the port's
// reuseport group at bind(), behind the active generation's "ret 0", so it
// gets no datagram until it is steered to; a steer is proven with a probe
// datagram that the app never sees. On a drain the old generation reads on
// for the grace and until its receive queue is empty (SO_MEMINFO, twice),
// then Draining is closed and ReadFrom returns net.ErrClosed, while WriteTo
// keeps working until every datagram read has been answered (or the drain
// deadline); only then is the socket closed. Datagrams read, sent, in
// flight and lost are reported per generation; an app reports an answer's
// outcome with Answer, so that a DNS SERVFAIL counts in the bake's health as
// an HTTP 5xx does. The pattern for github.com/miekg/dns:
//
//	pc, _ := rollover.ListenPacket(ctx, "udp", addr)
//	srv := &dns.Server{PacketConn: pc, Handler: h}
//	go func() { <-rollover.Draining(); srv.ShutdownContext(ctx) }()
//	rollover.Ready()
//	srv.ActivateAndServe()
//
// The limit: datagrams are steered one by one, each to the generation the
// group points at when it arrives, so every flow moves to the new
// generation at once. Request/response protocols lose nothing; protocols
// with per-flow state over UDP (connected UDP, QUIC) break across a
// rollover, since rollover keeps no flow table (udpgrm does).
//
// Without a coordinator (ROLLOVER_SOCKET unset) the same binary runs
// standalone, and SIGTERM or SIGINT trigger the same graceful drain; that is
// the one place the library handles signals. Apps that serve raw TCP or gRPC
// take a listener from Listen, call Ready once they accept, and stop when
// Draining is closed.
package rollover
