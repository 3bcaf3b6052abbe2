"""Network traffic: real captures made offline, pcap DataModules and the traffic models.

- :mod:`~lightning_ext.traffic.capture`: the capture recipe (``python -m lightning_ext.traffic.capture``, as root):
  real servers and clients in two network namespaces joined by a veth pair, offloads off, labelled by application.
- :mod:`~lightning_ext.traffic.pcap`: pcap reading with dpkt (Ethernet, raw IP, Linux cooked, BSD loopback), flows,
  netFound's burst tokens, NetMamba's byte images, NetFlow-like flow features, and the label-shortcut check.
- ``PcapBurstDataModule`` (netFound bursts or NetMamba bytes) and ``FlowWindowDataModule`` (FlowTransformer's windows
  of flow records), both caching parsed tensors atomically with validation;
- ``FlowTransformerModule`` (encoding, encoder and head chosen in YAML), ``NetMambaModule`` (MAE pretraining and
  classification on ``MambaBlock``: a PyTorch selective scan on CPU, mamba-ssm's kernel on CUDA when installed) and
  ``NetFoundModule`` (hierarchical burst/flow transformer: swapped-burst, masked-token and metadata pretraining,
  attentive-pooling fine-tuning).

Reading pcaps needs dpkt: ``pip install "lightning-ext[traffic]"``. Captures need root, iproute2, tcpdump and
openssl (Debian: ``apt-get install iproute2 tcpdump openssl``; ``ethtool`` is used when present).
"""
