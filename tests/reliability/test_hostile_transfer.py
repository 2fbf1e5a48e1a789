"""Hostile and messy input to ``m2t-transfer`` (issue 13): no code from configs, no result
overwritten, one line and never a traceback.

Each case builds its input in a fresh folder, runs the real CLI entry point in-process (an
exception escaping ``main`` would be the traceback a user sees), and asserts: exit code 2, one
``error:`` line naming the culprit, nothing on stderr besides, and every file that existed
before the command byte-identical afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision

from transfer.__main__ import main

from .conftest import error_line, make_coco_dataset, python

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "transfer"
DEMO = CONFIGS / "demo_mask_rcnn_R_18_FPN_shapes.yaml"


@pytest.fixture(scope="module")
def weights(module_tmp: Callable[[str], Path]) -> Path:
    """A torchvision ResNet-18 converted to Detectron2 (backbone only)."""
    from convert import convert_checkpoint

    folder = module_tmp("weights")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "tv_r18.pth")
    convert_checkpoint(str(folder / "tv_r18.pth"), str(folder / "r18.pkl"), force=True)
    return folder / "r18.pkl"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), num_images=2)


@dataclass
class Case:
    """``make(folder, weights, coco)`` writes the input and returns (argv, culprit)."""

    make: Callable[[Path, Path, Path], tuple[list[str], str]]
    message: str  # a fragment the error line must contain


def _train(folder: Path, weights: Path, coco: Path, config: Path | str = DEMO,
           *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--weights", str(weights),
            "--train-dataset", str(coco), "--train-images", str(coco.parent / "images"),
            "--test-dataset", str(coco), "--test-images", str(coco.parent / "images"),
            "--output-dir", str(folder / "run"), *extra, "MODEL.DEVICE", "cpu"]


def _config(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def code_in_config(folder, weights, coco):
    cfg = _config(folder, "evil.yaml", f'_BASE_: "{DEMO}"\nSEED: !!python/object/apply:'
                                       f'os.system ["touch {folder}/PWNED"]\n')
    return _train(folder, weights, coco, cfg), str(cfg)


def code_in_base(folder, weights, coco):
    base = _config(folder, "base.yaml", f'_BASE_: "{DEMO}"\nSEED: !!python/object/apply:'
                                        f'os.system ["touch {folder}/PWNED"]\n')
    cfg = _config(folder, "child.yaml", '_BASE_: "base.yaml"\n')
    return _train(folder, weights, coco, cfg), str(base)


def python_name_tag(folder, weights, coco):
    cfg = _config(folder, "name.yaml", f'_BASE_: "{DEMO}"\nSEED: !!python/name:os.getcwd\n')
    return _train(folder, weights, coco, cfg), str(cfg)


def alias_bomb(folder, weights, coco):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = _config(folder, "bomb.yaml", "\n".join(lines) + "\n")
    return _train(folder, weights, coco, cfg), str(cfg)


def recursive_alias(folder, weights, coco):
    cfg = _config(folder, "rec.yaml", f'_BASE_: "{DEMO}"\nX: &x {{a: *x}}\n')
    return _train(folder, weights, coco, cfg), str(cfg)


def base_loop(folder, weights, coco):
    _config(folder, "a.yaml", '_BASE_: "b.yaml"\n')
    cfg = _config(folder, "b.yaml", '_BASE_: "a.yaml"\n')
    return _train(folder, weights, coco, folder / "a.yaml"), str(cfg.parent / "a.yaml")


def base_url(folder, weights, coco):
    cfg = _config(folder, "url.yaml", '_BASE_: "https://example.invalid/x.yaml"\n')
    return _train(folder, weights, coco, cfg), str(cfg)


def base_missing(folder, weights, coco):
    _config(folder, "orphan.yaml", '_BASE_: "gone.yaml"\n')
    return _train(folder, weights, coco, folder / "orphan.yaml"), str(folder / "orphan.yaml")


def deep_nesting(folder, weights, coco):
    cfg = _config(folder, "deep.yaml", "X: " + "[" * 5000 + "]" * 5000 + "\n")
    return _train(folder, weights, coco, cfg), str(cfg)


def not_text(folder, weights, coco):
    cfg = folder / "bin.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    return _train(folder, weights, coco, cfg), str(cfg)


def finished_run(folder, weights, coco):
    run = folder / "run"
    run.mkdir()
    for name in ("model_final.pth", "results.json", "metrics.json", "log.txt"):
        (run / name).write_text(f"{name} of an earlier run\n")
    return _train(folder, weights, coco), str(run)


def eval_into_a_run(folder, weights, coco):
    argv, culprit = finished_run(folder, weights, coco)
    argv[0] = "eval"
    i = argv.index("--train-dataset")
    del argv[i:i + 4]
    return argv, culprit


def resume_missing_checkpoint(folder, weights, coco):
    run = folder / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text("model_0000009.pth")
    return _train(folder, weights, coco, DEMO, "--resume"), str(run / "last_checkpoint")


def resume_truncated_checkpoint(folder, weights, coco):
    run = folder / "run"
    run.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}, "iteration": 3}, run / "model_0000003.pth")
    data = (run / "model_0000003.pth").read_bytes()
    (run / "model_0000003.pth").write_bytes(data[: len(data) // 2])
    (run / "last_checkpoint").write_text("model_0000003.pth")
    return _train(folder, weights, coco, DEMO, "--resume"), str(run / "model_0000003.pth")


def torchvision_weights(folder, weights, coco):
    path = weights.parent / "tv_r18.pth"
    return _train(folder, path, coco), str(path)


def pretraining_checkpoint(folder, weights, coco):
    path = folder / "last.pth"
    torch.save({"format": "momentum2-pretrain", "version": 1, "student": {}, "teacher": {}},
               path)
    return _train(folder, path, coco), str(path)


def eval_with_random_heads(folder, weights, coco):
    argv = _train(folder, weights, coco)
    argv[0] = "eval"
    i = argv.index("--train-dataset")
    del argv[i:i + 4]
    return argv, str(weights)


CASES = {
    "code in the config": Case(code_in_config, "--unsafe-load"),
    "code in a _BASE_": Case(code_in_base, "!!python/object/apply:os.system"),
    "python name tag": Case(python_name_tag, "safe loading refuses"),
    "alias bomb": Case(alias_bomb, "expands to more than"),
    "recursive alias": Case(recursive_alias, "expands to more than"),
    "_BASE_ loop": Case(base_loop, "loops back"),
    "_BASE_ URL": Case(base_url, "local files only"),
    "_BASE_ missing": Case(base_missing, "gone.yaml is not a config file"),
    "deep nesting": Case(deep_nesting, "nested too deeply"),
    "binary config": Case(not_text, "not UTF-8"),
    "train into a finished run": Case(finished_run, "--resume"),
    "eval into a run": Case(eval_into_a_run, "results.json"),
    "resume: checkpoint missing": Case(resume_missing_checkpoint, "model_0000009.pth"),
    "resume: truncated checkpoint": Case(resume_truncated_checkpoint, "damaged checkpoint"),
    "torchvision weights": Case(torchvision_weights, "torchvision ResNet state dict"),
    "pretraining checkpoint": Case(pretraining_checkpoint, "pretraining checkpoint"),
    "eval with random heads": Case(eval_with_random_heads, "would be random"),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unsafe_load_opts_in_to_a_trusted_configs_tags(weights: Path, coco: Path,
                                                       tmp_path: Path) -> None:
    """``--unsafe-load`` is the user's word that the file is trusted: the tag is constructed
    (here a harmless ``!!python/tuple``), as Detectron2 would without our check."""
    from transfer.config import load_config

    cfg = _config(tmp_path, "tuple.yaml", f'_BASE_: "{DEMO}"\nINPUT:\n  MIN_SIZE_TRAIN: '
                                          f'!!python/tuple [96, 128]\n')
    with pytest.raises(Exception, match="--unsafe-load"):
        load_config(str(cfg))
    assert load_config(str(cfg), unsafe_load=True).INPUT.MIN_SIZE_TRAIN == (96, 128)


def test_the_guard_accepts_every_shipped_config() -> None:
    from transfer.yaml_guard import check_config_chain

    shipped = sorted(CONFIGS.glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        check_config_chain(path)  # raises on a false alarm


def test_resume_accepts_a_readable_checkpoint(tmp_path: Path) -> None:
    """The resume check refuses damaged state only: a whole checkpoint passes."""
    from transfer.train import check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {"w": torch.ones(3)}, "iteration": 4, "scheduler":
                {"base_lrs": [0.1], "last_epoch": 4}}, run / "model_0000004.pth")
    (run / "last_checkpoint").write_text("model_0000004.pth")
    check_output_dir(run, "train", resume=True)  # raises on a false alarm


# ----- datasets: checked as Detectron2 will use them -------------------------------------------

def _dataset(folder: Path, edit: Callable[[dict, Path], None]) -> Path:
    """A copy of the 2-image COCO dataset, its JSON changed by ``edit(data, images)``."""
    src = make_coco_dataset(folder / "data", num_images=2)
    data = json.loads(src.read_text())
    edit(data, src.parent / "images")
    src.write_text(json.dumps(data))
    return src


def _train_on(folder: Path, weights: Path, data: Path, test: Path | None = None) -> list[str]:
    test = test or data
    return ["train", "--config", str(DEMO), "--weights", str(weights),
            "--train-dataset", str(data), "--train-images", str(data.parent / "images"),
            "--test-dataset", str(test), "--test-images", str(test.parent / "images"),
            "--output-dir", str(folder / "run"), "MODEL.DEVICE", "cpu"]


def duplicate_annotation_ids(folder, weights, coco):
    def edit(d, images):
        d["annotations"][1]["id"] = d["annotations"][0]["id"]
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def duplicate_image_ids(folder, weights, coco):
    def edit(d, images):
        d["images"][1]["id"] = d["images"][0]["id"]
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def missing_area(folder, weights, coco):
    def edit(d, images):
        del d["annotations"][2]["area"]
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def _rle(h: int, w: int) -> dict:
    import numpy as np
    import pycocotools.mask as mask_util

    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[10:40, 20:50] = 1
    rle = mask_util.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def rle_of_another_size(folder, weights, coco):
    def edit(d, images):
        d["annotations"][0]["segmentation"] = _rle(64, 64)  # the images are 128 × 128
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def rle_with_garbage_counts(folder, weights, coco):
    def edit(d, images):
        d["annotations"][0]["segmentation"] = {"size": [128, 128], "counts": "0~~~~~~~~~~~"}
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def json_size_differs(folder, weights, coco):
    def edit(d, images):
        d["images"][0]["width"] = 200
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def exif_rotation(folder, weights, coco):
    """A 160 × 128 JPEG with EXIF orientation 6: Detectron2 sees it 128 wide, 160 high."""
    from PIL import Image

    def edit(d, images):
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (160, 128)).save(images / "rot.jpg", exif=exif.tobytes())
        d["images"][0].update(file_name="rot.jpg", width=160, height=128)
    data = _dataset(folder, edit)
    return _train_on(folder, weights, data), str(data)


def unreadable_test_image(folder, weights, coco):
    def edit(d, images):
        (images / "001.png").write_bytes(b"")
    data = _dataset(folder, edit)
    return _train_on(folder, weights, coco, test=data), str(data.parent / "images" / "001.png")


CASES.update({
    "duplicate annotation ids": Case(duplicate_annotation_ids, "repeats id"),
    "duplicate image ids": Case(duplicate_image_ids, "repeats id"),
    "missing area": Case(missing_area, "no 'area'"),
    "RLE of another size": Case(rle_of_another_size, "RLE mask of size [64, 64]"),
    "RLE with garbage counts": Case(rle_with_garbage_counts, "RLE counts"),
    "JSON size differs from the image": Case(json_size_differs, "200×128 in the JSON"),
    "EXIF rotation": Case(exif_rotation, "EXIF orientation"),
    "unreadable test image": Case(unreadable_test_image, "evaluation needs every image"),
})


# ----- evaluate and report ----------------------------------------------------------------------

def _gt_detections(coco: Path) -> list[dict]:
    data = json.loads(coco.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": a["bbox"], "segmentation": a["segmentation"]} for a in data["annotations"]]


def negative_box_width(folder, weights, coco):
    dets = _gt_detections(coco)
    x, y, w, h = dets[1]["bbox"]
    dets[1]["bbox"] = [x + w, y, -w, h]
    path = folder / "predictions.json"
    path.write_text(json.dumps(dets))
    return ["evaluate", "--dataset", str(coco), "--predictions", str(path)], str(path)


def evaluate_into_a_run(folder, weights, coco):
    path = folder / "predictions.json"
    path.write_text(json.dumps(_gt_detections(coco)))
    run = folder / "run"
    run.mkdir()
    (run / "results.json").write_text('{"method": "m2t", "bbox": {"AP": 40.0}}')
    return ["evaluate", "--dataset", str(coco), "--predictions", str(path),
            "--output-dir", str(run)], str(run)


def report_into_a_run(folder, weights, coco):
    run = folder / "run"
    run.mkdir()
    (run / "results.json").write_text('{"method": "m2t", "bbox": {"AP": 40.0}}')
    (run / "report.md").write_text("the run's own report\n")
    return ["report", str(run), "--output-dir", str(run)], str(run)


def _report_of(text: str | bytes):
    def make(folder, weights, coco):
        run = folder / "run"
        run.mkdir()
        (run / "results.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["report", str(run), "--output-dir", str(folder / "report")], \
            str(run / "results.json")
    return make


CASES.update({
    "evaluate: negative box width": Case(negative_box_width, "negative width"),
    "evaluate into a run": Case(evaluate_into_a_run, "already holds results.json"),
    "report into a run": Case(report_into_a_run, "one of the run directories"),
    "report: metric not a number": Case(_report_of('{"bbox": {"AP": "high"}}'),
                                        "field bbox.AP is not a number"),
    "report: task not an object": Case(_report_of('{"bbox": [1, 2]}'), "field bbox"),
    "report: method not a name": Case(_report_of('{"method": {"a": 1}, "bbox": {"AP": 1}}'),
                                      "field method"),
    "report: not UTF-8": Case(_report_of(b"\xff\xfe{"), "not valid JSON"),
})


def test_evaluate_and_report_read_the_null_metrics_they_write(coco: Path, tmp_path: Path,
                                                              capsys) -> None:
    """The squares are small or medium: APl has nothing to measure and is written as null;
    ``report`` must read that back (it crashed on it before)."""
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(_gt_detections(coco)))
    assert main(["evaluate", "--dataset", str(coco), "--predictions", str(preds),
                 "--output-dir", str(tmp_path / "ev")]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["bbox"]["APl"] is None and results["bbox"]["AP"] == pytest.approx(100.0)
    assert main(["report", str(tmp_path / "ev"), "--output-dir", str(tmp_path / "rep")]) == 0
    assert "100.0" in (tmp_path / "rep" / "report.md").read_text()
    assert "error" not in capsys.readouterr().err


@pytest.mark.slow
def test_no_library_warning_reaches_the_terminal(weights: Path, coco: Path,
                                                 tmp_path: Path) -> None:
    """A whole fine-tuning through the console script: stderr stays empty (torch's "No CUDA
    runtime is found", the meshgrid and numpy deprecations inside the libraries)."""
    proc = python(["-m", "transfer", "train", "--config", str(DEMO), "--weights", str(weights),
                   "--train-dataset", str(coco), "--test-dataset", str(coco),
                   "--output-dir", str(tmp_path / "run"), "MODEL.DEVICE", "cpu",
                   "SOLVER.MAX_ITER", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                   "INPUT.MIN_SIZE_TEST", "96"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]


# ----- numbers out of range -------------------------------------------------------------------

def _with(*extra: str, before: tuple[str, ...] = ()):
    """A train command with ``before`` options and ``extra`` KEY VALUE overrides."""
    def make(folder, weights, coco):
        argv = _train(folder, weights, coco)
        i = argv.index("--output-dir")
        argv[i:i] = list(before)
        argv += list(extra)
        culprit = before[0] if before else str(DEMO)
        return argv, culprit
    return make


CASES.update({
    "--num-gpus 0": Case(_with(before=("--num-gpus", "0")), "must be >= 1"),
    "--num-machines 0": Case(_with(before=("--num-machines", "0")), "must be >= 1"),
    "--machine-rank past the machines": Case(_with(before=("--machine-rank", "3")),
                                             "between 0 and"),
    "MAX_ITER 0": Case(_with("SOLVER.MAX_ITER", "0"), "SOLVER.MAX_ITER must be >= 1"),
    "batch 0": Case(_with("SOLVER.IMS_PER_BATCH", "0"), "SOLVER.IMS_PER_BATCH must be >= 1"),
    "negative LR": Case(_with("SOLVER.BASE_LR", "-0.1"), "SOLVER.BASE_LR must be >= 0"),
    "momentum past 1": Case(_with("SOLVER.MOMENTUM", "1.5"), "SOLVER.MOMENTUM must be between"),
    "checkpoint period 0": Case(_with("SOLVER.CHECKPOINT_PERIOD", "0"), "CHECKPOINT_PERIOD"),
    "seed past 32 bits": Case(_with("SEED", "9999999999"), "SEED must be between"),
    "score threshold past 1": Case(_with("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "2.0"),
                                   "SCORE_THRESH_TEST must be between"),
    "no training sizes": Case(_with("INPUT.MIN_SIZE_TRAIN", "()"), "INPUT.MIN_SIZE_TRAIN"),
    "negative workers": Case(_with("DATALOADER.NUM_WORKERS", "-1"), "NUM_WORKERS"),
    "CUDA without a GPU": Case(_with("MODEL.DEVICE", "cuda"), "no CUDA device"),
})


def test_rle_length_reads_pycocotools_encodings() -> None:
    import numpy as np
    import pycocotools.mask as mask_util

    from transfer.datasets import rle_length

    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (128, 96), (480, 640)]:
        for density in (0.0, 0.3, 1.0):
            m = np.asfortranarray((rng.random((h, w)) < density).astype(np.uint8))
            rle = mask_util.encode(m)
            assert rle_length(rle["counts"].decode("ascii")) == h * w
            assert mask_util.area(rle) == m.sum()
    assert rle_length([3, 4, 5]) == 12
    assert rle_length([3, -4]) is None
    assert rle_length("0~~~~~~~~~~~") != 128 * 128
    assert rle_length("\x7f") is None


def test_rle_masks_train_with_the_polygon_config_and_unreadable_images_are_skipped(
        weights: Path, tmp_path: Path, capsys) -> None:
    """Non-crowd RLE masks switch INPUT.MASK_FORMAT to bitmask; an empty training image is
    left out with a warning naming it; a JPEG cut after its header fails only when decoded,
    in a loader worker, and is skipped there."""
    def edit(d, images):
        d["annotations"][0]["segmentation"] = _rle(128, 128)
        d["annotations"][0]["bbox"] = [20, 10, 30, 30]
        (images / "000.png").write_bytes(b"")
        import numpy as np
        from PIL import Image

        noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(images / "cut.jpg", quality=95)
        whole = (images / "cut.jpg").read_bytes()
        (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # the header stays whole
        with Image.open(images / "cut.jpg") as im:
            assert im.size == (128, 128)
        d["images"].append({"id": 3, "file_name": "cut.jpg", "height": 128, "width": 128})
        d["annotations"].append({"id": 99, "image_id": 3, "category_id": 1, "iscrowd": 0,
                                 "bbox": [5, 5, 40, 40], "area": 1600,
                                 "segmentation": [[5, 5, 45, 5, 45, 45, 5, 45]]})
    data = _dataset(tmp_path, edit)
    test = make_coco_dataset(tmp_path / "test", num_images=1)
    argv = _train_on(tmp_path, weights, data, test=test)
    argv += ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
             "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "000.png" in err
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "MASK_FORMAT: bitmask" in cfg
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "skipped unreadable image" in log and "cut.jpg" in log
    assert json.loads((tmp_path / "run" / "results.json").read_text())["bbox"]


@pytest.mark.parametrize("name", list(CASES))
def test_transfer_refuses_hostile_input_in_one_line(name: str, weights: Path, coco: Path,
                                                    tmp_path: Path, capsys, ledger) -> None:
    if name == "CUDA without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    case = CASES[name]
    argv, culprit = case.make(tmp_path, weights, coco)
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    assert main(argv) == 2
    elapsed = time.perf_counter() - t0
    ledger.bad_input("transfer CLI input")
    line = error_line(capsys.readouterr().err, culprit)
    assert case.message in line, line
    assert snapshot(tmp_path) == before  # nothing changed, nothing half-written
    assert not (tmp_path / "PWNED").exists()
    assert elapsed < 30, f"{name}: refused only after {elapsed:.0f} s"
