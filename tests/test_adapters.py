"""Adapter registry and hot swap: validation, versions, live add/switch/remove, restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from lorag.adapters.registry import AdapterRegistry
from lorag.adapters.validate import AdapterInfo, AdapterInvalid, check_inside_roots
from tests.conftest import ADMIN_KEY, ANSWER_TIMEOUT_S, USER_KEY, Models, Server, start_server
from tests.random_adapter import build_random_adapter

MESSAGES = [{"role": "user", "content": "Summarise the policy."}]


async def answer(client: openai.AsyncOpenAI, model: str) -> tuple[str, str | None]:
    reply = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    return reply.choices[0].message.content or "", ((reply.model_extra or {}).get("lorag") or {}).get("adapter")


def add(admin: httpx.Client, name: str, path: Path, **extra) -> httpx.Response:
    return admin.post("/admin/adapters", json={"name": name, "path": str(path), **extra})


def test_hot_swap_under_traffic(models: Models, server: Server, admin: httpx.Client,
                                async_client: openai.AsyncOpenAI) -> None:
    """Add, switch a name to a new version and remove while requests stream in: none fails, none is mixed up."""
    assert add(admin, "swapref1", models.adapters["swap1"]).status_code == 201
    assert add(admin, "swapref2", models.adapters["swap2"]).status_code == 201

    async def scenario() -> None:
        expected = {ref: (await answer(async_client, name))[0]
                    for ref, name in (("v1", "swapref1"), ("v2", "swapref2"), ("alpha", "alpha"))}
        results: list[tuple[str, str, str | None]] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def traffic(model: str, until: asyncio.Event = stop) -> None:
            while not until.is_set():
                try:
                    text, adapter = await answer(async_client, model)
                    results.append((model, text, adapter))
                except Exception as err:  # any failure fails the test
                    failures.append(err)

        async def admin_call(method: str, path: str, **kwargs) -> httpx.Response:
            return await asyncio.to_thread(admin.request, method, path, **kwargs)

        async def answers_arrive(count: int, model: str | None = None) -> None:
            """Wait for `count` more answers (to `model`, or to any): each step of the swap then
            overlaps real traffic however slow the machine is (fixed sleeps saw 22 answers, not 30)."""
            def answered() -> int:
                return sum(1 for asked, _, _ in results if model is None or asked == model)

            target = answered() + count
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while answered() < target:
                assert not failures, failures
                assert time.monotonic() < deadline, f"fewer than {count} answers to {model or 'any model'}"
                await asyncio.sleep(0.1)

        workers = [asyncio.create_task(traffic(m)) for m in ("alpha", "alpha", "tiny-base")]
        await answers_arrive(3)
        r = await admin_call("POST", "/admin/adapters", json={"name": "live", "path": str(models.adapters["swap1"])})
        assert r.status_code == 201, r.text
        stop_v1 = asyncio.Event()
        workers += [asyncio.create_task(traffic("live")), asyncio.create_task(traffic("live@v1", stop_v1))]
        await answers_arrive(2, "live")
        r = await admin_call("POST", "/admin/adapters",
                             json={"name": "live", "path": str(models.adapters["swap2"]), "version": "v2"})
        assert r.status_code == 201, r.text
        workers.append(asyncio.create_task(traffic("live@v2")))
        await answers_arrive(2, "live@v2")
        assert (await admin_call("POST", "/admin/adapters/live/activate", json={"version": "v1"})).status_code == 200
        await answers_arrive(2, "live")  # the second began after the switch
        assert (await admin_call("POST", "/admin/adapters/live/activate", json={"version": "v2"})).status_code == 200
        await answers_arrive(2, "live")
        assert (await admin_call("DELETE", "/admin/adapters/swapref1")).status_code == 200
        stop_v1.set()
        # the version requests for "live" got until a moment ago goes, while they still run
        assert (await admin_call("DELETE", "/admin/adapters/live", params={"version": "v1"})).status_code == 200
        await answers_arrive(4)
        stop.set()
        await asyncio.gather(*workers)

        assert failures == []
        by_version = {"live@v1": expected["v1"], "live@v2": expected["v2"]}
        seen = set()
        for model, text, adapter in results:
            if model.startswith("live"):
                assert adapter in by_version, (model, adapter)
                if "@" in model:
                    assert adapter == model
                assert text == by_version[adapter], (model, adapter)
                seen.add((model, adapter))
            elif model == "alpha":
                assert text == expected["alpha"] and adapter == "alpha@v1"
        assert ("live", "live@v1") in seen and ("live", "live@v2") in seen

    asyncio.run(scenario())
    assert admin.get("/admin/adapters/live").json()["current"] == "v2"
    models_now = {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert "swapref1" not in models_now and "live" in models_now


def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_config(**changes):
    def apply(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
    return apply


@pytest.fixture(scope="module")
def bad_adapters(models: Models) -> dict[str, tuple[Path, str]]:
    """name -> (adapter dir, text the error must contain)."""
    good = models.adapters["alpha"]
    bad = models.root / "_bad"
    bad.mkdir(exist_ok=True)
    high_rank = build_random_adapter(models.base, bad / "rank32", seed=5, rank=32)

    def truncate(path: Path) -> None:
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    return {
        "not-lora": (corrupt_copy(good, bad / "ia3", edit_config(peft_type="IA3")), "LoRA adapters only"),
        "wrong-base": (corrupt_copy(good, bad / "base", edit_config(base_model_name_or_path="meta-llama/Llama-3-8B")),
                       "trained on"),
        "rank": (high_rank, "max_lora_rank"),
        "corrupt": (corrupt_copy(good, bad / "corrupt", truncate), "cannot be read"),
        "missing": (corrupt_copy(good, bad / "missing", lambda p: (p / "adapter_model.safetensors").unlink()),
                    "no adapter_model.safetensors"),
        "modules-to-save": (corrupt_copy(good, bad / "mts", edit_config(modules_to_save=["lm_head"])), "modules_to_save"),
        "unknown-target": (corrupt_copy(good, bad / "target", edit_config(target_modules=["q_proj", "wizard_proj"])),
                           "wizard_proj"),
        "no-config": (corrupt_copy(good, bad / "noconf", lambda p: (p / "adapter_config.json").unlink()),
                      "adapter_config.json"),
        "outside-roots": (Path("/tmp"), "outside the allowed adapter roots"),
    }


def test_bad_adapters_are_refused_and_serving_goes_on(admin: httpx.Client, client: openai.OpenAI,
                                                       bad_adapters: dict[str, tuple[Path, str]]) -> None:
    before = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0)
    for name, (path, expected) in bad_adapters.items():
        response = add(admin, name, path)
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert expected in error["message"], (name, error)
        assert error["code"] == "invalid_adapter"
    listed = {row["name"] for row in admin.get("/admin/adapters").json()["data"]}
    assert not listed & set(bad_adapters)
    after = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content


def test_symlink_escape_is_refused(models: Models, admin: httpx.Client, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(models.adapters["alpha"], outside)
    link = models.root / "_link_escape"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    try:
        response = add(admin, "escape", link)
        assert response.status_code == 400 and "outside the allowed" in response.json()["error"]["message"]
        response = add(admin, "dots", models.root / ".." / ".." / outside.name)
        assert response.status_code == 400
    finally:
        link.unlink()


def test_admin_needs_admin_key(server: Server, models: Models) -> None:
    body = {"name": "x", "path": str(models.adapters["alpha"])}
    assert httpx.post(f"{server.url}/admin/adapters", json=body).status_code == 401
    user = {"authorization": f"Bearer {USER_KEY}"}
    assert httpx.post(f"{server.url}/admin/adapters", json=body, headers=user).status_code == 403
    assert httpx.delete(f"{server.url}/admin/adapters/alpha", headers=user).status_code == 403


def test_restart_serves_registered_adapters(models: Models, tmp_path: Path) -> None:
    first = start_server(models, tmp_path / "one", preload=False)
    try:
        admin = httpx.Client(base_url=first.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert add(admin, "legal", models.adapters["gamma"]).status_code == 201
        assert add(admin, "legal", models.adapters["delta"], version="v2", activate=False).status_code == 201
        client = openai.OpenAI(base_url=first.api, api_key=USER_KEY, max_retries=0)
        before = {m: client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=0)
                  .choices[0].message.content for m in ("legal", "legal@v2")}
    finally:
        assert first.stop() == 0
    second = start_server(models, tmp_path / "two", preload=False, state_dir=first.state_dir)
    try:
        client = openai.OpenAI(base_url=second.api, api_key=USER_KEY, max_retries=0)
        after = {m: client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=10, temperature=0)
                 .choices[0].message.content for m in ("legal", "legal@v2")}
        assert after == before and before["legal"] != before["legal@v2"]
    finally:
        second.stop()


# -- pure logic -------------------------------------------------------------------

INFO = AdapterInfo(rank=8, alpha=16, target_modules=("q_proj",), base_model="m")


def test_registry_ids_versions_and_persistence(models: Models, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    one = registry.register("legal", models.adapters["alpha"], INFO)
    two = registry.register("legal", models.adapters["beta"], INFO)
    other = registry.register("medical", models.adapters["gamma"], INFO, version="2024-01")
    assert (one.version, two.version, other.version) == ("v1", "v2", "2024-01")
    assert len({one.lora_int_id, two.lora_int_id, other.lora_int_id}) == 3
    assert registry.resolve("legal") == two and registry.resolve("legal@v1") == one
    registry.activate("legal", "v1")
    reloaded = AdapterRegistry(tmp_path)
    assert reloaded.resolve("legal") == one
    reloaded.unregister("legal", "v2")
    reloaded.delete_files(two)
    newest = reloaded.register("legal", models.adapters["delta"], INFO)
    assert newest.lora_int_id > other.lora_int_id  # ids are never reused
    assert newest.version == "v2"
    with pytest.raises(Exception, match="already exists"):
        reloaded.register("legal", models.adapters["delta"], INFO, version="v1")
    with pytest.raises(AdapterInvalid):
        reloaded.register("../evil", models.adapters["delta"], INFO)


def test_paths_are_confined_to_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert check_inside_roots(root / "a", [root]) == (root / "a").resolve()
    for escape in (root / ".." / "x", Path("/etc")):
        with pytest.raises(AdapterInvalid):
            check_inside_roots(escape, [root])
