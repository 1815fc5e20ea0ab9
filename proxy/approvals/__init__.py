"""Human approvals: park calls the policy marks `approval.required` until a
person decides. (Placeholder wiring points; the approvals package fills them.)"""

from __future__ import annotations

from typing import Any


def build_stage(regate: Any) -> Any | None:
    """The approval stage for this Regate, or None when approvals are off."""
    return None


def add_admin_routes(app: Any, regate: Any) -> None:
    """Mount /admin/approvals* and /admin/ui/approvals on the admin application."""
    return None
