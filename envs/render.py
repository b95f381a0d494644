"""What an env shows a person debugging a policy: ``render_mode="ansi"`` (text) and
``render_mode="rgb_array"`` (an image), both read from the engine's state. Numpy only.

* ``render_text``: the clock, the trees (live, done, failed), the pending decision, and per
  replica its KV use (owned / cached-free / free blocks), its running calls and its waiting
  queue (the first few of each, with tree, role, context and progress), then the oldest trees
  in flight.
* ``render_image``: an (H, W, 3) uint8 array. Top: one square per tree released so far, in the
  tree's colour while it is live, dim grey once done, red if it failed. Below, per replica: a
  usage bar (owned | cached-free | free, to scale) and the KV cache as a grid of cells, a block
  owned by a running call in its tree's colour, a cached prefix block with no owner light
  grey-blue, a free block dark grey. A cache with more blocks than the grid holds is shown with
  several blocks per cell, the cell's colour their mean (a half-used cell looks half as
  bright). A white frame marks the replica of the pending decision.

Colours: tree ``i`` has hue ``i x 0.618`` (the golden ratio spreads neighbours apart), so a
tree keeps its colour across frames and replicas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servegym.envs.engine.calls import CallState

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.policy import Decision

RENDER_MODES = ("ansi", "rgb_array")
"""The render modes every servegym env accepts (besides None)."""

WIDTH_PX = 640
CELL_PX = 4  # the smallest KV cell: 3 px of colour and a 1 px gap
MAX_CELL_PX = 16  # a small cache gets larger cells, so its panel is about PANEL_PX tall
PANEL_PX = 160
MAX_GRID_ROWS = PANEL_PX // CELL_PX  # per replica; more blocks than fit share cells
TREE_PX = 8  # a tree square: 7 px and a 1 px gap
MAX_TREE_ROWS = 6

FREE_RGB = np.array([45, 45, 45], dtype=np.uint8)
CACHED_RGB = np.array([150, 160, 185], dtype=np.uint8)
DONE_RGB = np.array([90, 90, 90], dtype=np.uint8)
FAILED_RGB = np.array([220, 30, 30], dtype=np.uint8)
BACKGROUND_RGB = np.array([0, 0, 0], dtype=np.uint8)
FRAME_RGB = np.array([255, 255, 255], dtype=np.uint8)


def tree_colours(job_indices: np.ndarray) -> np.ndarray:
    """(N, 3) uint8: a saturated colour per tree index (HSV with hue = i x golden ratio)."""
    hue = np.mod(np.asarray(job_indices, dtype=np.float64) * 0.6180339887, 1.0)
    saturation, value = 0.75, 0.95
    sector = np.floor(hue * 6.0).astype(int) % 6
    f = hue * 6.0 - np.floor(hue * 6.0)
    q = value * (1 - f * saturation)
    t = value * (1 - (1 - f) * saturation)
    v = np.full_like(hue, value)
    p = np.full_like(hue, value * (1 - saturation))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((len(hue), 3))
    for index, (r, g, b) in enumerate(table):
        rows = sector == index
        rgb[rows] = np.stack([r[rows], g[rows], b[rows]], axis=1)
    return np.round(rgb * 255).astype(np.uint8)


# ---------------------------------------------------------------------------- state
def block_owners(engine: Engine, replica_index: int) -> np.ndarray:
    """(num_blocks,) int: the engine job index owning each block of a replica's GPU cache
    (the first running call holding it), -1 for a block no call holds."""
    replica = engine.replicas[replica_index]
    owners = np.full(replica.blocks.num_blocks, -1, dtype=np.int64)
    calls = engine.calls
    for call in reversed(list(replica.running)):  # reversed: the first holder's colour wins
        table = calls.blocks[call]
        if table:
            owners[np.asarray(table, dtype=np.int64)] = calls.job[call]
    return owners


def block_states(engine: Engine, replica_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(owners, cached): the owners (see ``block_owners``) and a bool mask of unowned blocks
    that still hold a reusable prefix (referenced by nobody, hash still published)."""
    blocks = engine.replicas[replica_index].blocks
    owners = block_owners(engine, replica_index)
    referenced = np.asarray(blocks.ref_count, dtype=np.int64) > 0
    hashed = np.fromiter((h is not None for h in blocks.block_hash), dtype=bool, count=blocks.num_blocks)
    owners[(owners < 0) & referenced] = -2  # held by a call that is not running (pinned, in flight)
    return owners, (owners == -1) & hashed


def tree_status(engine: Engine) -> np.ndarray:
    """(J,) int per tree released so far: 0 live, 1 done, 2 failed."""
    jobs = len(engine.jobs)
    finish = engine.job_table.finish_s[:jobs]
    failed = engine.job_table.failed[:jobs]
    status = np.where(np.isnan(finish), 0, 1)
    status[failed] = 2
    return status


# ---------------------------------------------------------------------------- text
def render_text(engine: Engine | None, decision: Decision | None = None, max_rows: int = 6) -> str:
    """The ``"ansi"`` view: a few lines a person can read between steps."""
    if engine is None:
        return "servegym: no episode (call reset())\n"
    status = tree_status(engine)
    lines = [
        f"t={engine.now_s:.3f} s  trees: {int((status == 0).sum())} live, {int((status == 1).sum())} done, "
        f"{int((status == 2).sum())} failed of {len(status)} released; calls rejected: "
        f"{int((engine.calls.state[: engine.calls.size] == CallState.REJECTED).sum())}",
        f"decision: {_decision_line(decision)}",
    ]
    calls = engine.calls
    for index, replica in enumerate(engine.replicas):
        owners, cached = block_states(engine, index)
        total = len(owners)
        owned = int((owners != -1).sum())
        lines.append(
            f"replica {index} ({replica.profile.name}): KV {_bar(owned, int(cached.sum()), total)} "
            f"{owned / total:5.1%} owned, {int(cached.sum())} cached-free, {total - owned - int(cached.sum())} "
            f"free of {total} blocks; running {len(replica.running)}, waiting {len(replica.waiting)}"
        )
        for label, queue in (("running", list(replica.running)), ("waiting", list(replica.waiting))):
            for call in queue[:max_rows]:
                lines.append(f"  {label:7s} {_call_line(engine, call)}")
            if len(queue) > max_rows:
                lines.append(f"  {label:7s} ... {len(queue) - max_rows} more")
    live = np.flatnonzero(status == 0)
    if len(live):
        oldest = live[np.argsort(engine.job_table.arrival_s[live], kind="stable")][:max_rows]
        lines.append(f"trees in flight ({len(live)}; oldest first):")
        done = np.bincount(
            calls.job[: calls.size][calls.state[: calls.size] == CallState.FINISHED], minlength=len(status)
        )
        for job in oldest:
            tree = engine.jobs[job]
            lines.append(
                f"  {tree.job_id} ({tree.kind}, tenant {tree.tenant}): {int(done[job])}/{len(tree.calls)} calls "
                f"done, age {engine.now_s - engine.job_table.arrival_s[job]:.2f} s"
            )
    return "\n".join(lines) + "\n"


def _decision_line(decision: Decision | None) -> str:
    if decision is None:
        return "none pending"
    return f"{decision.kind.name} on replica {decision.replica}, {len(decision)} candidates"


def _bar(owned: int, cached: int, total: int, width: int = 20) -> str:
    filled = round(width * owned / total) if total else 0
    shaded = min(width - filled, round(width * cached / total)) if total else 0
    return "[" + "#" * filled + "+" * shaded + "." * (width - filled - shaded) + "]"


def _call_line(engine: Engine, call: int) -> str:
    calls = engine.calls
    job = engine.jobs[int(calls.job[call])]
    role = engine.trees.spec(call).role  # a continuation's call lies past its job's calls
    return (
        f"{job.job_id}/c{int(calls.call_in_job[call])} {role:10s} prompt {int(calls.prompt_tokens[call])} "
        f"out {int(calls.num_output[call])}/{int(calls.max_tokens[call])} blocks {int(calls.num_held_blocks[call])}"
    )


# ---------------------------------------------------------------------------- image
def render_image(engine: Engine | None, decision: Decision | None = None) -> np.ndarray:
    """The ``"rgb_array"`` view: an (H, W, 3) uint8 image (see the module docstring)."""
    if engine is None:
        return np.zeros((CELL_PX, WIDTH_PX, 3), dtype=np.uint8)
    panels = [_tree_strip(engine)]
    for index in range(len(engine.replicas)):
        framed = decision is not None and decision.replica == index
        panels.append(_replica_panel(engine, index, framed))
    gap = np.zeros((CELL_PX, WIDTH_PX, 3), dtype=np.uint8)
    stacked: list[np.ndarray] = []
    for panel in panels:
        stacked += [panel, gap]
    return np.ascontiguousarray(np.concatenate(stacked[:-1], axis=0))


def _tree_strip(engine: Engine) -> np.ndarray:
    status = tree_status(engine)
    per_row = WIDTH_PX // TREE_PX
    shown = status[-per_row * MAX_TREE_ROWS :]  # the newest trees when there are more
    first = len(status) - len(shown)
    colours = tree_colours(np.arange(first, len(status)))
    colours[shown == 1] = DONE_RGB
    colours[shown == 2] = FAILED_RGB
    rows = max(1, -(-len(shown) // per_row))
    return _grid(colours, rows, per_row, TREE_PX)


def _replica_panel(engine: Engine, index: int, framed: bool) -> np.ndarray:
    owners, cached = block_states(engine, index)
    total = len(owners)
    colours = np.empty((total, 3), dtype=np.float64)
    colours[:] = FREE_RGB
    colours[cached] = CACHED_RGB
    held = owners == -2
    colours[held] = DONE_RGB
    owned = owners >= 0
    colours[owned] = tree_colours(owners[owned])
    cell_px = int(np.clip(np.sqrt(WIDTH_PX * PANEL_PX / max(total, 1)), CELL_PX, MAX_CELL_PX))
    per_row = WIDTH_PX // cell_px
    per_cell = max(1, -(-total // (per_row * MAX_GRID_ROWS)))
    cells = -(-total // per_cell)
    padded = np.zeros((cells * per_cell, 3))
    padded[:total] = colours
    weights = np.zeros(cells * per_cell)
    weights[:total] = 1.0
    sums = padded.reshape(cells, per_cell, 3).sum(axis=1)
    counts = weights.reshape(cells, per_cell).sum(axis=1)[:, None]
    cell_colours = np.round(sums / counts).astype(np.uint8)
    grid = _grid(cell_colours, -(-cells // per_row), per_row, cell_px)
    panel = np.concatenate(
        [_usage_bar(int(owned.sum() + held.sum()), int(cached.sum()), total), grid], axis=0
    )
    if framed:
        panel[0, :] = panel[-1, :] = FRAME_RGB
        panel[:, 0] = panel[:, -1] = FRAME_RGB
    return panel


def _usage_bar(owned: int, cached: int, total: int, height: int = 2 * CELL_PX) -> np.ndarray:
    bar = np.empty((height, WIDTH_PX, 3), dtype=np.uint8)
    bar[:] = FREE_RGB
    owned_px = round(WIDTH_PX * owned / total) if total else 0
    cached_px = round(WIDTH_PX * cached / total) if total else 0
    bar[:, :owned_px] = (255, 200, 60)
    bar[:, owned_px : owned_px + cached_px] = CACHED_RGB
    return bar


def _grid(colours: np.ndarray, rows: int, per_row: int, cell_px: int) -> np.ndarray:
    """Cells of ``cell_px`` (a 1 px gap right and below), row-major, on the background."""
    image = np.zeros((rows * cell_px, WIDTH_PX, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    if not len(colours):
        return image
    slots = np.zeros((rows * per_row, 3), dtype=np.uint8)
    slots[: len(colours)] = colours
    blocks = slots.reshape(rows, per_row, 1, 1, 3)
    tiles = np.broadcast_to(blocks, (rows, per_row, cell_px, cell_px, 3)).copy()
    tiles[:, :, -1, :, :] = BACKGROUND_RGB  # the gaps
    tiles[:, :, :, -1, :] = BACKGROUND_RGB
    tiles.reshape(rows * per_row, cell_px, cell_px, 3)[len(colours) :] = BACKGROUND_RGB  # unused slots
    body = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * cell_px, per_row * cell_px, 3)
    image[:, : per_row * cell_px] = body
    return image


__all__ = [
    "RENDER_MODES",
    "block_owners",
    "block_states",
    "render_image",
    "render_text",
    "tree_colours",
    "tree_status",
]
