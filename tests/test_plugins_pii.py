"""PII redaction: a table of real and look-alike values per type, and no leak at any chunk split."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorag.plugins.builtin.pii import ALL_KINDS, Vault, redact
from lorag.plugins.builtin.pii_entities import KINDS, cn_id_ok, find_entities, iban_ok, luhn_ok
from tests.plugins.host import hooks_for, make_host, run_stream

GITHUB = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n" \
      "-----END RSA PRIVATE KEY-----"

# (kind that must replace it, or None for "leave alone", the value)
EXAMPLES = [
    ("EMAIL", "jane.doe@example.com"),
    ("EMAIL", "a_b+tag@mail.example.co.uk"),
    ("EMAIL", "X9@example.io"),
    (None, "user@localhost"),
    (None, "a@b.c"),
    (None, "@handle"),
    (None, "foo..bar@example.com"),
    ("PHONE", "+44 20 7946 0958"),
    ("PHONE", "+1 (415) 555-2671"),
    ("PHONE", "0049 30 1234567"),
    ("PHONE", "+33 1 42 68 53 00"),
    ("PHONE", "(415) 555-2671"),
    ("PHONE", "415-555-2671"),
    ("PHONE", "+86 138 1234 5678"),
    ("PHONE", "13812345678"),
    ("PHONE", "139-1234-5678"),
    (None, "12812345678"),  # no Chinese mobile prefix starts 12
    (None, "1381234567"),  # one digit short
    (None, "138123456789"),  # one digit long
    (None, "123-456-7890"),  # no North American area code starts with 1
    (None, "415-155-2671"),  # nor an exchange
    (None, "+12 34"),  # too short for E.164
    (None, "2024-01-15"),
    (None, "3.14159265358979"),
    (None, "v1.2.3"),
    ("CARD", "4111 1111 1111 1111"),
    ("CARD", "5500-0000-0000-0004"),
    ("CARD", "378282246310005"),
    ("CARD", "6011111111111117"),
    (None, "4111 1111 1111 1112"),  # Luhn fails
    (None, "1234 5678 9012 3456"),
    (None, "0000 0000 0000 0000"),  # Luhn passes, but no issuer starts with 0
    (None, "12345678901234567890"),  # too long
    (None, "978-0-306-40615-7"),  # an ISBN
    ("IBAN", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "GB82WEST12345698765432"),
    ("IBAN", "FR14 2004 1010 0505 0001 3M02 606"),
    ("IBAN", "NL91ABNA0417164300"),
    (None, "DE89 3704 0044 0532 0130 01"),  # checksum fails
    (None, "GB82WEST1234569876543"),  # one character short for GB
    (None, "XX89370400440532013000"),  # no such country
    ("CN_ID", "11010519491231002X"),
    ("CN_ID", "440308199003071235"),
    ("CN_ID", "510107200502280011"),
    (None, "110105194912310021"),  # check digit wrong
    (None, "110105194902300020"),  # right check digit, but 30 February
    (None, "11010519491231002"),  # 17 digits
    ("IP", "192.168.1.23"),
    ("IP", "8.8.8.8"),
    ("IP", "2001:db8::8a2e:370:7334"),
    ("IP", "fe80::1ff:fe23:4567:890a"),
    (None, "256.1.1.1"),
    (None, "1.2.3"),
    (None, "1.2.3.4.5"),
    (None, "01.02.03.04"),
    (None, "12:30:45"),
    (None, "std::vector"),
    ("SECRET", "AKIAIOSFODNN7EXAMPLE"),
    ("SECRET", GITHUB),
    ("SECRET", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv"),
    ("SECRET", "xoxb-123456789012-abcdefghij"),
    ("SECRET", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("SECRET", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    ("SECRET", JWT),
    ("SECRET", PEM),
    (None, "sk-learn-is-a-python-library"),  # no digits: a name, not a key
    (None, "AKIA1234"),
    (None, "the password policy"),
]


@pytest.mark.parametrize(("kind", "value"), EXAMPLES, ids=[f"{k or 'none'}:{v[:24]}" for k, v in EXAMPLES])
def test_entity_table(kind: str | None, value: str) -> None:
    text = f"Details: {value}. Thanks"
    out = redact(text, frozenset(KINDS), Vault(), "input")
    if kind is None:
        assert out == text
    else:
        assert out == f"Details: [{kind}_1]. Thanks"


def test_keyed_secret_redacts_only_the_value() -> None:
    out = redact("config: password = hunter2hunter2, user=bob", frozenset(KINDS), Vault(), "input")
    assert out == "config: password = [SECRET_1], user=bob"


def test_setting_choices_match_the_detectors() -> None:
    assert tuple(ALL_KINDS) == KINDS


def test_checksums() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert cn_id_ok("11010519491231002X") and cn_id_ok("11010519491231002x")
    assert not cn_id_ok("110105194912310021")


def test_same_value_same_placeholder_and_numbering_per_kind() -> None:
    vault = Vault()
    text = "mail a@example.com, b@example.com, a@example.com; call +44 20 7946 0958"
    assert redact(text, frozenset(KINDS), vault, "input") == \
        "mail [EMAIL_1], [EMAIL_2], [EMAIL_1]; call [PHONE_1]"


def test_card_followed_by_more_digits_is_still_found() -> None:
    out = redact("card 4111 1111 1111 1111 2024 exp", frozenset(KINDS), Vault(), "input")
    assert out == "card [CARD_1] 2024 exp"


def test_only_selected_entities() -> None:
    assert redact("a@example.com 8.8.8.8", frozenset({"IP"}), Vault(), "input") == "a@example.com [IP_1]"


def test_entities_reaching_past_start_only() -> None:
    text = "old a@example.com, new b@example.com"
    assert [e.start for e in find_entities(text, start=20)] == [text.index("b@")]


@pytest.mark.parametrize("value", [
    "a.very.long.local.part.of.forty.chars.xx@department.example-university.co.uk", JWT])
def test_an_entity_longer_than_the_hold_back_is_held_whole(value: str) -> None:
    """Longer than the window, these are seen in part at first: their beginning must not leak."""
    host = make_host(default=["pii"], hold_back_chars=48)
    text = "Send it to " + value + " before Friday, " + "please " * 8
    whole, _ = run_stream(hooks_for(host), [text])
    assert whole.startswith("Send it to [") and value[:8] not in whole
    for cut in range(1, len(text)):
        assert run_stream(hooks_for(host), [text[:cut], text[cut:]]) == (whole, None), cut
    assert find_entities("to bob@exa", final=False) and not find_entities("to bob@exa", final=True)


# -- the plugin: input, context, output, restore ------------------------------------

PII_VALUES = ["jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00",
              "11010519491231002X", "192.168.1.23", GITHUB, "13812345678"]
TEXT = ("Contact jane.doe@example.com or +44 20 7946 0958. Pay with 4111 1111 1111 1111 or "
        "DE89 3704 0044 0532 0130 00; ID 11010519491231002X from 192.168.1.23 using " + GITHUB +
        ". 中文：手机 13812345678，谢谢。")


@pytest.fixture(scope="module")
def pii_host():
    return make_host(default=["pii"], hold_back_chars=64)


def test_input_redaction_by_role(pii_host) -> None:
    hooks = hooks_for(pii_host)
    messages = [{"role": "system", "content": "Operator: ops@example.com"},
                {"role": "user", "content": "I am jane.doe@example.com"},
                {"role": "user", "content": [{"type": "text", "text": "call +44 20 7946 0958"}]}]
    out = hooks.request_received(messages)
    assert out[0] == messages[0]  # system prompts are the operator's
    assert out[1]["content"] == "I am [EMAIL_1]"
    assert out[2]["content"] == [{"type": "text", "text": "call [PHONE_1]"}]
    assert messages[1]["content"] == "I am jane.doe@example.com"  # the caller's list is untouched


def test_context_redaction_copies_chunks(pii_host) -> None:
    from tests.test_plugins_hooks import Hit

    hit = Hit("kb", "a.md", "p1", "Reach the clerk at clerk@court.example.org.", 0.9)
    out = hooks_for(pii_host).context_retrieved("q", [hit])
    assert out[0].text == "Reach the clerk at [EMAIL_1]." and hit.text.endswith("court.example.org.")


def test_output_redaction_whole(pii_host) -> None:
    sent, blocked = run_stream(hooks_for(pii_host), [TEXT])
    assert blocked is None
    for value in PII_VALUES:
        assert value not in sent
    assert "[EMAIL_1]" in sent and "[SECRET_1]" in sent and "[PHONE_2]" in sent and "谢谢" in sent


def test_no_pii_at_any_single_split_point(pii_host) -> None:
    whole, _ = run_stream(hooks_for(pii_host), [TEXT])
    for cut in range(1, len(TEXT)):
        assert run_stream(hooks_for(pii_host), [TEXT[:cut], TEXT[cut:]]) == (whole, None), cut


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=1, max_value=len(TEXT) - 1), max_size=60, unique=True))
def test_no_pii_reaches_the_client_at_any_chunking(pii_host, cuts: list[int]) -> None:
    cuts = sorted(cuts)
    chunks = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True)]
    whole, _ = run_stream(hooks_for(pii_host), [TEXT])
    sent, blocked = run_stream(hooks_for(pii_host), chunks)
    assert (sent, blocked) == (whole, None)
    for value in PII_VALUES:
        assert value not in sent


def test_restore_puts_the_users_values_back_for_this_request_only() -> None:
    host = make_host(default=["pii"], settings={"pii": {"restore": True}}, hold_back_chars=32)
    hooks = hooks_for(host, request_id="r1")
    hooks.request_received([{"role": "user", "content": "mail me at jane.doe@example.com"}])
    hooks.context_retrieved("q", [{"text": "clerk: clerk@court.example.org"}])
    answer = "Sure, I will mail [EMAIL_1], not [EMAIL_2], and not model@example.net or [EMAIL_9]."
    sent, _ = run_stream(hooks, [answer[i:i + 3] for i in range(0, len(answer), 3)])
    # the user's own value comes back; the knowledge base's and the model's do not
    assert sent == "Sure, I will mail jane.doe@example.com, not [EMAIL_2], and not [EMAIL_3] or [EMAIL_9]."
    other = hooks_for(host, request_id="r2")  # another request has its own, empty vault
    assert run_stream(other, [answer])[0].startswith("Sure, I will mail [EMAIL_1], not [EMAIL_2]")
