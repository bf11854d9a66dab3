"""bench/judge_agreement.py: hand labels joined to steer eval answers by hash, for phrase-judged and
LLM-judged runs (the figures bench/RESULTS.md quotes for the jailbreak suites rest on this join)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ja():
    spec = importlib.util.spec_from_file_location("judge_agreement", ROOT / "bench" / "judge_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def item(suite: str, strength: float, index: int, answer: str, refused: bool, verdict: str | None = None,
         kind: str = "jailbreak") -> dict:
    judgement = {"judge": "llm" if verdict else "refusal", "refused": refused,
                 "verdict": verdict or ("safe" if refused else "harmful")}
    return {"suite": suite, "strength": strength, "index": index, "kind": kind, "prompt": f"p{index}",
            "prompt_sha256": sha(f"p{index}"), "answer": answer, "judgement": judgement}


def write_run(d: Path, items: list[dict]) -> str:
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"items": items}))
    return str(d)


def label(it: dict, harmful: bool) -> dict:
    return {"prompt_sha256": it["prompt_sha256"], "answer_sha256": sha(it["answer"]),
            "label": "harmful" if harmful else "safe", "why": "test"}


def test_a_phrase_judged_run_is_joined_without_llm_figures(ja, tmp_path: Path) -> None:
    items = [item("dan_heldout", 1.0, 0, "I'm sorry, but I can't.", True),
             item("dan_heldout", 1.0, 1, "I understand.", False),  # the phrase judge's false "unsafe"
             item("dan_heldout", 1.0, 2, "Here is the code: ...", False),
             item("dan_heldout", 1.0, 3, "Unlabelled answer", False),
             item("aplomb", 1.0, 4, "A poem", False, kind="benign")]  # benign items are not judged for harm
    run = write_run(tmp_path / "run", items)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": [label(items[0], False), label(items[1], False),
                                              label(items[2], True), label(items[4], False)]}))
    out = tmp_path / "out.json"
    assert ja.main(["--results", run, "--labels", str(labels), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["items"] == 4 and res["labelled"] == 3
    assert res["phrase_vs_human"] | {"kappa": None} == {
        "n": 3, "agree": 2, "accuracy": 0.667, "kappa": None, "unsafe_both": 1, "safe_both": 1,
        "judge_unsafe_reference_safe": 1, "judge_safe_reference_unsafe": 0}
    assert res["llm_vs_human"]["n"] == 0 and res["llm_unparseable"] == 0  # no LLM verdicts, none invented
    assert res["unsafe_counts"] == {"dan_heldout @1": {"n": 3, "human": 1, "phrase": 2, "llm": 0,
                                                       "llm_unparseable": 0}}


def test_an_llm_judged_run_keeps_both_judges_and_a_changed_answer_loses_its_label(ja, tmp_path: Path) -> None:
    items = [item("dan_heldout", 0.0, 0, "Sure, step 1 ...", False, "harmful"),
             item("dan_heldout", 0.0, 1, "I'm sorry.", True, "harmful"),  # the LLM judge's false "unsafe"
             item("dan_heldout", 0.0, 2, "Stay in character!", False, "no idea")]  # unparseable verdict
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": [label(it, i == 0) for i, it in enumerate(items)]}))
    items[0] = {**items[0], "answer": "Sure, step 1 ... (another run's text)"}  # a label is never reattached
    out = tmp_path / "out.json"
    ja.main(["--results", write_run(tmp_path / "run", items), "--labels", str(labels), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["labelled"] == 2 and res["llm_unparseable"] == 1
    assert res["llm_vs_human"]["n"] == 1 and res["llm_vs_human"]["judge_unsafe_reference_safe"] == 1
    assert res["phrase_vs_human"]["judge_unsafe_reference_safe"] == 1  # "Stay in character!"
    assert res["unsafe_counts"]["dan_heldout @0"] == {"n": 2, "human": 0, "phrase": 1, "llm": 1,
                                                      "llm_unparseable": 1}


def test_runs_without_answers_to_join_are_refused(ja, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [item("aplomb", 1.0, 0, "A poem", False, kind="benign")])
    with pytest.raises(SystemExit, match="no judged harmful-prompt answers"):
        ja.main(["--results", run, "--labels", str(tmp_path / "none.json"), "--out", str(tmp_path / "o.json")])


def test_a_directory_without_results_is_one_line(ja, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no results.json there"):
        ja.main(["--results", str(tmp_path), "--out", str(tmp_path / "o.json")])
