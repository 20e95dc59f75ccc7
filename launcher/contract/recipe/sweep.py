"""Node-scaling sweeps: a stage with `sweep:` becomes one stage per node count, `<name>-n<nodes>`."""

from __future__ import annotations

from ..errors import KeyPath
from .resolved import ResolvedStage, SweepPoint
from .schema import MAX_NODES, SweepSpec
from .yaml_lines import SourceMap


def expand_sweep(
    stage: ResolvedStage, sweep: SweepSpec, stage_names: set[str], where: SourceMap, base: KeyPath
) -> list[ResolvedStage]:
    key = base + ("sweep",)
    if not stage.kind.distributed:
        raise where.error(f"kind {stage.kind.name!r} runs as one process; it cannot be swept over nodes", key)
    if stage.array is not None:
        raise where.error("an array stage cannot be swept over nodes", key)
    points = []
    for nodes in sweep.nodes:
        if nodes * stage.resources.tasks_per_node > MAX_NODES:
            raise where.error(
                f"{nodes} nodes x {stage.resources.tasks_per_node} tasks_per_node is past Slurm's "
                f"{MAX_NODES:,} tasks (32 bits)",
                key + ("nodes",),
            )
        name = f"{stage.name}-n{nodes}"
        if name in stage_names:
            raise where.error(f"the sweep would create stage {name!r}, which the recipe already has", key)
        params_raw = dict(stage.params_raw)
        if sweep.scaling == "strong":
            param = stage.kind.accumulation_param
            if not param:
                raise where.error(
                    f"kind {stage.kind.name!r} has no batch parameter for strong scaling",
                    key + ("scaling",),
                    line_of=key,
                )
            total = int(params_raw[param]) * sweep.nodes[0]
            if total % nodes:
                raise where.error(
                    f"strong scaling: {param}={params_raw[param]} on {sweep.nodes[0]} node(s) "
                    f"cannot be split evenly over {nodes} nodes; raise {param}",
                    base + ("params", param),
                    line_of=base + ("params",),
                )
            params_raw[param] = total // nodes
        points.append(
            ResolvedStage(
                name=name,
                kind=stage.kind,
                params=stage.kind.params.model_validate(params_raw),
                params_raw=params_raw,
                resources=stage.resources.model_copy(update={"nodes": nodes}),
                array=None,
                after=stage.after,
                sweep=SweepPoint(stage.name, nodes, sweep.scaling),
            )
        )
    return points
