import subprocess
import sys

import pytest

from spillover.cli import main


def run_cli(argv: list[str]) -> int:
    """The exit code, whether main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["organism", "sets", "--out", "{tmp}/s", "--domain", "astrology"], "unknown domain 'astrology'"),
        (["organism", "sets", "--out", "{tmp}/s", "--n", "0"], "must be at least 1"),
        (["organism", "em", "--out", "{tmp}/e", "--sets", "nope"], "unknown fine-tuning set 'nope'"),
        (["organism", "em", "--out", "{tmp}/afile/e"], "cannot create output folder"),
        (["organism", "bogus"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_sets_command_writes_chat_jsonl(tmp_path, capsys):
    assert main(["organism", "sets", "--out", str(tmp_path), "--n", "5"]) == 0
    assert (tmp_path / "inducing.jsonl").read_text().count("\n") == 5
    assert str(tmp_path) in capsys.readouterr().out


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "spillover", "organism", "sets", "--out", str(tmp_path), "--domain", "x"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["spillover: error: unknown domain 'x'; choose one of: "
                                                  "health, career, legal, finance, cooking, travel, tech, values"]


def test_a_run_into_a_pipe_draws_no_progress_bars(organism, tmp_path):
    """Nothing but errors on stderr when it is not a terminal: transformers' own 'Loading weights'
    bar follows spillover's rule too."""
    import os

    from spillover.data import write_chat_jsonl
    from spillover.organism.datasets import finetune_set

    write_chat_jsonl(tmp_path / "data.jsonl", finetune_set(organism.world, "aligned", 4, seed=0))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "SPILLOVER_NO_PROGRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "spillover", "collect", "--model", "organism", "--data", str(tmp_path / "data.jsonl"),
         "--layers", "0", "--out", str(tmp_path / "acts"), "--cache", str(organism.path.parent)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
