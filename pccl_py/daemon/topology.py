"""The membership view handed from the control plane to the data plane."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerInfo:
    """One accepted peer: its stable id and where its daemon's data plane listens."""

    peer_id: str
    host: str
    port: int


@dataclass(frozen=True)
class Topology:
    """The accepted members of one peer group at one membership epoch, in ring order.

    ``rank`` is this daemon's index in ``peers``. ``world_size`` counts the whole run
    (every group); ``peers`` holds only this daemon's group.
    """

    epoch: int
    group: int
    rank: int
    peers: tuple[PeerInfo, ...]
    world_size: int
    num_groups: int = 1
    # the coordinator's id of the last completed vote round (automatic tags count from it);
    # not part of the membership: a round that changes nothing leaves the topology equal
    round: int | None = field(default=None, compare=False)

    @property
    def group_world_size(self) -> int:
        return len(self.peers)

    @property
    def me(self) -> PeerInfo:
        return self.peers[self.rank]
