"""Policy bundles from a bundle server (``policy.bundle.service``), polled as OPA polls one."""

from .service import BundleService, next_delay

__all__ = ["BundleService", "next_delay"]
