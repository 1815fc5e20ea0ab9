"""Decision logs in OPA's format, for platforms that already run OPA's
decision-log pipeline: each decision the policy stage made, as an OPA
`decision_logs` event (decision_id, path, input, result, bundles, labels,
timestamp, metrics, requested_by), uploaded in gzip'd JSON batches to
`POST <url><resource>`. The hash-chained audit log (proxy/audit.py) stays the
record of truth; this is a copy for other tools, lossy by design when its
collector is away (bounded buffer, oldest dropped, every drop counted).

`decision_logs.url` unset: nothing is built and the policy stage's hook is None.
mask.py owns masking, event.py the event shape, buffer.py the bound and the
batches, uploader.py the request-path call and the upload task.
"""

from __future__ import annotations

from .buffer import EventBuffer
from .event import Entry, EventEncoder, rfc3339_ns
from .mask import MaskError, MaskRule, apply_mask, parse_pointer, parse_rules
from .uploader import DecisionLogger, backoff_s, upload_due

__all__ = [
    "DecisionLogger", "Entry", "EventBuffer", "EventEncoder", "MaskError", "MaskRule", "apply_mask",
    "backoff_s", "parse_pointer", "parse_rules", "rfc3339_ns", "upload_due",
]
