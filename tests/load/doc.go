// Package load is the HTTP load generator used by the end-to-end tests,
// `make demo` and `make bench` to show that no client request fails while
// rollover replaces generations.
//
// Guarantees:
//
//   - A request counts as OK only if it got a complete 2xx answer and its body
//     was read to EOF without error. Everything else that finished while the
//     run was live is a failure, classified as connect (dial failed), reset
//     (ECONNRESET, EPIPE), eof (the server closed the connection early,
//     including a body shorter than its Content-Length), timeout (no complete
//     answer within Options.Timeout), status (a complete non-2xx answer; 3xx
//     are not followed) or other.
//   - A request cut short because the run itself ended (ctx canceled,
//     Runner.Stop, Duration reached) is neither a request nor a failure. A
//     request that hit its own Timeout before that still counts as a timeout.
//   - Failures are not hidden by retries. The default method is POST with a
//     nil body and no GetBody, which net/http's Transport never replays after
//     a connection broke; a GET would be silently retried on a reused
//     connection. The one retry the Transport still makes is when it wrote
//     nothing at all to a reused connection that was already dead: the server
//     never saw those bytes, and every HTTP client does the same.
//   - With KeepAlive each worker owns one Transport and so holds one
//     connection for as long as the server keeps it open; without it every
//     request dials a new connection. Proxies from the environment are
//     ignored: only Options.URL is contacted, over HTTP/1.1.
//   - Every run is bounded by Duration (and MaxRequests if set), and closes
//     its idle connections when it ends.
package load
