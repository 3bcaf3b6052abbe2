"""Network traffic: real captures made offline, pcap DataModules and the traffic models.

- :mod:`~lightning_ext.traffic.capture`: the capture recipe (``python -m lightning_ext.traffic.capture``, as root):
  real servers and clients in two network namespaces joined by a veth pair, offloads off, labelled by application.
- :mod:`~lightning_ext.traffic.pcap`: pcap reading with dpkt (Ethernet, raw IP, Linux cooked, BSD loopback), flows,
  netFound's burst tokens, NetMamba's byte images, NetFlow-like flow features, and the label-shortcut check.
- ``PcapBurstDataModule`` and ``FlowWindowDataModule``; ``FlowTransformerModule``, ``MambaBlock`` and
  ``NetMambaModule``.

Reading pcaps needs dpkt: ``pip install "lightning-ext[traffic]"``. Captures need root, iproute2, tcpdump and
openssl (Debian: ``apt-get install iproute2 tcpdump openssl``; ``ethtool`` is used when present).
"""
