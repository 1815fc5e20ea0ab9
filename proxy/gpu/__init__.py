"""GPU admission control: what the GPUs hold (views) and which GPU-bound calls may run now.

``choose_view(source, static_devices)`` gives the view (NVML sampled in the
background, or capacities declared in config); ``AdmissionController(view,
AdmissionConfig.from_section(cfg.gpu))`` admits, queues and sheds calls against it.
"""

from .admission import (
    AGENT_QUEUE_FULL, DEADLINE, NO_DEVICE, QUEUE_FULL, SHED_REASONS, SHUTDOWN, TOO_LARGE,
    AdmissionConfig, AdmissionController, Shed, Ticket, Waiter,
)
from .collector import GpuCollector
from .nvml import NvmlView
from .source import choose_view, open_view
from .static import StaticDevice, StaticView
from .view import DeviceReading, GpuUnavailable, GpuView

__all__ = [
    "AGENT_QUEUE_FULL", "DEADLINE", "NO_DEVICE", "QUEUE_FULL", "SHED_REASONS", "SHUTDOWN", "TOO_LARGE",
    "AdmissionConfig", "AdmissionController", "DeviceReading", "GpuCollector", "GpuUnavailable", "GpuView",
    "NvmlView", "Shed", "StaticDevice", "StaticView", "Ticket", "Waiter", "choose_view", "open_view",
]
