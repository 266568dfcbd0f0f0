"""A real uvicorn server on a loopback socket, shared by the serving tests."""
import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def running(app):
    """uvicorn in a thread on a socket bound here (no free-port race); stopped on exit."""
    import uvicorn

    # proto IPPROTO_TCP, not socket()'s 0: asyncio sets TCP_NODELAY only on sockets that say
    # they are TCP; without it Nagle + delayed ACKs add ~40 ms to every small response
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
