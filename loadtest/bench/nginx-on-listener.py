#!/usr/bin/env python3
"""Start nginx on a listening socket bound here to 127.0.0.1 port 0.

nginx reads its port from its config and cannot be handed port 0, and probing for a free
port and letting nginx bind it later races with anything else on the machine. Instead this
binds the socket itself, writes the chosen port into the config, and hands the socket over
through the NGINX environment variable, the mechanism nginx uses to inherit listeners
across a binary upgrade: nginx finds a listener for the same address already open and
uses it without binding.

Usage: nginx-on-listener.py TEMPLATE CONFIG PORT_FILE -- nginx ARGS...
Every "@PORT@" in TEMPLATE is replaced by the port in CONFIG. The port is written to
PORT_FILE once the config is in place; the process then becomes nginx (same pid).
"""
import os
import socket
import sys


def main() -> None:
    if len(sys.argv) < 6 or sys.argv[4] != "--":
        sys.exit(__doc__)
    template, config, port_file = sys.argv[1:4]
    command = sys.argv[5:]

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    # 511 is nginx's own default backlog on Linux.
    listener.listen(511)
    port = listener.getsockname()[1]

    with open(template) as src:
        text = src.read()
    with open(config, "w") as dst:
        dst.write(text.replace("@PORT@", str(port)))
    # Written through a rename so that a reader never sees a partial number.
    with open(port_file + ".tmp", "w") as out:
        out.write(f"{port}\n")
    os.rename(port_file + ".tmp", port_file)

    # nginx takes an inherited listener as it left it in its own upgrade: non-blocking. A
    # blocking one parks a worker inside accept() whenever another worker took the
    # connection first, and the requests that worker already holds wait with it.
    listener.setblocking(False)
    fd = listener.detach()
    os.set_inheritable(fd, True)
    os.environ["NGINX"] = f"{fd};"
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
