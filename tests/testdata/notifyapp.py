#!/usr/bin/env python3
"""A non-Go generation: an HTTP server that binds with SO_REUSEPORT, says
READY=1 on $NOTIFY_SOCKET (systemd's notify protocol) and drains on SIGTERM.
Every GET or POST gets 200, the body "notifyapp VERSION pid PID", the header
X-Notifyapp-Version and, under a coordinator, X-Rollover-Generation.

usage: notifyapp.py HOST PORT VERSION
"""
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(msg.encode())


class Server(ThreadingHTTPServer):
    daemon_threads = False  # finish requests in flight on shutdown
    request_queue_size = 128  # listen() backlog; the default 5 overflows under load

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def main():
    host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
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

    def drain(signum, frame):
        draining.set()
        notify("STOPPING=1")
        threading.Thread(target=srv.shutdown).start()

    signal.signal(signal.SIGTERM, drain)
    notify("READY=1\nSTATUS=serving %s on %s:%d" % (version, host, port))
    # Notice the shutdown request soon (the default polls every 0.5s): the
    # listener closes, and the coordinator sees the port left, sooner.
    srv.serve_forever(poll_interval=0.05)
    srv.server_close()


if __name__ == "__main__":
    main()
