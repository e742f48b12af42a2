"""The two CLIs: the original command lines parse, bad values exit 2 with one line before anything is
written, `--no-verify-files`, the precompute CLI's `--verify` (on a complete store: checks it,
writes nothing, exit 1 beyond the tolerance) and `--inspect`, and its refusal of an output path that
cannot be written or that another precompute holds.

Every case runs `main()` in a fresh subprocess, as a user's command would: a CLI may initialise a
process group or change torch's global state, which must not leak into the test process.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch
from test_data import folder_root, write_cifar100  # noqa: F401 - folder_root is a fixture
from test_logit_store import edit_a_value_keeping_the_checksum

from tinyvit_lib.data import DataSpec, get_dataset, per_class_subset
from tinyvit_lib.distill import precompute
from tinyvit_lib.teachers import build_model
from tinyvit_lib.utils import FileLock

TRAIN, PRECOMPUTE = "tinyvit_lib.train", "tinyvit_lib.precompute_logits"

# One interpreter runs every case (importing torch once), calling the CLI's main() per argv.
CASES_SCRIPT = """
    import contextlib, io, json, sys
    from {module} import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
"""

# Run before the cases: makes building a teacher or loading data fail loudly (`--inspect` needs neither).
NO_TEACHER_NO_DATA = """
    import tinyvit_lib.precompute_logits as cli
    def refuse(*args, **kwargs):
        raise AssertionError("--inspect built a teacher or loaded data")
    cli.build_model = cli.load_weights = cli.get_dataset = refuse
"""


def run_cases(cases: list[list[str]], cwd: Path, module: str = TRAIN, prelude: str = "") -> list:
    """[exit status, stdout, stderr] of `module`'s main() on each argv, in one fresh interpreter that
    first runs `prelude`."""
    script = textwrap.dedent(prelude) + textwrap.dedent(CASES_SCRIPT).format(module=module)
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_refused(result: list, message: str) -> None:
    code, _, err = result
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)


# ----------------------------------------------------------------------------- python -m tinyvit_lib.train


def test_original_command_lines_parse(tmp_path):
    script = textwrap.dedent("""
        import json
        from tinyvit_lib.train import build_parser, spec_from_args
        parser = build_parser()
        specs = [spec_from_args(parser.parse_args(argv.split())) for argv in (
            "--dataset cifar100 --train-data ./data --name tinyvit_5m_baseline",
            "--dataset cifar100 --train-data ./data --name tinyvit_5m_distill --use-distillation "
            "--logits-path ./logits/cifar100_logits.pkl --distill-alpha 0.5 --distill-temp 1.0",
            "--dataset cifar100 --train-data ./data --name copy --no-verify-files",
            "--dataset cifar100 --train-data ./data --name new --use-distillation "
            "--logits-path ./logits/c --alpha 0.25 --temperature 4 --seed 3 --data-seed 7")]
        print(json.dumps([[s.data.dataset, s.data.root, s.logits_path, s.train.alpha, s.train.temperature,
                           s.data.verify_files, s.train.seed, s.data.data_seed] for s in specs]))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    base, distill, copy, new = json.loads(out.stdout.strip().splitlines()[-1])
    assert base == ["cifar100", "data", None, 0.5, 1.0, True, 0, 0]  # no teacher: alpha is not used
    assert distill == ["cifar100", "data", "./logits/cifar100_logits.pkl", 0.5, 1.0, True, 0, 0]
    assert copy[5] is False
    assert new == ["cifar100", "data", "./logits/c", 0.25, 4.0, True, 3, 7]  # the new names


def test_every_train_flag_reaches_its_field():
    from tinyvit_lib.train import build_parser, spec_from_args

    argv = (
        "--dataset synthetic --train-data ./d --img-size 48 --augment full --mix function-matching "
        "--max-per-class 5 --max-val-per-class 4 --val-per-class 3 --init-from ./w.pt --num-workers 2 "
        "--no-verify-files --check-images decode --model resnet18 --name n --output-dir ./o "
        "--epochs 7 --batch-size 48 --lr 0.002 --min-lr 3e-6 --warmup-epochs 1.5 --weight-decay 0.07 "
        "--label-smoothing 0.15 --clip-grad 2.5 --seed 11 --data-seed 13 --device cpu --amp off "
        "--amp-dtype float16 --compile --no-channels-last --no-fused-adamw --checkpoint-every 9 "
        "--use-distillation --logits-path ./l --alpha 0.25 --temperature 4"
    )
    spec = spec_from_args(build_parser().parse_args(argv.split()))
    assert asdict(spec.train) == asdict(spec.train) | dict(
        epochs=7, batch_size=48, lr=0.002, min_lr=3e-6, warmup_epochs=1.5, weight_decay=0.07,
        label_smoothing=0.15, clip_grad=2.5, seed=11, device="cpu", amp=False, amp_dtype="float16",
        compile=True, channels_last=False, fused_adamw=False, num_workers=2, checkpoint_every=9,
        alpha=0.25, temperature=4.0,
    )  # fmt: skip
    assert asdict(spec.data) == asdict(spec.data) | dict(
        dataset="synthetic", root="d", img_size=48, augment="full", mix="function-matching",
        max_per_class=5, max_val_per_class=4, val_per_class=3, data_seed=13, verify_files=False,
        check_images="decode",
    )  # fmt: skip
    assert (spec.model, spec.name, spec.output_dir, spec.init_from, spec.logits_path) == (
        "resnet18", "n", "./o", "./w.pt", "./l",
    )  # fmt: skip
    for spelling in ("./d/", "d/.", "d//"):  # one folder, one spelling: a resume compares the spec
        assert spec_from_args(build_parser().parse_args(["--name", "n", "--train-data", spelling])).data.root == "d"
    untouched = spec_from_args(build_parser().parse_args("--name n --lr 5e-6".split())).train
    assert untouched.min_lr == 5e-6 and untouched.amp is None  # min_lr follows a lower --lr; amp auto


def test_every_precompute_data_flag_reaches_the_store_spec():
    from tinyvit_lib.precompute_logits import build_parser, data_spec

    argv = (
        "--dataset synthetic --data-root ./d --no-verify-files --check-images decode --img-size 48 "
        "--max-per-class 5 --val-per-class 3 --mode replay --augment full --mix function-matching --data-seed 13"
    )
    spec = data_spec(build_parser().parse_args(argv.split()))
    assert asdict(spec) == asdict(spec) | dict(
        dataset="synthetic", root="d", verify_files=False, check_images="decode", img_size=48, max_per_class=5,
        val_per_class=3, augment="full", mix="function-matching", data_seed=13,
    )  # fmt: skip
    static = data_spec(build_parser().parse_args("--dataset synthetic".split()))
    assert (static.augment, static.mix, static.data_seed) == ("none", None, DataSpec.data_seed)  # the eval view


def test_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path):
    common = ["--dataset", "synthetic", "--output-dir", str(tmp_path / "runs"), "--name", "x"]
    cases = {
        "epochs=-1": ["--epochs", "-1"],
        "alpha=1.5": ["--use-distillation", "--teacher-model", "resnet18", "--distill-alpha", "1.5"],
        "temperature=0.0": ["--use-distillation", "--teacher-model", "resnet18", "--temperature", "0"],
        "unknown model 'resnet9000'": ["--model", "resnet9000"],
        "checkpoint not found": [
            "--use-distillation",
            "--teacher-model",
            "resnet18",
            "--teacher-checkpoint",
            str(tmp_path / "none.pt"),
        ],
        "no logit store at": ["--use-distillation", "--logits-path", str(tmp_path / "nostore")],
        "--use-distillation needs": ["--use-distillation"],
        "cannot resume: no checkpoint": ["--resume"],
        "max_per_class=0": ["--max-per-class", "0"],
        "--alpha/--temperature apply only with --use-distillation": ["--alpha", "1", "--temperature", "2"],
        "--alpha 0 leaves the teacher's term out": ["--use-distillation", "--teacher-model", "x", "--alpha", "0"],
        "warmup_epochs=3.0": ["--epochs", "2", "--warmup-epochs", "3"],
        "invalid training config: lr=nan\n": ["--lr", "nan"],
        "seed=99999999999999999999": ["--seed", "99999999999999999999"],
    }
    results = run_cases([common + argv for argv in cases.values()], tmp_path)
    for message, result in zip(cases, results):
        assert_refused(result, message)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- both CLIs: --no-verify-files


def test_a_differing_cifar100_copy_needs_no_verify_files(tmp_path):
    root = write_cifar100(tmp_path / "cifar")
    train = [
        "--dataset",
        "cifar100",
        "--train-data",
        str(root),
        "--output-dir",
        str(tmp_path / "runs"),
        "--name",
        "copy",
        "--model",
        "resnet18",
        "--epochs",
        "1",
        "--batch-size",
        "5",
    ]
    precompute = [
        "--dataset",
        "cifar100",
        "--data-root",
        str(root),
        "--teacher-model",
        "resnet18",
        "--k",
        "3",
        "--output-path",
        str(tmp_path / "store"),
    ]
    refused, trained = run_cases([train, train + ["--no-verify-files"]], tmp_path)
    assert_refused(refused, "--no-verify-files")
    assert trained[0] == 0 and "1 epochs" in trained[1], trained
    refused, stored = run_cases([precompute, precompute + ["--no-verify-files"]], tmp_path, module=PRECOMPUTE)
    assert_refused(refused, "--no-verify-files")
    assert stored[0] == 0 and "10 images x 1 epoch(s)" in stored[1], stored


# ----------------------------------------------------------------------------- python -m tinyvit_lib.precompute_logits


def test_precompute_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path):
    base = ["--dataset", "synthetic", "--max-per-class", "4", "--k", "3"]
    full = base + ["--teacher-model", "resnet18", "--output-path", str(tmp_path / "store")]
    cases = {
        "k=0 must be between 1 and the class count 10": full + ["--k", "0"],
        "k=11": full + ["--k", "11"],
        "checkpoint not found": full + ["--teacher-checkpoint", str(tmp_path / "missing.pt")],
        "unknown model 'nosuchnet'": full + ["--teacher-model", "nosuchnet"],
        "a static store holds one record per image": full + ["--mode", "static", "--epochs", "3"],
        "epochs=0 must be >= 1": full + ["--mode", "replay", "--epochs", "0"],
        "batch_size=0": full + ["--batch-size", "0"],
        "num_workers=-1": full + ["--num-workers", "-1"],
        "--output-path required": base + ["--teacher-model", "resnet18"],
        "--teacher-model and --output-path required": base,
        "--verify-samples=0 must be >= 1": full + ["--verify", "--verify-samples", "0"],  # before writing the store
        "--augment, --data-seed describe augmented views": full + ["--augment", "full", "--data-seed", "3"],
    }
    for message, result in zip(cases, run_cases(list(cases.values()), tmp_path, module=PRECOMPUTE)):
        assert_refused(result, message)
    assert not (tmp_path / "store").exists()


def test_an_image_folder_of_three_classes_gets_a_store_of_k_3_by_default(tmp_path, folder_root):  # noqa: F811
    store = tmp_path / "store"
    folder = ["--dataset", "imagenet", "--data-root", str(folder_root), "--img-size", "16"]
    (made,) = run_cases(
        [folder + ["--teacher-model", "resnet18", "--output-path", str(store)]], tmp_path, module=PRECOMPUTE
    )
    assert made[0] == 0, made
    assert json.loads((store / "manifest.json").read_text())["header"]["k"] == 3  # min(10, 3 classes)


def test_precompute_refuses_an_unwritable_or_busy_output_path_with_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    busy = tmp_path / "busy"
    cases = {
        f"cannot write a logit store at {tmp_path / 'file'}: it is a file, not a folder": tmp_path / "file",
        f"cannot write a logit store at {tmp_path / 'file' / 'store'}: Not a directory": tmp_path / "file" / "store",
        "cannot write a logit store at /proc/version/store: Not a directory": Path("/proc/version/store"),
        "cannot write a logit store at /sys/tinyvit-logit-store: ": Path("/sys/tinyvit-logit-store"),  # read-only
        f"logit store {busy} is in use by process {os.getpid()} on host {socket.gethostname()}": busy,
    }
    common = ["--dataset", "synthetic", "--max-per-class", "2", "--teacher-model", "resnet18", "--k", "3"]
    with FileLock(busy / ".lock-rank-000", what="this test"):  # another precompute writing `busy`
        results = run_cases([common + ["--output-path", str(path)] for path in cases.values()], tmp_path, PRECOMPUTE)
    for message, result in zip(cases, results):
        assert_refused(result, message)
    assert (tmp_path / "file").read_text() == "x" and [p.name for p in busy.iterdir()] == [".lock-rank-000"]
    assert not Path("/sys/tinyvit-logit-store").exists()


def _teacher_checkpoint(tmp_path: Path) -> str:
    """A ResNet-18 teacher's weights for synthetic data: the same teacher in every process."""
    torch.save(build_model("resnet18", num_classes=10, img_size=32).state_dict(), tmp_path / "t.pt")
    return str(tmp_path / "t.pt")


def _snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _verify_numbers(out: str) -> tuple[float, float]:
    """(largest value error, its tolerance) from the CLI's verify line."""
    match = re.search(r"largest value error (\S+) \(tolerance (\S+)\)", out)
    assert match, out
    return float(match.group(1)), float(match.group(2))


def test_verify_checks_a_complete_store_writes_nothing_and_exits_1_beyond_the_tolerance(tmp_path):
    store = tmp_path / "store"
    make = [
        "--dataset",
        "synthetic",
        "--max-per-class",
        "8",
        "--teacher-model",
        "resnet18",
        "--k",
        "3",
        "--teacher-checkpoint",
        _teacher_checkpoint(tmp_path),
        "--output-path",
        str(store),
        "--verify",
        "--verify-samples",
        "1000",
    ]
    ((code, out, err),) = run_cases([make], tmp_path, module=PRECOMPUTE)  # no store yet: precompute, then verify
    assert code == 0 and "80 images x 1 epoch(s)" in out and "verify: 80 records" in out and out.endswith(": ok\n")
    before = _snapshot(store)

    again, other_k, other_data = run_cases(
        [make, make + ["--k", "4"], make + ["--max-per-class", "4"]], tmp_path, module=PRECOMPUTE
    )
    assert again[0] == 0 and again[1].startswith("verify: 80 records") and "tolerance" in again[1], again
    error, tolerance = _verify_numbers(again[1])
    assert error <= tolerance < 1e-2 and "index mismatch rate 0.00% (tolerance 1.00%): ok" in again[1]
    assert_refused(other_k, "was made for something else: k: store 3, asked 4")
    assert_refused(other_data, "was made for something else: ")
    assert "dataset: store {" in other_data[2]  # the fingerprints, after the shorter lines
    assert _snapshot(store) == before  # verifying wrote nothing

    edit_a_value_keeping_the_checksum(store, position=5, delta=1.0)
    edited = _snapshot(store)
    ((code, out, err),) = run_cases([make], tmp_path, module=PRECOMPUTE)
    error, tolerance = _verify_numbers(out)
    assert code == 1 and out.rstrip().endswith("FAILED") and abs(error - 1.0) < 1e-2 and tolerance < 1e-2, out
    assert _snapshot(store) == edited


def test_inspect_describes_a_store_without_a_teacher_or_data(tmp_path):
    dataset = per_class_subset(get_dataset("synthetic"), 4)
    precompute(
        build_model("resnet18", num_classes=10, img_size=32),
        dataset,
        tmp_path / "good",
        k=3,
        teacher_name="resnet18",
        progress=False,
        spec=DataSpec(dataset="synthetic", augment="none", max_per_class=4),
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("manifest.json", "epoch-0000.bin"):
        (bad / name).write_bytes((tmp_path / "good" / name).read_bytes())
    records = bytearray((bad / "epoch-0000.bin").read_bytes())
    records[30] ^= 1
    (bad / "epoch-0000.bin").write_bytes(bytes(records))
    (tmp_path / "empty").mkdir()
    cases = [["--inspect", str(tmp_path / name)] for name in ("good", "bad", "none", "empty")]
    good, corrupted, missing, empty = run_cases(cases, tmp_path, module=PRECOMPUTE, prelude=NO_TEACHER_NO_DATA)
    code, out, err = good
    assert code == 0 and err == "", err
    for expected in (
        "teacher  resnet18, 11,181,642 parameters",
        "dataset  synthetic, split train, 40 images",
        "records  static, k=3, 1 epoch(s), data seed 0: 40 records of 24 bytes (official format: 16)",
        "spec     dataset='synthetic', img_size=32, augment='none', mix=None, max_per_class=4, val_per_class=None, "
        "data_seed=0",
        "layout   seed int64, rest float32, index int16 x 3, value float16 x 3",
        "file     epoch-0000.bin, 960 bytes, checksum ok",
    ):
        assert expected in out, out
    assert "file     epoch-0000.bin, 960 bytes, BAD" in corrupted[1]
    assert_refused(corrupted, "checksum mismatch")
    assert_refused(missing, "no logit store at")
    assert_refused(empty, f"no logit store at {tmp_path / 'empty'} (the folder is empty)")


def test_mixed_views_through_both_command_lines(tmp_path):
    # --augment ... --mix PRESET in both CLIs; a student that mixes otherwise is refused in one line
    # before its data loads (the store records its data spec), one that matches trains (on a subset of
    # the store's data).
    store = tmp_path / "fm"
    data = ["--dataset", "synthetic", "--augment", "light"]
    teacher = ["--teacher-model", "resnet18", "--teacher-checkpoint", _teacher_checkpoint(tmp_path), "--k", "10"]
    fm = ["--mix", "function-matching"]
    make = data + teacher + ["--mode", "replay", "--epochs", "1"] + fm
    by_path = ["--dataset", "synthetic", *teacher[:4], "--output-path", str(store), "--verify"]
    made, verified, by_path, static, not_replay, subset = run_cases(
        [
            make + ["--output-path", str(store)],
            make + ["--output-path", str(store), "--verify"],
            by_path,  # a store is verified from its path, teacher and data: the mode, epochs, k and views are its own
            by_path + ["--mode", "static"],  # a flag given is compared with the store, not filled in
            data + teacher + ["--mix", "--output-path", str(tmp_path / "x")],
            make + ["--max-per-class", "4", "--output-path", str(tmp_path / "y")],
        ],
        tmp_path,
        module=PRECOMPUTE,
    )
    assert made[0] == 0, made
    assert verified[0] == 0 and verified[1].rstrip().endswith(": ok"), verified
    assert by_path[0] == 0 and by_path[1].rstrip().endswith(": ok"), by_path
    assert_refused(static, "was made for something else: mode: store 'replay', asked 'static'")
    assert_refused(not_replay, "--mix, --augment describe augmented views: use them with --mode replay")
    assert_refused(subset, "not a subset")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    student = data + ["--output-dir", str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "16"]
    student += ["--max-per-class", "4", "--use-distillation", "--logits-path", str(store), "--distill-alpha", "1"]
    unmixed, full, matching = run_cases(
        [
            student + ["--name", "unmixed"],
            student + ["--name", "full", "--mix"],
            student + ["--name", "matching"] + fm,
        ],
        tmp_path,
    )
    assert_refused(unmixed, "mix: store 'function-matching', run None")
    assert_refused(full, "mix: store 'function-matching', run 'full'")
    assert matching[0] == 0, matching
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["matching"]  # the refused runs wrote nothing


def test_a_carved_store_a_student_and_its_fine_tuning_through_the_command_lines(tmp_path):
    # --val-per-class leaves the same validation images out in both CLIs, so a student's labelled set
    # is the store's; without the carve the student's images differ and the store refuses it.
    # --init-from starts a run from another run's final weights.
    store = tmp_path / "store"
    data = ["--dataset", "synthetic", "--augment", "light"]
    teacher = ["--teacher-model", "resnet18", "--teacher-checkpoint", _teacher_checkpoint(tmp_path), "--k", "5"]
    carve = ["--val-per-class", "4", "--max-per-class", "3"]
    (made,) = run_cases(
        [data + teacher + carve + ["--mode", "replay", "--epochs", "1", "--output-path", str(store)]],
        tmp_path,
        module=PRECOMPUTE,
    )
    assert made[0] == 0, made
    student = data + ["--output-dir", str(tmp_path / "runs"), "--epochs", "1", "--batch-size", "8"]
    kd = ["--use-distillation", "--logits-path", str(store), "--distill-alpha", "1"]
    pretrained = str(tmp_path / "runs" / "carved" / "last.pt")
    carved, uncarved, finetuned, missing = run_cases(
        [
            student + carve + kd + ["--name", "carved"],
            student + ["--max-per-class", "3"] + kd + ["--name", "uncarved"],
            student + carve + ["--name", "finetuned", "--init-from", pretrained],
            student + carve + ["--name", "missing", "--init-from", str(tmp_path / "nope.pt")],
        ],
        tmp_path,
    )
    assert carved[0] == 0 and finetuned[0] == 0, (carved, finetuned)
    assert_refused(uncarved, "was written for other data: val_per_class: store 4, run None")
    assert missing[0] == 2 and "nope.pt" in missing[2]
    config = json.loads((tmp_path / "runs" / "finetuned" / "config.json").read_text())
    assert config["model"]["spec"]["init_from"] == pretrained and config["model"]["init"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["carved", "finetuned"]
    # The same command again does not train over the finished run unless asked to.
    weights = (tmp_path / "runs" / "finetuned" / "last.pt").read_bytes()
    again, overwritten = run_cases(
        [
            student + carve + ["--name", "finetuned", "--init-from", pretrained],
            student + carve + ["--name", "finetuned", "--init-from", pretrained, "--overwrite", "--seed", "1"],
        ],
        tmp_path,
    )
    assert_refused(again, "already holds a run")
    assert "1 epoch(s) logged): --resume continues it, --overwrite trains afresh" in again[2]
    assert overwritten[0] == 0 and (tmp_path / "runs" / "finetuned" / "last.pt").read_bytes() != weights


def test_help_shows_every_default_once_and_no_flags_or_nones():
    from tinyvit_lib.export import build_parser as export_parser
    from tinyvit_lib.precompute_logits import build_parser as precompute_parser
    from tinyvit_lib.train import build_parser as train_parser

    text = " ".join(train_parser().format_help().split())  # argparse wraps lines at the terminal's width
    for shown in ("--epochs EPOCHS (default: 10)", "--num-workers NUM_WORKERS (default: 0)", "(default: runs)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert text.count("(default: 1e-05, or --lr if lower)") == 1 and "lower) (default" not in text
    assert "(default: 256)" in " ".join(precompute_parser().format_help().split())
    assert "(default: exported)" in " ".join(export_parser().format_help().split())
