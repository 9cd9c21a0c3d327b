"""Runs `kind: probe` (the spec is `raybig.spec.probe.ProbeSpec`): a cluster smoke-test job that holds a gang of resources for a while.

Why a kind of its own: it checks a cluster and the scheduler (queueing, gang admission, retries,
stop) in seconds, without training anything. It reserves exactly what a train job with the same
`resources:` would (one placement-group bundle per worker), runs a tiny task in each bundle to prove
placement, holds them for `seconds`, then frees them. `fail_attempts` makes the first N attempts
fail, to see retries work.
"""

from __future__ import annotations

import os
import time
from typing import Any

from raybig.spec.models import ResourcesSpec
from raybig.spec.probe import ProbeSpec

__all__ = ["ProbeSpec", "bundles_of", "run_probe"]


def bundles_of(r: ResourcesSpec) -> list[dict[str, float]]:
    """One placement-group bundle per worker: what a train job with these resources reserves."""
    return [r.bundle() for _ in range(r.workers)]


def run_probe(spec: ProbeSpec, address: str | None = None, **_: Any) -> dict[str, Any]:
    """Reserve the gang as a placement group, touch every bundle, hold, release."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raybig.cluster.ray_env import ensure_ray

    ensure_ray(address, num_cpus=spec.resources.workers * spec.resources.cpus_per_worker)
    attempt = int(os.environ.get("RAYBIG_ATTEMPT", "1"))
    pg = placement_group(bundles_of(spec.resources), strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=120)

        @ray.remote(num_cpus=0)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        nodes = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=i)).remote() for i in range(spec.resources.workers)])
        print(f"[raybig] probe holds {spec.resources.workers} bundle(s) on {len(set(nodes))} node(s)",
              flush=True)
        time.sleep(spec.seconds)
        if attempt <= spec.fail_attempts:
            raise RuntimeError(f"probe failure on attempt {attempt} (fail_attempts={spec.fail_attempts})")
        return {"name": spec.name, "workers": spec.resources.workers, "nodes": len(set(nodes)),
                "attempt": attempt}
    finally:
        remove_placement_group(pg)
