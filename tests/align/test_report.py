"""The pipeline's report and its promises: plots are drawn, tables filled, regressions named."""

import json

import pytest

from align import report
from align.offline.tasks import LANGUAGES
from align.pipeline import check

PREF = {"base": 0.5, "sft": 0.6, "dpo": 0.7, "grpo": 0.7}


def _results(em, pref):
    out = {}
    for name in report.MODELS:
        out[name] = {
            "exact_match": {
                "overall": em[name],
                "per_language": {lang: em[name] * i / len(LANGUAGES) for i, lang in enumerate(LANGUAGES)},
                "n": 4,
                "examples": [{"q": "What is 1 plus 1?", "reply": "2", "answer": "2"}],
            },
            "preference": {"accuracy": pref[name], "per_language": dict.fromkeys(LANGUAGES, pref[name]), "n": 4},
        }
    out["dpo"]["preference"].update(reward_accuracy=0.7, reward_margin=0.2, rewards_chosen=0.5, rewards_rejected=0.3)
    return out


def test_report_writes_tables_and_plots(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base_report.json").write_text(json.dumps({"losses": [5.0, 4.0, 3.0]}))
    grpo_keys = ["reward", "rewards/exact_answer/mean"]
    for stage, keys in (("sft", ["loss"]), ("dpo", ["loss", "rewards/accuracies"]), ("grpo", grpo_keys)):
        (tmp_path / stage).mkdir()
        history = [{"step": s, **{k: 0.7 - 0.01 * s for k in keys}} for s in range(1, 6)]
        (tmp_path / stage / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    results = _results({"base": 0.0, "sft": 0.4, "dpo": 0.5, "grpo": 0.6}, {**PREF, "dpo": 0.75})
    path = report.write(tmp_path, {"results": results, "timings": {"base_s": 1.0}})
    text = path.read_text()
    assert "| DPO (Instruct) | 50.0% | 75.0% |" in text and "accuracy 70.0%" in text
    # per language: a column each, in alphabetical order; a row per model (ar is 13th of 18: 0.5 · 12/18)
    header = "| model | ar | cs | de | en | es | fr | hi | it | ja | ko | nl | pl | pt | ro | ru | sv | ur | zh |"
    assert text.count(header) == 2
    assert "| DPO (Instruct) | 33.3% | 27.8% | 5.6% | 0.0% | 8.3% |" in text
    assert "| SFT | " + " | ".join(["60.0%"] * 18) + " |" in text
    assert (
        "| GRPO | 60.0% | 70.0% |" in text and "| GRPO | 40.0% | 33.3% | 6.7% | 0.0% |" in text
    )  # its row per language
    for png in ("training_curves", "exact_match_by_language", "preference_by_language"):
        data = (tmp_path / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"plots/{png}.png" in text


def test_check_names_every_broken_promise():
    good = _results({"base": 0.0, "sft": 0.4, "dpo": 0.5, "grpo": 0.6}, {**PREF, "dpo": 0.75})
    assert check(good) == []
    bad = _results({"base": 0.3, "sft": 0.2, "dpo": 0.1, "grpo": 0.1}, {**PREF, "dpo": 0.55})
    problems = check(bad)
    assert len(problems) == 4 and "DPO preference accuracy 55.0% does not beat SFT 60.0%" in problems
    assert "GRPO exact match 10.0% does not beat SFT, where it starts, 20.0%" in problems


def test_a_rerun_keeps_each_skipped_stage_timing(tmp_path, capsys):
    """Rerunning `make run` skips finished stages; the report shows the time each took when it was made, not 0.0 s."""
    import time

    from align.pipeline import stage

    path = tmp_path / "sft"

    def make():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
        (path / "config.json").write_text("{}")
        time.sleep(0.3)

    first = stage(2, "SFT", path, make)
    again = stage(2, "SFT", path, lambda: pytest.fail("a finished stage ran again"))
    assert first >= 0.3 and again == first
    assert f"skipped (made in {first} s)" in capsys.readouterr().out
    (path / "pipeline_stage.json").unlink()  # made before timings were recorded
    assert stage(2, "SFT", path, lambda: None) is None
    assert report.format_timings({"base_s": 61.2, "sft_s": None}).startswith("base 61.2 s, sft not recorded")
