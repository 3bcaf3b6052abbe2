"""LocalGrid: Flower's ``Grid`` interface served in-process, sequentially, with no Ray and no sockets.

Flower 1.42's only simulation backend is Ray, and Ray resolves the machine's own address at start-up, which a
socket guard (the test suite's) refuses, so it hangs. A strategy only needs an object implementing ``Grid``;
this one hands each message to the real ``ClientApp`` in the same process and keeps one ``Context`` per node
for the whole run (that is where each client's state lives across rounds).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Iterable, Optional

from lightning_ext.federated._flwr import require_flwr


def local_grid(client_app: Any, num_nodes: int, run_config: Optional[dict] = None) -> Any:
    """A ``flwr.serverapp.Grid`` that runs ``client_app`` in-process for ``num_nodes`` nodes (ids 1000, 1001, ...).

    Node ``i`` has ``node_config = {"partition-id": i, "num-partitions": num_nodes}``. Each instruction message
    is deep-copied before the client sees it (strategies send one shared ``RecordDict`` to every node); a
    client exception becomes an ``Error`` reply, which the strategy counts as a failure.
    """
    require_flwr("LocalGrid")
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    class LocalGrid(Grid):
        def __init__(self) -> None:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
            self.app, self._run, self._replies = client_app, Run.create_empty(run_id=1), {}
            self.ids = [1000 + i for i in range(num_nodes)]
            self.contexts = {
                nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config=dict(run_config or {}))
                for i, nid in enumerate(self.ids)}
            self.last_replies: list = []

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                           ttl: Optional[float] = None) -> Any:
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

        def get_node_ids(self) -> Iterable[int]:
            return list(self.ids)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            out = []
            for msg in messages:
                mid = uuid.uuid4().hex
                msg.metadata.__dict__["_message_id"] = mid
                inp = copy.deepcopy(msg)
                try:
                    reply = self.app(inp, self.contexts[msg.metadata.dst_node_id])
                except Exception as err:  # noqa: BLE001 - a failed client is a reply, as on a real SuperLink
                    reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=inp)
                self._replies[mid] = reply
                out.append(mid)
            return out

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

        def send_and_receive(self, messages: Iterable[Any], *, timeout: Optional[float] = None) -> Iterable[Any]:
            replies = list(self.pull_messages(self.push_messages(messages)))
            self.last_replies = replies
            return replies

    return LocalGrid()
