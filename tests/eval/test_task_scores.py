"""Zero-shot task scoring: the toolkit's scores against a hand computation and against lm-eval on the same items;
dispatch and the errors for bad task names and malformed task YAMLs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from sensitivity.core import load_model
from sensitivity.data.tasks import BUILTIN_TASKS, task_items, task_windows
from sensitivity.eval import evaluate_tasks, lm_eval_rows, score_builtin
from sensitivity.eval import tasks as tasks_module
from sensitivity.eval.tasks import COLUMNS, _read_task_yaml, default_max_length, loglikelihoods
from sensitivity.tasks import TASKS_DIR

N = 6  # items per hand check


@pytest.fixture(scope="module")
def lm(one_thread):
    return load_model("tiny:mamba2")


@pytest.fixture
def no_lm_eval_index(monkeypatch):
    """lm-eval's task index without scanning its thousands of YAMLs (10 s): one known name."""
    monkeypatch.setattr(tasks_module, "_lm_eval_task_names", lambda: frozenset({"lambada_openai"}))


def _hand_logprobs(lm, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log-probability of ``continuation`` after ``context`` and whether it is greedy, by a plain HF forward
    of the byte-level tokens (the tiny models' tokenizer is one token per byte)."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])  # (1, L)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)  # (L, V)
    rows = logp[len(ctx) - 1 : -1]  # (C, V): the logits before each continuation token
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def _sem(xs):
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))


def test_cloze_scores_match_a_hand_computation(lm):
    items = task_items("cloze")[:N]
    hand = [_hand_logprobs(lm, it["context"], " " + it["target"]) for it in items]
    rows = {r["metric"]: r for r in score_builtin(lm, "cloze", max_items=N, batch_size=4, show_progress=False)}
    lls, greedy = [h[0] for h in hand], [float(h[1]) for h in hand]
    assert rows["acc"]["value"] == np.mean(greedy)
    assert rows["perplexity"]["value"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)
    assert rows["perplexity"]["stderr"] > 0
    assert all(r["n"] == N and r["task"] == "cloze" and "chance about 0" in r["definition"] for r in rows.values())
    bare = score_builtin(lm.model, "cloze", max_items=N, show_progress=False, tokenizer=lm.tokenizer)
    assert [r["value"] for r in bare] == [r["value"] for r in rows.values()]
    with pytest.raises(ValueError, match="the model has no tokenizer"):
        score_builtin(lm.model, "cloze", max_items=1, show_progress=False)


def test_choice_scores_match_a_hand_computation(lm):
    items = task_items("choice")[:N]
    acc, acc_norm = [], []
    for it in items:
        lls = np.array([_hand_logprobs(lm, it["context"], " " + c)[0] for c in it["choices"]])
        acc.append(float(np.argmax(lls) == it["gold"]))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in it["choices"]])) == it["gold"]))
    rows = {r["metric"]: r for r in score_builtin(lm, "choice", max_items=N, batch_size=3, show_progress=False)}
    assert (rows["acc"]["value"], rows["acc_norm"]["value"]) == (np.mean(acc), np.mean(acc_norm))
    assert rows["acc"]["stderr"] == pytest.approx(_sem(acc), abs=1e-12)
    assert rows["acc_norm"]["stderr"] == pytest.approx(_sem(acc_norm), abs=1e-12)
    assert "chance 25%" in rows["acc"]["definition"]


def test_loglikelihoods_do_not_depend_on_batching(lm):
    pairs = [([72, 105], [32, 116, 104, 101, 114, 101]), ([65] * 30, [32, 66]), ([10, 11, 12], [13])]
    one = loglikelihoods(lm, pairs, batch_size=1, show_progress=False)
    three = loglikelihoods(lm, pairs, batch_size=3, show_progress=False)
    assert [g for _, g in one] == [g for _, g in three]
    assert [ll for ll, _ in one] == pytest.approx([ll for ll, _ in three], rel=1e-5)


def test_task_windows_label_exactly_the_tokens_lm_eval_scores(lm):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=2048, batch_size=1)
    for name in BUILTIN_TASKS:
        cfg = _read_task_yaml(TASKS_DIR / name / f"{name}.yaml")
        task = TaskManager(include_defaults=False).load([cfg])["tasks"][cfg["task"]]
        task.build_all_requests(limit=N)
        requests = sorted(task.instances, key=lambda r: (r.doc_id, r.idx))
        items = task_items(name)[:N]
        windows = task_windows(name, lm.tokenizer, max_items=N)
        for i, item in enumerate(items):
            gold = 0 if name == "cloze" else item["gold"]
            (request,) = [r for r in requests if r.doc_id == i and r.idx == gold]
            ctx, cont = hflm._encode_pair(*request.args)
            n = len(ctx) + len(cont)
            assert windows.ids[i, :n].tolist() == ctx + cont
            assert windows.labels[i].ne(-100).nonzero().flatten().tolist() == list(range(len(ctx), n))
            assert windows.labels[i, len(ctx) : n].tolist() == cont


@pytest.mark.parametrize("name", ["cloze", "choice"])
def test_lm_eval_on_a_builtin_task_equals_the_toolkit(lm, name):
    pytest.importorskip("lm_eval")
    ours = {r["metric"]: r for r in score_builtin(lm, name, max_items=20, show_progress=False)}
    max_length = default_max_length(lm.tokenizer, [name])
    theirs = {r["metric"]: r for r in lm_eval_rows(lm, None, [name], max_length=max_length, limit=20,
                                                   show_progress=False)}  # fmt: skip
    assert ours.keys() == theirs.keys()
    for metric, row in ours.items():
        other = theirs[metric]
        assert (other["task"], other["n"]) == (name, 20)
        if metric == "perplexity":
            assert other["value"] == pytest.approx(row["value"], rel=1e-5)
        else:
            assert other["value"] == row["value"]
        assert other["stderr"] == pytest.approx(row["stderr"], rel=1e-4)
        assert "scored by lm-eval" in other["definition"]


def test_a_user_task_yaml_with_relative_data_runs_through_lm_eval(lm, tmp_path):
    pytest.importorskip("lm_eval")
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = (TASKS_DIR / "choice" / "choice.jsonl").read_text().splitlines(keepends=True)[:5]
    (folder / "choice.jsonl").write_text("".join(lines))
    text = (TASKS_DIR / "choice" / "choice.yaml").read_text().replace("task: sensitivity_choice", "task: my_choice")
    (folder / "mine.yaml").write_text(text)
    frame = evaluate_tasks(lm, [str(folder / "mine.yaml")], max_length=1024, show_progress=False)
    assert list(frame.columns) == list(COLUMNS)
    assert list(frame.task) == ["my_choice", "my_choice"] and list(frame.n) == [5, 5]
    ours = {r["metric"]: r["value"] for r in score_builtin(lm, "choice", max_items=5, show_progress=False)}
    assert dict(zip(frame.metric, frame.value)) == ours


def test_evaluate_tasks_uses_the_toolkit_for_builtin_tasks(lm, monkeypatch):
    def no_lm_eval(*args, **kwargs):
        raise AssertionError("lm-eval must not run for built-in tasks with engine auto")

    monkeypatch.setattr(tasks_module, "lm_eval_rows", no_lm_eval)
    frame = evaluate_tasks(lm, ["choice", "cloze"], limit=3, show_progress=False)
    assert list(frame.columns) == list(COLUMNS)
    assert list(zip(frame.task, frame.metric)) == [("choice", "acc"), ("choice", "acc_norm"), ("cloze", "acc"),
                                                   ("cloze", "perplexity")]  # fmt: skip
    assert str(frame.n.dtype) == "Int64" and set(frame.n) == {3}
    assert frame.definition.str.contains("scored by the toolkit").all()


def test_one_item_has_no_stderr(lm):
    rows = score_builtin(lm, "cloze", max_items=1, show_progress=False)
    assert all(math.isnan(r["stderr"]) for r in rows)


@pytest.mark.parametrize(
    "tasks,engine,message",
    [
        (["nope"], "builtin", "task 'nope' has no built-in scorer; allowed with engine 'builtin': cloze, choice"),
        (["nope"], "auto", "task 'nope' is not a built-in task (cloze, choice, recall, long, recall:P), an existing "
                           "task YAML file"),
        (["cloze"], "fast", "engine: 'fast' is invalid; allowed: auto, builtin, lm-eval"),
        ([], "auto", "tasks: [] is invalid; allowed: a non-empty list"),
        ("cloze", "auto", "tasks: 'cloze' is invalid"),
        (["cloze", "cloze"], "auto", "names a task twice"),
        (["/no/such/task.yaml"], "auto", "task YAML '/no/such/task.yaml' does not exist"),
    ],
)
def test_bad_task_names_are_one_line_errors(lm, no_lm_eval_index, tasks, engine, message):
    if engine == "auto" and tasks and tasks[0] != "cloze":
        pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match=None) as info:
        evaluate_tasks(lm, tasks, engine=engine, show_progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("task: [unclosed\n", "malformed task YAML '{path}': "),
        ("- a\n- b\n", "malformed task YAML '{path}': "),
        ("task: t\noutput_type: loglikelihood\n", "malformed task YAML '{path}': missing dataset_path, doc_to_text"),
        ("task: t\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_text: a\ndoc_to_target: b\n",
         "missing doc_to_choice"),
        ("task: t\ndataset_path: json\noutput_type: guess\ndoc_to_text: a\ndoc_to_target: b\n",
         "output_type 'guess' is invalid; allowed: loglikelihood"),
        ("task: t\ndataset_path: json\noutput_type: loglikelihood\ndoc_to_text: !function nowhere.fn\n"
         "doc_to_target: b\n", "malformed task YAML '{path}': "),
    ],
)
def test_malformed_task_yamls_are_one_line_errors_naming_the_file(lm, tmp_path, text, message):
    pytest.importorskip("lm_eval")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        evaluate_tasks(lm, [str(path)], show_progress=False)
    assert message.format(path=path) in str(info.value) and "\n" not in str(info.value)


def test_missing_lm_eval_is_named(lm, monkeypatch):
    def missing():
        raise ImportError("lm-eval tasks need lm-eval with its HF model: pip install 'sensitivity[eval]'")

    monkeypatch.setattr(tasks_module, "_lm_eval", missing)
    with pytest.raises(ValueError, match=r"lm-eval task names need lm-eval: pip install 'sensitivity\[eval\]'"):
        evaluate_tasks(lm, ["lambada_openai"], show_progress=False)
    with pytest.raises(ImportError, match="sensitivity\\[eval\\]"):
        evaluate_tasks(lm, ["cloze"], engine="lm-eval", show_progress=False)
    assert len(evaluate_tasks(lm, ["cloze"], limit=2, show_progress=False)) == 2  # the toolkit needs no lm-eval


def test_lm_eval_keeps_stdout_and_random_state(lm, capsys):
    pytest.importorskip("lm_eval")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lm_eval_rows(lm, None, ["cloze"], max_length=1024, limit=2, seed=7, show_progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert capsys.readouterr().out == ""


def test_a_task_yaml_data_path_is_made_absolute_against_its_folder(tmp_path):
    pytest.importorskip("lm_eval")
    shutil.copytree(TASKS_DIR / "cloze", tmp_path / "cloze")
    cfg = _read_task_yaml(tmp_path / "cloze" / "cloze.yaml")
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "cloze" / "cloze.jsonl").resolve())


def test_the_evaluate_job_scores_tasks_through_lm_eval_with_a_fitting_max_length(monkeypatch):
    pytest.importorskip("lm_eval")
    from sensitivity import jobs
    from sensitivity.eval.job import EvaluateSpec

    seen = {}
    real = tasks_module.lm_eval_rows

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks_module, "lm_eval_rows", spy)
    spec = EvaluateSpec(model="tiny:mamba2", seqlen=32, max_windows=1, tasks="cloze", engine="lm-eval", limit=3)
    result = jobs.run(spec, show_progress=False)
    rows = result.value["tasks"]
    assert [(r["task"], r["metric"], r["n"]) for r in rows] == [("cloze", "perplexity", 3), ("cloze", "acc", 3)]
    assert all("scored by lm-eval" in r["definition"] for r in rows)
    longest = default_max_length(load_model("tiny:mamba2").tokenizer, ["cloze"], floor=2)
    assert seen["max_length"] == max(32, longest) > 512  # byte tokens: the longest passage is ~900 bytes
