"""The package's import graph, read statically with ``ast``: no cycle inside headsup_core, and no import that
goes up a layer (front ends -> engine -> policy -> leaf: geometry and primitives). Every module must be given a
layer below, so a new module cannot slip past. Imports inside functions count like module-level ones."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("headsup_core", "nodes", "scripts")
LAYERS = ("leaf", "policy", "engine", "frontend")

# Module (or whole subpackage, ending in ".") -> layer.
LAYER_OF = {
    # leaf: geometry (sizes, the tile grid) and primitives that know nothing of models, budgets or requests
    "headsup_core.errors": "leaf",
    "headsup_core.version": "leaf",
    "headsup_core.choices": "leaf",
    "headsup_core.geometry": "leaf",
    "headsup_core.tiling": "leaf",
    "headsup_core.devices": "leaf",
    "headsup_core.spill": "leaf",
    "headsup_core.upsample": "leaf",
    "headsup_core.color": "leaf",
    "headsup_core.imageio": "leaf",
    "headsup_core.licences": "leaf",
    "headsup_core.model_paths": "leaf",
    "headsup_core.degradations": "leaf",
    "headsup_core.files.": "leaf",
    # policy: what to do (budget and estimates, the plan, precision, options, the backend interface)
    "headsup_core.memory": "policy",
    "headsup_core.planner": "policy",
    "headsup_core.precision": "policy",
    "headsup_core.perf": "policy",
    "headsup_core.options": "policy",
    "headsup_core.backend": "policy",
    # engine: doing it (model maths, tiled runs, loading, faces, the pipeline and its retry runner)
    "headsup_core.model": "engine",
    "headsup_core.tiled_vae": "engine",
    "headsup_core.tiled_vae_ldm": "engine",
    "headsup_core.stages": "engine",
    "headsup_core.pipeline": "engine",
    "headsup_core.runner": "engine",
    "headsup_core.blend": "engine",
    "headsup_core.batch": "engine",
    "headsup_core.batch_ray": "frontend",  # the CLI's folder mode on a Ray cluster
    # test fixtures: tiny random models in the real formats (make-tiny); nothing in the engine imports them
    "headsup_core.testing.": "engine",
    "headsup_core.testing": "engine",
    "headsup_core.loading.": "engine",
    "headsup_core.faces.": "engine",
    "headsup_core.tags.": "engine",
    # front ends: the package's public face (its __init__ hands out HeadsUpPipeline), CLI, doctor, training and
    # eval CLIs, ComfyUI nodes, the A1111 script
    "headsup_core": "frontend",
    "headsup_core.cli": "frontend",
    "headsup_core.doctor": "frontend",
    "headsup_core.tags.cli": "frontend",
    "headsup_core.train.": "frontend",
    "headsup_core.eval.": "frontend",
    "nodes.": "frontend",
    "scripts.": "frontend",
}
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()  # none: every cycle is a failure


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules ``name`` imports (an imported name that is a module counts as that module)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "pkg.mod.attr" -> "pkg.mod"
                t = t.rpartition(".")[0]
            # The root package is imported before any of its modules anyway (``from .. import __version__``)
            if t and t != name and t not in PACKAGES:
                found.add(t)
    return found


def _layer(module: str) -> str | None:
    if module in LAYER_OF:
        return LAYER_OF[module]
    prefixes = [p for p in LAYER_OF if p.endswith(".") and (module + ".").startswith(p)]
    return LAYER_OF[max(prefixes, key=len)] if prefixes else None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, f"assign these modules a layer in LAYER_OF: {missing}"


def test_no_import_goes_up_a_layer():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in _graph().items()
                    for t in targets if _layer(m) and _layer(t) and rank[_layer(t)] > rank[_layer(m)])
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_headsup_core():
    graph = {m: {t for t in ts if t.startswith("headsup_core") and (m, t) not in KNOWN_CYCLE_EDGES}
             for m, ts in _graph().items() if m.startswith("headsup_core")}
    assert not _cycles(graph), _cycles(graph)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _graph()
    assert "headsup_core.geometry" in graph["headsup_core.planner"]  # imports are seen
    assert _layer("headsup_core.planner") == "policy" and _layer("headsup_core.faces.condition") == "engine"
    assert _layer("headsup_core.brand_new_module") is None  # a new top-level module must be assigned
