"""One prepared GPU check: correctness on CUDA, step throughput, Detectron2 (issue 12).

Sized to finish in at most 8 minutes on one H200; writes ``gpu_check.md`` and ``gpu_check.json``
(to ``benchmarks/results/gpu/`` by default). The suite runs the same script on the CPU with
``--device cpu --quick`` so it never rots.

    # 1. where ../shared/data and the package index are at hand: gather what the GPU machine
    #    lacks into one folder (a coco_mini subset, wheels for Python 3.12; ~50 MiB)
    .venv/bin/python benchmarks/gpu_check.py --prepare-assets gpu_assets
    # 2. on the GPU machine (Python 3.12, torch and torchvision preinstalled, no internet)
    python benchmarks/gpu_check.py --assets gpu_assets --install   # installs, then checks
    python benchmarks/gpu_check.py --assets gpu_assets --profile    # checks only
    # 3. the suite
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check

What it checks, each as one row (pass / FAIL / skip, with the reason):

1. ``momentum_bn``: momentum BN on the device against the same module in float64 on the CPU,
   four steps of two views, outputs and running statistics (goal ≤ 1e-5), and channels_last
   input against contiguous input.
2. ``device_move``: every method (and residual) moved with ``.to(device)`` after construction,
   one step, against a float64 CPU copy that never moved: its teacher weights and every BN
   statistic must move as the reference's do (SPEC §1).
3. ``amp``: one Trainer step in bf16 and fp16 autocast: finite, loss close to fp32.
4. ``channels_last``: one Trainer step with channels_last equals the contiguous one.
5. ``train_resume_convert``: ``m2t-pretrain train`` on the device, stopped and resumed,
   against an uninterrupted run; then ``m2t-convert`` to ``.pkl`` (verified by Detectron2)
   and to ``.pth``.
6. ``ddp``: a 2-process DDP run when 2 GPUs exist (ranks must agree), else skipped.
7. ``throughput``: bf16, channels_last, batch 128, ResNet-50 at 224 px, input already on the
   device: m2t, byol, m2t with ``train.compile`` (the fast path), lightly's BYOL, interleaved
   in one run. Goals: m2t ≥ 1,000 images/s; m2t / byol step ≤ 1.05; ours ≥ lightly's and
   ≥ 1.2× with the fast path. ``--profile`` adds the top operators of an m2t step.
8. ``detectron2``: 20 iterations of Mask R-CNN R50-FPN on the coco subset from the weights
   converted in 5, then COCO evaluation; iteration time.

The assets folder (``--assets``) holds ``wheels/`` (Detectron2's pure-Python dependencies,
the ``sal-detectron2`` wheel whose ``detectron2/`` package is installed without ``_C``,
lightly for the peer) and ``coco/`` (``annotations/instances_{train,val}2017.json``,
``train2017/``, ``val2017/``); ``MANIFEST.json`` lists them. Without ``--assets`` the
Detectron2 check trains on generated shapes instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import REPO, interleave, machine, md_table, write_results  # noqa: E402

SHARED_COCO = REPO.parent / "shared" / "data" / "coco_mini"
#: Detectron2's and our pure-Python dependencies the GPU machine may lack (torch, torchvision
#: and pillow are there). Wheels are fetched for Python 3.12 without dependencies, so this
#: list is complete on purpose.
WHEELS = ["fvcore", "iopath", "yacs", "omegaconf>=2.1,<2.4", "hydra-core",
          "antlr4-python3-runtime==4.9.3", "tabulate", "termcolor", "cloudpickle", "tqdm",
          "portalocker", "pyyaml", "packaging", "typing_extensions", "pycocotools", "numpy",
          "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing",
          "python-dateutil", "six", "tzdata", "faster-coco-eval", "lightly==1.6.0", "sal-detectron2==0.7.2"]
COCO_SUBSET = {"train2017": 48, "val2017": 24}  # images: ~10 MiB, fits the carry limit

VARIANTS = {
    "m2t": ["model.method=m2t"], "byol": ["model.method=byol"],
    "eman": ["model.method=eman"], "projector_only": ["model.method=projector_only"],
    "m2t+residual": ["model.method=m2t", "model.residual=true"],
}


# ----- assets ------------------------------------------------------------------------------------

def prepare_assets(folder: Path) -> int:
    """Fill ``folder`` with the coco subset and the wheels (run where the data and index are)."""
    if not SHARED_COCO.is_dir():
        print(f"error: {SHARED_COCO}: coco_mini not found (needed for the Detectron2 check)",
              file=sys.stderr)
        return 2
    coco = folder / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in COCO_SUBSET.items():
        data = json.loads((SHARED_COCO / "annotations" / f"instances_{split}.json").read_text())
        data["images"] = sorted(data["images"], key=lambda im: im["id"])[:n]
        keep = {im["id"] for im in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (coco / split).mkdir(exist_ok=True)
        for im in data["images"]:
            shutil.copy2(SHARED_COCO / split / im["file_name"], coco / split / im["file_name"])
    wheels = folder / "wheels"
    wheels.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for req in WHEELS:
        binary = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:",
                  "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                  "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                  "--platform", "manylinux_2_17_x86_64", "--platform", "any",
                  "-d", str(wheels), req]
        if req.startswith("sal-detectron2"):  # built for Python 3.10; only its Python is used
            binary[binary.index("--abi") + 1] = "cp310"
            binary[binary.index("--python-version") + 1] = "3.10"
        if subprocess.call(binary, stderr=subprocess.DEVNULL) != 0:  # sdist only: fvcore, antlr4
            if subprocess.call([*pip, "wheel", "--quiet", "--no-deps", "-w", str(wheels),
                                req]) != 0:
                print(f"error: could not get a wheel for {req}", file=sys.stderr)
                return 1
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    size = sum((folder / f).stat().st_size for f in files)
    (folder / "MANIFEST.json").write_text(json.dumps({"wheels": WHEELS, "coco": COCO_SUBSET,
                                                      "files": files, "bytes": size}, indent=1))
    print(f"{folder}: {len(files)} files, {size / 2**20:.1f} MiB")
    return 0


def install_assets(folder: Path) -> int:
    """Install the wheels offline (``--no-deps``: the list is complete), then Detectron2."""
    wheels = folder / "wheels"
    files = [str(w) for w in sorted(wheels.glob("*.whl")) if "detectron2" not in w.name]
    rc = subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                          "--no-deps", *files])
    if rc != 0:
        return rc
    d2 = sorted(wheels.glob("sal_detectron2-*.whl"))
    if not d2:
        print(f"error: {wheels}: no sal_detectron2 wheel", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, str(REPO / "tools" / "install_detectron2.py"),
                            "--wheel", str(d2[0])])


# ----- helpers -----------------------------------------------------------------------------------

class Skip(Exception):
    """A check that cannot run here; the message says why."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in convolutions and matmuls while comparing with a float64 reference."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def image_folder(root: Path, n: int, size: int = 48) -> Path:
    """``n`` random-noise JPEGs in one class folder: data the Trainer can read, made here."""
    from PIL import Image

    folder = root / "x"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def trainer(ctx: Ctx, *overrides: str):
    from pretrain.config import load_config
    from pretrain.train import Trainer

    hidden = "64" if ctx.quick else "256"
    cfg = load_config(None, ["model.arch=resnet18", f"model.proj_hidden_dim={hidden}",
                             "model.proj_dim=32", "data.image_size=32",
                             f"data.batch_size={8 if ctx.quick else 16}",
                             "data.workers=0", "train.steps=20", f"train.device={ctx.device}",
                             *overrides])
    torch.manual_seed(0)
    t = Trainer(cfg, ctx.images, ctx.tmp / f"trainer_{len(list(ctx.tmp.iterdir()))}")
    t.model.train()
    return t


def views(batch: int, size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),
            torch.randn(batch, 3, size, size, generator=g))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


class Ctx:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.device = torch.device(args.device)
        self.quick = args.quick
        self.images = image_folder(tmp / "images", 64)
        self.converted: Path | None = None  # the .pkl made by train_resume_convert
        self.deadline = time.monotonic() + args.budget


# ----- checks ------------------------------------------------------------------------------------

def check_momentum_bn(ctx: Ctx) -> dict[str, Any]:
    from pretrain.momentum_bn import MomentumBatchNorm2d

    torch.manual_seed(0)
    c = 64
    with default_dtype(torch.float64):
        ref = MomentumBatchNorm2d(c, total_steps=8).train()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    dev = MomentumBatchNorm2d(c, total_steps=8).train()
    dev.load_state_dict(ref.state_dict())
    dev.to(ctx.device)
    dev_cl = MomentumBatchNorm2d(c, total_steps=8).train()  # fed channels_last input
    dev_cl.load_state_dict(ref.state_dict())
    dev_cl.to(ctx.device)
    out_err = stat_err = layout_err = 0.0
    g = torch.Generator().manual_seed(0)
    with exact_float32():
        for _ in range(4):
            for _view in range(2):
                x = torch.randn(32, c, 14, 14, generator=g, dtype=torch.float64) * 2 + 0.5
                y_ref = ref(x)
                xd = x.float().to(ctx.device)
                y = dev(xd)
                y_cl = dev_cl(xd.contiguous(memory_format=torch.channels_last))
                out_err = max(out_err, (y.double().cpu() - y_ref).abs().max().item())
                layout_err = max(layout_err, (y_cl - y).abs().max().item())
            for m in (ref, dev, dev_cl):
                m.commit()
            for name in ("running_mean", "running_var"):
                diff = getattr(dev, name).double().cpu() - getattr(ref, name)
                stat_err = max(stat_err, diff.abs().max().item())
                layout_err = max(layout_err, (getattr(dev_cl, name) - getattr(dev, name))
                                 .abs().max().item())
    ok = max(out_err, stat_err, layout_err) <= 1e-5 and int(dev.step) == 4
    return {"ok": ok, "detail": f"max |Δ| output {out_err:.2e}, running stats {stat_err:.2e}, "
                                f"channels_last vs contiguous {layout_err:.2e} (goal ≤ 1e-5)",
            "output_err": out_err, "stat_err": stat_err, "layout_err": layout_err}


def _sgd_step(model, x1: torch.Tensor, x2: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.student.parameters(), lr=0.5, momentum=0.9)
    loss = model(x1, x2)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_teacher(0)


def check_device_move(ctx: Ctx) -> dict[str, Any]:
    from pretrain.config import load_config
    from pretrain.methods import build_method

    worst, rows, ok = 0.0, [], True
    x1, x2 = views(8, 32)
    # the quick CPU run (the suite's) moves nothing: two methods keep the code path alive;
    # tests/pretrain/test_device_move.py moves every method's tensors on the CPU
    variants = {k: VARIANTS[k] for k in ("m2t", "eman")} if ctx.quick else VARIANTS
    for name, extra in variants.items():
        cfg = load_config(None, ["model.arch=resnet18", "model.proj_hidden_dim=64",
                                 "model.proj_dim=32", *extra])
        torch.manual_seed(0)
        moved = build_method(cfg, total_steps=10).train()
        start = {k: v.clone() for k, v in moved.state_dict().items()}
        with default_dtype(torch.float64):
            ref = build_method(cfg, total_steps=10).train()
        ref.load_state_dict(start)
        moved.to(ctx.device)
        with exact_float32():
            _sgd_step(ref, x1.double(), x2.double())
            _sgd_step(moved, x1.to(ctx.device), x2.to(ctx.device))
        expected = ref.teacher.state_dict()
        got = {k: v.detach().double().cpu() for k, v in moved.teacher.state_dict().items()}
        stuck, err = [], 0.0
        for key, value in expected.items():
            before = start["teacher." + key].double()
            if not value.is_floating_point():
                ok &= torch.equal(got[key].long(), value.long())
                continue
            if key.endswith(("running_mean", "running_var")) and torch.equal(got[key], before):
                stuck.append(key)
            # the device step's error relative to the step itself, where float32 can see it
            change = (value - before).norm().item()
            if change > 1e-5 * before.norm().item() + 1e-12:
                err = max(err, (got[key] - value).norm().item() / change)
        ok &= not stuck and err <= 0.05
        worst = max(worst, err)
        rows.append(f"{name}: max ‖Δ‖/‖step‖ {err:.1e}" + (f", {len(stuck)} statistics stuck "
                                                        f"(e.g. {stuck[0]})" if stuck else ""))
    if ctx.device.type == "cpu":
        rows.insert(0, "on the CPU .to('cpu') replaces nothing, so this only checks the "
                       "comparison (tests/pretrain/test_device_move.py moves dtype and layout)")
    return {"ok": ok, "detail": "; ".join(rows) + " (goal: no statistic stuck, "
                                                   "‖Δ‖ ≤ 5% of ‖step‖ per tensor)", "worst_rel": worst}


def check_amp(ctx: Ctx) -> dict[str, Any]:
    from pretrain.train import nonfinite_tensors

    x1, x2 = views(4 if ctx.quick else 16, 32)
    ref = trainer(ctx).train_step(x1, x2)
    ref_loss = float(ref["loss"])
    rows, ok, out = [], True, {}
    for amp in ("bf16", "fp16"):
        t = trainer(ctx, f"train.amp={amp}")
        loss = float(t.train_step(x1, x2)["loss"])
        t.step += 1  # as the loop counts it
        loss2 = float(t.train_step(x1, x2)["loss"])
        finite = not nonfinite_tensors(t.model)
        r = rel(loss, ref_loss)
        ok &= finite and r <= 0.05 and torch.isfinite(torch.tensor(loss2)).item()
        rows.append(f"{amp}: loss {loss:.4f} vs fp32 {ref_loss:.4f} (rel {r:.1e}), "
                    f"weights finite {finite}, 2nd step loss {loss2:.4f}")
        out[amp] = {"loss": loss, "rel": r, "finite": finite}
    return {"ok": ok, "detail": "; ".join(rows) + " (goal: finite, rel ≤ 5e-2)", **out}


def check_channels_last(ctx: Ctx) -> dict[str, Any]:
    x1, x2 = views(4 if ctx.quick else 16, 32)
    with exact_float32():
        a, b = trainer(ctx), trainer(ctx, "train.channels_last=true")
        la, lb = float(a.train_step(x1, x2)["loss"]), float(b.train_step(x1, x2)["loss"])
    err = max((p - q).abs().max().item() for p, q in
              zip(a.model.teacher.parameters(), b.model.teacher.parameters(), strict=True))
    ok = rel(lb, la) <= 1e-4 and err <= 1e-5
    return {"ok": ok, "detail": f"loss {lb:.6f} vs {la:.6f}; teacher weights max |Δ| "
                                f"{err:.1e} (goal: rel ≤ 1e-4, |Δ| ≤ 1e-5)"}


def check_train_resume_convert(ctx: Ctx) -> dict[str, Any]:
    from convert.__main__ import main as convert
    from pretrain.__main__ import main as pretrain
    from pretrain.checkpoint import load_checkpoint

    arch = "resnet18" if ctx.quick else "resnet50"
    workers = 0 if ctx.quick else 2  # worker start-up dominates a quick CPU run
    args = [f"model.arch={arch}", "model.proj_hidden_dim=256", "model.proj_dim=64",
            "data.image_size=32", "data.batch_size=16", f"data.workers={workers}",
            "train.steps=6", "train.log_every=2", f"train.device={ctx.device.type}"]
    full, split = ctx.tmp / "run_full", ctx.tmp / "run_split"
    rc = [pretrain(["train", "--data", str(ctx.images), "--out", str(full), *args]),
          pretrain(["train", "--data", str(ctx.images), "--out", str(split), *args,
                    "--stop-after", "3"]),
          pretrain(["train", "--data", str(ctx.images), "--out", str(split), "--resume"])]
    if any(rc):
        return {"ok": False, "detail": f"m2t-pretrain exit codes {rc}"}
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(split / "last.pth")
    diffs = [(a[br][k].double() - b[br][k].double()).abs().max().item()
             for br in ("student", "teacher") for k in a[br] if a[br][k].is_floating_point()]
    exact = max(diffs) == 0.0
    pkl, pth = ctx.tmp / f"m2t_{arch}.pkl", ctx.tmp / f"m2t_{arch}.pth"
    rc_pkl = convert([str(full / "last.pth"), str(pkl), "--verify"])
    rc_pth = convert([str(split / "last.pth"), str(pth)])
    ctx.converted = pkl if rc_pkl == 0 else None
    # on a GPU, cuDNN may pick other kernels after a restart: equal within rounding is fine
    ok = a["step"] == b["step"] == 6 and max(diffs) <= 1e-4 and rc_pkl == rc_pth == 0
    return {"ok": ok, "bit_exact": exact,
            "detail": f"{arch}: 6 steps straight vs 3 + resume 3: max |Δ| {max(diffs):.1e} "
                      f"(bit-exact {exact}); convert .pkl --verify rc {rc_pkl}, .pth rc {rc_pth}"}


def check_ddp(ctx: Ctx) -> dict[str, Any]:
    if ctx.device.type != "cuda":
        raise Skip("CPU run: DDP on the CPU (gloo) is tested in tests/pretrain/test_distributed.py")
    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU on this machine; a 2-process DDP step "
                   f"needs 2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "tests" / "pretrain" / "ddp_check.py"), str(ctx.images),
           str(ctx.tmp / "ddp"), "model.arch=resnet18", "model.proj_hidden_dim=64",
           "model.proj_dim=32", "data.image_size=32", "data.batch_size=8", "data.workers=0",
           "train.steps=2", "train.device=cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("rank ")]
    return {"ok": proc.returncode == 0, "detail": " | ".join(lines) or proc.stderr[-300:]}


def check_throughput(ctx: Ctx) -> dict[str, Any]:
    from benchmarks import pretrain_speed as ps

    arch, size, batch = ("resnet18", 32, 8) if ctx.quick else ("resnet50", 224, 128)
    amp = "bf16" if ctx.device.type == "cuda" else "none"
    common = dict(device=ctx.device.type, amp=amp, channels_last=True, hidden=4096,
                  out_dim=256)
    if ctx.quick:
        common.update(hidden=256, out_dim=64)
    steps: dict[str, Callable] = {}
    for method in ("m2t", "byol"):
        steps[method] = ps.build_ours(method, arch, size, batch, tmp=ctx.tmp / "speed", **common)[0]
    if not ctx.quick:  # inductor compiles for minutes on a small CPU; the suite checks that a
        # compiled student trains in tests/pretrain/test_device_move.py
        steps["m2t fast path (compile)"] = ps.build_ours(
            "m2t", arch, size, batch, tmp=ctx.tmp / "speed_fast", extra=["train.compile=true"],
            **common)[0]
    peer = ps.lightly_available()
    if peer is None:
        steps["lightly BYOL"] = ps.build_lightly(arch, size, batch, **common)[0]
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(batch, 3, size, size, generator=g).to(ctx.device) for _ in range(2))
    fns = {name: (lambda s=s: s(v1, v2)) for name, s in steps.items()}
    rounds, inner = (2, 1) if ctx.quick else (6, 5)
    times = interleave(fns, rounds=rounds, warmup=2 if ctx.quick else 3, inner=inner,
                       device=ctx.device.type)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch / t for k, t in med.items()}
    goals = {"m2t ≥ 1,000 images/s": ips["m2t"] >= 1000,
             "m2t / byol step ≤ 1.05": med["m2t"] / med["byol"] <= 1.05}
    if "lightly BYOL" in med:
        goals["m2t ≥ lightly"] = ips["m2t"] >= ips["lightly BYOL"]
        if "m2t fast path (compile)" in med:
            goals["fast path ≥ 1.2× lightly"] = (ips["m2t fast path (compile)"]
                                                 >= 1.2 * ips["lightly BYOL"])
    table = md_table(["step", "median step (ms)", "images/s"],
                     [[k, f"{1000 * t:.1f}", f"{ips[k]:.0f}"] for k, t in med.items()])
    result = {"ok": True, "table": table, "images_per_s": ips, "goals": goals,
              "settings": f"{arch} {size}px batch {batch}, autocast {amp}, channels_last, "
                          f"input on the device, {rounds} interleaved rounds of {inner} steps",
              "detail": ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items())
              + ("" if peer is None else f"; lightly not importable ({peer})")
              + ("; quick CPU run: the goals are for the GPU run" if ctx.quick else "")}
    if ctx.args.profile:
        result["profile"] = profile_step(steps["m2t"], v1, v2, ctx.device)
    return result


def profile_step(step: Callable, v1: torch.Tensor, v2: torch.Tensor,
                 device: torch.device) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step(v1, v2)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=50)


def check_detectron2(ctx: Ctx) -> dict[str, Any]:
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise Skip(f"detectron2 is not importable ({exc}); run with --install") from None
    from transfer.train import run_training

    if ctx.converted is None:
        raise Skip("no converted weights: train_resume_convert did not pass")
    out = ctx.tmp / "d2"
    dev = ["MODEL.DEVICE", ctx.device.type, "SEED", "0", "DATALOADER.NUM_WORKERS", "2"]
    coco = Path(ctx.args.assets) / "coco" if ctx.args.assets else None
    if ctx.quick or coco is None or not coco.is_dir():
        from transfer.shapes import make_shapes

        shapes = make_shapes(ctx.tmp / "shapes", n_train=8, n_val=4, size=128, max_shapes=2)
        data = dict(train_dataset=str(shapes["train_json"]), train_images=str(shapes["train_images"]),
                    test_dataset=str(shapes["val_json"]), test_images=str(shapes["val_images"]))
        # Detectron2's IterationTimer leaves the first iterations out of "time"
        iters, batch, where = 4, 2, "generated shapes, 128 px"
        config = "demo_mask_rcnn_R_18_FPN_shapes" if ctx.quick else "mask_rcnn_R_50_FPN_1x"
        sizes = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
                 "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]
    else:
        data = dict(train_dataset=str(coco / "annotations" / "instances_train2017.json"),
                    train_images=str(coco / "train2017"),
                    test_dataset=str(coco / "annotations" / "instances_val2017.json"),
                    test_images=str(coco / "val2017"))
        iters, batch, where = 20, 8, f"coco subset {COCO_SUBSET}, protocol sizes"
        config, sizes = "mask_rcnn_R_50_FPN_1x", []
    t0 = time.perf_counter()
    results = run_training(config, str(ctx.converted), output_dir=str(out), method="m2t",
                           overrides=[*dev, *sizes, "SOLVER.MAX_ITER", str(iters),
                                      "SOLVER.IMS_PER_BATCH", str(batch),
                                      "SOLVER.WARMUP_ITERS", str(iters),
                                      "TEST.PRECISE_BN.NUM_ITER", "1"], **data)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if x.strip()]
    iter_times = [r["time"] for r in records if "time" in r]
    it = statistics.median(iter_times) if iter_times else float("nan")
    box = (results.get("bbox") or {}).get("AP")
    mask = (results.get("segm") or {}).get("AP")
    ok = bool(iter_times) and "bbox" in results
    return {"ok": ok, "iteration_s": it, "wall_s": wall, "bbox_AP": box, "segm_AP": mask,
            "detail": f"{config}, {iters} iterations of {batch} images ({where}): median "
                      f"iteration {it:.3f} s, whole run with evaluation {wall:.0f} s; box AP "
                      f"{box}, mask AP {mask} (numbers of a {iters}-iteration run, not a result)"}


CHECKS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "momentum_bn": check_momentum_bn, "device_move": check_device_move, "amp": check_amp,
    "channels_last": check_channels_last, "train_resume_convert": check_train_resume_convert,
    "ddp": check_ddp, "throughput": check_throughput, "detectron2": check_detectron2,
}


def run_checks(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx(args, Path(tmp))
        for name, fn in CHECKS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            if time.monotonic() > ctx.deadline:
                row = {"status": "skip", "detail": f"out of time (--budget {args.budget} s)"}
            else:
                try:
                    res = fn(ctx)
                    row = {"status": "pass" if res.pop("ok") else "FAIL", **res}
                except Skip as exc:
                    row = {"status": "skip", "detail": str(exc)}
                except Exception as exc:  # noqa: BLE001 - one failed check must not hide the rest
                    row = {"status": "FAIL", "detail": f"{type(exc).__name__}: "
                           f"{(str(exc).strip().splitlines() or [''])[0][:300]}",
                           "traceback": traceback.format_exc()}
            row = {"check": name, "seconds": round(time.perf_counter() - t0, 1), **row}
            print(f"[{row['status']:>4}] {name} ({row['seconds']} s): {row['detail']}", flush=True)
            rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    body = [md_table(["check", "status", "s", "detail"],
                     [[r["check"], r["status"], r["seconds"], r["detail"]] for r in rows])]
    for r in rows:
        if r["check"] == "throughput" and "table" in r:
            body += ["", f"## Throughput ({r['settings']})", "", r["table"]]
            body += ["", "| goal | |", "|---|---|"]
            body += [f"| {g} | {'met' if v else 'missed'} |" for g, v in r["goals"].items()]
            if "profile" in r:
                body += ["", "Top operators of three m2t steps (`--profile`):", "", "```",
                         r["profile"], "```"]
        if "traceback" in r:
            body += ["", f"`{r['check']}` failed:", "", "```", r["traceback"].strip(), "```"]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small models and sizes (the suite's CPU run)")
    parser.add_argument("--assets", type=Path, help="folder made by --prepare-assets")
    parser.add_argument("--prepare-assets", type=Path, metavar="DIR",
                        help="gather the coco subset and wheels into DIR, then stop")
    parser.add_argument("--install", action="store_true",
                        help="install the wheels from --assets (offline) before checking")
    parser.add_argument("--profile", action="store_true", help="profile an m2t step")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds; checks that would start later are skipped")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    args = parser.parse_args(argv)
    if args.prepare_assets:
        return prepare_assets(args.prepare_assets)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu --quick)",
              file=sys.stderr)
        return 2
    if args.assets is not None and not args.assets.is_dir():
        print(f"error: {args.assets}: assets folder not found (make it with --prepare-assets)",
              file=sys.stderr)
        return 2
    if args.install:
        if args.assets is None:
            print("error: --install needs --assets", file=sys.stderr)
            return 2
        rc = install_assets(args.assets)
        if rc:
            return rc
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    rows = run_checks(args)
    info = machine(args.device)
    path = write_results("gpu_check", f"GPU check on {info.get('gpu') or args.device}",
                         render(rows), {"checks": rows, "quick": args.quick},
                         info, load_before, args.out)
    print(f"written to {path}")
    return 0 if all(r["status"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
