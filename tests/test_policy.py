"""Policy files: validation errors with file:line:field, decisions over signals, mapping, reload."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guardproxy.errors import ConfigError, PolicyError
from guardproxy.pipeline import Action
from guardproxy.policy import (
    HEADER_DECISION,
    HEADER_POLICY,
    check_policy_file,
    load_policy,
)
from guardproxy.policyset import PolicySet, load_mapping
from guardproxy.signals import ConversationSignals, Signals
from guardproxy.taxonomy import CATEGORY_IDS
from guardproxy.tomllines import KeyLines

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"
SHIPPED = ["default", "strict", "monitor"]


def shipped(name: str) -> Path:
    return POLICIES / f"{name}.toml"


# --- check: every error with file, line and field --------------------------------------------------------

BROKEN = [
    # file, [(line, field, message fragment)]
    ("wrong_type.toml", [(4, "harm_threshold", "valid number")]),
    ("unknown_field.toml", [(16, "input_rules[1].when.harm_above", "unknown field")]),
    ("missing_fail_mode.toml", [(1, "on_state_failure", "required field is missing")]),
    ("bad_category.toml", [(11, "input_rules[0].when.category_in[1]", "unknown category 'weapons'")]),
    ("bad_syntax.toml", [(5, "(file)", "TOML syntax error")]),
    ("output_condition_on_input.toml", [(11, "input_rules[0].when.reply_harm_at_least", "belongs in output_rules")]),
    ("retry_above_threshold.toml", [(10, "output.retry_below_harm", "must not exceed harm_threshold")]),
    ("duplicate_rule.toml", [(14, "output_rules[0].id", "duplicate rule id 'same'")]),
    ("unreachable_rule.toml", [(17, "input_rules[1].when", "can never match: rule 'flag-harm' comes first")]),
    (
        "many_errors.toml",
        [
            (1, "schema_version", "Input should be 1"),
            (2, "name", "pattern"),
            (4, "harm_threshold", "less than or equal to 1"),
            (5, "on_classifier_failure", "'fail_open' or 'fail_closed'"),
            (1, "on_state_failure", "required field is missing"),
            (8, "refusals.default", "at least 40 characters"),
            (9, "refusals.weapons", "unknown category 'weapons'"),
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_check_reports_every_error_with_file_line_and_field(name: str, expected: list[tuple[int, str, str]]) -> None:
    path = FIXTURES / name
    issues = check_policy_file(path)
    assert len(issues) == len(expected), [str(i) for i in issues]
    for issue, (line, field, fragment) in zip(issues, expected, strict=True):
        text = str(issue)
        assert text.startswith(f"{path}:{line}: {field}: "), text
        assert fragment in text
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.issues == tuple(str(i) for i in issues)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policies_are_valid(name: str) -> None:
    assert check_policy_file(shipped(name)) == []
    policy = load_policy(shipped(name))
    assert policy.name == name and policy.schema_version == 1


@pytest.mark.parametrize("name", ["default", "strict"])
def test_refusal_texts_are_written_per_category(name: str) -> None:
    policy = load_policy(shipped(name))
    hazards = [c for c in CATEGORY_IDS if c != "none"]
    assert set(hazards) <= set(policy.refusals), "every hazard category has its own text"
    texts = [policy.refusals[c] for c in hazards]
    assert len(set(texts)) == len(texts), "no two categories share a text"
    assert policy.refusals["default"] not in texts
    for text in texts:
        assert len(text) > 120  # a reason and an alternative, not a canned sentence


def test_strict_and_default_refusals_differ() -> None:
    default, strict = load_policy(shipped("default")), load_policy(shipped("strict"))
    assert all(default.refusals[c] != strict.refusals[c] for c in default.refusals)


def test_monitor_never_blocks() -> None:
    monitor = load_policy(shipped("monitor"))
    assert all(r.action is not Action.BLOCK for r in (*monitor.input_rules, *monitor.output_rules))
    worst = Signals(
        harm=1.0,
        category="violent_crimes",
        jailbreak=1.0,
        conversation=ConversationSignals(escalation=1.0, window_harm=1.0, history="forged"),
        state_failed=True,
    )
    assert monitor.decide_input(worst).action is Action.FLAG
    assert monitor.decide_input(Signals(classifier_failed=True)).action is Action.FLAG
    assert monitor.decide_output(Signals(harm=1.0, reply_harm=1.0, refusal="none"), final=True).action is Action.FLAG


# --- decisions: table-driven over shipped and fixture policies -------------------------------------------

CONV = ConversationSignals
INPUT_CASES = [
    # policy, signals, action, rule
    ("default", Signals(harm=0.05), Action.ALLOW, None),
    ("default", Signals(harm=0.4, category="privacy"), Action.ALLOW, None),  # below the operating point
    ("default", Signals(harm=0.7, category="privacy"), Action.BLOCK, "block-harm"),
    ("default", Signals(harm=0.1, jailbreak=0.9), Action.FLAG, "flag-jailbreak"),
    ("default", Signals(harm=0.2, conversation=CONV(escalation=0.9, window_harm=0.6)), Action.BLOCK,
     "block-escalation"),
    ("default", Signals(harm=0.35, conversation=CONV(rephrase_similarity=0.9, refusal_events=1)), Action.BLOCK,
     "block-rephrase-after-refusal"),
    ("default", Signals(harm=0.1, conversation=CONV(history="forged")), Action.FLAG, "flag-forged-history"),
    ("default", Signals(harm=0.1, classifier_failed=True), Action.FLAG, "classifier_failure"),
    ("default", Signals(harm=0.1, state_failed=True), Action.FLAG, "state_failure"),
    ("default", Signals(harm=0.9, state_failed=True), Action.BLOCK, "block-harm"),
    ("strict", Signals(harm=0.05), Action.ALLOW, None),
    ("strict", Signals(harm=0.2), Action.FLAG, "flag-uncertain-harm"),
    ("strict", Signals(harm=0.4, category="privacy"), Action.BLOCK, "block-harm"),
    ("strict", Signals(harm=0.1, jailbreak=0.9), Action.BLOCK, "block-jailbreak"),
    ("strict", Signals(harm=0.1, conversation=CONV(history="forged")), Action.BLOCK, "block-forged-history"),
    ("strict", Signals(harm=0.1, conversation=CONV(history="unverified")), Action.FLAG, "flag-unverified-history"),
    ("strict", Signals(harm=0.1, classifier_failed=True), Action.BLOCK, "classifier_failure"),
    ("strict", Signals(harm=0.1, state_failed=True), Action.BLOCK, "state_failure"),
    ("monitor", Signals(harm=0.9), Action.FLAG, "flag-harm"),
    ("monitor", Signals(harm=0.1), Action.ALLOW, None),
    ("fixture:shadow_blocks_all", Signals(harm=0.0), Action.BLOCK, "block-everything"),
    ("fixture:error_status", Signals(harm=0.6, category="violent_crimes"), Action.BLOCK, "block-harm"),
    ("fixture:error_status", Signals(classifier_failed=True), Action.BLOCK, "classifier_failure"),
]  # fmt: skip


def _policy(ref: str):  # type: ignore[no-untyped-def]
    if ref.startswith("fixture:"):
        return load_policy(FIXTURES / f"{ref.removeprefix('fixture:')}.toml")
    return load_policy(shipped(ref))


@pytest.mark.parametrize(("ref", "signals", "action", "rule"), INPUT_CASES)
def test_decide_input(ref: str, signals: Signals, action: Action, rule: str | None) -> None:
    policy = _policy(ref)
    decision = policy.decide_input(signals)
    assert (decision.action, decision.rule) == (action, rule)
    assert decision.stage == "input" and decision.policy == policy.name and decision.version == policy.version
    verdict = decision.verdict()
    assert verdict.action is action
    assert verdict.annotations[HEADER_DECISION] == action.value
    assert verdict.annotations[HEADER_POLICY] == f"{policy.name}@{policy.version}"
    if action is Action.BLOCK:
        assert decision.reply_text and len(decision.reply_text) >= 40
    else:
        assert decision.reply_text is None


def test_the_block_text_is_the_categorys_own() -> None:
    default = load_policy(shipped("default"))
    texts = {c: default.decide_input(Signals(harm=0.9, category=c)).reply_text for c in CATEGORY_IDS if c != "none"}
    assert texts["suicide_self_harm"] == default.refusals["suicide_self_harm"]
    assert "988" in (texts["suicide_self_harm"] or "")
    assert len(set(texts.values())) == len(texts)
    # a rule's own reply wins over the category text
    escalation = default.decide_input(
        Signals(harm=0.1, category="privacy", conversation=CONV(escalation=0.95, window_harm=0.7))
    )
    assert escalation.reply_text != default.refusals["privacy"] and "step by step" in (escalation.reply_text or "")


def test_error_delivery_carries_status() -> None:
    policy = load_policy(FIXTURES / "error_status.toml")
    decision = policy.decide_input(Signals(harm=0.9, category="violent_crimes"))
    assert decision.status_code == 403
    assert decision.reply_text == policy.refusals["violent_crimes"]
    failure = policy.decide_input(Signals(classifier_failed=True))
    assert failure.status_code == 403 and "safety service" in (failure.reply_text or "")
    assert load_policy(shipped("default")).decide_input(Signals(harm=0.9)).status_code is None


OUTPUT_CASES = [
    # policy, signals, final, action, rule
    ("default", Signals(harm=0.1, reply_harm=0.8, refusal="none"), False, Action.BLOCK, "stop-harmful-reply"),
    ("default", Signals(harm=0.1, reply_harm=0.2, refusal="none"), True, Action.ALLOW, None),
    ("default", Signals(harm=0.1, reply_harm=0.0, refusal="full"), True, Action.FLAG, "flag-false-refusal"),
    ("default", Signals(harm=0.1, reply_harm=0.0, refusal="full"), False, Action.ALLOW, None),  # not settled yet
    ("default", Signals(harm=0.7, reply_harm=0.0, refusal="full"), True, Action.ALLOW, None),  # a correct refusal
    ("strict", Signals(harm=0.1, reply_harm=0.35, refusal="none"), False, Action.BLOCK, "stop-harmful-reply"),
    ("default", Signals(harm=0.1, reply_harm=0.35, refusal="none"), False, Action.ALLOW, None),
    ("strict", Signals(classifier_failed=True), True, Action.BLOCK, "classifier_failure"),
    ("monitor", Signals(harm=0.1, reply_harm=0.9, refusal="none"), False, Action.FLAG, "flag-harmful-reply"),
]


@pytest.mark.parametrize(("ref", "signals", "final", "action", "rule"), OUTPUT_CASES)
def test_decide_output(ref: str, signals: Signals, final: bool, action: Action, rule: str | None) -> None:
    decision = _policy(ref).decide_output(signals, final=final)
    assert (decision.action, decision.rule) == (action, rule)
    assert decision.stage == "output"


def test_retry_on_false_refusal_only_when_harm_is_very_low() -> None:
    policy = load_policy(FIXTURES / "retry.toml")
    low = policy.decide_output(Signals(harm=0.02, reply_harm=0.0, refusal="full"), final=True)
    assert low.retry_note and "Test note" in low.retry_note and low.action is Action.FLAG
    # the retry is for plain replies once: the caller says when it may not retry
    assert policy.decide_output(Signals(harm=0.02, refusal="full"), final=True, may_retry=False).retry_note is None
    assert policy.decide_output(Signals(harm=0.02, refusal="full"), final=False).retry_note is None
    # above retry_below_harm (still below the harm threshold): no retry
    assert policy.decide_output(Signals(harm=0.3, refusal="full"), final=True).retry_note is None
    # off by default
    assert (
        load_policy(shipped("default")).decide_output(Signals(harm=0.0, refusal="full"), final=True).retry_note is None
    )


def test_default_and_strict_differ_on_the_same_scores() -> None:
    # the contract `guardproxy score --policy policies/strict.toml` relies on: one band, two actions
    default, strict = load_policy(shipped("default")), load_policy(shipped("strict"))
    for harm, d, s in [(0.2, Action.ALLOW, Action.FLAG), (0.4, Action.ALLOW, Action.BLOCK)]:
        assert default.decide_input(Signals(harm=harm)).action is d
        assert strict.decide_input(Signals(harm=harm)).action is s


# --- mapping and reload ----------------------------------------------------------------------------------


def test_mapping_picks_active_and_shadows_per_tenant_and_model(tmp_path: Path) -> None:
    for name in SHIPPED:
        shutil.copy(shipped(name), tmp_path / f"{name}.toml")
    (tmp_path / "mapping.toml").write_text(
        'schema_version = 1\n[default]\nactive = "default.toml"\nshadows = ["strict.toml"]\n'
        '[[routes]]\ntenant = "kids-app"\nactive = "strict.toml"\nshadows = ["default.toml"]\n'
        '[[routes]]\nmodel = "experimental-*"\nactive = "monitor.toml"\n'
    )
    pset = PolicySet(tmp_path / "default.toml", mapping=tmp_path / "mapping.toml")
    active, shadows = pset.select("acme", "gpt-4o")
    assert (active.name, [p.name for p in shadows]) == ("default", ["strict"])
    active, shadows = pset.select("kids-app", "experimental-1")
    assert (active.name, [p.name for p in shadows]) == ("strict", ["default"])
    active, shadows = pset.select("acme", "experimental-1")
    assert (active.name, shadows) == ("monitor", ())


def test_the_policies_in_force_are_logged_by_role(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="guardproxy.policyset")
    PolicySet(shipped("default"), [shipped("strict"), shipped("monitor")])
    (tmp_path / "mapping.toml").write_text(
        f'schema_version = 1\n[[routes]]\ntenant = "kids-app"\nactive = "{shipped("strict")}"\n'
        f'[[routes]]\nmodel = "experimental-*"\nactive = "{shipped("monitor")}"\nshadows = ["{shipped("default")}"]\n'
    )
    PolicySet(shipped("default"), mapping=tmp_path / "mapping.toml")
    assert [r.getMessage() for r in caplog.records] == [
        "policies in force: active default@2026.12.07.1, shadows strict@2026.12.07.1, monitor@2026.12.07.1",
        "policies in force: active default@2026.12.07.1, no shadows; tenant kids-app: active strict@2026.12.07.1, no "
        "shadows; model experimental-*: active monitor@2026.12.07.1, shadows default@2026.12.07.1",
    ]


def test_broken_mapping_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text('schema_version = 1\n[[routes]]\ntenant = "a"\nactiv = "x.toml"\n')
    with pytest.raises(PolicyError) as info:
        load_mapping(path, active=shipped("default"), shadows=())
    assert any(f"{path}:4: routes[0].activ: unknown field" in i for i in info.value.issues)


def test_reload_with_a_broken_file_keeps_the_old_policy(tmp_path: Path) -> None:
    path = tmp_path / "active.toml"
    shutil.copy(shipped("default"), path)
    pset = PolicySet(path)
    assert pset.select("t", None)[0].ref == "default@2026.12.07.1"
    path.write_text(path.read_text().replace('on_state_failure = "fail_open"\n', ""))
    assert pset.changed()
    result = pset.reload()
    assert not result.ok and result.error and "on_state_failure" in result.error and f"{path}:" in result.error
    assert pset.select("t", None)[0].ref == "default@2026.12.07.1"
    shutil.copy(shipped("strict"), path)
    result = pset.reload()
    assert result.ok and pset.select("t", None)[0].name == "strict"


def test_a_gateway_does_not_start_on_a_broken_policy() -> None:
    with pytest.raises(PolicyError):
        PolicySet(FIXTURES / "unknown_field.toml")


def test_thresholds_for_drill_sampling() -> None:
    th = load_policy(shipped("default")).thresholds()
    assert th == {"harm": 0.5, "history_harm": 0.8, "reply_harm": 0.6}  # block rules only: flags are not lines
    assert load_policy(shipped("strict")).thresholds() == {
        "harm": 0.3,
        "history_harm": 0.6,
        "jailbreak": 0.5,
        "escalation": 0.6,
        "reply_harm": 0.3,
        "joined_reply_harm": 0.5,
    }


# --- the CLI ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy.cli", "policy", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )


def test_cli_check_exits_nonzero_and_lists_every_error() -> None:
    ok = _cli("check", *(str(shipped(n)) for n in SHIPPED))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": ok") == 3
    bad = _cli("check", str(shipped("default")), str(FIXTURES / "many_errors.toml"), str(FIXTURES / "bad_syntax.toml"))
    assert bad.returncode == 1
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith(str(FIXTURES))]
    assert len(lines) == 8
    assert f"{FIXTURES / 'many_errors.toml'}:9: refusals.weapons:" in bad.stderr
    assert "2 of 3 file(s) invalid" in bad.stderr


# --- line finding is a parser of untrusted text: property test ---------------------------------------------

_ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_value = st.one_of(
    st.integers(-5, 5).map(str),
    st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\'), max_size=12).map(
        lambda t: f'"{t}"'
    ),
    st.just('"""a\nmulti-line = "string"\n[not.a.table]\n"""'),
    st.just("[1,\n 2,\n 3]"),
    st.just('{ a = 1, b = "x" }'),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(_ident, _value), min_size=1, max_size=4, unique_by=lambda kv: kv[0]),
                max_size=4))  # fmt: skip
# found by this test in CI: a basic string holding a multi-line delimiter opened nothing, but was read as opening one
@example([[("b", "\"'''\""), ("a", '"""a\nmulti-line = "string"\n[not.a.table]\n"""')]])
@example([[("b", '"x" # """'), ("c", "1")]])
def test_key_lines_point_at_the_key(rules: list[list[tuple[str, str]]]) -> None:
    lines = ["schema_version = 1  # top", 'name = "x"']
    where: dict[tuple[str | int, ...], int] = {("name",): 2}
    for i, fields in enumerate(rules):
        lines.append("[[input_rules]]")
        where[("input_rules", i)] = len(lines)
        for key, value in fields:
            where[("input_rules", i, key)] = len(lines) + 1
            lines.extend(f"{key} = {value}".split("\n"))
    text = "\n".join(lines)
    tomllib.loads(text)  # the generated text is valid TOML
    found = KeyLines(text)
    for loc, line in where.items():
        assert found.line_of(loc) == line, (loc, text)
    assert found.line_of(("input_rules", 99, "x")) in (1, where.get(("input_rules",), 1), *where.values())


def test_two_files_with_one_name_and_version_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "copy.toml"  # a copy of the active policy, its name and version left as they were
    shutil.copy(shipped("default"), copy)
    line = shipped("default").read_text().splitlines().index('name = "default"') + 1
    with pytest.raises(PolicyError) as info:
        PolicySet(shipped("default"), [copy])
    # the file to fix is the copy (whichever sorts first), at its name
    assert info.value.issues == (
        f"{copy}:{line}: name: default@2026.12.07.1 is also the name@version of {shipped('default')}: give this file "
        "a name or version of its own",
    )
    # with a mapping: the shadow is the copy, though the active policy it repeats is a route's
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        f'schema_version = 1\n[default]\nactive = "{shipped("strict")}"\nshadows = ["copy.toml"]\n'
        f'[[routes]]\ntenant = "t"\nactive = "{shipped("default")}"\n'
    )
    with pytest.raises(PolicyError) as info:
        PolicySet(shipped("default"), mapping=mapping)
    assert [i.split(": name: ")[0] for i in info.value.issues] == [f"{copy}:{line}"]


# --- conversation_sensitive: may a lower bound of the conversation signals stand in for the value? ---------------

QUIET = ConversationSignals(escalation=0.1, window_harm=0.1)
CONVERSATION_SENSITIVE = [
    # policy, low, high, could a value between them match a rule that ``low`` does not
    ("default", QUIET, QUIET, False),
    # a similarity to a refusal in another conversation of the tenant can match the rephrase rule
    ("default", QUIET, ConversationSignals(escalation=0.1, window_harm=0.1, rephrase_similarity=1.0), True),
    ("default", ConversationSignals(refusal_events=1), ConversationSignals(refusal_events=1, rephrase_similarity=1.0),
     True),
    # monitor's rephrase line is 0.59: a similarity that cannot reach it cannot flag
    ("monitor", ConversationSignals(refusal_events=1), ConversationSignals(refusal_events=1, rephrase_similarity=0.55),
     False),
    ("default", QUIET, ConversationSignals(escalation=0.49, window_harm=0.1), False),
    ("default", QUIET, ConversationSignals(escalation=0.5, window_harm=0.1), True),
    ("strict", QUIET, ConversationSignals(escalation=0.35, window_harm=0.1), True),
    # both already match flag-escalation: the same rules match whatever lies between
    ("default", ConversationSignals(escalation=0.55), ConversationSignals(escalation=0.7), False),
]  # fmt: skip


@pytest.mark.parametrize(("name", "low", "high", "expected"), CONVERSATION_SENSITIVE)
def test_conversation_sensitive(name: str, low: ConversationSignals, high: ConversationSignals, expected: bool) -> None:
    assert load_policy(shipped(name)).conversation_sensitive(low, high) is expected


@given(
    escalation=st.floats(0.0, 1.0),
    lift=st.floats(0.0, 1.0),
    similarity=st.floats(-1.0, 1.0),
    refusals=st.integers(0, 3),
    harm=st.floats(0.0, 1.0),
    between=st.floats(0.0, 1.0),
    under=st.floats(0.0, 1.0),
)
@settings(max_examples=300, deadline=None)
def test_when_not_conversation_sensitive_every_value_between_decides_as_the_lower_bound(
    escalation: float, lift: float, similarity: float, refusals: int, harm: float, between: float, under: float
) -> None:
    low = ConversationSignals(escalation=escalation, refusal_events=refusals, rephrase_similarity=similarity)
    high = ConversationSignals(escalation=min(1.0, escalation + lift), refusal_events=refusals, rephrase_similarity=1.0)
    mid = ConversationSignals(
        escalation=escalation + between * (high.escalation - escalation),
        refusal_events=refusals,
        rephrase_similarity=similarity + between * (1.0 - similarity),
    )
    for name in SHIPPED:
        policy = load_policy(shipped(name))
        if not policy.conversation_sensitive(low, high, harm):  # a request of this harm, at most
            decide, actual = policy.decide_input, harm * under
            assert decide(Signals(harm=actual, conversation=mid)) == decide(Signals(harm=actual, conversation=low))


# --- rules that can never fire, blank texts, and every problem in one run ------------------------------------

RULES_POLICY = """schema_version = 1
name = "never"
version = "1"
harm_threshold = 0.5
on_classifier_failure = "fail_open"
on_state_failure = "fail_open"

[refusals]
default = "This request was declined by the test policy because it could cause harm; ask for a safer version."

[[input_rules]]
id = "block-harm"
action = "block"
when = {input}

[[output_rules]]
id = "stop-reply"
action = "flag"
when = {output}
"""


def _rules_policy(tmp_path: Path, *, input: str = "{ harm_at_least = 0.9 }", output: str = "{}") -> Path:
    path = tmp_path / "never.toml"
    path.write_text(RULES_POLICY.replace("{input}", input).replace("{output}", output), encoding="utf-8")
    return path


NEVER_FIRES = [
    # stage, when, field of the issue, message fragment
    ("input", "{ harm_at_least = 0.4, category_in = [] }", "input_rules[0].when.category_in", "empty list"),
    ("input", "{ history_in = [] }", "input_rules[0].when.history_in", "empty list"),
    ("output", "{ refusal_in = [] }", "output_rules[0].when.refusal_in", "empty list"),
    ("input", "{ harm_at_least = 0.6, harm_below = 0.3 }", "input_rules[0].when.harm_below",
     "no value is at least 0.6 and below 0.3"),
    ("input", "{ harm_at_least = 0.3, harm_below = 0.3 }", "input_rules[0].when.harm_below", "can never match"),
    ("input", '{ category_in = ["privacy"], category_not_in = ["privacy", "hate"] }',
     "input_rules[0].when.category_not_in", "excludes every value category_in allows"),
    ("input", '{ category_in = ["privacy", "hate"], category_not_in = ["privacy"] }',
     "input_rules[0].when.category_not_in", "'privacy' is in both category_in and category_not_in"),
    ("output", '{ false_refusal = true, refusal_in = ["none"] }', "output_rules[0].when.false_refusal",
     "refusal_in allows only 'none'"),
    ("output", "{ false_refusal = true, harm_at_least = 0.7 }", "output_rules[0].when.false_refusal",
     "needs harm below harm_threshold (0.5)"),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "when", "field", "fragment"), NEVER_FIRES)
def test_a_rule_that_can_never_fire_is_an_error(
    tmp_path: Path, stage: str, when: str, field: str, fragment: str
) -> None:
    path = _rules_policy(tmp_path, **{stage: when})
    issues = [str(i) for i in check_policy_file(path)]
    line = 14 if stage == "input" else 19
    assert len(issues) == 1 and issues[0].startswith(f"{path}:{line}: {field}: "), issues
    assert fragment in issues[0]


@pytest.mark.parametrize(
    "when",
    [
        '{ category_in = ["privacy"], category_not_in = ["hate"] }',
        "{ harm_at_least = 0.3, harm_below = 0.6, category_not_in = [] }",
        '{ false_refusal = true, refusal_in = ["full"] }',
        '{ false_refusal = false, refusal_in = ["none"] }',
    ],
)
def test_a_rule_that_can_fire_is_not_reported(tmp_path: Path, when: str) -> None:
    assert check_policy_file(_rules_policy(tmp_path, output=when)) == []


@pytest.mark.parametrize(
    ("text", "written"),
    [(" " * 45, 0), (" " * 20 + "x" * 39 + " " * 20, 39), ("\\n" * 20 + "x" * 40, None)],
    ids=["blanks", "padded-39", "padded-40"],
)
@pytest.mark.parametrize("where", ["refusals", "failure_messages", "rule reply"])
def test_blanks_do_not_count_toward_a_refusal_texts_40_characters(
    tmp_path: Path, where: str, text: str, written: int | None
) -> None:
    path = _rules_policy(tmp_path)
    source = path.read_text(encoding="utf-8")
    if where == "rule reply":
        source, field = (
            source.replace('id = "block-harm"\n', f'id = "block-harm"\nreply = "{text}"\n'),
            "input_rules[0].reply",
        )
    elif where == "refusals":
        source, field = source.replace("[refusals]\n", f'[refusals]\nprivacy = "{text}"\n'), "refusals.privacy"
    else:
        source, field = source + f'\n[failure_messages]\nclassifier = "{text}"\n', "failure_messages.classifier"
    path.write_text(source, encoding="utf-8")
    issues = [str(i) for i in check_policy_file(path)]
    if written is None:
        assert issues == []
        return
    assert len(issues) == 1 and f": {field}: " in issues[0], issues
    assert f"at least 40 characters, not counting blanks at either end (has {written})" in issues[0]


EVERY_PROBLEM = """schema_version = 1
name = "every-problem"
version = "1"
harm_threshold = 0.3
on_classifier_failure = "fail_open"
on_state_failure = "fail_open"

[output]
check_chars = 4
retry_below_harm = 0.4

[refusals]
medical = "This request was declined by the test policy because it could cause harm; ask for a safer version."

[[input_rules]]
id = "block-harm"
action = "block"
when = { harm_at_least = 0.5 }

[[input_rules]]
id = "flag-escalation"
action = "flag"
when = { escalaton_at_least = 0.6 }

[[input_rules]]
id = "block-harm"
action = "block"
when = { harm_at_least = 0.7 }

[[input_rules]]
id = "Bad-Id"
action = "flag"
when = { harm_at_least = 0.9, jailbreak_at_least = 0.5 }
"""


def test_field_errors_do_not_hide_the_cross_field_ones(tmp_path: Path) -> None:
    path = tmp_path / "every.toml"
    path.write_text(EVERY_PROBLEM, encoding="utf-8")
    issues = [str(i).removeprefix(f"{path}:") for i in check_policy_file(path)]
    assert [i.split(": ", 2)[:2] for i in issues] == [
        # field errors first, as pydantic finds them
        ["9", "output.check_chars"],
        ["13", "refusals.medical"],
        ["23", "input_rules[1].when.escalaton_at_least"],
        ["31", "input_rules[3].id"],
        # then every cross-field check whose own fields are valid
        ["12", "refusals"],
        ["10", "output.retry_below_harm"],
        ["26", "input_rules[2].id"],
        ["28", "input_rules[2].when"],
        ["33", "input_rules[3].when"],
    ], issues
    assert "a 'default' refusal text is required" in issues[4]
    assert "must not exceed harm_threshold (0.3)" in issues[5]
    assert "duplicate rule id 'block-harm'" in issues[6]
    assert "rule 'block-harm' comes first" in issues[7] and "rule 'block-harm' comes first" in issues[8]


def test_cli_check_mapping_checks_every_policy_it_names(tmp_path: Path) -> None:
    shutil.copy(shipped("default"), tmp_path / "copy.toml")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        "schema_version = 1\n"
        "[default]\n"
        f'active = "{shipped("default")}"\n'
        f'shadows = ["{FIXTURES / "unknown_field.toml"}", "missing.toml", "copy.toml"]\n'
        "[[routes]]\n"
        'tenant = "kids-app"\n'
        f'active = "{FIXTURES / "duplicate_rule.toml"}"\n'
    )
    bad = _cli("check", "--mapping", str(mapping))
    assert bad.returncode == 1 and ": ok" not in bad.stdout
    assert bad.stderr.splitlines() == [
        f"{FIXTURES / 'duplicate_rule.toml'}:14: output_rules[0].id: duplicate rule id 'same'",
        f"{FIXTURES / 'unknown_field.toml'}:16: input_rules[1].when.harm_above: unknown field",
        f"{mapping}:4: default.shadows[1]: {tmp_path / 'missing.toml'}: cannot read file: No such file or directory",
        f"{tmp_path / 'copy.toml'}:9: name: default@2026.12.07.1 is also the name@version of {shipped('default')}: "
        "give this file a name or version of its own",
        "1 of 1 file(s) invalid",
    ]
    # every problem the check lists is one the gateway refuses to start on
    with pytest.raises(PolicyError) as info:
        PolicySet(shipped("default"), mapping=mapping)
    assert list(info.value.issues) == bad.stderr.splitlines()[:-1]
    (tmp_path / "good.toml").write_text(
        f'schema_version = 1\n[default]\nactive = "{shipped("default")}"\nshadows = ["{shipped("monitor")}"]\n'
    )
    good = _cli("check", "--mapping", str(tmp_path / "good.toml"))
    assert good.returncode == 0 and good.stdout == f"{tmp_path / 'good.toml'}: ok\n", good.stderr
