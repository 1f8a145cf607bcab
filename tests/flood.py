"""A spoofed TCP flood toward a VIP, from inside a lab namespace (for tests).

    python -m tests.flood --netns lbt-client --ifname eth0 --src-mac M --dst-mac M \\
        --vip 10.0.0.100 --port 9000 --count 600000 [--pps 200000] [--seconds 20] [--cpu 0]

Every frame is IPv4/TCP to VIP:port from a random source address in
SPOOF_NET and a random source port, with random sequence and
acknowledgement numbers. The TCP flags go round FLAGS: SYN, ACK, SYN, RST,
SYN, FIN+ACK, so half the packets open a flow and half belong to none.
Frames leave through an AF_PACKET socket in batches (sendmmsg), paced to
--pps; the run stops after --count frames or --seconds, whichever comes
first (or at SIGTERM), and prints one JSON line: {"sent", "seconds"}.

The spoofed sources are in 10.0.128.0/17: inside the lab's 10.0.0.0/16,
which exists only in the lab's namespaces, and outside every subnet they
route, so what answers them (a target's SYN-ACK or RST) ends in the lb
namespace, which has no route to them. Nothing leaves the lab.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import struct
import sys
import time

from pyroute2 import netns

SPOOF_NET = (10, 0, 128)  # 10.0.128.0/17: the third byte is 128..255
SYN, RST, ACK, FIN = 0x02, 0x04, 0x10, 0x01
FLAGS = (SYN, ACK, SYN, RST, SYN, FIN | ACK)
BATCH = 1024
FRAME_LEN = 14 + 20 + 20


_stop = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _stop
    _stop = True


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(IoVec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def words(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class Frames:
    """Builds BATCH frames at a time into one buffer that sendmmsg reads."""

    def __init__(self, src_mac: bytes, dst_mac: bytes, vip: str, port: int) -> None:
        self.buffer = (ctypes.c_char * (FRAME_LEN * BATCH))()
        self.eth = dst_mac + src_mac + b"\x08\x00"
        self.vip = socket.inet_aton(vip)
        self.port = port
        # The checksums' constant parts: everything but the source, the id,
        # the ports' random half, seq, ack and the flags.
        self.ip_const = words(struct.pack("!BBHHHBBH", 0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0)
                              + self.vip)
        pseudo = self.vip + struct.pack("!BBH", 0, socket.IPPROTO_TCP, 20)
        self.tcp_const = words(pseudo + struct.pack("!HHH", port, 0, 1024))  # dport, urgent, window
        self.flag_index = 0

    def fill(self, n: int) -> None:
        rnd = os.urandom(14 * n)
        view = memoryview(self.buffer).cast("B")
        for i in range(n):
            r = rnd[14 * i:14 * (i + 1)]
            src = bytes((SPOOF_NET[0], SPOOF_NET[1], SPOOF_NET[2] | (r[0] & 0x7F), r[1]))
            sport = (r[2] << 8 | r[3]) | 1024
            ident = r[4] << 8 | r[5]
            seq, ack = r[6:10], r[10:14]
            flags = FLAGS[self.flag_index % len(FLAGS)]
            self.flag_index += 1
            src_words = (src[0] << 8 | src[1]) + (src[2] << 8 | src[3])
            ip_sum = 0xFFFF - fold(self.ip_const + src_words + ident)
            tcp_sum = 0xFFFF - fold(self.tcp_const + src_words + sport + words(seq + ack) + (0x50 << 8 | flags))
            frame = (self.eth
                     + struct.pack("!BBHHHBBH", 0x45, 0, 40, ident, 0x4000, 64, socket.IPPROTO_TCP, ip_sum)
                     + src + self.vip
                     + struct.pack("!HH", sport, self.port) + seq + ack
                     + struct.pack("!BBHHH", 0x50, flags, 1024, tcp_sum, 0))
            view[FRAME_LEN * i:FRAME_LEN * (i + 1)] = frame


def flood(ifname: str, src_mac: bytes, dst_mac: bytes, vip: str, port: int, count: int, pps: float,
          seconds: float) -> tuple[int, float]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    frames = Frames(src_mac, dst_mac, vip, port)
    base = ctypes.addressof(frames.buffer)
    iovs = (IoVec * BATCH)(*(IoVec(base + FRAME_LEN * i, FRAME_LEN) for i in range(BATCH)))
    msgs = (MMsgHdr * BATCH)()
    for i in range(BATCH):
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        start = time.monotonic()
        while sent < count and time.monotonic() - start < seconds and not _stop:
            n = min(BATCH, count - sent)
            frames.fill(n)
            done = 0
            while done < n and time.monotonic() - start < seconds:
                rc = libc.sendmmsg(sock.fileno(), ctypes.byref(msgs, done * ctypes.sizeof(MMsgHdr)), n - done, 0)
                if rc < 0:
                    err = ctypes.get_errno()
                    if err in (11, 105):  # EAGAIN, ENOBUFS: the queue is full, try again
                        time.sleep(0.001)
                        continue
                    raise OSError(err, os.strerror(err))
                done += rc
            sent += done
            ahead = sent / pps - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        return sent, time.monotonic() - start


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tests.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True)
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--src-mac", required=True)
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pps", type=float, default=200_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # stop after this batch, and still report
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    netns.setns(args.netns, flags=0)  # the main thread, before any socket exists
    sent, elapsed = flood(args.ifname, bytes.fromhex(args.src_mac.replace(":", "")),
                          bytes.fromhex(args.dst_mac.replace(":", "")), args.vip, args.port, args.count, args.pps,
                          args.seconds)
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 3)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
