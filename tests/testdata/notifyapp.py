#!/usr/bin/env python3
"""A non-Go generation: an HTTP server that binds with SO_REUSEPORT, says
READY=1 on $NOTIFY_SOCKET (systemd's notify protocol) and drains on SIGTERM.
Every GET or POST gets 200, the body "notifyapp VERSION pid PID", the header
X-Notifyapp-Version and, under a coordinator, X-Rollover-Generation.

usage: notifyapp.py HOST PORT VERSION [WARMUP seconds before READY=1 [nondumpable]]
"""
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sdnotify import notify


class Server(ThreadingHTTPServer):
    daemon_threads = False  # finish requests in flight on shutdown
    request_queue_size = 128  # listen() backlog; the default 5 overflows under load

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def main():
    host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    warmup = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    if len(sys.argv) > 5 and sys.argv[5] == "nondumpable":
        # As a hardened service might: no core dumps, no ptrace, and no
        # pidfd_getfd of its sockets by an unprivileged coordinator.
        import ctypes
        PR_SET_DUMPABLE = 4
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            sys.exit("prctl(PR_SET_DUMPABLE, 0) failed")
    body = ("notifyapp %s pid %d\n" % (version, os.getpid())).encode()
    generation = os.environ.get("ROLLOVER_GENERATION", "")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Notifyapp-Version", version)
            if generation:
                self.send_header("X-Rollover-Generation", generation)
            if draining.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    draining = threading.Event()
    srv = Server((host, port), Handler)

    # The handler only sets a flag. A signal handler runs in the main thread
    # between two bytecodes, possibly while it holds one of threading's
    # internal locks (it reaps finished request threads on every accept), so
    # starting a thread there (srv.shutdown) or taking a lock can deadlock
    # the server: it stops accepting but keeps its listener until killed.
    term = []

    def on_sigterm(signum, frame):
        term.append(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    # WARMUP: seconds of warm-up after listen() and before READY=1, as a
    # real app loads its caches: it listens, but accepts nothing yet.
    time.sleep(warmup)
    # A connection already in the accept queue now reached this generation
    # before it was ready: say so (the tests count these lines), and serve it.
    parked = 0
    srv.socket.setblocking(False)
    try:
        while True:
            conn, peer = srv.socket.accept()
            conn.setblocking(True)
            parked += 1
            srv.process_request(conn, peer)
    except BlockingIOError:
        pass
    srv.socket.setblocking(True)
    if parked:
        print("notifyapp: %d connections were queued before READY=1" % parked, file=sys.stderr, flush=True)
    notify("READY=1\nSTATUS=serving %s on %s:%d" % (version, host, port))
    # Accept until SIGTERM, noticing it within 50ms.
    srv.timeout = 0.05
    while not term:
        srv.handle_request()
    # Drain: answers say Connection: close from now on; close the listener
    # (the kernel migrates its queue with net.ipv4.tcp_migrate_req=1), then
    # wait for the requests in flight (server_close joins their threads).
    draining.set()
    notify("STOPPING=1")
    srv.server_close()


if __name__ == "__main__":
    main()
