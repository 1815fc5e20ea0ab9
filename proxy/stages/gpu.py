"""GPU admission: a GPU-bound call runs only when its memory fits.

A call is GPU-bound when its route or its decision declares `gpu.memory_mb`
(the larger wins; priority from the decision, else the route). The controller
(proxy/gpu/admission.py) admits it against live readings minus in-flight
reservations, queues it by priority within the call's deadline, or sheds it
with 503 `gpu_saturated` and a Retry-After estimate. The reservation is held
until the response has been fully sent, and released whatever happens.
"""

from __future__ import annotations

import time
from typing import Any

from ..gpu import AdmissionController, Shed
from ..pipeline import Call, Rejection


class GpuAdmission:
    name = "gpu"

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        # Set at startup, once the view (NVML or static) is open.
        self.controller: AdmissionController | None = None

    def policy_state(self) -> dict[str, Any] | None:
        """``state.gpu`` of the policy input (None until the view is open): the controller's
        cached summary of the sampled readings, reservations and queue. No NVML call, and
        no new object per call unless something changed since the last one."""
        controller = self.controller
        return None if controller is None else controller.policy_state()

    async def enter(self, call: Call) -> Rejection | None:
        tool = call.tool
        demand = tool.gpu.memory_mb
        priority = tool.gpu.priority
        d = call.decision
        if d is not None:
            demand = max(demand, d.gpu_memory_mb)
            if d.gpu_memory_mb:
                priority = d.gpu_priority
        if demand <= 0:
            return None
        controller = self.controller
        if controller is None:
            return Rejection(503, "gpu_unavailable", "GPU admission is not ready yet", retry_after=1)
        timeout_ms = tool.timeout_ms if call.timeout_ms is None else min(tool.timeout_ms, call.timeout_ms)
        deadline = time.monotonic() + timeout_ms / 1000
        outcome = await controller.acquire(demand, device=tool.gpu.device, priority=priority,
                                           agent=call.agent, deadline=deadline)
        if isinstance(outcome, Shed):
            return Rejection(503, "gpu_saturated", outcome.message, retry_after=outcome.retry_after,
                             reasons=[outcome.reason])
        call.extra["gpu_ticket"] = outcome
        return None

    def leave(self, call: Call) -> None:
        ticket = call.extra.pop("gpu_ticket", None)
        if ticket is not None:
            ticket.release()
