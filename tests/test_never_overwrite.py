"""No command overwrites any of its inputs (model, property, data, instances), through any path spelling, link or
folder; bad output paths are one plain sentence. Each case runs the real CLI entry point in-process and checks
that the input's bytes are untouched."""
from __future__ import annotations

import os

import numpy as np
import pytest

import cli
from test_verify import tiny_network, write_property


@pytest.fixture
def files(tmp_path):
    model, spec, data = tmp_path / "m.onnx", tmp_path / "p.vnnlib", tmp_path / "d.npz"
    tiny_network(model)
    write_property(spec, [([-1, -1], [1, 1])], "(>= Y_0 100)")
    np.savez(data, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "instances.csv").write_text("m.onnx,p.vnnlib,5\n")
    return {"model": model, "spec": spec, "data": data, "instances": tmp_path / "instances.csv"}


def run(args, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_refused(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphcert: error:"), err
    for word in words:
        assert word in lines[0], err


# Each command's arguments, given the input files and a function that spells the output path for an input kind.
COMMANDS = {
    "verify --out model": lambda f, t: ["verify", f["model"], f["spec"], "--timeout", "5", "--out", t("model")],
    "verify --out spec": lambda f, t: ["verify", f["model"], f["spec"], "--timeout", "5", "--out", t("spec")],
    "verify --instances --out a listed model": lambda f, t: ["verify", "--instances", f["instances"],
                                                             "--out", t("model")],
    "verify --instances --out the csv": lambda f, t: ["verify", "--instances", f["instances"], "--out",
                                                      t("instances")],
    "convert -o spec": lambda f, t: ["convert", f["model"], "--spec", f["spec"], "-o", t("spec")],
    "convert -o model": lambda f, t: ["convert", f["model"], "-o", t("model")],
    "train -o data": lambda f, t: ["train", f["model"], "--data", f["data"], "--eps", "0.1", "--epochs", "1",
                                   "-o", t("data")],
}


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link", "relative path"])
@pytest.mark.parametrize("case", list(COMMANDS))
def test_no_command_overwrites_its_input(files, tmp_path, capsys, monkeypatch, case, link):
    before = {k: p.read_bytes() for k, p in files.items()}

    def target(kind):
        source = files[kind]
        if link == "symlink":
            alias = tmp_path / f"alias-{kind}"
            os.symlink(source, alias)
            return alias
        if link == "hard link":
            alias = tmp_path / f"hard-{kind}"
            os.link(source, alias)
            return alias
        if link == "relative path":
            (tmp_path / "sub").mkdir(exist_ok=True)
            monkeypatch.chdir(tmp_path / "sub")
            return os.path.join("..", source.name)
        return source

    code, err = run(COMMANDS[case](files, target), capsys)
    assert_refused(code, err, "refusing to overwrite")
    assert {k: p.read_bytes() for k, p in files.items()} == before


def test_train_checkpoint_may_not_overwrite_an_input(files, tmp_path, capsys):
    checkpoint_alias = tmp_path / "trained.onnx.ckpt"
    os.symlink(files["data"], checkpoint_alias)
    code, err = run(["train", files["model"], "--data", files["data"], "--eps", "0.1", "--epochs", "1",
                     "-o", tmp_path / "trained.onnx"], capsys)
    assert_refused(code, err, "refusing to overwrite", "ckpt")


def test_output_folder_is_a_plain_error(files, tmp_path, capsys):
    code, err = run(["convert", files["model"], "-o", tmp_path], capsys)
    assert_refused(code, err, "is a folder")


def test_missing_output_folder_is_a_plain_error(files, tmp_path, capsys):
    code, err = run(["convert", files["model"], "-o", tmp_path / "nowhere" / "b.onnx"], capsys)
    assert_refused(code, err, "does not exist")


def test_unwritable_output_is_a_plain_sentence(files, capsys):
    # /proc refuses new files even to root, unlike a chmod-ed folder.
    code, err = run(["convert", files["model"], "-o", "/proc/graphcert-bounds.onnx"], capsys)
    assert_refused(code, err, "cannot write /proc/graphcert-bounds.onnx")
    assert ".graphcert-" not in err and "Errno" not in err


def test_verify_accepts_a_shipped_model_name_and_exits_by_verdict(tmp_path, capsys):
    spec = tmp_path / "robust.vnnlib"
    lines = [f"(declare-const X_{i} Real)" for i in range(784)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.0))" for i in range(784)]
    lines.append("(assert (>= Y_0 1000000))")  # unreachable: the property holds
    spec.write_text("\n".join(lines) + "\n")
    assert cli.main(["verify", "mnist_mlp", str(spec), "--timeout", "20"]) == cli.VERDICT_EXIT_CODES["holds"]
    assert capsys.readouterr().out.strip() == "holds"


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("graphcert ")
