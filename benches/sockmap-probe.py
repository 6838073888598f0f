#!/usr/bin/env python3
# Probe: can this kernel splice a WebSocket tunnel's two TCP sockets in the
# kernel (a sockmap with a stream-verdict program that redirects each
# socket's incoming bytes out of the other), so the proxy's process would not
# wake per frame? Loads a 10-instruction program with raw bpf() calls (root,
# or CAP_BPF + CAP_NET_ADMIN), splices client<->[A proxy B]<->server on
# loopback, and prints: whether bytes pass both ways, whether the proxy's
# socket still reads end-of-file when the client closes, and whether a
# client that reads nothing pushes back on the server (32 MB written).
#
#   python3 benches/sockmap-probe.py
#
# On the run-9 machine (Linux 6.18, 2026-12-06): bytes pass both ways and the
# proxy's socket reads end-of-file after the client's close, but the server
# wrote all 32 MB without one stall while the client read nothing: the kernel
# queued it all (no backpressure through the splice), so a tunnel spliced
# this way needs its own bound (a slow client would otherwise make the
# proxy's kernel hold whatever the backend sends). Not used by the proxy.
import ctypes, socket, struct, os, time, threading
libc = ctypes.CDLL(None, use_errno=True)
SYS_bpf = 321
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_bpf, cmd, buf, 128)
    if r < 0: raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r
mapfd = bpf(BPF_MAP_CREATE, struct.pack("IIII", BPF_MAP_TYPE_SOCKMAP, 4, 4, 2))
print("sockmap fd", mapfd)
# program: key = (skb->local_port == PORT_A) ? 1 : 0 ; return bpf_sk_redirect_map(skb, map, key, 0)
def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
def prog(port_a):
    p = b""
    p += insn(0xbf, 6, 1)                 # r6 = r1
    p += insn(0x61, 2, 6, 136)            # r2 = *(u32*)(r6 + local_port)   (host order)
    p += insn(0xb7, 3, 0, 0, 0)           # r3 = 0
    p += insn(0x55, 2, 0, 1, port_a)      # if r2 != port_a goto +1
    p += insn(0xb7, 3, 0, 0, 1)           # r3 = 1
    p += insn(0x18, 2, 1, 0, mapfd) + insn(0, 0, 0, 0, 0)  # r2 = map (ld_imm64 pseudo map fd)
    p += insn(0xbf, 1, 6)                 # r1 = r6
    p += insn(0xb7, 4, 0, 0, 0)           # r4 = 0 (egress)
    p += insn(0x85, 0, 0, 0, 52)          # call bpf_sk_redirect_map
    p += insn(0x95)                       # exit
    return p
# sockets: client <-> [A  proxy  B] <-> server
ls1 = socket.socket(); ls1.bind(("127.0.0.1", 0)); ls1.listen()
ls2 = socket.socket(); ls2.bind(("127.0.0.1", 0)); ls2.listen()
client = socket.create_connection(ls1.getsockname()); A, _ = ls1.accept()
B = socket.create_connection(ls2.getsockname()); server, _ = ls2.accept()
code = prog(A.getsockname()[1])
lic = ctypes.create_string_buffer(b"GPL")
logbuf = ctypes.create_string_buffer(65536)
insns = ctypes.create_string_buffer(code, len(code))
attr = struct.pack("IIQQIIQI", BPF_PROG_TYPE_SK_SKB, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(lic), 1, 65536, ctypes.addressof(logbuf), 0)
try:
    progfd = bpf(BPF_PROG_LOAD, attr)
except OSError as e:
    print("load failed", e, logbuf.value.decode()[:2000]); raise
print("prog fd", progfd)
bpf(BPF_PROG_ATTACH, struct.pack("IIII", mapfd, progfd, BPF_SK_SKB_STREAM_VERDICT, 0))
# map[0] = A (data arriving on B goes out of A), map[1] = B (data arriving on A goes out of B)
for k, s in ((0, A), (1, B)):
    key = ctypes.c_uint32(k); val = ctypes.c_uint32(s.fileno())
    bpf(BPF_MAP_UPDATE_ELEM, struct.pack("IIQQQ", mapfd, 0, ctypes.addressof(key), ctypes.addressof(val), 0))
print("spliced")
client.sendall(b"hello from client"); print("server got", server.recv(100))
server.sendall(b"hello from server"); print("client got", client.recv(100))
# Backpressure: the server writes 32 MB while the client reads nothing.
data = os.urandom(32 << 20)
server.setblocking(False)
sent = stalls = 0
t0 = time.time()
while sent < len(data) and time.time() - t0 < 5:
    try:
        sent += server.send(data[sent:sent + 65536])
    except BlockingIOError:
        stalls += 1
        time.sleep(0.001)
print(f"server wrote {sent} of {len(data)} bytes while the client read nothing ({stalls} stalls)")
server.setblocking(True)
rest = threading.Thread(target=lambda: server.sendall(data[sent:]))
rest.start()
client.settimeout(2)
got = bytearray()
while len(got) < len(data):
    try:
        chunk = client.recv(1 << 20)
    except socket.timeout:
        break
    if not chunk:
        break
    got += chunk
rest.join(timeout=5)
print(f"client then read {len(got)} bytes, intact: {bytes(got) == data}")
client.close()
time.sleep(0.1)
A.setblocking(False)
try:
    print("proxy's socket after the client's close reads:", A.recv(10))
except BlockingIOError:
    print("proxy's socket after the client's close: no end-of-file (would block)")
