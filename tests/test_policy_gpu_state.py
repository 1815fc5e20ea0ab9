"""`state.gpu` in the policy input: a policy can see the GPUs' sampled state and decide on it.

End to end: Regate as a real process on the static GPU view (no GPU here), a policy
written by the test that refuses `report` calls while less than 500 MiB of GPU 0 is
available, and a slow GPU-bound call that holds a 600 MiB reservation meanwhile.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.gpu import AdmissionConfig, AdmissionController, StaticView
from proxy.stages.gpu import GpuAdmission
from tests.conftest import AGENT_KEY
from tests.support.procs import RegateProcess
from tests.test_policy_e2e import write_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")
H = {"X-Api-Key": AGENT_KEY}

MIN_FREE_MB = 500

# Denies `report` calls while any GPU has less than MIN_FREE_MB available, saying so;
# tells the tool what it saw in a header (so the test can read what the policy read).
GPU_POLICY = """
package regate

deny contains msg if {
	input.tool.name == "report"
	some d in input.state.gpu.devices
	d.available_mb < %(min)d
	msg := sprintf("GPU %%d has %%d MiB available (%%s view), below the %(min)d MiB that report calls need", [d.index, d.available_mb, input.state.gpu.source])
}

deny contains "no GPU state in the input" if {
	input.tool.name == "report"
	not input.state.gpu
}

seen := sprintf("source=%%s available=%%d total=%%d util=%%v queued=%%d in_flight=%%d", [
	input.state.gpu.source, input.state.gpu.devices[0].available_mb, input.state.gpu.devices[0].total_mb,
	input.state.gpu.devices[0].util_percent, input.state.gpu.queued, input.state.gpu.in_flight,
])

decision := {"allow": count(deny) == 0, "reasons": deny, "headers": {"set": {"X-Seen-Gpu": seen}}}
""" % {"min": MIN_FREE_MB}


@pytest.fixture(scope="module")
def regate(upstream, keys_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpustate")
    rego, data = write_bundle(tmp, GPU_POLICY)
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(rego), "data": str(data)},
        "gpu": {"source": "static", "static": [{"memory_mb": 1000, "name": "declared"}]},
        "tools": [
            {"name": "infer", "upstream": upstream, "gpu": {"memory_mb": 600}, "timeout_ms": 5000},
            {"name": "report", "upstream": upstream, "timeout_ms": 5000},
        ],
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()


async def get(s: aiohttp.ClientSession, url: str) -> tuple[int, dict, dict]:
    async with s.get(url, headers=H) as r:
        return r.status, dict(r.headers), await r.json()


async def reserved(s: aiohttp.ClientSession, regate: RegateProcess, mb: int) -> None:
    """Wait until GET /admin/gpu shows `mb` MiB reserved on GPU 0."""
    for _ in range(100):
        async with s.get(regate.admin_url + "/admin/gpu", headers=regate.admin_headers) as r:
            if (await r.json())["devices"][0]["reserved_mb"] == mb:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"/admin/gpu never showed {mb} MiB reserved")


async def test_policy_denies_while_gpu_memory_is_short_and_allows_again_after(regate):
    async with aiohttp.ClientSession() as s:
        status, _, seen = await get(s, regate.url + "/tools/report/x")
        assert status == 200
        assert seen["headers"]["X-Seen-Gpu"] == \
            "source=static available=1000 total=1000 util=0 queued=0 in_flight=0"

        # A GPU-bound call holds 600 of the declared 1000 MiB for a second.
        held = asyncio.create_task(get(s, regate.url + "/tools/infer/slow?s=1"))
        await reserved(s, regate, 600)

        status, headers, body = await get(s, regate.url + "/tools/report/x")
        assert status == 403 and body["error"]["code"] == "policy_denied"
        assert body["error"]["reasons"] == [
            f"GPU 0 has 400 MiB available (static view), below the {MIN_FREE_MB} MiB that report calls need"]

        assert (await held)[0] == 200
        # Released when the response was sent: the policy sees the memory back.
        status, _, seen = await get(s, regate.url + "/tools/report/x")
        assert status == 200
        assert seen["headers"]["X-Seen-Gpu"].startswith("source=static available=1000 ")


async def test_state_gpu_reports_reservations_and_queue_of_the_sampled_view(regate):
    """While a call holds its reservation the policy reads it as in flight; the tool
    with GPU demand is itself judged on the state before its own admission."""
    async with aiohttp.ClientSession() as s:
        held = asyncio.create_task(get(s, regate.url + "/tools/infer/slow?s=1"))
        await reserved(s, regate, 600)
        status, _, seen = await get(s, regate.url + "/tools/infer/x")
        # 600 + 600 > 1000: the second GPU call is admitted only after the first ends
        # (it waits in the queue), but the policy judged it on the state before that.
        assert status == 200
        assert seen["headers"]["X-Seen-Gpu"] == \
            "source=static available=400 total=1000 util=0 queued=0 in_flight=1"
        assert (await held)[0] == 200


async def test_state_gpu_is_the_cached_view_not_rebuilt_per_call():
    """Cheap on the call path: the same object until a reservation, the queue or a
    reading changes it; nothing at all before the view is open."""
    stage = GpuAdmission(metrics=None)
    assert stage.policy_state() is None
    stage.controller = AdmissionController(StaticView([{"memory_mb": 1000}]), AdmissionConfig())
    first = stage.policy_state()
    assert stage.policy_state() is first
    ticket = stage.controller.submit(300).outcome
    changed = stage.policy_state()
    assert changed is not first and changed["devices"][0]["available_mb"] == 700
    assert first["devices"][0]["available_mb"] == 1000  # an earlier snapshot is never mutated
    ticket.release()
