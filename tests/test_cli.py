"""The click front end, through click.testing.CliRunner (and once through the installed command)."""
import shutil
import subprocess
import sys

from click.testing import CliRunner

from refimpl.cli.main import main


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0, r.output
    for cmd in ("info", "equivalence"):
        assert cmd in r.output


def test_info_reports_versions_threads_and_numba():
    import numba
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in r.output.splitlines()}
    assert rows["numba"] == numba.__version__
    assert "numba threads" in rows and "numba JIT" in rows and "refimpl pool" in rows
    assert rows["fastmath"].startswith("False")


def test_equivalence_table():
    r = CliRunner().invoke(main, ["equivalence", "--cases", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("forms compared"))
    row = lines[header + 2]
    assert row.startswith("direct conv = FFT conv = recurrence = scan")
    worst = float(row.split()[-3])  # the worst-error column
    assert worst < 1e-12
    pmbc = lines[header + 3].split()
    assert " ".join(pmbc[:4]) == "PMBC = iterative neuron"
    cases, worst, mismatches, it_min, it_med, it_max = pmbc[4], float(pmbc[5]), int(pmbc[6]), \
        int(pmbc[7]), float(pmbc[9]), int(pmbc[11])
    assert cases == "3" and worst < 1e-10 and mismatches == 0
    assert 1 <= it_min <= it_med <= it_max


def test_equivalence_unknown_check_is_a_usage_error():
    r = CliRunner().invoke(main, ["equivalence", "--check", "nope"])
    assert r.exit_code == 2
    assert "Invalid value for '--check': 'nope' is not one of 'ssm', 'pmbc'" in r.output


def test_installed_command_runs():
    exe = shutil.which("refimpl") or str(
        __import__("pathlib").Path(sys.executable).with_name("refimpl"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refimpl" in out.stdout


def test_progress_prints_plain_lines_when_not_a_terminal(capsys):
    """Off a terminal click's bar prints only its label; ours prints progress lines."""
    from refimpl.cli.common import progress_bar
    from refimpl.progress import EpochEnd, Step

    with progress_bar(4, "train", summary=lambda e: f"done {e.epoch}", interval=0.0) as cb:
        for i in range(4):
            cb(Step(0, 1, i, 4, i, 4, 0.5, None))
        cb(EpochEnd(0, 1, 0.5))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "train: 0/4"
    with progress_bar(2, "slow", summary=lambda e: f"epoch {e.epoch + 1} done", interval=1e9) as cb:
        cb(Step(0, 2, 0, 1, 0, 2, 0.5, None))
        cb(EpochEnd(0, 2, 0.5))  # an epoch ends: a line even though the interval has not passed
        cb(Step(1, 2, 0, 1, 1, 2, 0.4, None))
        cb(EpochEnd(1, 2, 0.4))
    slow = capsys.readouterr().err.splitlines()
    assert "slow: 1/2 (50 %)  epoch 1 done" in slow and "slow: 2/2 (100 %)  epoch 2 done" in slow
    assert "train: 2/4 (50 %)  epoch 1/1 loss 0.5" in lines
    assert lines[-1] == "train: 4/4 (100 %)  done 0"
