"""A workspace of good and broken inputs, the command line run in-process, and listings of what a run left."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensitivity.cli.main import main
from sensitivity.core import load_model

MARKER = "PWNED"  # what malicious inputs try to create


class _Evil:
    """Unpickling this runs ``touch MARKER`` (in the working directory of whoever loads it)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _save(lm, path: Path, dtype=torch.float32) -> Path:
    path.mkdir(parents=True)
    lm.model.to(dtype).save_pretrained(path)
    lm.model.to(torch.float32)
    lm.tokenizer.save_pretrained(path)
    return path


def build_workspace(root: Path) -> Path:
    """Good and broken checkpoints, corpora, schedules and tables under ``root``; returns ``root``."""
    lm = load_model("tiny:mamba2", instrument=False)
    good = _save(lm, root / "good")
    _save(lm, root / "half", torch.float16)
    shutil.copytree(good, root / "truncated")
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(good, root / "header-only")
    (root / "header-only" / "model.safetensors").write_bytes(weights[:6])
    shutil.copytree(good, root / "noweights")
    (root / "noweights" / "model.safetensors").unlink()
    shutil.copytree(root / "noweights", root / "pickled")
    (root / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil()}))
    shutil.copytree(good, root / "badjson")
    (root / "badjson" / "config.json").write_text('{"model_type": "mamba2", ')
    shutil.copytree(good, root / "notype")
    (root / "notype" / "config.json").write_text("{}")
    shutil.copytree(good, root / "listjson")
    (root / "listjson" / "config.json").write_text("[1, 2]")
    shutil.copytree(good, root / "wrongshape")
    tensors = load_file(good / "model.safetensors")
    key = next(k for k in tensors if k.endswith("out_proj.weight"))
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, root / "wrongshape" / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    shutil.copytree(good, root / "nan")
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, root / "nan" / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text('{"model_type": "llama"}')
    (root / "emptydir").mkdir()
    (root / "file.txt").write_text("not a directory\n")

    words = " ".join(f"word{i % 97} and more{i % 13}." for i in range(4000))
    (root / "text.txt").write_text(words + "\n")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    (root / "nofield.jsonl").write_text('{"body": "some text here"}\n')
    (root / "short.txt").write_text("tiny text\n")

    (root / "pyobj.yaml").write_text(f"!!python/object/apply:os.system ['touch {MARKER}']\n")
    (root / "pyobj-meta.yaml").write_text("schedule:\n  meta: !!python/object/apply:os.system "
                                          f"['touch {MARKER}']\n")  # fmt: skip
    bomb = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("schedule:\n  meta:\n" + "".join(f"    {line}\n" for line in bomb))
    (root / "empty.yaml").write_text("")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "malformed.yaml").write_text("schedule: [unclosed\n")
    (root / "empty.csv").write_text("")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (root / "wrongcols.csv").write_text("a,b\n1,2\n")
    (root / "existing-dir").mkdir()
    (root / "existing-dir" / "keep.txt").write_text("someone else's file\n")
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: a name that is not a local path fails at once instead of trying the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


def listing(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its mode, and each file's size and modification time: what a refused run
    may not change. (A directory's own mtime is left out: it moves when a temporary entry comes and goes.)"""
    out = {".": (root.stat().st_mode,)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            out[str(path.relative_to(root))] = (st.st_mode,) if kind == stat.S_IFDIR else (st.st_mode, st.st_size,
                                                                                          st.st_mtime_ns)
    return out


def cli(*argv: str) -> tuple[int, str, str]:
    """``sensitivity ARGV`` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a traceback, as a user would see it
            import traceback

            traceback.print_exception(e, file=stderr)
            code = 1
    return code, stdout.getvalue(), stderr.getvalue()
