"""Routing: the admin's rules (data, never code) decide which model contours a complete series.

``routing.yaml`` holds an ordered list of rules::

    rules:
      - name: thorax-ct
        match:                      # every entry must match (AND)
          Modality: CT
          BodyPartExamined: {one_of: [CHEST, THORAX, LUNG]}
          SeriesDescription: {regex: "(?i)thorax|chest"}
          instances: {min: 20}
          calling_ae: PACS
          any:                      # at least one alternative matches; `all:` needs every one
            - {SliceThickness: {max: 3}}
            - {ConvolutionKernel: {present: true}}
        model: demo-thorax          # the active version; demo-thorax@1 pins version 1
        outputs: [rtstruct, seg]
        send_to: [TPS]
        continue: false             # true lets later rules match as well (default: first wins)
        sync: false                 # true allows uploading the anonymised case for training
        review: hold                # failing plausibility checks: hold (until release) | flag
        priority: normal            # high | normal | low: the order in which queued jobs are taken
        deliver: true               # false: shadow mode, results stay on the node (agreement only)

Keys of ``match`` are DICOM keywords (pydicom's dictionary), ``calling_ae``, ``called_ae``,
``instances`` (the series' instance count), or the groups ``any`` / ``all`` (lists of such
mappings). Matchers and their semantics:

- a plain value: equals. Code strings (VR CS, AE and the two AE keys) compare case-insensitively;
  numeric VRs (DS, IS, US, SS, UL, SL, FL, FD, UV, SV and ``instances``) compare as numbers, so
  SliceThickness "2.50" equals 2.5 (within 1e-9); other VRs compare as exact text. Surrounding
  spaces (DICOM's padding) are ignored.
- multi-valued attributes (ImageType ``ORIGINAL\\PRIMARY\\AXIAL``, given as a list or as a
  backslash-joined string): a plain scalar matches when *any* value equals it
  (``ImageType: AXIAL``); a list matches when the values equal the list in order
  (``ImageType: [ORIGINAL, PRIMARY, AXIAL]``).
- ``{one_of: [...]}``: any value equals any listed item.
- ``{regex: "..."}``: ``re.search`` on any value's text (write ``(?i)`` for case-insensitivity).
- ``{min: x, max: y}``: any value within the inclusive range; either bound may be left out;
  only on numeric attributes.
- ``{present: true}`` / ``{absent: true}`` (or ``present: false``): a value is present when the
  attribute exists with a non-empty value (an empty type-2 attribute counts as absent).
- ``{not: <matcher>}``: the inverse, so ``{not: {regex: x}}`` matches a missing value.

A missing value never matches equals, one_of, regex or min/max. Rules are evaluated in order;
the first matching rule wins unless it says ``continue: true``. Every rule is evaluated in full
so that the explanation can say why each one did or did not match.
"""

from ie_gateway.route.explain import (
    Explanation,
    Route,
    RouteDecision,
    SeriesFacts,
)
from ie_gateway.route.load import ModelExists, load_rules
from ie_gateway.route.rules import Rule, RuleSet
from ie_gateway.route.watch import RulesWatcher
from ie_gateway.vocab import OutputKind

__all__ = [
    "Explanation",
    "ModelExists",
    "OutputKind",
    "Route",
    "RouteDecision",
    "Rule",
    "RuleSet",
    "RulesWatcher",
    "SeriesFacts",
    "load_rules",
]
