"""Human approvals: calls the policy marks `approval.required` wait for a person.

The stage (stage.py) parks them in a store (store.py in memory, redis_store.py
shared by replicas), the admin plane (admin.py) lists and decides them and
serves the inbox page, and `regate approvals` (cli.py) does the same from a
terminal. These two functions are how the app wires it all in.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("regate.approvals")


def build_stage(regate: Any) -> Any | None:
    """The approval stage for this Regate, or None when approvals are off."""
    cfg = regate.cfg
    section = cfg.approvals
    if not section.enabled or cfg.policy.engine == "off":
        return None
    from ..app import StartupError
    from .stage import ApprovalStage
    from .store import MemoryApprovalStore

    tools = {t.name for t in cfg.tools}
    for name in section.tools:
        if name not in tools:
            raise StartupError(f"approvals.tools.{name}: no tool named {name!r} in tools")
    kind = section.store or cfg.limits.store
    unusable = None
    if kind == "redis":
        from .redis_store import RedisApprovalStore

        store: Any = RedisApprovalStore(section.redis_url or cfg.limits.redis_url)
    else:
        store = MemoryApprovalStore()
        if os.environ.get("REGATE_SUPERVISOR_PID"):
            # Under --workers N only worker 0 serves the admin plane: a call held in
            # another worker's memory could never be approved. Fail closed, loudly.
            unusable = ("approvals need a shared store under --workers N: set approvals.store: redis "
                        "(or limits.store: redis)")
            if regate.worker_index == 0:
                log.warning("approvals: %s; calls that need approval are refused (503)", unusable)
    # Pub/sub can drop a message across a reconnect, so a call held on Redis also
    # re-reads its record every second; in memory no event is ever missed.
    reread_s = 1.0 if kind == "redis" else 30.0
    return ApprovalStage(section, store, audit=regate.audit, metrics=regate.metrics, regate=regate,
                         unusable=unusable, reread_s=reread_s)


def add_admin_routes(app: Any, regate: Any) -> None:
    """Mount /admin/approvals*, the inbox page and its live stream on the admin application."""
    from .admin import add_routes

    add_routes(app, regate)
