"""Routing rules: every matcher kind, groups, rule order, explanations, and config errors."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from ie_gateway.errors import ConfigError
from ie_gateway.route import (
    OutputKind,
    RuleSet,
    RulesWatcher,
    SeriesFacts,
    load_rules,
)

DESTINATIONS = {"TPS", "ARCHIVE"}
MODELS = {("demo-thorax", None), ("demo-thorax", "1"), ("demo-pelvis", None)}


def model_exists(name: str, version: str | None) -> bool:
    return (name, version) in MODELS


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def rules(tmp_path: Path, text: str) -> RuleSet:
    return load_rules(write(tmp_path / "routing.yaml", text), DESTINATIONS, model_exists)


def facts(
    header: dict[str, object] | None = None,
    calling_ae: str = "PACS",
    called_ae: str = "IE_GATEWAY",
    instances: int = 120,
) -> SeriesFacts:
    return SeriesFacts(header or {}, calling_ae, called_ae, instances)


def one_rule(tmp_path: Path, key: str, matcher: str) -> RuleSet:
    return rules(
        tmp_path,
        f"""
        rules:
          - name: r
            match:
              {key}: {matcher}
            model: demo-thorax
            outputs: [rtstruct]
            send_to: [TPS]
        """,
    )


MISSING = object()

MATCHER_TABLE = [
    # plain value: code strings compare case-insensitively, padding ignored
    ("Modality", "CT", "CT", True),
    ("Modality", "CT", "ct", True),
    ("Modality", "CT", "CT ", True),
    ("Modality", "CT", "MR", False),
    ("Modality", "CT", MISSING, False),
    ("Modality", "CT", "", False),
    ("Modality", "CT", None, False),
    # other string VRs compare exactly
    ("SeriesDescription", "Thorax", "Thorax", True),
    ("SeriesDescription", "Thorax", "thorax", False),
    # numeric VRs compare as numbers, from text or numbers
    ("SliceThickness", "2.5", "2.5", True),
    ("SliceThickness", "2.5", "2.50", True),
    ("SliceThickness", "2.5", 2.5, True),
    ("SliceThickness", "'2.5'", "2.5", True),
    ("SliceThickness", "2.5", "3", False),
    ("SliceThickness", "2.5", "abc", False),
    ("Rows", "512", 512, True),
    ("Rows", "512", "512", True),
    ("Rows", "512", 256, False),
    # multi-valued: a scalar matches any value, a list matches the values in order
    ("ImageType", "AXIAL", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("ImageType", "AXIAL", "ORIGINAL\\PRIMARY\\AXIAL", True),
    ("ImageType", "axial", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("ImageType", "AXIAL", ["ORIGINAL", "PRIMARY", "LOCALIZER"], False),
    ("ImageType", "[ORIGINAL, PRIMARY, AXIAL]", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("ImageType", "[ORIGINAL, PRIMARY, AXIAL]", "original\\primary\\axial", True),
    ("ImageType", "[ORIGINAL, PRIMARY, AXIAL]", ["ORIGINAL", "PRIMARY", "AXIAL", "HELICAL"], False),
    ("ImageType", "[ORIGINAL, PRIMARY, AXIAL]", ["PRIMARY", "ORIGINAL", "AXIAL"], False),
    # one_of
    ("BodyPartExamined", "{one_of: [CHEST, THORAX]}", "thorax", True),
    ("BodyPartExamined", "{one_of: [CHEST, THORAX]}", "ABDOMEN", False),
    ("BodyPartExamined", "{one_of: [CHEST, THORAX]}", MISSING, False),
    ("ImageType", "{one_of: [LOCALIZER, AXIAL]}", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("SliceThickness", "{one_of: [1, 2.5]}", "2.500", True),
    # regex: re.search, case-sensitive unless the pattern says (?i), any value of many
    ("SeriesDescription", '{regex: "(?i)thorax"}', "CT THORAX 2.5mm", True),
    ("SeriesDescription", '{regex: "thorax"}', "CT THORAX", False),
    ("SeriesDescription", '{regex: "(?i)thorax"}', "Abdomen", False),
    ("SeriesDescription", '{regex: "(?i)thorax"}', MISSING, False),
    ("ImageType", '{regex: "^LOCAL"}', ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),
    ("ImageType", '{regex: "^LOCAL"}', ["ORIGINAL", "PRIMARY", "AXIAL"], False),
    # numeric range: inclusive, numeric strings accepted, non-numbers and missing do not match
    ("SliceThickness", "{min: 1, max: 3}", "2.5", True),
    ("SliceThickness", "{min: 1, max: 3}", "3", True),
    ("SliceThickness", "{min: 1, max: 3}", "3.5", False),
    ("SliceThickness", "{min: 1, max: 3}", "abc", False),
    ("SliceThickness", "{min: 1, max: 3}", MISSING, False),
    ("SliceThickness", "{max: 3}", 0.625, True),
    ("KVP", "{min: 100}", "80", False),
    # present / absent
    ("ConvolutionKernel", "{present: true}", "B30f", True),
    ("ConvolutionKernel", "{present: true}", MISSING, False),
    ("ConvolutionKernel", "{present: true}", "", False),
    ("ConvolutionKernel", "{present: false}", MISSING, True),
    ("ConvolutionKernel", "{absent: true}", MISSING, True),
    ("ConvolutionKernel", "{absent: true}", "B30f", False),
    # not
    ("Modality", "{not: CT}", "MR", True),
    ("Modality", "{not: CT}", "ct", False),
    ("Modality", "{not: CT}", MISSING, True),
    ("SeriesDescription", '{not: {regex: "(?i)scout"}}', "Scout", False),
    ("SeriesDescription", '{not: {regex: "(?i)scout"}}', "Thorax", True),
    ("Modality", "{not: {one_of: [MR, PT]}}", "CT", True),
    ("SliceThickness", "{not: {min: 5}}", "2.5", True),
]


@pytest.mark.parametrize(("key", "matcher", "seen", "expected"), MATCHER_TABLE)
def test_matcher_table(
    tmp_path: Path, key: str, matcher: str, seen: object, expected: bool
) -> None:
    header = {} if seen is MISSING else {key: seen}
    decision = one_rule(tmp_path, key, matcher).route(facts(header))
    assert decision.routed is expected


@pytest.mark.parametrize(
    ("key", "matcher", "series", "expected"),
    [
        ("calling_ae", "PACS", facts(calling_ae="pacs"), True),
        ("calling_ae", "PACS", facts(calling_ae="SCANNER1"), False),
        ("called_ae", "{one_of: [IE_GATEWAY, IE_TEST]}", facts(called_ae="IE_TEST"), True),
        ("calling_ae", '{regex: "^CT\\\\d+$"}', facts(calling_ae="CT12"), True),
        ("instances", "{min: 20}", facts(instances=20), True),
        ("instances", "{min: 20}", facts(instances=19), False),
        ("instances", "{max: 400}", facts(instances=401), False),
    ],
)
def test_special_keys(
    tmp_path: Path, key: str, matcher: str, series: SeriesFacts, expected: bool
) -> None:
    assert one_rule(tmp_path, key, matcher).route(series).routed is expected


GROUPS = """
rules:
  - name: g
    match:
      Modality: CT
      any:
        - {BodyPartExamined: CHEST}
        - {SeriesDescription: {regex: "(?i)thorax"}, SliceThickness: {max: 3}}
      all:
        - {SeriesDescription: {regex: "(?i)planning"}}
        - {SeriesDescription: {not: {regex: "(?i)scout"}}}
    model: demo-thorax
    outputs: [seg]
    send_to: [TPS]
"""


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"Modality": "CT", "BodyPartExamined": "CHEST", "SeriesDescription": "planning"}, True),
        (
            {"Modality": "CT", "SeriesDescription": "Thorax planning", "SliceThickness": "2"},
            True,
        ),
        # second alternative needs both of its entries
        (
            {"Modality": "CT", "SeriesDescription": "Thorax planning", "SliceThickness": "5"},
            False,
        ),
        # all: the second member fails
        ({"Modality": "CT", "BodyPartExamined": "CHEST", "SeriesDescription": "planning scout"},
         False),
        ({"Modality": "MR", "BodyPartExamined": "CHEST", "SeriesDescription": "planning"}, False),
    ],
)
def test_any_and_all_groups(tmp_path: Path, header: dict[str, object], expected: bool) -> None:
    assert rules(tmp_path, GROUPS).route(facts(header)).routed is expected


TWO_RULES = """
rules:
  - name: first
    match: {{Modality: CT}}
    model: demo-thorax@1
    outputs: [rtstruct, seg]
    send_to: [TPS]
{extra}
  - name: second
    match: {{Modality: CT, BodyPartExamined: CHEST}}
    model: demo-pelvis
    outputs: [seg]
    send_to: [TPS, ARCHIVE]
    sync: true
"""


def test_first_match_wins(tmp_path: Path) -> None:
    decision = rules(tmp_path, TWO_RULES.format(extra="")).route(
        facts({"Modality": "CT", "BodyPartExamined": "CHEST"})
    )
    assert [r.rule for r in decision.routes] == ["first"]
    second = decision.explanation.rules[1]
    assert second.matched and not second.applied and second.shadowed_by == "first"
    assert "rule 'first' matched first" in decision.explanation.render()


def test_continue_lets_later_rules_match(tmp_path: Path) -> None:
    decision = rules(tmp_path, TWO_RULES.format(extra="    continue: true")).route(
        facts({"Modality": "CT", "BodyPartExamined": "CHEST"})
    )
    assert [r.rule for r in decision.routes] == ["first", "second"]


def test_later_rule_matches_when_earlier_does_not(tmp_path: Path) -> None:
    text = TWO_RULES.format(extra="").replace("{Modality: CT}", "{Modality: MR}", 1)
    decision = rules(tmp_path, text).route(facts({"Modality": "CT", "BodyPartExamined": "CHEST"}))
    assert [r.rule for r in decision.routes] == ["second"]


def test_route_carries_model_version_outputs_destinations_and_sync(tmp_path: Path) -> None:
    ruleset = rules(tmp_path, TWO_RULES.format(extra="    continue: true"))
    first, second = ruleset.route(facts({"Modality": "CT", "BodyPartExamined": "CHEST"})).routes
    assert (first.model, first.version, first.outputs, first.send_to, first.sync) == (
        "demo-thorax", "1", (OutputKind.RTSTRUCT, OutputKind.SEG), ("TPS",), False,
    )
    assert (second.model, second.version, second.outputs, second.send_to, second.sync) == (
        "demo-pelvis", None, (OutputKind.SEG,), ("TPS", "ARCHIVE"), True,
    )


def test_model_at_active_means_active_version(tmp_path: Path) -> None:
    text = TWO_RULES.format(extra="").replace("demo-thorax@1", "demo-thorax@active")
    ruleset = rules(tmp_path, text)
    (route,) = ruleset.route(facts({"Modality": "CT"})).routes
    assert (route.model, route.version) == ("demo-thorax", None)


def test_unrouted_explanation_shows_values_for_admin_but_not_in_logs(tmp_path: Path) -> None:
    ruleset = rules(tmp_path, TWO_RULES.format(extra=""))
    decision = ruleset.route(facts({"Modality": "MR", "BodyPartExamined": "KNEE_SECRET"}))
    assert decision.routes == ()
    text = decision.explanation.render()
    assert "rule 1 'first': no match" in text
    assert "no  Modality equals CT (seen: 'MR')" in text
    assert "no  BodyPartExamined equals CHEST (seen: 'KNEE_SECRET')" in text
    logged = decision.explanation.for_log()
    assert logged == [
        {"rule": "first", "matched": False, "applied": False, "failed": ["Modality"]},
        {
            "rule": "second",
            "matched": False,
            "applied": False,
            "failed": ["Modality", "BodyPartExamined"],
        },
    ]
    assert "KNEE_SECRET" not in repr(logged)


def test_explanation_lists_every_matcher_of_every_rule(tmp_path: Path) -> None:
    decision = rules(tmp_path, GROUPS).route(facts({"Modality": "CT"}))
    (rule,) = decision.explanation.rules
    keys = [item.key if hasattr(item, "key") else item.mode for item in rule.items]
    assert keys == ["Modality", "any", "all"]
    text = decision.explanation.render()
    assert "SliceThickness <= 3 (seen: missing)" in text
    assert "SeriesDescription not (matches regex '(?i)scout') (seen: missing)" in text


# --- config errors: each names file:line: key: why -----------------------------------------

VALID_RULE = """
  - name: {name}
    match:
      {match}
    model: {model}
    outputs: {outputs}
    send_to: {send_to}
"""


def rule_text(name: str = "r", match: str = "Modality: CT", model: str = "demo-thorax",
              outputs: str = "[rtstruct]", send_to: str = "[TPS]") -> str:
    return VALID_RULE.format(name=name, match=match, model=model, outputs=outputs, send_to=send_to)


def config_errors(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "routing.yaml"
    path.write_text("rules:" + body, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_rules(path, DESTINATIONS, model_exists)
    return [line.removeprefix(f"{path}:") for line in caught.value.errors]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (rule_text(match="Modallity: CT"),
         "4: rules.0.match.Modallity: unknown DICOM keyword 'Modallity' (did you mean "
         "'Modality'?); special keys: calling_ae, called_ae, instances, any, all"),
        (rule_text(match='SeriesDescription: {regex: "(thorax"}'),
         "4: rules.0.match.SeriesDescription.regex: invalid regular expression '(thorax': "
         "missing ), unterminated subpattern at position 0"),
        (rule_text(match="SliceThickness: {min: 5, max: 2}"),
         "4: rules.0.match.SliceThickness: min 5 is greater than max 2"),
        (rule_text(match="SeriesDescription: {min: 5}"),
         "4: rules.0.match.SeriesDescription: min/max need a numeric attribute; "
         "SeriesDescription is not numeric"),
        (rule_text(match="SliceThickness: thin"),
         "4: rules.0.match.SliceThickness: SliceThickness is numeric; 'thin' is not a number"),
        (rule_text(match="Modality: {regexp: CT}"),
         "4: rules.0.match.Modality.regexp: unknown matcher 'regexp'; expected one of "
         "one_of, regex, min, max, present, absent, not"),
        (rule_text(match="Modality: {one_of: [CT], regex: CT}"),
         "4: rules.0.match.Modality: one matcher per key (found one_of, regex); "
         "combine several with all: [...]"),
        (rule_text(match="BodyPartExamined: no"),
         "4: rules.0.match.BodyPartExamined: False is a boolean: YAML reads yes/no/on/off as "
         "true/false; quote it"),
        (rule_text(match="ReferencedImageSequence: {present: true}"),
         "4: rules.0.match.ReferencedImageSequence: ReferencedImageSequence has VR SQ: "
         "only single values can be matched"),
        (rule_text(match="any: []"),
         "4: rules.0.match.any: any needs a non-empty list of mappings (keyword: matcher)"),
        (rule_text(send_to="[TPS, PLANNING]"),
         "7: rules.0.send_to.1: unknown destination 'PLANNING' (known: ARCHIVE, TPS)"),
        (rule_text(model="demo-brain"),
         "5: rules.0.model: model 'demo-brain' is not installed or has no active version"),
        (rule_text(model="demo-thorax@7"),
         "5: rules.0.model: model 'demo-thorax' has no version '7' installed"),
        (rule_text(model='"demo thorax"'),
         "5: rules.0.model: 'demo thorax' is not a model reference: write name or "
         "name@version (letters, digits, '.', '_', '-')"),
        (rule_text(outputs="[rtstruct, png]"),
         "6: rules.0.outputs.1: Input should be 'rtstruct' or 'seg'"),
        (rule_text() + "    send-to: [TPS]\n",
         "8: rules.0.send-to: unknown key (not allowed here; check spelling)"),
        (rule_text() + "    continue: maybe\n",
         "8: rules.0.continue: Input should be a valid boolean"),
        (rule_text() + rule_text(),
         "9: rules.1.name: duplicate rule name 'r' (already used by rules.0)"),
    ],
)
def test_config_error_names_line_and_key(tmp_path: Path, body: str, expected: str) -> None:
    assert config_errors(tmp_path, body) == [expected]


def test_every_problem_is_reported_in_line_order(tmp_path: Path) -> None:
    body = (
        rule_text(match="Modallity: CT", send_to="[NOWHERE]")
        + rule_text(name="r", match='SeriesDescription: {regex: "["}', model="nope")
    )
    errors = config_errors(tmp_path, body)
    assert [e.split(":")[0] for e in errors] == ["4", "7", "9", "11", "12"]
    assert [e.split(": ")[1] for e in errors] == [
        "rules.0.match.Modallity",
        "rules.0.send_to.0",
        "rules.1.name",
        "rules.1.match.SeriesDescription.regex",
        "rules.1.model",
    ]


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "absent.yaml", DESTINATIONS, model_exists)


# --- hot reload -------------------------------------------------------------------------------


def rewrite(path: Path, text: str) -> None:
    """Write new content with a later mtime, as an editor saving a minute later would."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 60_000_000_000, before + 60_000_000_000))


def loader(path: Path) -> RuleSet:
    return load_rules(path, DESTINATIONS, model_exists)


def test_watcher_loads_then_reports_no_change(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    rewrite(path, "rules:" + rule_text(name="a"))
    watcher = RulesWatcher(path, loader)
    first = watcher.poll()
    assert first is not None and [r.name for r in first.rules] == ["a"]
    assert watcher.poll() is None
    assert watcher.current is first


def test_watcher_picks_up_a_valid_change(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    rewrite(path, "rules:" + rule_text(name="a"))
    watcher = RulesWatcher(path, loader)
    watcher.poll()
    rewrite(path, "rules:" + rule_text(name="b"))
    reloaded = watcher.poll()
    assert reloaded is not None and [r.name for r in reloaded.rules] == ["b"]
    assert watcher.last_error is None


def test_watcher_keeps_old_rules_when_new_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    rewrite(path, "rules:" + rule_text(name="a"))
    watcher = RulesWatcher(path, loader)
    good = watcher.poll()
    rewrite(path, "rules:" + rule_text(name="a", match="Modallity: CT"))
    assert watcher.poll() is None
    assert watcher.current is good
    assert watcher.last_error is not None
    assert watcher.last_error.errors[0].startswith(f"{path}:4: rules.0.match.Modallity: ")
    # fixing the file clears the error and brings the fixed rules in
    rewrite(path, "rules:" + rule_text(name="fixed"))
    fixed = watcher.poll()
    assert fixed is not None and [r.name for r in fixed.rules] == ["fixed"]
    assert watcher.last_error is None


def test_watcher_ignores_a_touch_without_content_change(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    text = "rules:" + rule_text(name="a")
    rewrite(path, text)
    calls: list[Path] = []

    def counting_loader(p: Path) -> RuleSet:
        calls.append(p)
        return loader(p)

    watcher = RulesWatcher(path, counting_loader)
    watcher.poll()
    rewrite(path, text)
    assert watcher.poll() is None
    assert len(calls) == 1
    assert watcher.poll(force=True) is not None
    assert len(calls) == 2


def test_watcher_reports_a_deleted_file_once_and_keeps_rules(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    rewrite(path, "rules:" + rule_text(name="a"))
    watcher = RulesWatcher(path, loader)
    good = watcher.poll()
    path.unlink()
    assert watcher.poll() is None
    assert watcher.current is good
    error = watcher.last_error
    assert error is not None and "cannot read" in str(error)
    assert watcher.poll() is None
    assert watcher.last_error is error  # one refusal, not a new one per poll
    # the same content put back: nothing new to load, and the error is gone
    rewrite(path, "rules:" + rule_text(name="a"))
    assert watcher.poll() is None
    assert watcher.last_error is None
    assert watcher.current is good
