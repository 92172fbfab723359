"""The `ensel` command line: a user error of any subcommand is one line, `ensel <command>: error:
...`, exit status 2, found before any long pass and before any file is written; Ctrl-C and a
closed pipe end without a traceback; writes are atomic; --help shows the defaults."""

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import ensel
from ensel.cli import main


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's errors exit from parse_args
        return e.code


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder of tiny inputs, the current directory (the default --out folders land in it)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(f"m{i}.npy", rng.standard_normal((20, 4)).astype(np.float16))
    np.save("short.npy", np.zeros((19, 4), np.float16))
    np.save("y.npy", rng.integers(0, 4, 20))
    pathlib.Path("text.npy").write_text("not numbers\n")
    np.save("objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save("yfloat.npy", rng.random(20))
    np.save("idx.npy", np.arange(20))
    np.savez("map.npz", other=np.arange(20))
    np.save("sub.npy", np.arange(5))
    np.save("subfloat.npy", np.arange(5.0))
    np.save("subnone.npy", np.array([], np.int64))
    np.save("subfar.npy", np.array([0, 10**6]))
    (tmp_path / "empty.npy").touch()
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in, or None. Root writes anywhere that
    permissions guard, so as root it is /sys (sysfs refuses new files to everyone)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        yield pathlib.Path("/sys")
    else:
        yield None


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid on this machine")

# (argv, a part of the message); {ro} is an unwritable folder. Every row is a user error.
BAD = {
    "demo": [
        (["--out", "m0.npy"], "not a directory"),  # FileExistsError from mkdir
        (["--out", "{ro}/demo"], "cannot write"),
        (["--fresh", "--out", "m0.npy"], "not a directory"),  # refused before --fresh deletes anything
        (["--fresh", "--out", "."], "holds no run"),  # was: the current folder deleted
        (["--bogus"], "unrecognized arguments"),
        (["NO_EXTRA"], "pip install 'ensel[al]'"),  # MissingExtraError
    ],
    "run": [
        (["--initial", "", "--out", "r"], "at least one size"),
        (["--lr", "nan", "--out", "r"], "positive number"),
        (["--lr", "-1", "--out", "r"], "positive number"),
        (["--scheme", "pretrain", "--finetune-lr", "nan", "--out", "r"], "positive number"),
        (["--device", "meta", "--out", "r"], "cpu or cuda"),
        (["--device", "bogus", "--out", "r"], "not a torch device"),  # RuntimeError, after config.json and a subset
        pytest.param(["--device", "cuda", "--out", "r"], "0 CUDA device(s)", marks=no_gpu),  # RuntimeError
        (["--device", "cuda:99", "--out", "r"], "CUDA device(s)"),
        (["--out", "m0.npy"], "not a directory"),  # FileExistsError
        (["--out", "{ro}/r"], "cannot write"),  # PermissionError
        (["--sizes", "1.5", "--out", "r"], "a fraction lies in (0, 1]"),
        (["--sizes", "0", "--out", "r"], "a count is a whole number"),
        (["--sizes", "0.4,0.2", "--out", "r"], "increasing"),
        (["--methods", "bogus", "--out", "r"], "method 'bogus'"),
        (["--epochs", "0", "--out", "r"], "epochs=0"),
        (["--data", "cifar10", "--data-root", "nothing", "--out", "r"], "nothing/cifar-10-batches-py/ holding data_batch_1"),
        (["--data", "imagefolder", "--data-root", "nothing", "--out", "r"], "nothing/train/<class>/<image>"),
        (["--sizes", "0.2"], "required: --out"),
    ],
    "score": [
        (["m0.npy", "m1.npy", "--out", "m1.npy"], "an input of this command"),
        (["m0.npy", "m1.npy", "--labels", "y.npy", "--out", "y.npy"], "an input of this command"),
        (["m0.npy", "--labels", "text.npy"], "not a .npy or .npz file"),
        (["m0.npy", "--labels", "objects.npy"], "it holds Python objects"),
        (["m0.npy", "--device", "xpu"], "cpu or cuda"),
        (["m0.npy", "--device", "meta"], "cpu or cuda"),
        (["m0.npy", "m1.npy", "--labels", "yfloat.npy", "--out", "s.pt"], "integer dtype"),  # TypeError
        (["m0.npy", "--labels", "y.npy", "--out", "s.pt", "--top", "2", "--rows", "idx.npy"], "holding 'indices'"),  # IndexError
        (["m0.npy", "--top", "2", "--rows", "map.npz"], "holding 'indices'"),  # KeyError
        (["m0.npy", "--device", "bogus"], "not a torch device"),  # RuntimeError
        pytest.param(["m0.npy", "--device", "cuda"], "0 CUDA device(s)", marks=no_gpu),  # RuntimeError
        (["m0.npy", "--device", "cuda:99"], "CUDA device(s)"),
        (["m0.npy", "--out", "nodir/s.pt"], "does not exist"),  # RuntimeError of torch.save
        (["m0.npy", "--out", "adir"], "is a directory"),  # IsADirectoryError, after NAME.tmp was written
        (["m0.npy", "--out", "{ro}/s.pt"], "cannot write"),
        (["m0.npy", "--top", "2", "--top-out", "nodir/t.npy"], "does not exist"),
        (["m0.npy", "--out", "s.pt", "--top", "21"], "the files hold 20 samples"),  # after the pass and --out
        (["m0.npy", "--out", "s.pt", "--top", "2", "--by", "nll"], "--by nll needs --labels"),
        (["m0.npy", "--out", "s.pt", "--top", "20", "--exclude-top", "0.1"], "2 of them excluded"),
        (["m0.npy", "--exclude-top", "1"], "fraction in [0, 1)"),
        (["m0.npy", "--top", "-1"], "at least 0"),
        (["m0.npy", "--chunk", "0"], "at least 1"),
        (["m0.npy", "--top-out", "t.npy"], "--top-out needs --top"),
        (["m0.npy", "--out", "s.pt", "--top", "2", "--top-out", "s.pt"], "the same file"),
        (["m0.npy", "--labels", "empty.npy"], "--labels empty.npy: not a readable"),  # EOFError
        (["m0.npy", "--labels", "missing.npy"], "--labels missing.npy: No such file"),
        (["m0.npy", "short.npy", "--out", "s.pt"], "differs"),
        (["missing.npy"], "missing.npy"),
        (["m0.npy", "--backend", "bogus", "--out", "s.pt"], "backend='bogus'"),
        (["m0.npy", "--max-memory", "10", "--out", "s.pt"], "too small"),
        (["m0.npy", "--max-memory", "lots"], "expected bytes"),
        ([], "required: files"),
    ],
    "transfer": [
        (["--subset", "empty.npy", "--out", "t"], "--subset empty.npy: not a readable"),  # EOFError
        (["--subset", "subfloat.npy", "--out", "t"], "integer indices"),
        (["--subset", "subnone.npy", "--out", "t"], "empty"),
        (["--subset", "subfar.npy", "--out", "t"], "pool indices"),
        (["--subset", "missing.npy", "--out", "t"], "No such file"),
        (["--subset", "sub.npy", "--device", "bogus", "--out", "t"], "not a torch device"),
        (["--subset", "sub.npy", "--out", "m0.npy"], "not a directory"),
        (["--subset", "sub.npy", "--out", "{ro}/t"], "cannot write"),
        (["--subset", "sub.npy", "--arch", "vgg", "--out", "t"], "argument --arch: arch='vgg': unknown"),
    ],
    "consensus": [
        (["m0.npy", "m1.npy", "m2.npy", "--last=-1"], "at least 2"),  # dropped the first file
        (["m0.npy", "m1.npy", "m2.npy", "--last", "0"], "at least 2"),  # used all files
        (["m0.npy", "m1.npy", "m2.npy", "--last", "1"], "at least 2"),
        (["m0.npy"], "at least 2 logit files"),
        ([], "FILES or --run-dir"),
        (["m0.npy", "m1.npy", "--run-dir", "adir"], "not both"),
        (["m0.npy", "m1.npy", "--unselected"], "--run-dir"),
        (["m0.npy", "short.npy"], "differs"),
        (["m0.npy", "empty.npy"], "empty.npy"),
        (["m0.npy", "m1.npy", "--out", "m0.npy"], "not a directory"),  # FileExistsError
        (["m0.npy", "m1.npy", "--out", "{ro}/c"], "cannot write"),
        (["--run-dir", "adir", "--device", "bogus"], "not a torch device"),
        (["--run-dir", "adir", "--device", "cpu"], "has not finished"),
        (["--run-dir", "adir", "--unselected", "--split", "val"], "--split val"),
    ],
}


def _rows():
    for command, rows in BAD.items():
        for row in rows:
            values, marks = (row.values, row.marks) if hasattr(row, "values") else (row, ())
            argv, message = values
            yield pytest.param(command, argv, message, marks=marks, id=f"{command} {' '.join(argv)}")


@pytest.mark.parametrize("command, argv, message", list(_rows()))
def test_bad_arguments_are_one_line_before_any_work(work, unwritable, monkeypatch, capsys, command, argv, message):
    from ensel import outofcore

    def no_pass(*_):
        raise AssertionError("the scoring pass started")

    monkeypatch.setattr(outofcore._Pipeline, "chunks", no_pass)  # every check comes before the pass
    if argv == ["NO_EXTRA"]:
        # The al extra uninstalled: find_spec answers None for a module mapped to None.
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.delitem(sys.modules, "ensel.al", raising=False)
        argv = []
    if any("{ro}" in a for a in argv):
        if unwritable is None:
            pytest.skip("no unwritable folder here")
        argv = [a.replace("{ro}", str(unwritable)) for a in argv]
    before = _listing(work)
    capsys.readouterr()
    code = _run([command, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ensel {command}: error: "), err
    assert message in lines[0]
    assert _listing(work) == before  # no file written, no temporary left


def test_consensus_compares_the_last_n_files(work):
    assert _run(["consensus", "m0.npy", "m1.npy", "m2.npy", "--last", "2", "--out", "c"]) == 0
    agree = int((np.load("m1.npy").argmax(1) == np.load("m2.npy").argmax(1)).sum())  # not m0's
    assert (work / "c" / "consensus.csv").read_text().splitlines()[1:] == [f"files,2,{agree},{agree}"]
    assert sorted(p.name for p in (work / "c").iterdir()) == ["consensus.csv", "consensus.json", "consensus.png"]


def _disk_full(*_, **__):
    raise OSError(28, "No space left on device")


def test_score_failed_writes_leave_no_file(work, monkeypatch, capsys):
    def torch_save(obj, path):
        pathlib.Path(path).write_bytes(b"partial")
        _disk_full()

    def np_save(file, arr, **kw):
        file.write(b"partial")
        _disk_full()

    before = _listing(work)
    real = torch.save
    monkeypatch.setattr(torch, "save", torch_save)
    assert _run(["score", "m0.npy", "m1.npy", "--out", "s.pt"]) == 2
    assert capsys.readouterr().err == "ensel score: error: No space left on device\n"
    assert _listing(work) == before  # was: s.pt.tmp left behind
    monkeypatch.setattr(torch, "save", real)
    monkeypatch.setattr(np, "save", np_save)
    assert _run(["score", "m0.npy", "m1.npy", "--out", "s.pt", "--top", "3", "--top-out", "t.npy"]) == 2
    assert _listing(work) == sorted(before + ["s.pt"])  # the scores are whole; no t.npy, no temporary


def test_consensus_failed_writes_leave_no_file(work, monkeypatch):
    real = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        _disk_full()

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert _run(["consensus", "m0.npy", "m1.npy", "--out", "c"]) == 2
    assert list((work / "c").iterdir()) == []  # was: half a consensus.csv


def test_score_writes_atomically_and_maps_rows(work, capsys):
    np.savez("rows.npz", indices=np.arange(100, 120))  # beside the files: taken by default
    assert _run(["score", "m0.npy", "m1.npy", "--labels", "y.npy", "--top", "3", "--by", "nll",
                 "--out", "s.pt", "--top-out", "t.npy"]) == 0
    expected = ensel.score(np.stack([np.load("m0.npy"), np.load("m1.npy")]), labels=torch.from_numpy(np.load("y.npy")))
    assert np.array_equal(np.load("t.npy"), 100 + expected.top(3, by="nll").numpy())
    assert torch.equal(torch.load("s.pt", weights_only=True)["fields"]["nll"], expected.nll)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []  # no temporaries


@pytest.mark.parametrize("text, size", [("0.25", 0.25), ("25%", 0.25), ("1.0", 1.0), ("100%", 1.0), ("300", 300),
                                        ("1e3", 1000), ("3E2", 300)])
def test_sizes_are_read_by_notation(text, size):
    from ensel.al.loop import parse_size

    got = parse_size(text)
    assert got == size and type(got) is type(size)  # an int is a count, a float a fraction


@pytest.mark.parametrize("text", ["1.5", "0", "0.0", "0%", "150%", "-3", "1e-3", "2.5e3", "nan", "inf", "a lot", ""])
def test_sizes_that_are_neither_a_fraction_nor_a_count(text):
    from ensel.al.loop import parse_size

    with pytest.raises(ValueError, match="expected a fraction"):
        parse_size(text)


def test_help_shows_every_default(monkeypatch, capsys):
    from ensel.cli import build_parser

    monkeypatch.setenv("COLUMNS", "2000")  # no wrapped lines
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    for name, p in sub.choices.items():
        assert _run([name, "--help"]) == 0
        # one block per option: its line, and the next one where the help text starts there
        blocks = re.split(r"\n(?=  -)", capsys.readouterr().out)
        for action in p._actions:
            d = action.default  # nothing to show: no default, a flag's False, an empty list
            if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS or d == []:
                continue
            (block,) = [b for b in blocks if re.match(rf"  {re.escape(action.option_strings[0])}(\s|$)", b)]
            assert f"(default: {action.default})" in block or "default" in action.help, (name, block)
    assert _run(["score", "--help"]) == 0
    assert "float16, float32 or float64" in capsys.readouterr().out


# -- signals and pipes: a real process ----------------------------------------------------------------


def _default_sigint():
    # A process started with SIGINT ignored (a test run launched in the background by a shell
    # without job control, as CI may be) passes that on, and Python then never raises
    # KeyboardInterrupt: the child gets the default disposition, as a terminal's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ensel(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ENSEL_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ensel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=_default_sigint, **kw)


def test_ctrl_c_is_one_line_and_status_130(tmp_path):
    # 50,000 one-sample chunks: tens of seconds of scoring, of which the test waits for the start.
    for e in range(2):
        np.save(tmp_path / f"m{e}.npy", np.random.default_rng(e).standard_normal((50_000, 4)).astype(np.float16))
    proc = _ensel("score", "m0.npy", "m1.npy", "--chunk", "1", "--out", "s.pt", cwd=tmp_path)
    try:
        assert proc.stdout.readline().startswith(b"scoring 50000 samples")  # the pass starts now
        time.sleep(0.2)  # into the pass: the interrupt must also stop the prefetch thread
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode() == "ensel score: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.npy", "m1.npy"]


def test_closed_pipe_ends_quietly(tmp_path):
    for e in range(2):
        np.save(tmp_path / f"m{e}.npy", np.zeros((5, 3), np.float16))
    proc = _ensel("score", "m0.npy", "m1.npy", cwd=tmp_path)
    proc.stdout.close()  # the reader left before the first line (`ensel score ... | head -0`)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert err == b""  # was: a BrokenPipeError traceback
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a writer a closed pipe ended


def test_score_of_files_without_samples(work, capsys):
    np.save("none0.npy", np.zeros((0, 4), np.float32))
    np.save("none1.npy", np.zeros((0, 4), np.float32))
    assert _run(["score", "none0.npy", "none1.npy"]) == 0
    assert "scored 0 samples x 2 members" in capsys.readouterr().out
