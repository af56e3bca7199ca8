#!/usr/bin/env python3
"""A non-Go generation: an HTTP server that binds with SO_REUSEPORT, says
READY=1 on $NOTIFY_SOCKET (systemd's notify protocol) and drains on SIGTERM.
Every GET or POST gets 200, the body "notifyapp VERSION pid PID", the header
X-Notifyapp-Version and, under a coordinator, X-Rollover-Generation.

With WORKERS above 1 it is a pre-forking server, as gunicorn's or
Node's cluster: the first process forks WORKERS workers, each binds the port
on its own (one socket each in the SO_REUSEPORT group) and warms up, and
READY=1 comes once all of them are ready. On SIGTERM each worker closes its
listener when it gets to it: worker i a little later than worker i-1, as
workers busy with a request do.

usage: notifyapp.py HOST PORT VERSION [WARMUP seconds before READY=1 [nondumpable|dumpable [WORKERS]]]
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
    workers = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    if len(sys.argv) > 5 and sys.argv[5] == "nondumpable":
        # As a hardened service might: no core dumps, no ptrace, and no
        # pidfd_getfd of its sockets by an unprivileged coordinator.
        import ctypes
        PR_SET_DUMPABLE = 4
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            sys.exit("prctl(PR_SET_DUMPABLE, 0) failed")
    if workers <= 1:
        serve(host, port, version, warmup, ready=lambda: notify("READY=1\nSTATUS=serving %s on %s:%d" % (version, host, port)))
        return
    r, w = os.pipe()
    children = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            serve(host, port, version, warmup, ready=lambda: os.write(w, b"."), stagger=0.025 * i, worker=True)
            os._exit(0)
        children.append(pid)
    os.close(w)
    # The first process passes SIGTERM on to every worker, and waits for them.
    def forward(signum, frame):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    got = b""
    while len(got) < workers:
        b = os.read(r, workers)
        if not b:
            sys.exit("a worker exited before it was ready")
        got += b
    notify("READY=1\nSTATUS=serving %s on %s:%d" % (version, host, port))
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    notify("STOPPING=1")


def serve(host, port, version, warmup, ready, stagger=0.0, worker=False):
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
    ready()
    # Accept until SIGTERM, noticing it within 50ms.
    srv.timeout = 0.05
    while not term:
        srv.handle_request()
    # Drain: answers say Connection: close from now on; close the listener
    # (the kernel migrates its queue with net.ipv4.tcp_migrate_req=1), then
    # wait for the requests in flight (server_close joins their threads).
    draining.set()
    time.sleep(stagger)
    if not worker:
        notify("STOPPING=1")
    srv.server_close()


if __name__ == "__main__":
    main()
