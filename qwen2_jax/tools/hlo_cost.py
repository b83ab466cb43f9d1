"""What a compiled XLA program moves through memory, read from its optimized HLO text.

A kernel is what runs on the device: a fusion, a custom call (a cuBLAS gemm, a Pallas kernel), a copy, a
collective, or an unfused op. For each one this counts the bytes it reads and writes:

- a fusion reads each operand in full, except where every use inside it is a (dynamic-)slice or gather: then
  only the sliced bytes (a weight picked out of a larger array in place); an operand updated in place by a
  dynamic-update-slice is not read, and only the update is written; a convolution whose input is cut by
  negative padding reads only the rows its window reaches (XLA:TPU's form of a product over a slice);
- loops weigh their bodies by the trip count XLA annotated (or, on TPU, the ``i < N`` of a counted loop); a
  data-dependent ``while_loop`` counts as ``loop_bound`` trips (1 when not given; a callable gets the names of
  the Python functions that made the loop, innermost first, from the HLO's stack frames), except, with
  ``step_loop``, the first one of the entry computation: the decode loop, whose body is one step;
  ``unknown_trip_loops`` says how many data-dependent loops were counted; a conditional counts its most
  expensive branch.

``weight_copy_bytes`` is what kernels that read a weight (an entry parameter named in ``weight_params``)
write without computing on it (no dot, convolution or reduction inside): copies, transposes, gathers,
concatenations and casts of weights, each a temporary the step then reads again.

Per-device: under SPMD the HLO holds each device's shard, so every figure is one device's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a TPU layout's memory space: VMEM, SMEM (not HBM)
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) (\(.*\)) -> (.*) \{$")
_INSTR = re.compile(r"^\s+(ROOT )?%?([\w.\-]+) = (.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|async_execution_thread)=([^,]*(?:\{[^}]*\})?)")

FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
        "opt-barrier", "partition-id", "replica-id", "domain", "all-reduce-done", "all-gather-done",
        "collective-permute-done", "copy-done", "async-done", "async-update", "send-done", "recv-done"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
COMPUTE = {"dot", "convolution", "reduce", "reduce-window", "sort", "ragged-dot", "scaled-dot", "select-and-scatter"}
SLICING = {"slice", "dynamic-slice", "gather"}
# Inside a fusion these compute each element from the same element of their operand, on demand: a slice of
# their result reads only the slice (XLA:TPU re-tiles an int8 weight with a copy nested in the fusion that
# slices one expert out of it). A fusion's root is still written whole (``_reads``).
PASS_THROUGH = {"bitcast", "reshape", "get-tuple-element", "copy"}


def shape_bytes(shape: str, hbm_only: bool = True) -> int:
    """HBM bytes of every array in a shape string (a tuple sums its elements); an array in a TPU core's own
    memory (a layout with memory space ``S(1)``, VMEM, or ``S(2)``) is not in HBM and counts nothing unless
    ``hbm_only`` is false."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if hbm_only and layout and _ON_CHIP.search(layout):
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return int(total)


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool
    literal: str = ""  # a constant's value

    def calls(self, key: str | None = None) -> list[str]:
        out = []
        for k, v in _CALLS.findall(self.attrs):
            if key is None or k == key:
                out += [c.strip().lstrip("%") for c in v.strip("{}").split(",") if c.strip()]
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def bytes(self) -> int:
        return shape_bytes(self.shape)


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instrs: list[Instr]

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}
        self.params = {_param_index(i): i.name for i in self.instrs if i.opcode == "parameter"}
        self.root = next((i for i in self.instrs if i.root), self.instrs[-1] if self.instrs else None)
        self.users: dict[str, list[Instr]] = {}
        for i in self.instrs:
            for o in i.operands:
                self.users.setdefault(o, []).append(i)


def _param_index(instr: Instr) -> int:
    return int(instr.operands[0]) if instr.operands and instr.operands[0].isdigit() else 0


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in HLO: {text[:120]}")


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(_COMMENT.sub("", line))
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    opcode = op.group(1)
    start = op.end() - 1
    end = _matching(rest, start)
    args, attrs = rest[start + 1:end], rest[end + 1:]
    if opcode == "constant":
        operands = []
    elif opcode == "parameter":
        operands = [args.strip()]
    else:
        operands = [a.split()[-1].lstrip("%") for a in _split_top(args)]
    return Instr(name, shape, opcode, operands, attrs, root, args if opcode == "constant" else "")


def stack_functions(text: str) -> dict[int, list[str]]:
    """Per stack frame id of the HLO's tables, the Python functions of its stack, innermost first."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(line, {})
        elif not line.strip():
            section = None
        elif section is not None:
            key, _, value = line.partition(" ")
            section[int(key)] = value
    names = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    location = {k: int(re.search(r"function_name_id=(\d+)", v).group(1))
                for k, v in tables.get("FileLocations", {}).items()}
    frames = {k: (int(re.search(r"file_location_id=(\d+)", v).group(1)),
                  int(re.search(r"parent_frame_id=(\d+)", v).group(1)) - 1)  # printed one past the parent's id
              for k, v in tables.get("StackFrames", {}).items()}
    out = {}
    for frame in frames:
        chain, f = [], frame
        while f in frames and len(chain) < 64:
            chain.append(names.get(location.get(frames[f][0], 0), "?"))
            f = frames[f][1]
        out[frame] = chain
    return out


def parse(text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name."""
    comps: dict[str, Computation] = {}
    current: list[Instr] | None = None
    name, entry = "", False
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                entry, name, current = bool(m.group(1)), m.group(2), []
            continue
        if line.startswith("}"):
            comps[name] = Computation(name, entry, current)
            current = None
            continue
        instr = _parse_instr(line)
        if instr is not None:
            current.append(instr)
    return comps


@dataclasses.dataclass
class Kernel:
    name: str
    opcode: str
    kind: str  # fusion kind, custom-call target, or the opcode
    read: int
    written: int
    weight_copy: int  # bytes written that copy a weight
    runs: float  # times per program run (loop trip counts multiplied)
    where: str  # the computation it runs in
    flops: int = 0  # of its matrix products (dots, and XLA:TPU's convolutions)


@dataclasses.dataclass
class Report:
    kernels: list[Kernel]
    unknown_trip_loops: int
    collectives: list[dict]

    @property
    def bytes(self) -> float:
        return sum((k.read + k.written) * k.runs for k in self.kernels)

    @property
    def weight_copy_bytes(self) -> float:
        return sum(k.weight_copy * k.runs for k in self.kernels)

    @property
    def count(self) -> float:
        return sum(k.runs for k in self.kernels)

    @property
    def flops(self) -> float:
        return sum(k.flops * k.runs for k in self.kernels)

    def top(self, n: int = 10) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -(k.read + k.written) * k.runs)[:n]


class Analyzer:
    def __init__(self, text: str, weight_params: set[int] | None = None, *, step_loop: bool = False,
                 loop_bound=None):
        self.comps = parse(text)
        self.frames = stack_functions(text)
        self.entry = next(c for c in self.comps.values() if c.entry)
        self.weight_params = set(weight_params or ())
        self.kernels: list[Kernel] = []
        self.collectives: Counter = Counter()
        self.unknown = 0
        self.step_loop, self.loop_bound = step_loop, loop_bound

    # ---- data flow: which values are (views of) weights ---------------------------------------------------
    def _origin(self, comp: Computation, name: str, params: dict, memo: dict):
        """A frozenset of weight parameter indices (or a list of them for a tuple) that ``name`` passes on."""
        key = (comp.name, name)
        if key in memo:
            return memo[key]
        memo[key] = frozenset()
        i = comp.by_name.get(name)
        out = frozenset()
        if i is None:
            pass
        elif i.opcode == "parameter":
            idx = _param_index(i)
            out = params.get(idx, frozenset())
        elif i.opcode == "get-tuple-element":
            src = self._origin(comp, i.operands[0], params, memo)
            idx = int(i.attr("index") or 0)
            out = src[idx] if isinstance(src, list) and idx < len(src) else (src if isinstance(src, frozenset) else frozenset())
        elif i.opcode == "tuple":
            out = [self._origin(comp, o, params, memo) for o in i.operands]
        elif i.opcode in ("bitcast", "reshape"):
            out = self._origin(comp, i.operands[0], params, memo)
        memo[key] = out
        return out

    @staticmethod
    def _flat(origin) -> frozenset:
        if isinstance(origin, list):
            return frozenset().union(*[Analyzer._flat(o) for o in origin]) if origin else frozenset()
        return origin

    # ---- bytes of one fusion --------------------------------------------------------------------------------
    def _reads(self, comp: Computation, name: str, full: int, chain: tuple = ()) -> int:
        """Bytes of value ``name`` (of ``full`` bytes) that computation ``comp`` reads; ``chain``: the enclosing
        (computation, fusion) pairs when ``comp`` is a fusion nested in another."""
        if len(chain) > 20:
            return full
        total = 0
        instr = comp.by_name.get(name)
        if instr is not None and instr is comp.root:
            if not chain:
                return full  # the value is the fusion's output: copied out whole
            parent, fusion = chain[-1]
            total += self._reads(parent, fusion.name, full, chain[:-1])
        for u in comp.users.get(name, []):
            if u.opcode in PASS_THROUGH:
                total += self._reads(comp, u.name, full, chain)
            elif u.opcode in SLICING and u.operands[0] == name:
                total += shape_bytes(u.shape, hbm_only=False)  # into VMEM too: read from HBM all the same
            elif u.opcode in ("dynamic-update-slice", "scatter") and u.operands[0] == name:
                continue  # updated in place: the buffer is the output's
            elif u.opcode == "convolution" and u.operands[0] == name and instr is not None:
                total += math.ceil(full * _lhs_kept(u, _dims(instr.shape)))
            elif u.opcode == "fusion":
                nested = self.comps.get((u.calls("calls") or [""])[0])
                if nested is None:
                    return full
                for pos, o in enumerate(u.operands):
                    if o == name and pos in nested.params:
                        total += self._reads(nested, nested.params[pos], full, chain + ((comp, u),))
            else:
                return full
            if total >= full:
                return full
        return min(total, full)

    def _written(self, comp: Computation, instr: Instr) -> int:
        if instr.opcode == "tuple":
            return sum(self._written(comp, comp.by_name[o]) for o in instr.operands if o in comp.by_name)
        if instr.opcode in ("bitcast", "reshape") and instr.operands[0] in comp.by_name:
            return self._written(comp, comp.by_name[instr.operands[0]])
        if instr.opcode not in ("dynamic-update-slice", "scatter"):
            return instr.bytes
        # An update written in place: in HBM where the output is, from wherever it is (XLA:TPU stages it in VMEM).
        if not instr.bytes:
            return 0
        if instr.opcode == "dynamic-update-slice":
            update = comp.by_name.get(instr.operands[1])
            return shape_bytes(update.shape, hbm_only=False) if update is not None else instr.bytes
        n = (len(instr.operands) - 1) // 2
        return sum(shape_bytes(comp.by_name[o].shape, hbm_only=False) for o in instr.operands[-n:] if o in comp.by_name)

    def _computes(self, comp: Computation, depth: int = 0) -> bool:
        for i in comp.instrs:
            if i.opcode in COMPUTE:
                return True
            if i.opcode == "custom-call":
                return True
            if i.opcode == "fusion" and depth < 10:
                nested = self.comps.get((i.calls("calls") or [""])[0])
                if nested is not None and self._computes(nested, depth + 1):
                    return True
        return False

    def _flops(self, comp: Computation, depth: int = 0) -> int:
        """Floating-point operations of the matrix products in a (fused) computation: 2 x output elements x
        contracted elements."""
        total = 0
        for i in comp.instrs:
            if i.opcode == "dot":
                lhs = comp.by_name.get(i.operands[0])
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
                if lhs is not None and dims:
                    shape = _dims(lhs.shape)
                    k = math.prod(shape[int(d)] for d in dims.group(1).split(",") if d)
                    total += 2 * math.prod(_dims(i.shape)) * k
            elif i.opcode == "convolution":
                # XLA:TPU's matmuls: they contract the kernel's input-feature dim; a spatial "window" there
                # encodes a batch dim (one input position per output), so it adds no products.
                rhs = comp.by_name.get(i.operands[1]) if len(i.operands) > 1 else None
                labels = re.search(r"dim_labels=\w+_(\w+)->", i.attrs)
                if rhs is not None and labels and "i" in labels.group(1):
                    total += 2 * math.prod(_dims(i.shape)) * _dims(rhs.shape)[labels.group(1).index("i")]
            elif i.opcode == "fusion" and depth < 10:
                nested = self.comps.get((i.calls("calls") or [""])[0])
                if nested is not None:
                    total += self._flops(nested, depth + 1)
        return total

    # ---- walking the program ------------------------------------------------------------------------------
    def run(self) -> Report:
        params = {i: frozenset({i}) for i in self.weight_params}
        self._walk(self.entry, 1.0, params)
        collectives = [dict(kind=k[0], group=k[1], bytes=k[2], count=v) for k, v in sorted(self.collectives.items())]
        return Report(self.kernels, self.unknown, collectives)

    def _walk(self, comp: Computation, runs: float, params: dict) -> None:
        memo: dict = {}
        for i in comp.instrs:
            op = i.opcode
            if op in FREE or op.endswith("-done") or op.endswith("-update"):  # the other halves of async ops
                continue
            sub_params = {pos: self._origin(comp, o, params, memo) for pos, o in enumerate(i.operands)}
            if op == "while":
                trip = self._trip_count(i) or self._inferred_trip_count(comp, i)
                body, cond = self.comps.get(i.attr("body") or ""), self.comps.get(i.attr("condition") or "")
                if trip is None and self.step_loop and comp is self.entry:
                    self.step_loop, trip = False, 1  # the decode loop: its body is the step
                elif trip is None:
                    self.unknown += 1
                    trip = self.loop_bound or 1
                    if callable(trip):
                        frame = re.search(r"stack_frame_id=(\d+)", i.attrs)
                        trip = trip(self.frames.get(int(frame.group(1)), []) if frame else [])
                carried = {0: sub_params.get(0, frozenset())}
                if body is not None:
                    self._walk(body, runs * trip, carried)
                if cond is not None:
                    self._walk(cond, runs * (trip + 1), carried)
                continue
            if op == "conditional":
                branches = [self.comps[c] for c in i.calls("branch_computations") if c in self.comps]
                if not branches:  # true_computation / false_computation form
                    branches = [self.comps[c] for c in (i.attr("true_computation"), i.attr("false_computation"))
                                if c in self.comps]
                best = None
                for pos, b in enumerate(branches):
                    trial = Analyzer.__new__(Analyzer)
                    trial.__dict__.update(self.__dict__, kernels=[], collectives=Counter(), unknown=0)
                    trial._walk(b, runs, {0: sub_params.get(pos + 1, frozenset())})
                    cost = sum((k.read + k.written) * k.runs for k in trial.kernels)
                    if best is None or cost > best[0]:
                        best = (cost, trial)
                if best is not None:
                    self.kernels += best[1].kernels
                    self.collectives.update(best[1].collectives)
                    self.unknown += best[1].unknown
                continue
            if op in ("call", "async-start") and i.calls("calls") + i.calls("to_apply"):
                target = self.comps.get((i.calls("calls") + i.calls("to_apply"))[0])
                if target is not None and not target.name.startswith("fused"):
                    self._walk(target, runs, sub_params)
                    continue
            self._kernel(comp, i, runs, sub_params)

    def _kernel(self, comp: Computation, i: Instr, runs: float, operand_origin: dict) -> None:
        op = i.opcode
        operands = [comp.by_name.get(o) for o in i.operands]
        sizes = [o.bytes if o is not None else 0 for o in operands]
        kind = op
        computes = op in COMPUTE
        if op == "fusion":
            fused = self.comps.get((i.calls("calls") or [""])[0])
            kind = i.attr("kind") or "fusion"
            m = re.search(r'"kind":"([\w]+)"', i.attrs)
            if m:
                kind = m.group(1)
            if fused is None:
                per_operand, written = list(sizes), i.bytes
            else:
                per_operand = [self._reads(fused, fused.params[p], s) if p in fused.params else 0
                               for p, s in enumerate(sizes)]
                written = self._written(fused, fused.root)
                computes = self._computes(fused)
            read = sum(per_operand)
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
            kind = target.group(1) if target else "custom-call"
            read = sum(sizes)
            written = _first_array_bytes(i.shape) if "cublas" in kind or "cudnn" in kind else i.bytes
            computes = True
        elif op == "dynamic-update-slice":
            read, written = (sizes[1], self._written(comp, i)) if len(sizes) > 1 else (i.bytes, i.bytes)
        elif op in ("copy-start", "slice-start", "dynamic-slice-start"):
            # Asynchronous copies and slices, e.g. XLA:TPU prefetching (a slice of) a weight into VMEM: a copy's
            # output tuple is (result, source, context), a slice's ((operands), result, context); what is read
            # is the result's worth of the source.
            result = _tuple_element(i.shape, 0 if op == "copy-start" else 1)
            read, written = shape_bytes(result, hbm_only=False), shape_bytes(result)
        elif op in ("dynamic-slice", "slice"):  # the slice, read from HBM and written to HBM where each is there
            piece = _first_array_bytes(i.shape, hbm_only=False)
            read, written = piece if sizes and sizes[0] else 0, _first_array_bytes(i.shape)
        else:
            read, written = sum(sizes), i.bytes
        base = op.removesuffix("-start")
        if base in COLLECTIVES:
            volume = sum(shape_bytes(o.shape, hbm_only=False) for o in operands if o is not None)
            self.collectives[(base, _group_size(i.attrs), volume)] += runs
        # Of the weight bytes a kernel reads without computing on them (no dot, reduction, ...), what it writes
        # back out: a copy, transpose, gather or cast of a weight. A bias added to activations reads a little
        # weight and writes much more; it counts the little.
        if op != "fusion":
            per_operand = sizes if op not in ("copy-start", "slice-start", "dynamic-slice-start") else [read]
        from_weights = sum(n for p, n in enumerate(per_operand) if self._flat(operand_origin.get(p, frozenset())))
        weight_copy = min(written, from_weights) if not computes and base not in COLLECTIVES else 0
        flops = self._flops(self.comps[(i.calls("calls") or [""])[0]]) if op == "fusion" and (
            i.calls("calls") or [""])[0] in self.comps else self._flops(Computation("", False, [i]))
        self.kernels.append(Kernel(i.name, op, kind, read, written, weight_copy, runs, comp.name, flops))

    @staticmethod
    def _trip_count(i: Instr) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', i.attrs)
        if m:
            return int(m.group(1))
        m = re.search(r"known_trip_count=\{n=(\d+)\}", i.attrs)
        return int(m.group(1)) if m else None


    def _inferred_trip_count(self, comp: Computation, i: Instr) -> int | None:
        """XLA:TPU leaves its loops unannotated: ``i < N`` in the condition, on a tuple element that starts at a
        constant (and, as every loop XLA makes from a scan, a fori_loop or a gather, steps by one)."""
        cond = self.comps.get(i.attr("condition") or "")
        if cond is None or cond.root is None:
            return None
        root = cond.root
        if root.opcode == "fusion":
            fused = self.comps.get((root.calls("calls") or [""])[0])
            if fused is None or fused.root is None or fused.root.opcode != "compare":
                return None
            inner = fused.root
            args = [_outer(fused, cond, root, o) for o in inner.operands]
            direction = inner.attr("direction")
        elif root.opcode == "compare":
            args, direction = [cond.by_name.get(o) for o in root.operands], root.attr("direction")
        else:
            return None
        if direction != "LT" or len(args) != 2 or None in args:
            return None
        counter, bound = args
        limit = _constant(cond, bound)
        if counter.opcode != "get-tuple-element" or limit is None:
            return None
        init_tuple = comp.by_name.get(i.operands[0])
        index = int(counter.attr("index") or 0)
        if init_tuple is None or init_tuple.opcode != "tuple" or index >= len(init_tuple.operands):
            return None
        start = _constant(comp, comp.by_name.get(init_tuple.operands[index]))
        return None if start is None else max(limit - start, 0)


def _outer(fused: Computation, comp: Computation, fusion: Instr, name: str) -> Instr | None:
    """The instruction of ``comp`` that a fused computation's value ``name`` (a parameter) stands for."""
    instr = fused.by_name.get(name)
    if instr is None:
        return None
    if instr.opcode == "parameter":
        pos = _param_index(instr)
        return comp.by_name.get(fusion.operands[pos]) if pos < len(fusion.operands) else None
    return instr


def _constant(comp: Computation, instr: Instr | None) -> int | None:
    """The value of an integer scalar constant (through copies and bitcasts)."""
    for _ in range(8):
        if instr is None:
            return None
        if instr.opcode in ("copy", "bitcast") and instr.operands:
            instr = comp.by_name.get(instr.operands[0])
            continue
        if instr.opcode == "constant":
            return int(instr.literal) if re.fullmatch(r"\s*-?\d+\s*", instr.literal) else None
        return None
    return None


def _dims(shape: str) -> list[int]:
    """The dimensions of an array shape string."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _lhs_kept(conv: Instr, lhs: list[int]) -> float:
    """The fraction of its input (of dimensions ``lhs``) a convolution reads: XLA:TPU writes a batched product
    over the first rows of a larger array (a decode step over the live slots of a cache) as a convolution whose
    dilated input is cut by negative padding, a slice folded into the window."""
    window = re.search(r"window=\{([^}]*)\}", conv.attrs)
    labels = re.search(r"dim_labels=(\w+)_", conv.attrs)
    if not window or not labels or len(labels.group(1)) != len(lhs):
        return 1.0
    fields = dict(f.split("=", 1) for f in window.group(1).split() if "=" in f)
    spatial = [lhs[i] for i, c in enumerate(labels.group(1)) if c.isdigit()]
    pads = [tuple(int(x) for x in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else []
    dilate = [int(x) for x in fields["lhs_dilate"].split("x")] if "lhs_dilate" in fields else [1] * len(spatial)
    kept = 1.0
    for n, (lo, hi), d in zip(spatial, pads, dilate):
        first, last = max(0, -lo), (n - 1) * d - max(0, -hi)  # the dilated positions the window can reach
        rows = last // d - -(-first // d) + 1 if last >= first else 0
        kept *= max(0, min(n, rows)) / n
    return kept


def _tuple_element(shape: str, index: int) -> str:
    """Element ``index`` of a tuple shape string (the shape itself when it is not a tuple)."""
    if not shape.startswith("("):
        return shape
    parts = _split_top(shape[1:-1])
    return parts[index] if index < len(parts) else ""


def _first_array_bytes(shape: str, hbm_only: bool = True) -> int:
    m = _ARRAY.search(shape)
    return shape_bytes(m.group(0), hbm_only) if m else 0


def _group_size(attrs: str) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)  # iota form [groups, size]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)  # XLA:TPU's named mesh axes
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)) if a in sizes)
    m = re.search(r"source_target_pairs=\{([^}]*)\}", attrs)
    if m:
        return len(re.findall(r"\{", m.group(1))) + 1
    return 1


def analyze(text: str, weight_params=None, *, step_loop: bool = False, loop_bound=None) -> Report:
    """The kernels of the optimized HLO ``text`` with their bytes (see the module docstring)."""
    return Analyzer(text, weight_params, step_loop=step_loop, loop_bound=loop_bound).run()


def summary(report: Report) -> dict:
    return {"bytes": report.bytes, "weight_copy_bytes": report.weight_copy_bytes, "kernels": report.count,
            "flops": report.flops,
            "unknown_trip_loops": report.unknown_trip_loops, "collectives": report.collectives}


if __name__ == "__main__":  # python -m qwen2_jax.tools.hlo_cost FILE: the summary of a dumped HLO text
    import sys

    print(json.dumps(summary(analyze(open(sys.argv[1]).read())), indent=2))
