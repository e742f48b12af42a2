"""The training CLI: the seed's command lines parse, bad values exit 2 before anything is written."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One interpreter runs every case (importing torch once), calling the CLI's main() per argv.
CASES_SCRIPT = """
    import contextlib, io, json, sys
    from tinyvit_lib.train import build_parser, main, spec_from_args
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        results.append([code, err.getvalue()])
    print(json.dumps(results))
"""


def run_cases(cases: list[list[str]], cwd: Path) -> list:
    import json
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CASES_SCRIPT), json.dumps(cases)], cwd=cwd,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, TQDM_DISABLE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_seed_command_lines_parse():
    from tinyvit_lib.train import build_parser, spec_from_args
    parser = build_parser()
    base = spec_from_args(parser.parse_args(
        "--dataset cifar100 --train-data ./data --name tinyvit_5m_baseline".split()))
    assert base.dataset == "cifar100" and base.data_root == "./data" and base.train.distill_alpha == 0.0
    distill = spec_from_args(parser.parse_args(
        ("--dataset cifar100 --train-data ./data --name tinyvit_5m_distill --use-distillation "
         "--logits-path ./logits/cifar100_logits.pkl --distill-alpha 0.5 --distill-temp 1.0").split()))
    assert distill.logits_path == "./logits/cifar100_logits.pkl"
    assert distill.train.distill_alpha == 0.5 and distill.train.distill_temp == 1.0


def test_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path):
    common = ["--dataset", "synthetic", "--output-dir", str(tmp_path / "runs"), "--name", "x"]
    cases = {
        "epochs=-1": ["--epochs", "-1"],
        "distill_alpha=1.5": ["--use-distillation", "--teacher-model", "resnet18", "--distill-alpha", "1.5"],
        "unknown model 'resnet9000'": ["--model", "resnet9000"],
        "checkpoint not found": ["--use-distillation", "--teacher-model", "resnet18",
                                 "--teacher-checkpoint", str(tmp_path / "none.pt")],
        "no logit store at": ["--use-distillation", "--logits-path", str(tmp_path / "nostore")],
        "--use-distillation needs": ["--use-distillation"],
        "--resume: no checkpoint": ["--resume"],
        "max_per_class=0": ["--max-per-class", "0"],
    }
    results = run_cases([common + argv for argv in cases.values()], tmp_path)
    for (message, argv), (code, err) in zip(cases.items(), results):
        assert code == 2, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "runs").exists()
