"""The gate into a domain: a fine-tuning job with `promote` goes live only if it is not worse than what
serves the domain now, on held-out items scored by the domain's graders.

The decision rule and the held-out file reading are pure (first tests); then the whole flow on the tiny
model through a real `lorag serve` and the official client: a job that learned the domain's behaviour is
promoted over the base model, then a job trained on a deliberately bad file is refused and left inactive.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from lorag.adapters.registry import AdapterRegistry
from lorag.improve.promotion import decide, read_cases
from tests.conftest import Models, start_server
from tests.finetune_data import CODEWORD, QUESTIONS, chat_lines, upload, wait_job, write_jsonl

TUNER = "sk-promotion-tuner"
HELD_OUT = ("What is the tallest mountain?", "Name a fruit.", "How many days in a week?", "Who painted the Mona Lisa?",
            "What colour is grass?", "What is the opposite of hot?")
CONFIG = f"""
[fine_tuning]
threads = 1
rank = 8
canary_prompts = 1

[domains.codeword]
adapter = "codeword"

[[domains.codeword.graders]]
type = "string_check"
name = "says_codeword"
input = "{{{{sample.output_text}}}}"
reference = "{CODEWORD}"
operation = "like"
"""


def test_the_gate_promotes_only_what_is_not_worse_beyond_the_noise_bound() -> None:
    assert decide([1.0] * 6, [0.0] * 6)[0]
    assert not decide([0.0] * 6, [1.0] * 6)[0]
    assert decide([0.5, 0.6, 0.4, 0.5, 0.5, 0.6], [0.6, 0.5, 0.5, 0.4, 0.6, 0.5])[0]  # a wash: noise
    promoted, difference, margin, reason = decide([1.0, 0.0, 1.0, 1.0], [0.0] * 4)
    assert not promoted and "only 4 held-out items" in reason


def test_held_out_items_come_from_supervised_and_preference_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
         "provenance": {"kind": "rated", "completions": ["c"], "metadata": {"reference": "r1"}}},
        {"input": {"messages": [{"role": "user", "content": "q2"}]},
         "preferred_output": [{"role": "assistant", "content": "a2"}],
         "non_preferred_output": [{"role": "assistant", "content": "b2"}]}])
    first, second = read_cases(path, limit=10)
    assert (first.messages, first.reference, first.fields["reference"]) == ([{"role": "user", "content": "q1"}],
                                                                            "a1", "r1")
    assert (second.reference, second.fields) == ("a2", {"question": "q2", "reference": "a2"})
    assert len(read_cases(path, limit=1)) == 1


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.timeout(2400)
def test_a_better_adapter_is_promoted_and_a_worse_one_refused(models: Models, tmp_path: Path) -> None:
    keys = f'  {{ key = "{TUNER}", name = "tuner", fine_tune = true }},\n'
    server = start_server(models, tmp_path / "srv", preload=False, extra_config=CONFIG, extra_keys=keys)
    api = openai.OpenAI(base_url=server.api, api_key=TUNER, max_retries=0, timeout=600)
    learn = {"n_epochs": 60, "batch_size": 4, "learning_rate_multiplier": 10}
    try:
        held_out = upload(api, write_jsonl(tmp_path / "held.jsonl", chat_lines(HELD_OUT)))
        good = api.fine_tuning.jobs.create(
            model="tiny-base", training_file=upload(api, write_jsonl(tmp_path / "good.jsonl", chat_lines())),
            validation_file=held_out, hyperparameters=learn, extra_body={"promote": {"domain": "codeword"}})
        done = wait_job(api, good.id)
        assert done.status == "succeeded", done.error
        verdict = done.model_extra["promotion"]
        assert verdict["promoted"] and verdict["previous"] is None and verdict["items"] == len(HELD_OUT), verdict
        assert verdict["candidate_score"] > verdict["previous_score"] and verdict["graders"] == ["says_codeword"]
        reply = api.chat.completions.create(model="codeword", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            temperature=0, max_tokens=12)
        assert CODEWORD in (reply.choices[0].message.content or "")

        bad_file = write_jsonl(tmp_path / "bad.jsonl", chat_lines(answer="I do not know, sorry."))
        bad = api.fine_tuning.jobs.create(model="tiny-base", training_file=upload(api, bad_file),
                                          validation_file=held_out, hyperparameters=learn,
                                          extra_body={"promote": {"domain": "codeword"}})
        refused = wait_job(api, bad.id)
        assert refused.status == "succeeded", refused.error  # trained fine; the gate said no
        verdict = refused.model_extra["promotion"]
        assert not verdict["promoted"] and verdict["previous"] == good.id, verdict
        assert verdict["difference"] < 0 and "worse beyond the noise bound" in verdict["reason"]
        messages = [e.message for e in api.fine_tuning.jobs.list_events(bad.id, limit=100)]
        assert any(m.startswith("Not promoted:") and "stays registered, inactive" in m for m in messages)
        reply = api.chat.completions.create(model="codeword", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            temperature=0, max_tokens=12)
        assert CODEWORD in (reply.choices[0].message.content or "")  # the domain still serves the good one

        with pytest.raises(openai.BadRequestError) as unknown:
            api.fine_tuning.jobs.create(model="tiny-base", training_file=held_out,
                                        extra_body={"promote": {"domain": "nowhere"}})
        assert unknown.value.body["param"] == "promote.domain"
    finally:
        server.stop()
    registry = AdapterRegistry(server.state_dir)
    versions = {v.version for v in registry.all_versions() if v.name == "codeword"}
    assert versions == {good.id, bad.id} and registry.resolve("codeword").version == good.id
    json.dumps(verdict)  # what the job stored is plain JSON
