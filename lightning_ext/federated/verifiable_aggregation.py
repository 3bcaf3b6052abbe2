"""Verifiable aggregation (zkFL, Wang et al., IEEE TBD 2024, arXiv 2310.02554) without the SNARK: Pedersen vector
commitments to the clients' quantised updates, so every client can check the server's published sum.

Paper: "zkFL: Zero-Knowledge Proof-based Gradient Aggregation for Federated Learning", Zhipeng Wang, Nanqing Dong,
Jiahao Sun, William Knottenbelt, Yike Guo; no official code was found. zkFL has each client commit to its update
with a Pedersen commitment and sign it; the aggregator sums the updates and proves with a zkSNARK that the sum
opens the product of the commitments. Here (the spec's "level 1 + 2", ``federated.md`` 2.1) the aggregator
publishes the exact integer sum and the summed blinding instead of a proof, and anyone holding the signed
commitments verifies it. **A full zero-knowledge proof system is out of scope**: the verifiers see the sum (as
every FedAvg client does) but third parties get no zero-knowledge guarantee.

Commitment of an integer vector ``v`` with blinding ``s`` in the order-``r`` subgroup of quadratic residues
modulo a 2048-bit safe prime ``p = 2r + 1``::

    C(v; s) = prod_j G_j^(v_j) * H^s  (mod p),    G_j = H2G(dst, j),  H = H2G(dst, "H")

with generators hashed to the group (SHAKE-256 then squared), so no discrete-log relation among them is known
(binding). It is additively homomorphic: ``prod_i C(v_i; s_i)^(n_i) = C(sum_i n_i v_i; sum_i n_i s_i)``. A client's
update ``w_local - w_global`` is quantised to ``round(update * 2^frac_bits)``; the server aggregates the integers
exactly, ``Q = sum_i n_i q_i``, and the new global model is ``w + Q / (2^frac_bits sum_i n_i)``. Each client checks
that its own signed commitment is in the published list, that every listed commitment carries a valid Ed25519
signature of a registered client for this round, and that ``prod_i C_i^(n_i) == C(Q; S)``: a dropped, replaced or
injected update fails one of the three.

Example:
    >>> com = PedersenCommitment(dim=3)
    >>> c1, c2 = com.commit([1, -2, 3], 5), com.commit([4, 0, -1], 7)
    >>> com.verify_sum([c1, c2], [2, 1], [6, -4, 5], 17)
    True
    >>> com.verify_sum([c1, c2], [2, 1], [6, -4, 6], 17)
    False
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Optional, Sequence

import torch

from lightning_ext.core.validation import check_number, check_positive_int

#: a 2048-bit safe prime (p and (p - 1) / 2 prime; generated with OpenSSL's DH parameter generator through
#: ``cryptography``, checked by Miller-Rabin in tests/test_federated.py)
P = int("0xf5be7b556a701b0fa3f123199c19a6f7969c53f6a4646d2a2d26b13e05e19fbbd784ff90b7c79ee7975b8813b1c63c5fbb84ed8bb672f554c9f2a7a6650a2281b5cbaee50ab47c84d24d03a2bf5ed5f2fb154cc7dd7cad8b2049f506842fd1e6631e024acdb3cdb92e0eb08024060b4214f5f4b5ff3e3d6e542dabb38c69287f080f1fba2459633d85c51c888c30d54175aca41395c41da1e1fda2a44421361ad679e4409e452148e33704666c72e212d2675d2a907a2ac29fcb56356bbbcbcd835d87cec6ba35d2aba2517e644bb6eb999d58088d98c55a7696e8a3ee0dd6465d2e2ef3aea8645c28422c28cea26ee0631a4cffd364de0f5d5511064a9c8c97", 16)
R = (P - 1) // 2  #: the prime order of the subgroup of quadratic residues


def _hash_to_group(dst: bytes, label: bytes) -> int:
    h = int.from_bytes(hashlib.shake_256(dst + b"|" + label).digest(256 + 16), "big") % P
    return pow(h, 2, P)


class PedersenCommitment:
    """Pedersen vector commitments (additively homomorphic) over a 2048-bit safe-prime group.

    Args:
        dim: length of the committed vectors.
        dst: domain-separation tag of the generators.
    """

    def __init__(self, dim: int, dst: bytes = b"lightning_ext.federated.zkfl") -> None:
        check_positive_int("dim", dim)
        self.dim, self.dst = dim, dst
        self.g = [_hash_to_group(dst, str(j).encode()) for j in range(dim)]
        self.g_inv = [pow(x, -1, P) for x in self.g]
        self.h = _hash_to_group(dst, b"H")

    def commit(self, values: Sequence[int], blinding: int) -> int:
        """``prod_j G_j^(v_j) H^s mod p`` (negative entries through the inverse generator, small exponents)."""
        if len(values) != self.dim:
            raise ValueError(f"commit: got {len(values)} values for a {self.dim}-dimensional commitment.")
        acc = pow(self.h, blinding % R, P)
        for v, g, gi in zip(values, self.g, self.g_inv):
            v = int(v)
            if v:
                acc = acc * pow(g if v > 0 else gi, abs(v), P) % P
        return acc

    def verify_sum(self, commitments: Sequence[int], weights: Sequence[int], total: Sequence[int],
                   blinding: int) -> bool:
        """Whether ``prod_i C_i^(n_i) == C(total; blinding)``."""
        lhs = 1
        for c, n in zip(commitments, weights):
            lhs = lhs * pow(int(c), int(n), P) % P
        return lhs == self.commit(total, blinding)


def quantize_update(update: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    """``round(update * 2^frac_bits)`` as int64."""
    return torch.round(update.double() * 2 ** frac_bits).to(torch.int64)


def _to_bytes_tensor(x: int | bytes) -> torch.Tensor:
    raw = x if isinstance(x, bytes) else int(x).to_bytes(256, "big")
    return torch.tensor(list(raw), dtype=torch.uint8)


def _from_tensor(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).tolist())


def flat_keys(arrays: dict) -> list[str]:
    """The float keys that are committed, in a fixed order."""
    return sorted(k for k, v in arrays.items() if torch.is_floating_point(torch.as_tensor(v)))


def _message(server_round: int, client_id: int, commitment: int) -> bytes:
    return f"zkfl|{server_round}|{client_id}|".encode() + int(commitment).to_bytes(256, "big")


class VerifiableUpdate:
    """Client side: quantise the update, commit to it, sign ``(round, client, commitment)`` with Ed25519.

    A ``LightningClient`` reply transform. The reply carries the int64 quantised update under the model's keys and
    three extra uint8 arrays: ``zkfl.commitment``, ``zkfl.blinding`` (sent to the aggregator, as in zkFL, so that it
    can publish the summed blinding) and ``zkfl.signature``. Private keys are derived from ``key_seed`` and the
    partition id (for a reproducible simulation; a deployment gives each client its own key).

    Args:
        frac_bits: fixed-point bits of the quantisation.
        key_seed: seed of the clients' signing keys (simulation only).
        blinding_seed: seed of the blinding factors (``None``: from ``secrets``).
    """

    def __init__(self, frac_bits: int = 16, key_seed: int = 0, blinding_seed: Optional[int] = None) -> None:
        from lightning_ext.federated._flwr import require_flwr

        require_flwr("VerifiableUpdate")  # its Ed25519 signatures come from `cryptography`, a Flower dependency
        check_number("frac_bits", frac_bits, low=1, high=40, integer=True)
        check_number("key_seed", key_seed, integer=True)
        self.frac_bits, self.key_seed, self.blinding_seed = frac_bits, key_seed, blinding_seed
        self._commitment: Optional[PedersenCommitment] = None

    def private_key(self, client_id: int) -> Any:
        """The Ed25519 key of a client (derived; simulation only)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        seed = hashlib.sha256(f"zkfl-key|{self.key_seed}|{client_id}".encode()).digest()
        return Ed25519PrivateKey.from_private_bytes(seed)

    def public_key(self, client_id: int) -> Any:
        """The Ed25519 public key of a client."""
        return self.private_key(client_id).public_key()

    def commitment_scheme(self, dim: int) -> PedersenCommitment:
        """The (cached) commitment scheme for a model of ``dim`` committed parameters."""
        if self._commitment is None or self._commitment.dim != dim:
            self._commitment = PedersenCommitment(dim)
        return self._commitment

    def __call__(self, reply: dict, global_arrays: dict, server_round: int, partition_id: int) -> dict:
        """Quantised update + commitment + blinding + signature."""
        keys = flat_keys(reply)
        q = {k: quantize_update(reply[k].double() - torch.as_tensor(global_arrays[k]).double(), self.frac_bits)
             for k in keys}
        flat = torch.cat([q[k].reshape(-1) for k in keys]).tolist()
        if self.blinding_seed is None:
            s = secrets.randbelow(R)
        else:
            s = int.from_bytes(hashlib.sha256(f"{self.blinding_seed}|{server_round}|{partition_id}".encode()).digest(),
                               "big") % R
        c = self.commitment_scheme(len(flat)).commit(flat, s)
        sig = self.private_key(partition_id).sign(_message(server_round, partition_id, c))
        out = {k: v for k, v in reply.items() if k not in q}
        out.update(q)
        out.update({"zkfl.commitment": _to_bytes_tensor(c), "zkfl.blinding": _to_bytes_tensor(s),
                    "zkfl.signature": _to_bytes_tensor(sig), "zkfl.client": torch.tensor([partition_id])})
        return out


def verify_round(transcript: dict, client_id: int, my_commitment: int, public_keys: dict,
                 scheme: PedersenCommitment) -> tuple[bool, str]:
    """A client's check of a published round: its own commitment is listed, every entry is signed by a
    registered client for this round, and the published sum opens the weighted product of the commitments."""
    from cryptography.exceptions import InvalidSignature

    entries = transcript["entries"]
    if not any(e["client"] == client_id and e["commitment"] == my_commitment for e in entries):
        return False, "my update is missing or altered"
    for e in entries:
        key = public_keys.get(e["client"])
        if key is None:
            return False, f"unregistered client {e['client']}"
        try:
            key.verify(e["signature"], _message(transcript["round"], e["client"], e["commitment"]))
        except InvalidSignature:
            return False, f"bad signature of client {e['client']}"
    ok = scheme.verify_sum([e["commitment"] for e in entries], [e["weight"] for e in entries],
                           transcript["total"], transcript["blinding"])
    return ok, "ok" if ok else "the published sum does not open the product of the commitments"


def verifiable_fedavg(frac_bits: int = 16, tamper: Optional[Any] = None, **fedavg_kwargs: Any) -> Any:
    """A Flower ``FedAvg`` that aggregates ``VerifiableUpdate`` replies exactly in integers and publishes a transcript.

    ``strategy.transcripts[round]`` holds the entries (client, commitment, signature, weight), the integer total
    ``Q = sum_i n_i q_i`` and the blinding ``S = sum_i n_i s_i mod r``; the new global model is
    ``w + Q / (2^frac_bits sum_i n_i)``. ``tamper(round, entries, total, blinding) -> (entries, total, blinding)``
    simulates a malicious aggregator (tests and the benchmark).
    """
    check_number("frac_bits", frac_bits, low=1, high=40, integer=True)
    from lightning_ext.federated._flwr import require_flwr

    require_flwr("verifiable_fedavg")
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    class VerifiableFedAvg(FedAvg):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transcripts: dict = {}

        def configure_train(self, server_round, arrays, config, grid):
            self._sent = arrays.to_torch_state_dict()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            ok = [r for r in replies if not r.has_error()]
            if not ok:
                return None, None
            keys = flat_keys(self._sent)
            entries, total, blinding = [], None, 0
            for r in ok:
                arr = r.content["arrays"].to_torch_state_dict()
                n = int(r.content["metrics"][self.weighted_by_key])
                flat = torch.cat([arr[k].reshape(-1) for k in keys]).to(torch.int64)
                total = flat * n if total is None else total + flat * n
                s_i = int.from_bytes(_from_tensor(arr["zkfl.blinding"]), "big")
                blinding = (blinding + n * s_i) % R
                entries.append({"client": int(arr["zkfl.client"][0]), "weight": n, "values": flat, "blinding": s_i,
                                "commitment": int.from_bytes(_from_tensor(arr["zkfl.commitment"]), "big"),
                                "signature": _from_tensor(arr["zkfl.signature"])})
            if tamper is not None:
                entries, total, blinding = tamper(server_round, entries, total, blinding)
            weight = sum(e["weight"] for e in entries)
            mean = total.double() / (2 ** frac_bits * weight)
            new, offset = {}, 0
            for k in keys:
                size = self._sent[k].numel()
                new[k] = (self._sent[k].double() + mean[offset:offset + size].reshape(self._sent[k].shape)).to(
                    self._sent[k].dtype)
                offset += size
            for k, v in self._sent.items():
                new.setdefault(k, v)
            self.transcripts[server_round] = {
                "round": server_round, "total": total.tolist(), "blinding": blinding,
                "entries": [{k: v for k, v in e.items() if k not in ("values", "blinding")} for e in entries]}
            return ArrayRecord(new), MetricRecord({"clients": len(entries), "num-examples": weight})

    return VerifiableFedAvg(**fedavg_kwargs)
