"""What each ingredient of a method costs: momentum BN, the fused EMA, projector-only, ...

    .venv/bin/python benchmarks/ingredients.py                 # CPU, a few minutes
    .venv/bin/python benchmarks/ingredients.py --device cuda

Three interleaved comparisons, each in one process:

1. **Teacher forward, momentum BN vs plain BN.** The teacher of ``m2t`` (every BN a momentum
   BN; two views, then the lazy commit) against the teacher of ``byol`` (ordinary train-mode
   BN), under ``no_grad`` as in a step; plus one BN layer alone on a typical activation.
2. **Teacher EMA.** ``pretrain.ema.update_ema`` (one fused ``torch._foreach_lerp_``) against
   ``pretrain.ema.update_ema_loop`` (a Python loop over the tensors) and lightly's
   ``update_momentum`` (``_foreach_mul_`` + ``_foreach_add_``), on the backbone + projector
   tensors of a ResNet-50 method.
3. **Whole steps by method** (``Trainer.train_step``): byol, m2t, eman, projector_only and
   m2t + residual momentum, as ratios to m2t and to byol. projector_only skips the teacher's
   backbone passes: SPEC §1.4 expects about a third of the step saved (≈ 0.7× m2t).

``--baseline-rev REV`` adds, to comparison 1, the momentum BN of an earlier git revision
(``pretrain/momentum_bn.py`` as it was at REV, loaded beside the current one), so a change
to it is measured before/after in one interleaved run, host-device syncs included.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    REPO,
    fmt_ms,
    interleave,
    machine,
    md_table,
    median,
    paired_ratio,
    spread,
    write_results,
)
from benchmarks.pretrain_speed import build_ours, lightly_available, make_inputs  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.ema import update_ema, update_ema_loop  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.model import Encoder  # noqa: E402
from pretrain.momentum_bn import MomentumBatchNorm2d  # noqa: E402

STEP_METHODS = {
    "byol": ("byol", []),
    "m2t": ("m2t", []),
    "eman": ("eman", []),
    "projector_only": ("projector_only", []),
    "m2t + residual": ("m2t", ["model.residual=true"]),
}


def rows_for(times: dict[str, list[float]], ref: str, group: str) -> list[dict[str, Any]]:
    return [{"group": group, "name": name, "median_s": median(ts), "iqr_rel": spread(ts),
             "ratio": paired_ratio(ts, times[ref]), "ref": ref, "times_s": ts}
            for name, ts in times.items()]


def momentum_bn_at(rev: str):
    """``pretrain/momentum_bn.py`` as it was at git revision ``rev``, as a module."""
    source = subprocess.run(["git", "show", f"{rev}:pretrain/momentum_bn.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"momentum_bn_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"momentum_bn_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_syncs(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def teacher_forward(args: argparse.Namespace) -> list[dict[str, Any]]:
    arch, size, batch = args.teacher_config.split(":")
    size, batch = int(size), int(batch)
    dev = torch.device(args.device)
    print(f"\n1. teacher forward, {arch} {size}px batch {batch}", flush=True)
    overrides = [f"model.arch={arch}", f"model.proj_hidden_dim={args.hidden}"]
    m2t = build_method(load_config(None, ["model.method=m2t", *overrides]), 1000).to(dev).train()
    byol = build_method(load_config(None, ["model.method=byol", *overrides]), 1000).to(dev).train()
    x1, x2 = (t.to(dev) for t in make_inputs(batch, size, args.device))

    def run(method):
        def f():
            with torch.no_grad():
                method.teacher_embed(x1, None)
                method.teacher_embed(x2, None)
                method.after_teacher_forwards()
        return f

    fns = {"plain BN teacher (byol)": run(byol), "momentum BN teacher (m2t)": run(m2t)}
    if args.baseline_rev:
        old = momentum_bn_at(args.baseline_rev)
        teacher = Encoder(arch, args.hidden, 256)
        teacher.load_state_dict(m2t.teacher.state_dict(), strict=False)
        teacher = old.convert_to_momentum_bn(teacher, 1000).to(dev).train()
        for p in teacher.parameters():
            p.requires_grad_(False)

        def run_old():
            with torch.no_grad():
                teacher(x1)
                teacher(x2)
                old.commit_momentum_bn(teacher)

        fns[f"momentum BN teacher, momentum_bn.py at {args.baseline_rev}"] = run_old
    times = interleave(fns, rounds=args.rounds, warmup=2, device=dev)
    rows = rows_for(times, "plain BN teacher (byol)", f"teacher forward ×2 + commit, {arch} "
                                                     f"{size}px b{batch}")
    for r in rows:
        r["host_syncs"] = host_syncs(fns[r["name"]])
    # one layer alone: 64 channels at a quarter of the input side (a ResNet's layer1)
    side = max(size // 4, 2)
    x = torch.randn(batch, 64, side, side, device=dev)
    plain = nn.BatchNorm2d(64).to(dev).train()
    mom = MomentumBatchNorm2d(64, 1000).to(dev).train()

    def layer(bn, commit):
        def f():
            with torch.no_grad():
                bn(x)
                bn(x)
                if commit:
                    bn.commit()
        return f

    fns = {"nn.BatchNorm2d": layer(plain, False), "MomentumBatchNorm2d": layer(mom, True)}
    if args.baseline_rev:
        fns[f"MomentumBatchNorm2d at {args.baseline_rev}"] = layer(
            old.MomentumBatchNorm2d(64, 1000).to(dev).train(), True)
    times = interleave(fns, rounds=args.rounds * 10, warmup=5, device=dev, inner=20,
                       progress=False)
    rows += rows_for(times, "nn.BatchNorm2d", f"one BN layer ×2 + commit, ({batch}, 64, {side}, {side})")
    return rows


def ema(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev = torch.device(args.device)
    print(f"\n2. teacher EMA, {args.ema_arch} backbone + projector", flush=True)
    method = build_method(load_config(None, ["model.method=m2t", f"model.arch={args.ema_arch}"]),
                          1000).to(dev)
    teacher, student = method.ema_pairs()
    n = sum(t.numel() for t in teacher)
    fns = {
        "update_ema (fused _foreach_lerp_)": lambda: update_ema(teacher, student, 0.99),
        "update_ema_loop (per tensor)": lambda: update_ema_loop(teacher, student, 0.99),
    }
    if args.peer:
        from lightly.models.utils import update_momentum

        # lightly takes modules: the student's backbone + projector and a copy as the "teacher"
        s_mod = nn.ModuleList([method.student.backbone, method.student.projector])
        t_mod = copy.deepcopy(s_mod)
        fns["lightly update_momentum (_foreach_mul_ + _foreach_add_)"] = (
            lambda: update_momentum(s_mod, t_mod, 0.99))
    times = interleave(fns, rounds=args.rounds * 4, warmup=3, device=dev, inner=5, progress=False)
    return rows_for(times, "update_ema (fused _foreach_lerp_)",
                    f"EMA of {len(teacher)} tensors, {n / 1e6:.1f} M values")


def steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    arch, size, batch = args.step_config.split(":")
    size, batch = int(size), int(batch)
    print(f"\n3. whole steps, {arch} {size}px batch {batch}", flush=True)
    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        fns = {}
        v1, v2 = make_inputs(batch, size, args.device)
        for name, (method, extra) in STEP_METHODS.items():
            torch.manual_seed(0)
            step, _ = build_ours(method, arch, size, batch, args.device, "bf16" if gpu else "none",
                                 gpu, args.hidden, 256, Path(tmp), extra)
            fns[name] = lambda s=step: s(v1, v2)
        times = interleave(fns, rounds=args.rounds, warmup=2, device=args.device,
                           inner=1 if not gpu else 5)
    rows = rows_for(times, "m2t", f"step, {arch} {size}px b{batch}")
    for r in rows:
        r["vs_byol"] = paired_ratio(r["times_s"], times["byol"])
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    out = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        with_byol = any("vs_byol" in r for r in rs)
        with_syncs = any("host_syncs" in r for r in rs)
        headers = ["what", "median (ms)", "IQR/median", f"time / {rs[0]['ref']}"]
        if with_byol:
            headers.append("time / byol")
        if with_syncs:
            headers.append("host syncs")
        table = []
        for r in rs:
            row = [r["name"], fmt_ms(r["median_s"]), f"{r['iqr_rel']:.2f}", f"{r['ratio']:.3f}"]
            if with_byol:
                row.append(f"{r['vs_byol']:.3f}")
            if with_syncs:
                row.append(r["host_syncs"])
            table.append(row)
        out += [f"**{group}**", "", md_table(headers, table), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--teacher-config", default=None, help="ARCH:SIZE:BATCH")
    parser.add_argument("--step-config", default=None, help="ARCH:SIZE:BATCH")
    parser.add_argument("--ema-arch", default="resnet50")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", nargs="+", choices=["teacher", "ema", "steps"],
                        default=["teacher", "ema", "steps"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on the CPU, see pretrain_speed.py)")
    parser.add_argument("--baseline-rev", default=None,
                        help="also time pretrain/momentum_bn.py as of this git revision")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.teacher_config = args.teacher_config or ("resnet50:224:128" if gpu else "resnet18:64:32")
    args.step_config = args.step_config or ("resnet50:224:128" if gpu else "resnet18:64:32")
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.peer and lightly_available() is not None:
        print("lightly is not importable: its update_momentum is left out")
        args.peer = False
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    if "teacher" in args.only:
        rows += teacher_forward(args)
    if "ema" in args.only:
        rows += ema(args)
    if "steps" in args.only:
        rows += steps(args)
    body = render(rows)
    print("\n" + body)
    path = write_results("ingredients", "What each ingredient costs", body, {"rows": rows},
                         machine(args.device), load_before, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
