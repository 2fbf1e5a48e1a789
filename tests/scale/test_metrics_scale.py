"""metrics.jsonl of a 500,000-step run logged at every step (``train.log_every=1``), trimmed
on resume in bounded memory."""

from __future__ import annotations

from .conftest import measure

STEPS = 500_000

#: A file of ``STEPS`` records as ``ProgressLog`` writes them, then trimmed to the first half
#: (a resume from step 250,000) by ``trim`` (the current function, or the whole-file one).
TRIM = """
    import json, tempfile
    from pathlib import Path
    from pretrain.rundir import _step, trim_metrics
    def whole_file(path, step):  # before issue 30
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        kept = [line for line in lines if _step(line) is None or _step(line) <= step]
        path.write_bytes(b"".join(kept))
        return len(lines) - len(kept)
    trim = {trim}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        with open(path, "w") as f:
            for s in range(1, {steps} + 1):
                f.write(json.dumps({{"step": s, "epoch": s / 5004, "loss": 3.141592653589793,
                    "byol_loss": 3.141592653589793, "lr": 0.29999999999999993,
                    "m": 0.99612345678, "gap": 0.012345678901234, "img_per_s": 1234.5678901,
                    "bad_images": 0, "skipped_steps": 0, "alpha": 0.5012345678901}}) + "\\n")
        size = path.stat().st_size
        base()
        t = time.perf_counter()
        dropped = trim(path, {steps} // 2)
        seconds = time.perf_counter() - t
        with open(path, "rb") as f:
            lines = sum(1 for _ in f)
        done(dropped=dropped, lines=lines, size_mib=size / 2**20, seconds=seconds)
    """


def test_trimming_a_500k_step_metrics_file_reads_it_line_by_line() -> None:
    r = measure(TRIM.format(trim="trim_metrics", steps=STEPS))
    assert r["dropped"] == STEPS // 2 and r["lines"] == STEPS // 2
    assert r["size_mib"] > 100  # 500,000 records of ~240 bytes
    # the whole-file version held the file, its lines and the kept ones: ~4× the file
    assert r["peak_mib"] - r["base_mib"] < 32, r
    assert r["seconds"] < 60, r
