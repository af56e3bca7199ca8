#!/usr/bin/env python3
"""A non-Go UDP generation: a tiny DNS responder that binds with SO_REUSEPORT,
warms up, says READY=1 on $NOTIFY_SOCKET (systemd's notify protocol) and, on
SIGTERM, answers the query it is on, closes its socket and exits. Every query
gets its question back with one TXT answer: "dnsapp VERSION gen N pid PID",
after -delay (one at a time: queries queue up meanwhile).

usage: dnsapp.py -addr HOST:PORT -version VERSION [-warmup SECONDS] [-delay SECONDS]
"""
import os
import signal
import socket
import struct
import sys
import time

from sdnotify import notify


def answer(query, txt):
    """The reply to query: its header with QR and RA set and one answer,
    its question, and a TXT record pointing at the question's name."""
    if len(query) < 12:
        return None
    qid, flags = struct.unpack(">HH", query[:4])
    end = 12
    while end < len(query) and query[end] != 0:  # the question's name
        end += 1 + query[end]
    end += 5  # the root label, QTYPE, QCLASS
    if end > len(query):
        return None
    header = struct.pack(">HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
    rdata = bytes([len(txt)]) + txt
    rr = struct.pack(">HHHIH", 0xC00C, 16, 1, 0, len(rdata)) + rdata
    return header + query[12:end] + rr


def main():
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    host, port = args["-addr"].rsplit(":", 1)
    version = args.get("-version", "v1")
    warmup = float(args.get("-warmup", "0"))
    delay = float(args.get("-delay", "0"))
    txt = ("dnsapp %s gen %s pid %d" % (version, os.environ.get("ROLLOVER_GENERATION", "0"), os.getpid())).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, int(port)))

    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    sock.settimeout(0.05)  # to see the drain signal between queries
    time.sleep(warmup)
    notify("READY=1")
    while not stop:
        try:
            query, client = sock.recvfrom(4096)
        except socket.timeout:
            continue
        time.sleep(delay)
        reply = answer(query, txt)
        if reply:
            sock.sendto(reply, client)
    sock.close()


if __name__ == "__main__":
    main()
