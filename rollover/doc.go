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
//   - In-flight requests and open connections (hijacked ones included until
//     they close) are counted with atomics and reported to the coordinator.
//
// The functions of this package share one agent per process, made from the
// coordinator's environment variables on first use: the coordinator sees a
// generation as a process.
//
// Without a coordinator (ROLLOVER_SOCKET unset) the same binary runs
// standalone, and SIGTERM or SIGINT trigger the same graceful drain; that is
// the one place the library handles signals. Apps that serve raw TCP or gRPC
// take a listener from Listen, call Ready once they accept, and stop when
// Draining is closed.
package rollover
