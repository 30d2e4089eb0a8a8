"""Ten lab PCs switched on at once all boot to their marker (distinct addresses, each its own fresh disk)."""
from __future__ import annotations

import pytest
from harness import boot_all, lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

N = 10


@pytest.mark.timeout(900)
def test_ten_pcs_boot_at_once(assets, pc_logs):
    macs = [f"52:54:00:77:04:{i:02x}" for i in range(1, N + 1)]
    # Half are known hosts of the room, half are unknown PCs (pool addresses, the default image).
    hosts = [{"mac": m, "name": f"pc{i:02d}", "group": "lab"} for i, m in enumerate(macs[: N // 2], 1)]
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, hosts=hosts),
                           assets) as bl:
        pcs = [bl.pc(f"pc{i:02d}", mac=m, memory=192) for i, m in enumerate(macs, 1)]
        results = boot_all(pcs, timeout=600)
        bad = [r.describe(25) for r in results if not (r.ok and r.marker == "A" and r.fresh is True)]
        assert not bad, "\n\n".join(bad)
        ips = [r.ip for r in results]
        assert len(set(ips)) == N, ips
        slowest = max(results, key=lambda r: r.elapsed)
        print(f"ten PCs: slowest {slowest.name} {slowest.elapsed:.1f}s, "
              f"median {sorted(r.elapsed for r in results)[N // 2]:.1f}s")
