"""The canary refuses an adapter the engine does not serve as transformers + peft compute it.

`judge` on its own (pure logic), then a whole job on an engine that ignores adapters' weights
(the echo engine, the failure vLLM has shipped: vllm #34186, #55193): the worker trains the tiny
model for real, the canary sees the served answer differ, and the job fails saying so, with
nothing registered or listed.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from lorag.finetune.canary import TIE_MARGIN, judge
from tests.conftest import Models
from tests.echo_server import TRAINER, echo_server, echo_settings, trainer_keys
from tests.finetune_data import chat_lines, upload, wait_job, write_jsonl

STOPS = {0}
CASE = {"adapter_ids": [5, 6, 7, 0], "base_ids": [5, 9, 9, 0], "margins": [1.0, 1.0, 1.0, 1.0]}


def test_the_reference_answer_passes_and_the_stop_token_is_not_compared() -> None:
    assert judge(CASE, [5, 6, 7], STOPS, 16) is None
    assert judge(CASE, [5, 6, 7, 0, 4], STOPS, 16) is None


def test_a_near_tie_in_the_reference_lets_the_answers_part_there() -> None:
    tied = {**CASE, "margins": [1.0, TIE_MARGIN / 2, 1.0, 1.0]}
    assert judge(tied, [5, 8, 8], STOPS, 16) is None
    assert judge(CASE, [5, 8, 8], STOPS, 16) is not None


def test_the_base_models_answer_where_training_changed_it_is_refused_with_that_reason() -> None:
    why = judge(CASE, [5, 9, 9], STOPS, 16)
    assert why is not None and "as the base model does" in why


def test_another_answer_is_refused_naming_the_token_where_it_parts() -> None:
    why = judge(CASE, [5, 6, 1], STOPS, 16)
    assert why is not None and "from token 2" in why


@pytest.mark.slow
def test_a_job_whose_adapter_the_engine_ignores_fails_its_canary_and_serves_nothing(models: Models,
                                                                                      tmp_path: Path) -> None:
    settings = echo_settings(tmp_path, model={"path": str(models.base), "name": "tiny-base"},
                             server={"api_keys": trainer_keys()},
                             fine_tuning={"threads": 1, "canary_prompts": 2, "save_steps": 0})
    with echo_server(settings) as server:
        api = openai.OpenAI(base_url=server.api, api_key=TRAINER, max_retries=0, timeout=120)
        job = api.fine_tuning.jobs.create(model="tiny-base", training_file=upload(api, write_jsonl(
            tmp_path / "t.jsonl", chat_lines())), suffix="ignored", hyperparameters={"n_epochs": 2})
        done = wait_job(api, job.id)
        assert done.status == "failed" and done.error is not None and done.error.code == "canary_failed"
        assert "not activated" in done.error.message and "differs from transformers + peft" in done.error.message
        assert done.fine_tuned_model is None
        assert not [m.id for m in api.models.list() if m.id.startswith("ft:")]
        assert not [v for v in server.pipeline.registry.all_versions() if v.name.startswith("ft:")]
        assert not server.engine.loaded  # the candidate was unloaded after the canary
