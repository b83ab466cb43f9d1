"""The package's layers, read from its imports: checked (``--check``) and drawn (``--draw FILE.png``).

    python scripts/architecture.py --check                     # every violation; exit status 1 if any
    python scripts/architecture.py --draw docs/architecture.png [--tiny]

Every ``import``/``from ... import`` of a qwen2_jax module (at module level or inside a function, relative ones
resolved, ``importlib.import_module("...")`` with a literal name too) is an edge of the graph. A module may
import only from its own layer or the ones below it, never from its sibling, and never through an old path of
``qwen2_jax.MOVED``; from the root facade it may take ``__version__`` and the error classes, its other names
only in tools and cli. No import cycle, no module over 700 lines, no class over 300 (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRS = {"qwen2_jax": "qwen2_jax", "convert": "qwen2_jax.convert", "sharding": "qwen2_jax.sharding"}
# Bottom to top: one row per level, siblings side by side. The root package (a lazy facade over errors) sits
# with errors; every other module belongs to the layer whose prefix it has.
LEVELS = [["errors"], ["model"], ["sharding", "convert"], ["loading"], ["inference", "training"], ["tools"], ["cli"]]
LEVEL = {layer: i for i, row in enumerate(LEVELS) for layer in row}
FACADE_USERS = {"tools", "cli"}  # who may take the facade's names (any module: its __version__ and errors)
MAX_MODULE_LINES, MAX_CLASS_LINES = 700, 300


def layer_of(module: str) -> str | None:
    if module == "qwen2_jax":
        return "errors"
    head = module.split(".")[1] if module.count(".") else None
    return head if head in LEVEL else None


def _root_table(name: str) -> dict:
    """A dict literal assigned at the top of qwen2_jax/__init__.py (``_EXPORTS``, ``MOVED``)."""
    for node in ast.parse((ROOT / "qwen2_jax/__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def modules() -> dict[str, tuple[Path, ast.Module, int]]:
    """Module name -> (file, syntax tree, line count), for every .py file of the package."""
    out = {}
    for directory, package in DIRS.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            parts = path.relative_to(ROOT / directory).with_suffix("").parts
            name = ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
            text = path.read_text()
            out[name] = (path, ast.parse(text, str(path)), len(text.splitlines()))
    return out


def imports(mods) -> list[tuple[str, str, int, str, str]]:
    """Every import of a package module: (importer, imported module, line, as written, "" | "facade" | "moved")."""
    exports, moved = _root_table("_EXPORTS"), _root_table("MOVED")
    edges = []
    for name, (path, tree, _) in mods.items():
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        for node in ast.walk(tree):
            targets = []  # (module, as written, kind)
            if isinstance(node, ast.Import):
                targets = [(a.name, f"import {a.name}", "") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
                base = ".".join(filter(None, [base, node.module]))
                how = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in mods or sub in moved:
                        targets.append((sub, how, ""))
                    elif base == "qwen2_jax" and a.name in exports:
                        targets.append((exports[a.name], how, "facade"))
                    else:
                        targets.append((base, how, ""))
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                targets = [(node.args[0].value, f"import_module({node.args[0].value!r})", "")]
            for target, how, kind in targets:
                if target.split(".")[0] == "qwen2_jax" and target != name:
                    edges.append((name, moved.get(target, target), node.lineno, how, "moved" if target in moved else kind))
    return list(dict.fromkeys(edges))


def crosses(src: str, dst: str) -> str | None:
    """How an import from ``src`` to ``dst`` breaks the layering, if it does."""
    a, b = layer_of(src), layer_of(dst)
    if a and b and (LEVEL[b] > LEVEL[a] or LEVEL[b] == LEVEL[a] and a != b):
        return f"{a} imports the higher layer {b}" if LEVEL[b] > LEVEL[a] else f"{a} imports its sibling {b}"
    return None


def layer_violations(mods, edges) -> list[str]:
    out = [f"{m}: in no layer (add its subpackage to LEVELS in scripts/architecture.py)"
           for m in mods if layer_of(m) is None]
    for src, dst, line, how, kind in edges:
        a, b = layer_of(src), layer_of(dst)
        where = f"{src}:{line} `{how}`"
        if b is None or dst not in mods:
            out.append(f"{where}: {dst} is no module of the package")
        elif crosses(src, dst):
            out.append(f"{where}: {crosses(src, dst)}")
        if kind == "facade" and a not in FACADE_USERS:
            out.append(f"{where}: only {' and '.join(sorted(FACADE_USERS))} take the facade's names; import {dst}")
        if kind == "moved":
            out.append(f"{where}: an old path (qwen2_jax.MOVED); import {dst}")
    return out


def cycles(edges) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    graph = {}
    for src, dst, *_ in edges:
        graph.setdefault(src, set()).add(dst)
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop()), on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def size_violations(mods) -> list[str]:
    out = [f"{m}: {n} lines (at most {MAX_MODULE_LINES})" for m, (_, _, n) in mods.items() if n > MAX_MODULE_LINES]
    for m, (_, tree, _) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                out.append(f"{m}.{node.name}: a class of {node.end_lineno - node.lineno + 1} lines "
                           f"(at most {MAX_CLASS_LINES})")
    return out


def check() -> list[str]:
    mods = modules()
    edges = imports(mods)
    return [*layer_violations(mods, edges), *(f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)),
            *size_violations(mods)]


FLOW = {"checkpoint": ((0.45, 0.95), "HF safetensors, or Orbax\n(convert: HF -> Orbax)"),
        "params": ((0.45, 0.80), "model.params table\n+ sharding rules"),
        "model": ((0.45, 0.64), "model.modeling\n(loading.from_pretrained)"),
        "generate": ((0.17, 0.45), "inference.generate\n(+ sampling, tokenizer)"),
        "engine": ((0.50, 0.45), "inference.serving\n(continuous batching)"),
        "server": ((0.50, 0.28), "serving.server\n(OpenAI HTTP)"), "data": ((0.83, 0.80), "token ids + labels"),
        "trainer": ((0.83, 0.45), "training\n(loss, step, checkpoint)")}
FLOW_EDGES = [("checkpoint", "params"), ("params", "model"), ("model", "generate"), ("model", "engine"),
              ("engine", "server"), ("model", "trainer"), ("data", "trainer")]


def draw(path: str, tiny: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    mods = modules()
    edges = imports(mods)
    wrong = {(s, d) for s, d, *_ in edges if crosses(s, d)}
    red = {s for s, _ in wrong} | {m for c in cycles(edges) for m in c}
    fig = plt.figure(figsize=(20, 13))
    ax, flow = fig.add_axes([0.01, 0.03, 0.71, 0.92]), fig.add_axes([0.73, 0.30, 0.265, 0.62])
    for a in (ax, flow):
        a.set_xlim(0, 1), a.set_ylim(0, 1), a.axis("off")
    fig.suptitle("qwen2_jax: the layers (imports only go down) and the data flow", fontsize=17, y=0.985)
    summary = Counter((layer_of(s), layer_of(d)) for s, d, *_ in edges if layer_of(s) != layer_of(d))
    members = {layer: sorted(m for m in mods if layer_of(m) == layer) for layer in LEVEL}
    fit = {layer: int(8 / len(row)) for row in LEVELS for layer in row}  # boxes in a row of the band
    rows = [max(-(-len(members[layer]) // fit[layer]) for layer in row) for row in LEVELS]
    unit, at, y0 = 1 / sum(1 + 1.6 * r for r in rows), {}, 0.0
    for level, row in enumerate(LEVELS):
        band, bh = unit * (1 + 1.6 * rows[level]), unit * 1.6
        for k, layer in enumerate(row):
            x0, w = k / len(row), 1 / len(row)
            ax.add_patch(FancyBboxPatch((x0 + 0.004, y0 + 0.004), w - 0.008, band - 0.008, fc=plt.cm.Pastel1(level),
                                        boxstyle="round,pad=0,rounding_size=0.01", ec="0.4"))
            uses = sorted(((b, n) for (a, b), n in summary.items() if a == layer), key=lambda t: -LEVEL[t[0]])
            ax.text(x0 + 0.012, y0 + band - 0.012, layer + ("   imports: " + ", ".join(f"{b} {n}" for b, n in uses)
                    if uses else ""), va="top", fontsize=11.5, weight="bold")
            per_row = -(-len(members[layer]) // -(-len(members[layer]) // fit[layer]))
            cw = w / max(per_row, fit[layer] * 0.6)
            for i, m in enumerate(members[layer]):
                r, c = divmod(i, per_row)
                bx, by = x0 + c * cw, y0 + band - unit * 0.9 - (r + 1) * bh
                label = (m.removeprefix(f"qwen2_jax.{layer}").lstrip(".") or m.rpartition(".")[2]).replace(".", "/")
                if mods[m][0].name == "__init__.py":
                    label = "__init__" if m == f"qwen2_jax.{layer}" else f"{label}/__init__"
                label = "qwen2_jax (facade)" if m == "qwen2_jax" else label
                n, bad = mods[m][2], m in red or mods[m][2] > MAX_MODULE_LINES
                ax.add_patch(FancyBboxPatch((bx + 0.006, by + 0.12 * bh), cw - 0.012, 0.8 * bh, lw=2.2 if bad else 1,
                                            boxstyle="round,pad=0,rounding_size=0.006", fc="white",
                                            ec="red" if bad else "0.3"))
                ax.text(bx + cw / 2, by + 0.52 * bh, f"{label}\n{n} lines", ha="center", va="center",
                        fontsize=9.5 if len(label) < 19 else 8, color="red" if bad else "black")
                at[m] = (bx + cw / 2, by + 0.52 * bh)
        y0 += band
    for s, d in wrong:
        if s in at and d in at:
            ax.annotate("", xy=at[d], xytext=at[s], arrowprops=dict(arrowstyle="-|>", color="red", lw=1.8,
                        connectionstyle="arc3,rad=0.15", shrinkA=14, shrinkB=14))
    ax.text(0.0, -0.008, "'imports: X n': n imports of modules of layer X.   Red: a module or an import that breaks a "
            "rule (python scripts/architecture.py --check).", fontsize=10, va="top", color="0.25")
    flow.set_title("data flow", fontsize=14)
    for key, ((x, y), text) in FLOW.items():
        flow.text(x, y, f"{key}\n{text}", ha="center", va="center", fontsize=10, bbox=dict(
            boxstyle="round", fc="lightyellow" if key in ("data", "trainer") else "aliceblue", ec="0.4"))
    for a, b in FLOW_EDGES:
        flow.annotate("", xy=FLOW[b][0], xytext=FLOW[a][0], arrowprops=dict(arrowstyle="-|>", color="0.3", lw=1.5,
                      shrinkA=26, shrinkB=26))
    fig.savefig(path, dpi=30 if tiny else 110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print every violation; exit status 1 if any")
    parser.add_argument("--draw", metavar="FILE.png", help="draw the layers and the data flow")
    parser.add_argument("--tiny", action="store_true", help="draw at a low resolution (the tests)")
    args = parser.parse_args(argv)
    if not (args.check or args.draw):
        parser.error("give --check or --draw FILE.png")
    if args.draw:
        draw(args.draw, args.tiny)
        print(f"wrote {args.draw}")
    if args.check:
        found = check()
        print("\n".join(found) if found else "no violations")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
