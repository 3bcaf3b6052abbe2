"""Pcap files to flows to model inputs: netFound's burst tokens, NetMamba's byte arrays, NetFlow-like flow features.

Pure functions over dpkt (``pip install "lightning-ext[traffic]"``); the DataModules in
:mod:`~lightning_ext.traffic.datamodules` cache their output.

- :func:`read_packets`: classic pcap (either byte order, micro- or nanosecond stamps) and pcapng; link types
  Ethernet (1), raw IP (101, 12, 14), Linux cooked (113) and BSD loopback (0, 108). A truncated file is refused with
  its name and the byte offset of the broken record; another link type with one line naming it.
- :func:`flows_of`: IPv4/IPv6 TCP/UDP/ICMP packets grouped by the bidirectional 5-tuple, split after an idle gap or
  when a new SYN follows a FIN/RST; the client is the side that sent the first packet.
- :func:`netfound_tokens` (netFound, arXiv 2310.17025, ``pre_process_src/Tokenize.py`` of
  https://github.com/SNL-UCSB/netFound): per packet 12 header tokens (IP header length, ToS, total length, IP flags,
  TTL; TCP flags, window, urgent pointer, relative seq and ack as two 16-bit tokens each; UDP length), optionally
  ``payload_tokens`` 16-bit payload tokens; token = value + 1, PAD 0, CLS 65537, MASK 65538. Packets in one
  direction less than ``burst_gap`` seconds apart form a burst (10 ms in netFound), each burst prefixed by CLS, at
  most 12 bursts of 6 packets; per-burst metadata (direction, bytes, packets, inter-burst time).
- :func:`netmamba_bytes` (NetMamba, arXiv 2405.11449, ``dataset/dataset_common.py`` of
  https://github.com/wangtz19/NetMamba): the first 5 packets' IP+transport header bytes padded/truncated to
  ``header_bytes`` and payload to ``payload_bytes``, addresses zeroed; unlike the official code ports, IP-ID and
  checksums are zeroed too by default (they leak the label on generated traffic), and the header is cut by length,
  not by ``str.replace`` of the payload's hex (which also deleted matching header bytes).
- :func:`flow_features`: FlowTransformer's NetFlow-like record (packets, bytes, duration, lengths, flags, size bins).
- :func:`shortcut_check`: how well each single field predicts the label on held-out flows (the leakage check).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lightning_ext.core.optional import require

PAD, CLS, MASK = 0, 65537, 65538
VOCAB_SIZE = 65539
HEADER_TOKENS = 12
LINK_TYPES = {1: "Ethernet", 101: "raw IP", 12: "raw IP", 14: "raw IP", 113: "Linux cooked", 0: "BSD loopback",
              108: "BSD loopback"}


@dataclass
class Packet:
    """One IP packet: time (s), the IP packet's bytes, and its parsed 5-tuple pieces."""

    ts: float
    ip: bytes
    version: int
    proto: int
    src: bytes
    dst: bytes
    sport: int = 0
    dport: int = 0
    ip_header: int = 20
    transport_header: int = 0
    tcp_flags: int = 0


@dataclass
class Flow:
    """Packets of one bidirectional flow in time order; ``forward[i]`` is True for client -> server packets."""

    client: bytes
    server: bytes
    proto: int
    cport: int
    sport: int
    packets: list[Packet] = field(default_factory=list)
    forward: list[bool] = field(default_factory=list)
    source: str = ""

    @property
    def start(self) -> float:
        return self.packets[0].ts


def _records_pcap(path: Path, data: bytes) -> tuple[int, list[tuple[float, bytes]]]:
    magic = data[:4]
    orders = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
              b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
    if magic not in orders or len(data) < 24:
        raise ValueError(f"{path} is not a pcap or pcapng file (magic {magic.hex()}); give a capture written by "
                         "tcpdump, Wireshark or dpkt.")
    endian, unit = orders[magic]
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    out, off = [], 24
    while off < len(data):
        if off + 16 > len(data):
            raise ValueError(f"{path} is truncated at byte offset {off}: a record header needs 16 bytes, "
                             f"{len(data) - off} remain; repair it (pcapfix) or cut it at that offset.")
        sec, frac, caplen, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        if off + 16 + caplen > len(data):
            raise ValueError(f"{path} is truncated at byte offset {off}: the record there declares {caplen} bytes, "
                             f"{len(data) - off - 16} remain; repair it (pcapfix) or cut it at that offset.")
        out.append((sec + frac * unit, data[off + 16:off + 16 + caplen]))
        off += 16 + caplen
    return linktype, out


def _records_pcapng(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    dpkt = require("dpkt", "reading pcapng")
    with open(path, "rb") as f:
        try:
            reader = dpkt.pcapng.Reader(f)
            records = list(reader)
        except (dpkt.NeedData, dpkt.UnpackError, struct.error, ValueError) as err:
            raise ValueError(f"{path} is a truncated or damaged pcapng file near byte offset {f.tell()} ({err}); "
                             "repair it or re-export it as pcap.") from err
        return reader.datalink(), records


def _ip_of(linktype: int, frame: bytes) -> Optional[bytes]:
    if linktype == 1:
        if len(frame) < 14:
            return None
        etype, off = struct.unpack("!H", frame[12:14])[0], 14
        while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:  # VLAN tags
            etype, off = struct.unpack("!H", frame[off + 2:off + 4])[0], off + 4
        return frame[off:] if etype in (0x0800, 0x86DD) else None
    if linktype in (101, 12, 14):
        return frame
    if linktype == 113:
        return frame[16:] if len(frame) >= 16 and struct.unpack("!H", frame[14:16])[0] in (0x0800, 0x86DD) else None
    if linktype in (0, 108):
        return frame[4:]
    return None


def _parse_ip(ts: float, raw: bytes) -> Optional[Packet]:
    if not raw:
        return None
    version = raw[0] >> 4
    if version == 4 and len(raw) >= 20:
        ihl = (raw[0] & 0x0F) * 4
        total = struct.unpack("!H", raw[2:4])[0]
        raw = raw[:total] if 20 <= total <= len(raw) else raw  # drop Ethernet padding
        proto, src, dst = raw[9], raw[12:16], raw[16:20]
    elif version == 6 and len(raw) >= 40:
        ihl, proto, src, dst = 40, raw[6], raw[8:24], raw[24:40]
    else:
        return None
    pkt = Packet(ts, raw, version, proto, src, dst, ip_header=ihl)
    seg = raw[ihl:]
    if proto == 6 and len(seg) >= 20:
        pkt.sport, pkt.dport = struct.unpack("!HH", seg[:4])
        pkt.transport_header, pkt.tcp_flags = (seg[12] >> 4) * 4, seg[13]
    elif proto == 17 and len(seg) >= 8:
        pkt.sport, pkt.dport = struct.unpack("!HH", seg[:4])
        pkt.transport_header = 8
    elif proto in (1, 58) and len(seg) >= 4:
        pkt.transport_header = 8
    else:
        return None
    return pkt


def read_packets(path: str | Path) -> list[Packet]:
    """The IPv4/IPv6 TCP/UDP/ICMP packets of a pcap or pcapng file, in file order.

    Raises:
        ValueError: one line for a truncated file (its name and the record's byte offset), an unknown format or
            an unsupported link type.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        linktype, records = _records_pcapng(path)
    else:
        linktype, records = _records_pcap(path, data)
    if linktype not in LINK_TYPES:
        raise ValueError(f"{path} has link type {linktype}, which is not supported (Ethernet 1, raw IP 101, Linux "
                         "cooked 113, BSD loopback 0/108 are); re-capture on an Ethernet or `any` interface.")
    out = []
    for ts, frame in records:
        raw = _ip_of(linktype, frame)
        pkt = _parse_ip(float(ts), raw) if raw is not None else None
        if pkt is not None:
            out.append(pkt)
    return out


def flows_of(packets: Sequence[Packet], idle_timeout: float = 60.0, source: str = "") -> list[Flow]:
    """Group packets into bidirectional flows (5-tuple; new flow after ``idle_timeout`` s or a SYN after FIN/RST)."""
    open_flows: dict[tuple, Flow] = {}
    closed: dict[tuple, bool] = {}
    done: list[Flow] = []
    for p in sorted(packets, key=lambda q: q.ts):
        a, b = (p.src, p.sport), (p.dst, p.dport)
        key = (p.proto, *sorted([a, b]))
        flow = open_flows.get(key)
        syn = p.proto == 6 and p.tcp_flags & 0x02 and not p.tcp_flags & 0x10
        if flow is not None and (p.ts - flow.packets[-1].ts > idle_timeout or (syn and closed.get(key))):
            done.append(flow)
            flow = None
        if flow is None:
            flow = Flow(p.src, p.dst, p.proto, p.sport, p.dport, source=source)
            open_flows[key], closed[key] = flow, False
        flow.packets.append(p)
        flow.forward.append(p.src == flow.client and p.sport == flow.cport)
        if p.proto == 6 and p.tcp_flags & 0x05:  # FIN or RST
            closed[key] = True
    done.extend(open_flows.values())
    return sorted(done, key=lambda f: f.start)


def _u16(x: int) -> int:
    return int(x) & 0xFFFF


def packet_tokens(p: Packet, rel_seq: int, rel_ack: int, payload_tokens: int, include_ports: bool) -> list[int]:
    """netFound's header tokens of one packet (value + 1 per 16-bit field; see the module docstring)."""
    raw = p.ip
    if p.version == 4:
        hl, tos, total, flags, ttl = raw[0] & 0x0F, raw[1], struct.unpack("!H", raw[2:4])[0], raw[6] >> 5, raw[8]
    else:
        hl, tos, total, flags, ttl = 10, ((raw[0] & 0x0F) << 4) | (raw[1] >> 4), len(raw), 0, raw[7]
    vals = [hl, tos, total, flags, ttl]
    seg = raw[p.ip_header:]
    if p.proto == 6:
        window, urp = struct.unpack("!H", seg[14:16])[0], struct.unpack("!H", seg[18:20])[0]
        vals += [p.tcp_flags, window, urp, rel_seq >> 16, rel_seq & 0xFFFF, rel_ack >> 16, rel_ack & 0xFFFF]
    elif p.proto == 17:
        vals += [struct.unpack("!H", seg[4:6])[0]]
    else:
        vals += [seg[0], seg[1]]
    toks = [_u16(v) + 1 for v in vals] + [PAD] * (HEADER_TOKENS - len(vals))
    if include_ports:
        toks += [p.sport + 1, p.dport + 1]
    if payload_tokens:
        pay = raw[p.ip_header + p.transport_header:][:2 * payload_tokens]
        pay = pay + b"\0" * (2 * payload_tokens - len(pay))
        toks += [v + 1 for v in struct.unpack(f"!{payload_tokens}H", pay)]
    return toks


def netfound_tokens(flow: Flow, max_bursts: int = 12, max_packets: int = 6, payload_tokens: int = 0,
                    burst_gap: float = 0.01, include_ports: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A flow as netFound bursts: tokens ``(max_bursts, 1 + max_packets * T)`` and metadata ``(max_bursts, 4)``.

    Metadata per burst: direction (+1 client -> server, -1 back; 0 = padding burst), bytes, packets, time since the
    previous burst started (ms).
    """
    per = HEADER_TOKENS + 2 * include_ports + payload_tokens
    tokens = np.zeros((max_bursts, 1 + max_packets * per), dtype=np.int64)
    meta = np.zeros((max_bursts, 4), dtype=np.float32)
    base_seq: dict[bool, int] = {}
    b, n_in, prev_start, last = -1, 0, None, None
    for p, fwd in zip(flow.packets, flow.forward):
        rel_seq = rel_ack = 0
        if p.proto == 6:
            seq, ack = struct.unpack("!II", p.ip[p.ip_header + 4:p.ip_header + 12])
            base_seq.setdefault(fwd, seq)
            rel_seq = (seq - base_seq[fwd]) & 0xFFFFFFFF
            rel_ack = (ack - base_seq[not fwd]) & 0xFFFFFFFF if (not fwd) in base_seq else 0
        new = last is None or fwd != last[1] or p.ts - last[0] >= burst_gap
        last = (p.ts, fwd)
        if new:
            b += 1
            if b >= max_bursts:
                break
            tokens[b, 0], n_in = CLS, 0
            meta[b, 0] = 1.0 if fwd else -1.0
            meta[b, 3] = 0.0 if prev_start is None else (p.ts - prev_start) * 1e3
            prev_start = p.ts
        meta[b, 1] += len(p.ip)
        meta[b, 2] += 1
        if n_in < max_packets:
            tokens[b, 1 + n_in * per:1 + (n_in + 1) * per] = packet_tokens(p, rel_seq, rel_ack, payload_tokens,
                                                                           include_ports)
            n_in += 1
    return tokens, meta


def netmamba_bytes(flow: Flow, packets: int = 5, header_bytes: int = 80, payload_bytes: int = 240,
                   mask_ports: bool = True, mask_ids: bool = True) -> np.ndarray:
    """NetMamba's input: ``packets * (header_bytes + payload_bytes)`` uint8, IP addresses always zeroed."""
    out = np.zeros((packets, header_bytes + payload_bytes), dtype=np.uint8)
    for i, p in enumerate(flow.packets[:packets]):
        head = bytearray(p.ip[:p.ip_header + p.transport_header])
        if p.version == 4:
            head[12:20] = bytes(8)
            if mask_ids:
                head[4:6], head[10:12] = bytes(2), bytes(2)  # IP-ID, header checksum
        else:
            head[8:40] = bytes(32)
        t = p.ip_header
        if mask_ports and p.proto in (6, 17):
            head[t:t + 4] = bytes(4)
        if mask_ids and p.proto == 6:
            head[t + 16:t + 18] = bytes(2)
        elif mask_ids and p.proto == 17:
            head[t + 6:t + 8] = bytes(2)
        pay = p.ip[p.ip_header + p.transport_header:][:payload_bytes]
        out[i, :min(len(head), header_bytes)] = np.frombuffer(bytes(head[:header_bytes]), dtype=np.uint8)
        out[i, header_bytes:header_bytes + len(pay)] = np.frombuffer(pay, dtype=np.uint8)
    return out.reshape(-1)


#: the numeric fields of :func:`flow_features`, in order
NUMERIC_FEATURES = ("in_pkts", "out_pkts", "in_bytes", "out_bytes", "duration_ms", "min_len", "max_len",
                    "mean_iat_ms", "in_throughput", "out_throughput", "len_lt128", "len_128_512", "len_512_1024",
                    "len_gt1024", "first_payload_len")
#: the categorical fields; ``src_port``/``dst_port`` are left out unless asked for (they name the class here)
CATEGORICAL_FEATURES = ("protocol", "client_tcp_flags", "server_tcp_flags", "tcp_flags", "icmp_type")
PORT_FEATURES = ("src_port", "dst_port")


def flow_features(flow: Flow) -> dict[str, float]:
    """A NetFlow-like record of one flow (FlowTransformer's input row): counts, bytes, timing, flags, ports."""
    lens = np.array([len(p.ip) for p in flow.packets], dtype=np.float64)
    fwd = np.array(flow.forward)
    ts = np.array([p.ts for p in flow.packets])
    dur = max(ts[-1] - ts[0], 1e-6)
    cf = sf = 0
    for p, f in zip(flow.packets, flow.forward):
        if f:
            cf |= p.tcp_flags
        else:
            sf |= p.tcp_flags
    icmp = flow.packets[0].ip[flow.packets[0].ip_header] if flow.proto in (1, 58) else 0
    first_pay = next((len(p.ip) - p.ip_header - p.transport_header for p in flow.packets
                      if len(p.ip) > p.ip_header + p.transport_header), 0)
    return {
        "in_pkts": float(fwd.sum()), "out_pkts": float((~fwd).sum()),
        "in_bytes": float(lens[fwd].sum()), "out_bytes": float(lens[~fwd].sum()),
        "duration_ms": dur * 1e3, "min_len": float(lens.min()), "max_len": float(lens.max()),
        "mean_iat_ms": float(np.diff(ts).mean() * 1e3) if len(ts) > 1 else 0.0,
        "in_throughput": float(lens[fwd].sum() / dur), "out_throughput": float(lens[~fwd].sum() / dur),
        "len_lt128": float((lens < 128).sum()), "len_128_512": float(((lens >= 128) & (lens < 512)).sum()),
        "len_512_1024": float(((lens >= 512) & (lens < 1024)).sum()), "len_gt1024": float((lens >= 1024).sum()),
        "first_payload_len": float(first_pay),
        "protocol": float(flow.proto), "client_tcp_flags": float(cf), "server_tcp_flags": float(sf),
        "tcp_flags": float(cf | sf), "icmp_type": float(icmp), "src_port": float(flow.cport),
        "dst_port": float(flow.sport),
    }


def shortcut_check(columns: dict[str, np.ndarray], labels: np.ndarray, train: np.ndarray,
                   test: np.ndarray) -> dict[str, float]:
    """Held-out accuracy of predicting the label from one field alone (the majority label of each value seen in
    training; unseen values get the overall majority). A field near 1.0 is a shortcut that names the class.

    Example:
        >>> cols = {"port": np.array([80, 80, 53, 53]), "noise": np.array([1, 2, 1, 2])}
        >>> shortcut_check(cols, np.array([0, 0, 1, 1]), np.array([0, 2]), np.array([1, 3]))
        {'port': 1.0, 'noise': 0.5}
    """
    out = {}
    majority = np.bincount(labels[train]).argmax()
    for name, col in columns.items():
        table: dict[Any, np.ndarray] = {}
        for v, y in zip(col[train], labels[train]):
            table.setdefault(v, np.zeros(labels.max() + 1, dtype=np.int64))[y] += 1
        pred = np.array([table[v].argmax() if v in table else majority for v in col[test]])
        out[name] = float((pred == labels[test]).mean()) if len(test) else float("nan")
    return out
