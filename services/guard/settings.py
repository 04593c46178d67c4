from __future__ import annotations

from bastion_common.settings import CommonSettings


class GuardSettings(CommonSettings):
    guard_host: str = "127.0.0.1"
    guard_port: int = 50051
    # The longest run of entity-like characters the output filter holds back
    # while waiting to see whether it completes an entity.
    guard_max_holdback: int = 512
