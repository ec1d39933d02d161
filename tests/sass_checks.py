"""Reading the machine code (SASS) of the CUDA kernels, for tests/test_nvcc_compile.py.

nvdisasm prints each kernel as its instructions in address order, with labels for branch targets.
A loop is a backward branch: the instructions from its target label to the branch. The checks
below look at what a loop holds and at the order of instructions in it; each returns a list of
problems (empty: the property holds), worded for a failing test's message.

Instruction classes (sm_80 / sm_90 spelling):
  cp.async.cg (16 bytes)           LDGSTS.E.BYPASS[.LTC128B].128, waited for by LDGDEPBAR/DEPBAR
  __ldcg (ld.global.cg)            LDG.E[.64|.128].STRONG.GPU
  other global loads               LDG.E[...] without STRONG (plain, .CONSTANT)
  shared loads / stores            LDS* / STS*
  fused multiply-adds              FFMA / DFMA
  the grid barrier (cooperative_groups): arrive = ATOM/RED ...STRONG.GPU, wait = a loop polling
  with LD.E.STRONG.GPU (ld.acquire.gpu)
"""

import glob
import os
import re
import shutil
import subprocess

_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_FUNCTION = re.compile(r"^\.text\.(\S+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def nvdisasm_path():
    """nvdisasm from PATH, the CUDA toolkit, or the nvidia-cuda-nvdisasm wheel; None if absent."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia  # the namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for base in nvidia.__path__:
        for path in sorted(glob.glob(os.path.join(base, "*", "bin", "nvdisasm"))):
            if os.access(path, os.X_OK):
                return path
    return None


class Kernel:
    def __init__(self, name):
        self.name = name
        self.instructions = []  # text without the address, predicate included
        self.labels = {}  # label -> index of the instruction it precedes

    def op(self, i):
        """The opcode with its modifiers, no predicate: '@!P2 LDG.E R4, [R2]' -> 'LDG.E'."""
        tokens = self.instructions[i].split()
        return tokens[1] if tokens[0].startswith("@") else tokens[0]

    def loops(self):
        """(first, last) instruction index of every loop, innermost ones first where nested."""
        found = []
        for i, text in enumerate(self.instructions):
            m = _TARGET.search(text)
            if self.op(i).startswith("BRA") and m and self.labels.get(m.group(1), i + 1) <= i:
                found.append((self.labels[m.group(1)], i))
        return sorted(found, key=lambda loop: loop[1] - loop[0])

    def innermost_loops(self):
        """The loops with no loop inside them."""
        loops = self.loops()
        return [
            (a, b)
            for a, b in loops
            if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
        ]

    def count(self, first, last, predicate):
        return sum(1 for i in range(first, last) if predicate(self.op(i)))

    def first(self, first, last, predicate):
        return next((i for i in range(first, last) if predicate(self.op(i))), None)


def disassemble(nvdisasm, cubin):
    """(architecture such as '80', {kernel name: Kernel}) of one cubin."""
    out = subprocess.run(
        [nvdisasm, "-c", cubin], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    arch = re.search(r"\.target\s+sm_(\d+)", out).group(1)
    kernels, current = {}, None
    for line in out.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            current.labels[m.group(1)] = len(current.instructions)
            continue
        m = _INSTRUCTION.search(line)
        if m:
            current.instructions.append(m.group(1))
    return arch, kernels


def is_async_copy(op):
    return op.startswith("LDGSTS")


def is_async_wait(op):
    return "DEPBAR" in op


def is_ldcg(op):
    return re.fullmatch(r"LDG\.E(\.\d+)?\.STRONG\.GPU", op) is not None


def is_plain_global_load(op):
    return op.startswith("LDG.E") and "STRONG" not in op


def is_shared_store(op):
    return re.fullmatch(r"STS(\.\d+)?", op) is not None


def is_shared_load(op):
    return op.startswith("LDS")


def is_fma(op):
    return op.split(".")[0] in ("FFMA", "DFMA")


def is_barrier_poll(op):
    return op.startswith("LD.E") and "STRONG.GPU" in op


def is_barrier_arrive(op):
    return op.split(".")[0] in ("ATOM", "RED") and "STRONG.GPU" in op


def async_staging_problems(kernel):
    """Fix 1, aligned rows: a loop of 16-byte asynchronous copies that bypass L1 (cp.async.cg,
    read from L2 as __ldcg) with no wait inside it, so all of a thread's copies are in flight at
    once."""
    loops = [(a, b) for a, b in kernel.innermost_loops() if kernel.count(a, b + 1, is_async_copy)]
    if not loops:
        return [f"{kernel.name}: no loop of asynchronous global-to-shared copies"]
    problems = []
    for a, b in loops:
        ops = {kernel.op(i) for i in range(a, b + 1) if is_async_copy(kernel.op(i))}
        if any(".BYPASS" not in op or not op.endswith(".128") for op in ops):
            problems.append(
                f"{kernel.name}: copies at {a}..{b} are {sorted(ops)}, expected "
                f"16-byte copies that bypass L1"
            )
        if kernel.count(a, b + 1, is_async_wait):
            problems.append(f"{kernel.name}: the copy loop at {a}..{b} waits inside the loop")
    return problems


def scalar_staging_problems(kernel, min_loads):
    """Fix 1, unaligned rows: every loop that moves __ldcg loads into shared memory issues at
    least `min_loads` of them before its first shared store."""
    loops = [
        (a, b)
        for a, b in kernel.innermost_loops()
        if kernel.count(a, b + 1, is_ldcg) and kernel.count(a, b + 1, is_shared_store)
    ]
    if not loops:
        return [f"{kernel.name}: no loop stages __ldcg loads into shared memory"]
    problems = []
    for a, b in loops:
        before = kernel.count(a, kernel.first(a, b + 1, is_shared_store), is_ldcg)
        if before < min_loads:
            problems.append(
                f"{kernel.name}: staging loop at {a}..{b} has {before} __ldcg loads "
                f"before its first shared store, expected >= {min_loads}"
            )
    return problems


def matvec_problems(kernel, min_fma, min_loads, min_loads_first):
    """Fix 2: an innermost loop (the unrolled matrix-vector loop) of at least `min_fma` FMAs and
    `min_loads` shared loads, of which at least `min_loads_first` come before its first FMA."""
    for a, b in kernel.innermost_loops():
        fma = kernel.first(a, b, is_fma)
        if (
            fma is not None
            and kernel.count(a, b, is_fma) >= min_fma
            and kernel.count(a, b, is_shared_load) >= min_loads
            and kernel.count(a, fma, is_shared_load) >= min_loads_first
        ):
            return []
    return [
        f"{kernel.name}: no loop with >= {min_fma} FMAs and >= {min_loads} shared loads, "
        f">= {min_loads_first} of them before the first FMA (the unrolled matrix-vector loop)"
    ]


def _step_loop(kernel):
    """(the time-step loop, the grid-barrier wait in it): the smallest loop around a loop that
    polls the grid barrier."""
    loops = kernel.loops()
    for poll in (loop for loop in loops if kernel.count(loop[0], loop[1] + 1, is_barrier_poll)):
        around = [(a, b) for a, b in loops if a <= poll[0] and poll[1] <= b and (a, b) != poll]
        if around:
            return around[0], poll
    return None, None


def prefetch_problems(kernel, min_loads):
    """Fix 3: inside the time-step loop, at least `min_loads` plain global loads (the step's
    inputs) come before the wait of the grid barrier."""
    step, poll = _step_loop(kernel)
    if step is None:
        return [f"{kernel.name}: no time-step loop around a grid-barrier wait"]
    n = kernel.count(step[0], poll[0], is_plain_global_load)
    if n < min_loads:
        return [
            f"{kernel.name}: {n} global loads before the grid-barrier wait in the step loop "
            f"{step[0]}..{step[1]}, expected >= {min_loads} (inputs loaded ahead)"
        ]
    return []


def overlap_problems(kernel, min_loads):
    """Backward: between the grid barrier's arrive and the end of the time-step loop (before the
    next wait), at least `min_loads` global loads: the weight-gradient work runs while the other
    blocks arrive."""
    step, _ = _step_loop(kernel)
    if step is None:
        return [f"{kernel.name}: no time-step loop around a grid-barrier wait"]
    arrive = kernel.first(step[0], step[1], is_barrier_arrive)
    if arrive is None:
        return [f"{kernel.name}: no grid-barrier arrive in the step loop {step[0]}..{step[1]}"]
    n = kernel.count(arrive, step[1], is_plain_global_load)
    if n < min_loads:
        return [
            f"{kernel.name}: {n} global loads between the grid-barrier arrive and the end of "
            f"the step loop, expected >= {min_loads}"
        ]
    return []
