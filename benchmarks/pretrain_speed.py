"""Pretraining step throughput and peak memory: our m2t and byol against lightly's BYOL.

    .venv/bin/python benchmarks/pretrain_speed.py                 # CPU defaults, a few minutes
    .venv/bin/python benchmarks/pretrain_speed.py --device cuda   # GPU defaults (fast path on)

What is timed, per configuration (architecture, image size, per-device batch):

- ``m2t``, ``byol`` (and any ``--methods``): exactly what ``m2t-pretrain`` runs per step,
  ``pretrain.train.Trainer.train_step`` (LR set, inputs to the device, forward of student and
  teacher on both views, loss, backward, SGD step, teacher EMA, momentum-BN commit), on a
  Trainer built from the same config system a user runs;
- ``lightly``: BYOL assembled from lightly's public modules as in lightly's own BYOL example
  (``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``,
  ``update_momentum``, ``cosine_schedule``, ``deactivate_requires_grad``) on the same
  torchvision backbone, projector widths, batch, image size, SGD settings, device, and the
  same autocast / channels_last settings.

All models live in one process and their steps run interleaved (A, B, C, A, B, C, ...); the
table gives median step times, images/s (a step's two views of one image count once), and
ratios to our byol. Peak memory is measured per (configuration, method) in a fresh
subprocess: ``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on the CPU (torch has no
CPU allocator statistics). ``host syncs/step`` counts ``aten::_local_scalar_dense`` calls in
one profiled step (``.item()``, ``int(tensor)``, ``bool(tensor)``): each one stalls the host
until the GPU has caught up.

The fast path (``--amp bf16 --channels-last``) is on by default on CUDA and off on the CPU,
where bf16 autocast is slower than fp32 on most processors. lightly's BYOL is skipped with a
message if ``lightly`` is not importable (install: see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
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

SAMPLE_JPEG = REPO.parent / "shared" / "data" / "coco_mini" / "train2017"

CPU_CONFIGS = ["resnet18:64:32", "resnet50:224:4"]
GPU_CONFIGS = ["resnet18:64:256", "resnet50:224:128"]


def lightly_available() -> str | None:
    """None if lightly's BYOL parts import, else the reason they do not."""
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules.heads  # noqa: F401
        import lightly.models.utils  # noqa: F401
        import lightly.utils.scheduler  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip the peer
        return f"{type(exc).__name__}: {exc}"
    return None


# ----- our step: the real Trainer --------------------------------------------------------------

def image_folder_for(batch: int, root: Path) -> Path:
    """An ImageFolder of ``batch`` links to one real JPEG: the Trainer only needs it to exist."""
    folder = root / "images" / "x"
    if not folder.exists():
        folder.mkdir(parents=True)
        jpegs = sorted(SAMPLE_JPEG.glob("*.jpg"))
        if not jpegs:
            from PIL import Image
            Image.new("RGB", (64, 64)).save(folder / "0.jpg")
            jpegs = [folder / "0.jpg"]
        for i in range(batch):
            if not (folder / f"{i}.jpg").exists():
                os.symlink(jpegs[0].resolve(), folder / f"{i}.jpg")
    return folder.parent


def build_ours(method: str, arch: str, size: int, batch: int, device: str, amp: str,
               channels_last: bool, hidden: int, out_dim: int, tmp: Path,
               extra: list[str] | None = None):
    """A Trainer for ``method``, as ``m2t-pretrain train`` builds it; returns (step, trainer)."""
    from pretrain.config import load_config
    from pretrain.train import Trainer

    overrides = [f"model.method={method}", f"model.arch={arch}", f"data.batch_size={batch}",
                 f"data.image_size={size}", "data.workers=0", "train.steps=1000",
                 f"train.device={device}", f"train.amp={amp}",
                 f"train.channels_last={str(channels_last).lower()}",
                 f"model.proj_hidden_dim={hidden}", f"model.proj_dim={out_dim}", *(extra or [])]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, image_folder_for(batch, tmp), tmp / f"run_{method}")
    trainer.model.train()

    def step(v1: torch.Tensor, v2: torch.Tensor) -> None:
        trainer.train_step(v1, v2)
        trainer.step += 1  # as the loop counts it

    return step, trainer


# ----- the peer: lightly's BYOL example, on the same backbone ----------------------------------

class LightlyBYOL(nn.Module):
    """lightly's BYOL example model (examples/pytorch/byol.py), widths made configurable."""

    def __init__(self, arch: str, hidden: int, out_dim: int) -> None:
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        resnet = getattr(torchvision.models, arch)(weights=None)
        dim = resnet.fc.in_features
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = BYOLProjectionHead(dim, hidden, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden, out_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()


def build_lightly(arch: str, size: int, batch: int, device: str, amp: str, channels_last: bool,
                  hidden: int, out_dim: int, total_steps: int = 1000):
    """lightly's BYOL training step (its example's loop body), same SGD settings as ours."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from pretrain.config import Config
    from pretrain.schedules import scaled_lr

    o = Config().optim
    dev = torch.device(device)
    model = LightlyBYOL(arch, hidden, out_dim).to(dev)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(o.base_lr, batch),
                                momentum=o.momentum, weight_decay=o.weight_decay)
    state = {"step": 0}

    def autocast():
        if amp == "none":
            return torch.autocast(dev.type, enabled=False)
        return torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        m = cosine_schedule(state["step"], total_steps, 0.996, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        x0 = x0.to(dev, non_blocking=True, memory_format=memory)
        x1 = x1.to(dev, non_blocking=True, memory_format=memory)
        with autocast():
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state["step"] += 1

    return step, model


# ----- measurements ---------------------------------------------------------------------------

def make_inputs(batch: int, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised-looking batches on the host (pinned for a GPU, as the loader gives them)."""
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(batch, 3, size, size, generator=g) for _ in range(2))
    if torch.device(device).type == "cuda":
        v1, v2 = v1.pin_memory(), v2.pin_memory()
    return v1, v2


def host_syncs(step: Callable[[torch.Tensor, torch.Tensor], None], v1: torch.Tensor,
               v2: torch.Tensor) -> int:
    """``aten::_local_scalar_dense`` calls (device → host scalar reads) in one step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(v1, v2)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


def builders(args: argparse.Namespace, arch: str, size: int, batch: int, tmp: Path
             ) -> dict[str, Callable[[], Callable]]:
    common = dict(device=args.device, amp=args.amp, channels_last=args.channels_last,
                  hidden=args.hidden, out_dim=args.out_dim)
    out: dict[str, Callable[[], Callable]] = {}
    for method in args.methods:
        out[method] = (lambda m=method: build_ours(m, arch, size, batch, tmp=tmp, **common)[0])
    if args.peer:
        out["lightly"] = lambda: build_lightly(arch, size, batch, **common)[0]
        if args.amp != "none" or args.channels_last:
            plain = dict(common, amp="none", channels_last=False)
            out["lightly (fp32, as its example)"] = lambda: build_lightly(arch, size, batch, **plain)[0]
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``; unlike ``ru_maxrss`` it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: fall back to getrusage (kilobytes on Linux, bytes on macOS)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(args: argparse.Namespace) -> None:
    """Subprocess entry: build one model, run a few steps, print peak memory as JSON."""
    arch, size, batch = parse_config(args.configs[0])
    base_rss = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        step = builders(args, arch, size, batch, Path(tmp))[args.child_memory]()
        v1, v2 = make_inputs(batch, size, args.device)
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the first step allocates the optimiser state; the second is steady
            step(v1, v2)
        result: dict[str, Any] = {}
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
            result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = peak_rss_mib()
            result["peak_mib"] = peak
            result["over_imports_mib"] = peak - base_rss
    print("MEMORY " + json.dumps(result), flush=True)


def measure_memory(args: argparse.Namespace, config: str, name: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name,
           "--configs", config, "--device", args.device, "--amp", args.amp,
           "--channels-last", "on" if args.channels_last else "off",
           "--hidden", str(args.hidden), "--out-dim", str(args.out_dim),
           "--threads", str(torch.get_num_threads()),
           "--methods", *args.methods]
    if not args.peer:
        cmd.append("--no-peer")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[7:])
    print(f"memory measurement of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return {}


def parse_config(text: str) -> tuple[str, int, int]:
    arch, size, batch = text.split(":")
    return arch, int(size), int(batch)


def run_config(args: argparse.Namespace, config: str) -> list[dict[str, Any]]:
    arch, size, batch = parse_config(config)
    big = arch not in ("resnet18", "resnet34") and size >= 160
    rounds = args.rounds or (8 if big and args.device == "cpu" else 12)
    warmup = 1 if big and args.device == "cpu" else args.warmup
    print(f"\n{arch} at {size} px, batch {batch} on {args.device}: {rounds} interleaved rounds",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        steps = {name: build() for name, build in builders(args, arch, size, batch, Path(tmp)).items()}
        v1, v2 = make_inputs(batch, size, args.device)
        fns = {name: (lambda s=s: s(v1, v2)) for name, s in steps.items()}
        inner = 1 if args.device == "cpu" else args.inner
        times = interleave(fns, rounds=rounds, warmup=warmup, inner=inner, device=args.device)
        syncs = {name: host_syncs(s, v1, v2) for name, s in steps.items()} if args.syncs else {}
    rows = []
    ref = median(times["byol"]) if "byol" in times else None
    for name, ts in times.items():
        t = median(ts)
        row: dict[str, Any] = {"config": f"{arch} {size}px b{batch}", "name": name,
                               "step_s": t, "iqr_rel": spread(ts), "images_per_s": batch / t,
                               "times_s": ts,
                               "vs_byol_time": paired_ratio(ts, times["byol"]) if ref else None,
                               "vs_lightly_speed": (paired_ratio(times["lightly"], ts)
                                                    if "lightly" in times else None),
                               "host_syncs": syncs.get(name)}
        if args.memory:
            row.update({f"mem_{k}": v for k, v in measure_memory(args, config, name).items()})
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    gpu = torch.device(args.device).type == "cuda"
    mem_head = "peak GPU memory (MiB)" if gpu else "peak RSS (MiB) [over imports]"
    headers = ["config", "step", "median step (ms)", "IQR/median", "images/s",
               "step time / our byol", "throughput vs lightly", mem_head, "host syncs/step"]
    table = []
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["name"]] = r
    for config, named in by_config.items():
        for name, r in named.items():
            mem = None
            if "mem_peak_mib" in r:
                mem = f"{r['mem_peak_mib']:.0f}"
                if "mem_over_imports_mib" in r:
                    mem += f" [{r['mem_over_imports_mib']:.0f}]"
            table.append([
                config, name, fmt_ms(r["step_s"]), f"{r['iqr_rel']:.2f}", f"{r['images_per_s']:.1f}",
                f"{r['vs_byol_time']:.3f}" if r["vs_byol_time"] else None,
                f"{r['vs_lightly_speed']:.2f}×" if r["vs_lightly_speed"] else None, mem,
                r["host_syncs"],
            ])
    return md_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="ARCH:SIZE:BATCH per configuration (defaults depend on the device)")
    parser.add_argument("--methods", nargs="+", default=["m2t", "byol"],
                        help="our methods to time (model.method values)")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave lightly's BYOL out")
    parser.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                        help="autocast for every model (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--channels-last", default=None, choices=["on", "off"],
                        help="default: on for CUDA, off for the CPU")
    parser.add_argument("--hidden", type=int, default=4096, help="projector/predictor hidden width")
    parser.add_argument("--out-dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: auto)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inner", type=int, default=5, help="steps per timed block on a GPU")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--no-syncs", dest="syncs", action="store_false")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on the CPU: on a shared machine "
                             "oversubscribed OpenMP threads make timings erratic; all of the "
                             "device's on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.amp = args.amp or ("bf16" if gpu else "none")
    args.channels_last = (args.channels_last or ("on" if gpu else "off")) == "on"
    args.configs = args.configs or (GPU_CONFIGS if gpu else CPU_CONFIGS)
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.peer:
        reason = lightly_available()
        if reason is not None:
            print(f"lightly is not importable ({reason}): skipping the peer. Install it with "
                  f"`.venv/bin/python -m pip install --no-deps lightly` (see benchmarks/README.md).")
            args.peer = False
    if args.child_memory:
        child_memory(args)
        return

    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        rows.extend(run_config(args, config))
    table = render(rows, args)
    print("\n" + table)
    info = machine(args.device)
    body = [
        f"Settings: autocast {args.amp}, channels_last {args.channels_last}, projector/predictor "
        f"{args.hidden}→{args.out_dim}, SGD (momentum 0.9, wd 1e-4), torch threads "
        f"{torch.get_num_threads()}. Median of interleaved rounds; images/s = batch / median "
        f"step time (two views of an image count once); the ratio columns are medians of "
        f"per-round ratios (the timings of one round are taken moments apart).",
        "",
        table,
    ]
    if not args.peer:
        body += ["", "lightly's BYOL was not measured (lightly not importable)."]
    path = write_results("pretrain_speed", "Pretraining step: ours vs lightly's BYOL",
                         "\n".join(body), {"rows": rows, "settings": {
                             "amp": args.amp, "channels_last": args.channels_last,
                             "hidden": args.hidden, "out_dim": args.out_dim}},
                         info, load_before, args.out)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
