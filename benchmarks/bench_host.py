"""Host time per eager call of the projection on lists of small CPU tensors, against one native
torch._foreach_add_ over the same two lists, for one or more builds of spard_ext in one run.

    python benchmarks/bench_host.py                                  # this checkout
    python benchmarks/bench_host.py --build before=../main --build after=.

Each build is measured in its own process (two builds cannot share one: their ops have the same
names); the processes alternate, round after round, so load on the machine falls on all of them
alike. Every process times torch._foreach_add_ on its own lists as the baseline, and the table
gives each call's time as a ratio to it. Tensors of 16 x 8 float32: the work is negligible, what
is measured is the host's cost per call (Python wrapper, dispatcher, checks). One thread, timed
in CPU time of the calling thread (time.thread_time): on a machine shared with other jobs, wall
time mostly measures waiting for a core, CPU time the work of the call.

A build with ``spard_ext.FlatLayout`` is also timed through it: x is a list of parameters laid out
as one flat buffer, a the layout's gradient buffer; each call includes the layout's staleness
check (the address and size of every parameter) and the version bump of every parameter, i.e.
everything SPAG's step pays for its projection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LENGTHS = (16, 64, 256, 1024)
SHAPE = (16, 8)


def _child(root: str, lengths, calls: int, repeats: int) -> dict:
    sys.path.insert(0, root)
    import torch

    import spard_ext

    torch.set_num_threads(1)
    out = {"spard_ext": os.path.dirname(spard_ext.__file__)}
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        x = [torch.randn(SHAPE, generator=g) for _ in range(n)]
        a = [torch.randn(SHAPE, generator=g) * 1e-3 for _ in range(n)]
        b = torch.tensor(-1.0)

        def fused():
            spard_ext.project_(x, a, b, max_step=1e-9, use_dot=True)

        def split():
            dot, sq = spard_ext.project_reduce(x, a, use_dot=True)
            spard_ext.project_apply_(x, a, dot, sq, b, max_step=1e-9, use_dot=True)

        def foreach():
            torch._foreach_add_(x, a, alpha=-1e-9)

        row = {}
        cases = {"foreach_add_": foreach, "project_": fused, "reduce+apply_": split}
        if hasattr(spard_ext, "FlatLayout"):
            params = [torch.nn.Parameter(t.clone()) for t in x]
            layout = spard_ext.FlatLayout(params)
            grads = layout.zeros()
            torch._foreach_copy_(layout.views(grads), a)

            def fused_flat():
                spard_ext.project_(layout, grads, b, max_step=1e-9, use_dot=True)

            def split_flat():
                dot, sq = spard_ext.project_reduce(layout, grads, use_dot=True)
                spard_ext.project_apply_(layout, grads, dot, sq, b, max_step=1e-9, use_dot=True)

            cases.update({"project_ layout": fused_flat, "reduce+apply_ layout": split_flat})
        for name, fn in cases.items():  # warm up
            for _ in range(20):
                fn()
        samples = {name: [] for name in cases}
        for _ in range(repeats):  # interleaved, so a burst of load hits every case
            for name, fn in cases.items():
                start = time.thread_time()
                for _ in range(calls):
                    fn()
                samples[name].append((time.thread_time() - start) / calls * 1e6)
        for name, s in samples.items():
            row[name] = statistics.median(s)
        out[str(n)] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", default=[],
                   help="label=path of a source checkout with spard_ext built in place (repeatable)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--rounds", type=int, default=3, help="processes per build, alternated")
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    p.add_argument("--repeats", type=int, default=15, help="timings per case and process")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.lengths, args.calls, args.repeats)))
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    builds = dict(b.split("=", 1) for b in args.build) or {"this checkout": here}
    runs = {label: [] for label in builds}
    for _ in range(args.rounds):
        for label, root in builds.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", os.path.abspath(root),
                   "--calls", str(args.calls), "--repeats", str(args.repeats), "--lengths", *map(str, args.lengths)]
            env = dict(os.environ, PYTHONPATH="")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.abspath(root))
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"Host time per call (µs, median over {args.rounds} processes), and / foreach_add_ in the same process")
    print("| build | x | tensors | foreach_add_ | project_ | reduce + apply_ | project_ / foreach | (reduce + apply_) / foreach |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for label, rs in runs.items():
        for n in args.lengths:
            rows = [r[str(n)] for r in rs]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            summary.setdefault(label, {})[n] = med
            for kind, suffix in (("list", ""), ("FlatLayout", " layout")):
                if "project_" + suffix not in rows[0]:
                    continue
                ratio_f = statistics.median(r["project_" + suffix] / r["foreach_add_"] for r in rows)
                ratio_s = statistics.median(r["reduce+apply_" + suffix] / r["foreach_add_"] for r in rows)
                med.update({f"fused_ratio{suffix}": ratio_f, f"split_ratio{suffix}": ratio_s})
                print(f"| {label} | {kind} | {n} | {med['foreach_add_']:.1f} | {med['project_' + suffix]:.1f} "
                      f"| {med['reduce+apply_' + suffix]:.1f} | {ratio_f:.2f} | {ratio_s:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": runs, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
