"""Linux SocketCAN from Python without python-can: the kernel's frame layouts and socket
options, the socket set up for reading, libc's recvmmsg, and the slab that drains and
decodes frames in batches. `agent/sources/socketcan.py` is the source built on it."""
