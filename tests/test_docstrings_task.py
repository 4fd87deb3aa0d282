"""The shipped docstrings task: real stdlib text, split by module, scored by token F1."""

from tunegap.data import docstrings
from tunegap.data.tasks import TASKS, task_of_records

from conftest import tiny_config


def test_splits_are_disjoint_by_module_and_replies_are_the_authors_sentence(tmp_path):
    lib = tmp_path / "lib"
    for i, name in enumerate(("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lam")):
        (lib / name).mkdir(parents=True)
        (lib / name / "mod.py").write_text(
            "def area(width, height):\n    '''Return the area of a width by height rectangle.\n\n    More.'''\n"
            f"    return width * height * {i}\n\n"
            "def short():\n    '''Too short.'''\n    return 1\n")
    (lib / "test").mkdir()
    (lib / "test" / "skip.py").write_text("def f(x):\n    '''This file is in a test folder and skipped.'''\n    return x\n")
    splits = docstrings.generate_docstrings(lib)
    modules = {name: {r["meta"]["function"].split("/")[0] for r in records} for name, records in splits.items()}
    assert sum(map(len, splits.values())) == 11  # one per module: "Too short." and the test folder are left out
    assert not modules["train"] & modules["test"] and not modules["validation"] & modules["test"]
    record = next(r for records in splits.values() for r in records)
    assert record["messages"][1]["content"] == "Return the area of a width by height rectangle."
    assert "Return the area" not in record["messages"][0]["content"]  # the docstring is removed from the code
    assert "return width * height" in record["messages"][0]["content"]


def test_real_stdlib_task_has_enough_held_out_examples():
    splits = docstrings.generate_docstrings()
    assert len(splits["train"]) > 1000 and len(splits["validation"]) > 100 and len(splits["test"]) > 100
    assert task_of_records(splits["test"]) is TASKS["docstrings"]


def test_summary_score_rewards_the_reference_and_not_a_wrong_reply():
    metas = [{"reference": "Return the area of a rectangle."}] * 2
    scores = docstrings.aggregate_scores(metas, ["Return the area of a rectangle.\nextra", "Open sockets quickly."])
    assert scores["summary_f1"] == 0.5 and scores["summary_exact"] == 0.5


def test_a_run_logs_validation_loss_apart_from_test_loss(tmp_path):
    from tunegap.trainer import run_or_reuse

    folder, ledger = run_or_reuse(tiny_config(tmp_path, data="docstrings", val_examples=4, max_steps=2,
                                              generate_examples=2, seq_len=256), prefix="doc")
    metrics = ledger["metrics"]
    assert metrics["val_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["val_loss"] != metrics["eval_loss"]
    assert 0 <= metrics["summary_f1"] <= 1
