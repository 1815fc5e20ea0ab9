"""Prometheus metrics of GPU admission, read from the view and the controller at scrape
time, so the request path pays nothing for them.

Register with ``registry.register(GpuCollector(controller))``.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .admission import WAIT_BUCKETS, AdmissionController


def _histogram(buckets: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(WAIT_BUCKETS, buckets):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + buckets[-1]))
    return out


_MIB = 1 << 20


class GpuCollector:
    def __init__(self, controller: AdmissionController) -> None:
        self.controller = controller

    def describe(self) -> list[Metric]:
        # Families are dynamic (per device, per priority); describe by collecting.
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        view = c.view
        labels = ["device", "name"]
        # Base units (bytes, ratios 0-1), as every regate_ metric; config speaks MiB and percent.
        free = GaugeMetricFamily("regate_gpu_memory_free_bytes", "Free GPU memory in the latest reading", labels=labels)
        used = GaugeMetricFamily("regate_gpu_memory_used_bytes", "Used GPU memory in the latest reading", labels=labels)
        total = GaugeMetricFamily("regate_gpu_memory_total_bytes", "GPU memory", labels=labels)
        util = GaugeMetricFamily("regate_gpu_utilization_ratio", "GPU utilisation in the latest reading (0-1)",
                                 labels=labels)
        age = GaugeMetricFamily("regate_gpu_reading_age_seconds", "Age of the latest measured reading", labels=labels)
        reserved = GaugeMetricFamily("regate_gpu_reserved_bytes", "GPU memory reserved by admitted in-flight calls",
                                     labels=["device"])
        reservations = GaugeMetricFamily("regate_gpu_reservations", "Admitted in-flight GPU calls", labels=["device"])
        held = c.reserved()
        now = c._clock()
        for r in view.devices():
            key = [str(r.index), r.name]
            free.add_metric(key, r.free_mb * _MIB)
            used.add_metric(key, r.used_mb * _MIB)
            total.add_metric(key, r.total_mb * _MIB)
            if r.util_percent is not None:
                util.add_metric(key, r.util_percent / 100)
            if r.sampled_at is not None:
                age.add_metric(key, max(0.0, now - r.sampled_at))
            n, mb = held.get(r.index, (0, 0))
            reserved.add_metric([str(r.index)], mb * _MIB)
            reservations.add_metric([str(r.index)], n)
        yield from (free, used, total, util, age, reserved, reservations)

        depth = GaugeMetricFamily("regate_gpu_queue_depth", "GPU calls waiting for admission, by priority", labels=["priority"])
        for priority, n in sorted(c.queue_depths().items()):
            depth.add_metric([str(priority)], n)
        yield depth

        admitted = CounterMetricFamily("regate_gpu_admitted", "GPU calls admitted", labels=["waited"])
        admitted.add_metric(["no"], c.admitted - c.admitted_after_wait)
        admitted.add_metric(["yes"], c.admitted_after_wait)
        yield admitted
        shed = CounterMetricFamily("regate_gpu_shed", "GPU calls shed, by reason", labels=["reason"])
        for reason, n in c.shed.items():
            shed.add_metric([reason], n)
        yield shed

        wait = HistogramMetricFamily("regate_gpu_wait_seconds", "Time a GPU call waited for admission, by outcome",
                                     labels=["outcome"])
        wait.add_metric(["admitted"], _histogram(c.wait_admitted), c.wait_admitted_sum)
        wait.add_metric(["shed"], _histogram(c.wait_shed), c.wait_shed_sum)
        yield wait

        errors = getattr(view, "sample_errors", None)
        if errors is not None:
            yield CounterMetricFamily("regate_gpu_sample_errors", "NVML samples that failed", value=errors)
