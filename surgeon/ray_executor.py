"""The Ray executor: one task per output shard on the cluster that ``RAY_ADDRESS`` names (``--executor ray``).

The driver (the machine that runs ``surgeon``) plans the shards exactly as the local executor does, then:
1. evaluates the graph's global reductions (a global magnitude threshold, norms): each is a streaming fold over
   many tensors whose result is small. A reduction whose partial folds merge (``Reduce.merge``; the global
   magnitude threshold's two histogram passes) runs as map tasks over chunks of its inputs, merged by the driver;
   others are folded on the driver. The result becomes a constant of the graph the shard tasks receive;
2. sends each task the part of the graph its shard needs (lazy nodes: sources are reopened on the worker *by
   path*, so the inputs and the output's parent folder must be on storage every node sees at the same path);
3. each task writes its shard with the local pipeline into ``<shard>.part-*`` beside its final name and renames
   it when complete, so a task that dies (and is retried, ``max_retries`` times) never leaves a partial shard at
   the final path; the driver removes leftover parts before the output folder is renamed into place;
4. the driver writes the index, configs, side files, model card and ``surgeon.json``.
Bytes are identical to the local executor's: same plan, same header, same computation.

Each task asks Ray for ``memory`` = what its shard's pipeline may hold (the largest tensor's compute footprint,
capped by the run's memory budget) plus a fixed overhead, so the scheduler never packs more shards on a node than
its memory holds.
"""
from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.graph import Graph, Node, Reduce
    from surgeon.writer import ShardPlan

TASK_OVERHEAD = 512 << 20  # a worker process with torch imported
DEFAULT_RETRIES = 3


def connect() -> Any:
    """``ray`` connected to the cluster at ``RAY_ADDRESS`` (Ray's own convention), or a clear error."""
    try:
        import ray
    except ImportError:
        raise SurgeonError("--executor ray: the ray package is not installed "
                           "(pip install 'surgeon[ray]')") from None
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        raise SurgeonError("--executor ray: RAY_ADDRESS is not set; start a cluster (`ray start --head` on one "
                           "machine, `ray start --address=HEAD:6379` on the others) and export "
                           "RAY_ADDRESS=HEAD:6379")
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SurgeonError(f"--executor ray: cannot connect to the Ray cluster at RAY_ADDRESS={address}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray


def reductions_resolved(graph: Graph, names: list[str], ray: Any = None) -> Graph:
    """A copy of ``graph`` whose global reductions (``Reduce`` nodes) are evaluated and replaced by constants,
    with every consumer rebuilt around them; other nodes are shared, not copied. With ``ray``, a reduction that
    can be merged is split into map tasks over chunks of its inputs, whose partial results the driver merges."""
    from surgeon.graph import Const, Reduce, reachable

    reduces = {id(node): node for node in reachable([graph[n] for n in names]) if isinstance(node, Reduce)}
    if not reduces:
        return graph
    values: dict[int, Any] = {}
    for node in reduces.values():
        reduced_value(node, values, ray)
    replaced: dict[int, Node] = {key: Const(values[key], label=node.label) for key, node in reduces.items()}

    def rebuilt(node: Node) -> Node:
        key = id(node)
        if key not in replaced:
            new_inputs = tuple(rebuilt(i) for i in node.inputs)
            if any(a is not b for a, b in zip(new_inputs, node.inputs)):
                node = copy.copy(node)
                node.inputs = new_inputs
            replaced[key] = node
        return replaced[key]

    out = graph.copy()
    for n in names:
        out.nodes[n] = rebuilt(graph[n])
    return out


def reduced_value(node: Reduce, values: dict[int, Any], ray: Any = None) -> Any:
    """The value of ``node`` (memoised in ``values``): its ``given`` inputs first, then a fold over the streamed
    inputs, as map tasks on the cluster when ``node.merge`` allows and there is more than one input."""
    from surgeon.graph import Executor, Reduce

    if id(node) in values:
        return values[id(node)]
    given = [reduced_value(g, values, ray) if isinstance(g, Reduce) else Executor([g]).evaluate_all()[0]
             for g in node.given]
    n = len(node.streamed)
    if ray is None or node.merge is None or n < 2:
        acc = reduce_chunk(node, given, 0, n)
    else:
        chunks = max(2, min(n, int(ray.cluster_resources().get("CPU", 2))))
        bounds = [(n * c // chunks, n * (c + 1) // chunks) for c in range(chunks)]
        task = ray.remote(reduce_chunk).options(max_retries=DEFAULT_RETRIES, retry_exceptions=False)
        try:
            partials = ray.get([task.remote(node, given, a, b) for a, b in bounds])
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise SurgeonError(str(cause) if isinstance(cause, SurgeonError) else
                               f"{node.label}: map task failed on the Ray cluster: {cause!r}") from None
        acc = partials[0]
        for part in partials[1:]:
            acc = node.merge(acc, part)
    values[id(node)] = node.finish(acc)
    return values[id(node)]


def reduce_chunk(node: Reduce, given: list[Any], start: int, stop: int) -> Any:
    """Runs on a worker (or here): the fold of ``node`` over its streamed inputs ``start:stop``."""
    from surgeon.graph import Executor

    chunk = node.streamed[start:stop]
    executor = Executor(list(chunk))

    def values():
        for x in chunk:
            v = executor.value(x)
            yield v
            del v
            executor.release(x)

    return node.fold(given, values(), start)


def shard_graph(graph: Graph, plan: ShardPlan) -> Graph:
    """The part of ``graph`` one shard needs: its tensors (with their inputs) and the component layout."""
    from surgeon.graph import Graph

    return Graph({n: graph[n] for n in plan.names}, weight_stems=dict(graph.weight_stems))


def shard_memory(graph: Graph, plan: ShardPlan, budget: int) -> int:
    """Bytes one shard task holds at most: its pipeline's in-flight budget, at least its largest tensor's
    footprint, plus a worker's overhead."""
    from surgeon.executor import largest_task

    largest = largest_task(graph, plan.names)
    return min(budget, max(largest, 64 << 20)) + largest + TASK_OVERHEAD


def write_shard_task(graph: Graph, plan: ShardPlan, folder: str, budget: int, allow_nonfinite: bool) -> int:
    """Runs on a worker: write one shard under a temporary name, rename it when complete."""
    from surgeon.writer import write_shard_file

    root = Path(folder)
    if not root.is_dir():  # the run failed and its temporary folder is gone: never recreate it
        raise SurgeonError(f"shard {plan.file}: output folder {root} no longer exists")
    final = root / plan.file
    final.parent.mkdir(exist_ok=True)  # a component's subfolder (unet/, text_encoder/)
    part = final.with_name(f"{final.name}.part-{uuid.uuid4().hex[:8]}")
    try:
        write_shard_file(graph, plan, part, budget=budget, allow_nonfinite=allow_nonfinite)
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return plan.nbytes


def write_shards_on_ray(graph: Graph, plans: list[ShardPlan], tmp: Path, *, budget: int, allow_nonfinite: bool,
                        on_shard: Callable[[int], None], max_retries: int = DEFAULT_RETRIES) -> None:
    """Write every planned shard into ``tmp`` with one Ray task each; raise the first task's error."""
    ray = connect()
    names = [n for p in plans for n in p.names]
    resolved = reductions_resolved(graph, names, ray)
    task = ray.remote(write_shard_task)
    pending = {}
    for plan in plans:
        part = shard_graph(resolved, plan)
        ref = task.options(memory=shard_memory(part, plan, budget), max_retries=max_retries,
                           retry_exceptions=False).remote(part, plan, str(tmp), budget, allow_nonfinite)
        pending[ref] = plan
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(done[0])
            try:
                on_shard(ray.get(done[0]))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, SurgeonError):
                    raise SurgeonError(str(cause)) from None
                raise SurgeonError(f"shard {plan.file}: task failed on the Ray cluster: "
                                   f"{cause!r}" if cause is not None else str(e).strip().splitlines()[-1]) from None
            except ray.exceptions.RayError as e:
                raise SurgeonError(f"shard {plan.file}: task failed on the Ray cluster after {max_retries} "
                                   f"retries: {type(e).__name__}") from None
    finally:
        for ref in pending:  # after a failure: stop the other shards and wait until none can still write
            ray.cancel(ref, force=True)
        for ref in pending:
            try:
                ray.get(ref, timeout=120)
            except Exception:  # noqa: BLE001, S110 - cancelled or failed: either way it no longer writes
                pass
        for leftover in tmp.rglob("*.part-*"):
            leftover.unlink(missing_ok=True)


def dry_run_tasks(graph: Graph, plans: list[ShardPlan], budget: int) -> list[dict[str, Any]]:
    """What ``--executor ray`` would submit: one task per shard with its tensors, bytes and memory request."""
    return [{"shard": p.file, "tensors": len(p.names), "bytes": p.nbytes,
             "memory_bytes": shard_memory(shard_graph(graph, p), p, budget)} for p in plans]
