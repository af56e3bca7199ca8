"""systemd's notify protocol, for the test apps: send msg (READY=1, say) to
$NOTIFY_SOCKET, when the coordinator set one."""
import os
import socket


def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(msg.encode())
