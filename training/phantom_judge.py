"""Exact, rule-based judging of free-text answers to PhantomVQA questions.

This module owns `judge(answer, qa) -> Judgement`. It reads only the answer text and
`qa.label` (written by `training.phantom`); it knows nothing of models or images.

How an answer is read:
1. Normalise (lower case, "n't" -> " not", hyphens -> spaces, "x ray" -> "xray"). A leading
   "Yes"/"No" is the answer's lead. The rest is cut into clauses at . ; : , ! ? and before
   "but", "however", "whereas", "although" and "and there/it/they/the/a/an/this".
2. In each clause find items: finding words (nodule, mass/tumour, pleural effusion/fluid,
   pneumothorax, rib fracture/broken rib, calcification/calcified, and generic abnormality/
   lesion/opacity/findings), side words (the PATIENT's left/right; "bilateral"/"both lungs"),
   zone words (upper/apical, middle/mid, lower/basal/base), sizes ("N mm", "N cm" -> mm),
   counts (a number or number word before a finding word, or after "there are", "only",
   "count"), modality words, annotation words (arrow, circle, asterisk, marker, label ...)
   and normality words (normal, unremarkable, clear; "no abnormality" counts as normal).
3. Negation: a negator (no, not, none, without, absent, neither/nor, rather than, instead
   of, free of, ...) negates the items after it in its clause. A finding word before a
   negator is itself denied when the negator is followed by a visibility word ("is not
   seen") or by no further item ("is absent"); otherwise only the later attributes are
   negated ("the nodule is not on the left", "the mass is not 40 mm"). A clause that only
   lists finding words ("..., mass, or effusion") inherits a previous denial. A bare number
   after a negator ("not 3") is a count or a size like the last number before it.
4. Attributes attach to the finding word right after them ("a 20 mm nodule", "left sided
   effusion"), else to the nearest finding word before them (in the clause, then in earlier
   clauses), else to the question's finding (an implicit mention: "It is 20 mm.").

Rules:
- hallucinated: the answer asserts (not negated) something the case does not have: a finding
  kind that is absent; a present finding on the wrong side (or "bilateral"), in the wrong
  zone, with a size outside the tolerance (`phantom.size_within_tolerance`), or with the wrong
  explicit count; a generic abnormality in a normal case; a modality other than the case's;
  any annotation; a "Yes" to a presence question about an absent finding. Accepting the
  premise of a negative question counts too (it asserts the premise in context: "It is
  20 mm" to "How large is the nodule on the left?"), except the "it is normal" premise:
  omissions ("normal" when it is not) are wrong, not hallucinated.
- accepted_false_premise (negative questions only): the answer asserts the premise (the absent
  finding, the wrong side/size/count/modality, the annotation, the "normal" claim) or, without
  rejecting it, answers along with it ("Yes", or talks about the premised finding/image as if
  the premise held). Rejecting means denying the premise ("there is no nodule", "not on the
  left", "not 40 mm", "this is not an MRI", "no arrow") or stating the true fact instead.
- correct: positive questions: the asked fact is stated and right (presence: the yes/no
  stance; side; zone; size within tolerance; count; modality; findings: the expected Yes/No
  lead for a yes/no question, else every true finding named, or normality); negative
  questions: the premise is rejected and not accepted. In both cases a correct answer
  hallucinates nothing.
- Garbage (no recognisable facts, or a word repeated back to back as a looping decoder does)
  is not correct; it is hallucinated only if a finding word or attribute in it asserts
  something false (a bare "nodule" mention counts as asserting one).

Known limits: negation scope is clause-local and heuristic; hedges ("may be", "possibly")
count as assertions; sides must be words (image-left/right phrasing is read as the patient's
side); "right" as in "that's right" is dropped only for a few fixed phrases; numbers written
as digits or one..six only; a finding word inside a restated question is read as asserted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from training.phantom import NOUNS, QA, size_within_tolerance

_FINDING_RE = {
    "nodule": r"nodules?|nodular",
    "mass": r"mass(?:es)?|tumou?rs?",
    "effusion": r"(?:pleural )?effusions?|pleural fluid|hydrothorax",
    "pneumothorax": r"pneumothora(?:x|ces)|collapsed lung",
    "fracture": r"(?:rib )?fractur(?:e|es|ed)|broken ribs?",
    "calcification": r"calcifi\w*",
    "abnormality": r"abnormalit(?:y|ies)|lesions?|opacit(?:y|ies)|abnormal findings?",
}
_MODALITY_RE = {
    "chest X-ray": r"xrays?|radiographs?|radiography|cxr|chest films?|plain films?",
    "axial CT": r"ct|cts|computed tomography|cat scan",
    "MRI": r"mri|mr|magnetic resonance",
    "ultrasound": r"ultrasound|sonograph\w*|sonogram",
    "PET": r"pet|positron emission",
    "mammogram": r"mammogra\w*",
}
_ZONE_WORDS = {"upper": "upper", "apical": "upper", "apex": "upper", "apices": "upper", "top": "upper",
               "middle": "middle", "mid": "middle", "midzone": "middle",
               "lower": "lower", "basal": "lower", "base": "lower", "bases": "lower", "bottom": "lower"}
_NUMBER_WORDS = {"one": 1, "single": 1, "solitary": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                 "multiple": 0, "several": 0}  # 0 means "two or more"
_NUM = r"\d+|one|two|three|four|five|six|single|solitary|multiple|several"

_ITEM_RE = re.compile(
    "|".join(f"(?P<f_{k}>\\b(?:{p})\\b)" for k, p in _FINDING_RE.items())
    + "|" + "|".join(f"(?P<m_{i}>\\b(?:{p})\\b)" for i, p in enumerate(_MODALITY_RE.values()))
    + r"|(?P<size>\b\d+(?:\.\d+)?)\s*(?P<unit>mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?)\b"
    + rf"|(?P<num>\b(?:{_NUM})\b)"
    + r"|(?P<side>\b(?:left|right)\b|\bbilateral(?:ly)?\b|\bboth (?:lungs|sides)\b)"
    + rf"|(?P<zone>\b(?:{'|'.join(_ZONE_WORDS)})\b)"
    + r"|(?P<annot>\b(?:arrows?|arrowheads?|markers?|circles?|circled|asterisks?|annotations?|annotated"
    + r"|labels?|labell?ed|pointers?)\b)"
    + r"|(?P<normal>\b(?:normal|unremarkable|clear)\b)"
)
_MODALITY_NAMES = list(_MODALITY_RE)
_NEGATOR_RE = re.compile(r"\b(?:no|not|none|without|absent|never|neither|nor|cannot|nothing|free of|negative for"
                         r"|rather than|instead of|ruled out|lack of|lacks)\b")
_VISIBILITY_RE = re.compile(r"^\W*(?:\w+\W+){0,2}?(?:seen|visible|present|identified|demonstrated|shown|evident|"
                            r"detected|noted|appreciated|found|apparent|depicted|there)\b")
_VERB_RE = re.compile(r"\b(?:is|are|was|were|shows?|seen|visible|present|there|measures?|measuring|lies|located|"
                      r"noted|appears?|demonstrat\w*|identif\w*|has|have|see)\b")
_COUNT_CUE_RE = re.compile(r"\b(?:there (?:is|are)|count(?:s|ed)?|only|total of|number (?:of \w+ )?is)\W*$")
_FORWARD_BLOCK_RE = re.compile(r"\b(?:in|on|of|and|with|is|are|was|were|measur\w*|but|or|not|no|than|there|it|"
                               r"which|that|at)\b|[^\w\s]")
_CLAUSE_SPLIT_RE = re.compile(r"[.;:!?,]+(?!\d)|\b(?=(?:but|however|whereas|while|although|though)\b)"
                              r"|\band (?=(?:there|it|they|the|a|an|this|\d+|one|two|three|four|five|six)\b)")
_LEAD_RE = re.compile(r"^\W*(?:(yes)\b|(no)\b(?=\W*$|\W*[,.;:!]|\s+(?:there|it|the|this|that|i|we|they|these)\b))")
_REPEAT_RE = re.compile(r"\b(\w{3,})\W+\1\b")  # "nodule nodule": a looping decoder, never correct
_NOT_SIDE_RE = re.compile(r"\b(?:that'?s|that is|you'?re|you are|all) right\b")


@dataclass(frozen=True)
class Judgement:
    """What an answer gets right or asserts falsely about its case."""

    correct: bool
    """States the asked fact (positive) or rejects the premise (negative), and hallucinates nothing."""
    hallucinated: bool
    """Asserts a finding or attribute the image does not show (module docstring)."""
    accepted_false_premise: bool
    """Negative questions: goes along with the false premise instead of correcting it."""
    reason: str
    """Short human-readable account of the decision."""


@dataclass
class _Mention:
    kind: str  # a finding kind or "abnormality"
    denied: bool  # the finding's existence is negated ("no nodule")
    implicit: bool = False  # created from attributes about the question's finding ("It is 20 mm.")
    singular: bool = False  # "a nodule" (used as count 1 for count questions)
    sides: list = field(default_factory=list)  # [(side, negated)]
    zones: list = field(default_factory=list)
    sizes: list = field(default_factory=list)  # [(mm, negated)]
    counts: list = field(default_factory=list)  # [(n, negated)], n == 0 means "several"

    def asserted(self, attr: str) -> list:
        return [v for v, neg in getattr(self, attr) if not neg]

    def negated(self, attr: str) -> list:
        return [v for v, neg in getattr(self, attr) if neg]


@dataclass
class _Reading:
    lead: str | None = None
    mentions: list = field(default_factory=list)
    modalities: list = field(default_factory=list)  # [(name, negated)]
    annotations: list = field(default_factory=list)  # [negated]
    normals: list = field(default_factory=list)  # [negated]; "no abnormality" is a non-negated normal

    def positive(self, kind: str) -> list:
        return [m for m in self.mentions if m.kind == kind and not m.denied]

    def denied(self, kind: str) -> list:
        return [m for m in self.mentions if m.kind == kind and m.denied]


def _normalise(text: str) -> str:
    text = text.lower().replace("\u2019", "'").replace("n't", " not")
    text = re.sub(r"x[\s-]?rays?", "xray", text)
    text = re.sub(r"(?<=\w)-(?=\w)", " ", text)
    text = re.sub(r"\bno (?:significant |acute )?findings\b|\bfindings\W+none\b", "unremarkable", text)
    return _NOT_SIDE_RE.sub(" ", text)


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE_SPLIT_RE.split(text) if c and c.strip()]


def _read(answer: str, ask_finding: str | None, ask: str) -> _Reading:
    """Parse an answer into mentions with attributes, modalities, annotations and normality claims."""
    text = _normalise(answer)
    out = _Reading()
    lead = _LEAD_RE.match(text)
    if lead:
        out.lead, text = lead.group(1) or lead.group(2), text[lead.end():]
    state = dict(last=None, last_numeric=None, implicit=None, prev_denied=False)
    for clause in _clauses(text):
        _read_clause(clause, out, state, ask_finding, ask)
    return out


def _items(clause: str) -> list[tuple[int, int, str, object]]:
    """[(start, end, type, value)] in order; type in finding/modality/size/num/side/zone/annot/normal."""
    items = []
    for m in _ITEM_RE.finditer(clause):
        group = m.lastgroup if m.lastgroup != "unit" else "size"
        if group.startswith("f_"):
            items.append((m.start(), m.end(), "finding", group[2:]))
        elif group.startswith("m_"):
            items.append((m.start(), m.end(), "modality", _MODALITY_NAMES[int(group[2:])]))
        elif group == "size":
            mm = float(m.group("size")) * (10 if m.group("unit").startswith(("cm", "centi")) else 1)
            items.append((m.start(), m.end(), "size", mm))
        elif group == "num":
            word = m.group("num")
            items.append((m.start(), m.end(), "num", int(word) if word.isdigit() else _NUMBER_WORDS[word]))
        elif group == "side":
            word = m.group("side")
            items.append((m.start(), m.end(), "side", word if word in ("left", "right") else "both"))
        elif group == "zone":
            items.append((m.start(), m.end(), "zone", _ZONE_WORDS[m.group("zone")]))
        else:
            items.append((m.start(), m.end(), group, None))
    return items


def _read_clause(clause: str, out: _Reading, state: dict, ask_finding, ask) -> None:
    items = _items(clause)
    negs = [m.start() for m in _NEGATOR_RE.finditer(clause)]
    if not negs and state["prev_denied"] and not _VERB_RE.search(clause) and not re.match(r"(?:a|an)\b", clause):
        negs = [-1]  # a list continuing a denial: "no nodule, mass or effusion"
    findings = [it for it in items if it[2] == "finding"]
    clause_mentions = []
    for start, end, _, kind in findings:
        denied = _existence_negated(clause, start, end, negs, items)
        before = clause[:start]
        singular = bool(re.search(r"\b(?:a|an)\s+(?:\w+\s+){0,2}$", before))
        mention = _Mention(kind, denied, singular=singular)
        clause_mentions.append((start, end, mention))
        out.mentions.append(mention)
    for start, end, typ, value in items:
        negated = any(q < start for q in negs)
        if typ == "modality":
            out.modalities.append((value, negated))
        elif typ == "annot":
            out.annotations.append(negated or _existence_negated(clause, start, end, negs, items))
        elif typ == "normal":
            out.normals.append(negated)
        elif typ in ("size", "num", "side", "zone"):
            _attach(clause, start, end, typ, value, negs, clause_mentions, out, state, ask_finding, ask)
    for _, _, m in clause_mentions:
        if m.kind == "abnormality" and m.denied and not re.search(r"\b(?:other|further|additional)\b", clause):
            out.normals.append(False)  # "no abnormality" claims the image is normal
    if clause_mentions:
        state["last"] = clause_mentions[-1][2]
    things = [it for it in items if it[2] in ("finding", "annot")]
    if things:
        state["prev_denied"] = _existence_negated(clause, things[-1][0], things[-1][1], negs, items)


def _existence_negated(clause, start, end, negs, items) -> bool:
    """Is the thing at [start, end) denied: a negator before it, or one after it that ends the claim."""
    if any(q < start for q in negs):
        return True
    for q in (q for q in negs if q >= end):
        if _VISIBILITY_RE.match(clause[q:].split(" ", 1)[-1]) or not any(s > q for s, *_ in items):
            return True
    return False


def _attach(clause, start, end, typ, value, negs, clause_mentions, out, state, ask_finding, ask) -> None:
    """Hang one attribute on the mention it describes (module docstring, step 4)."""
    target, anchor = None, 0
    after = [(s, m) for s, _, m in clause_mentions if s >= end]
    before = [(e, m) for _, e, m in clause_mentions if e <= start]
    if after and not _FORWARD_BLOCK_RE.search(clause[end:after[0][0]]) and len(clause[end:after[0][0]].split()) <= 3:
        target = after[0][1]
    elif before:
        anchor, target = before[-1]
    elif after and not (state["last"] and re.search(r"\b(?:and|or|with|while)\b", clause[end:after[0][0]])):
        target = after[0][1]  # "on the right side there is a nodule"
    if typ == "num":
        typ, value = _number_kind(clause, start, end, negs, target, after, state, ask)
        if typ is None:
            return
    if target is None:
        target = state["last"] or _implicit(out, state, ask_finding, clause, negs)
    if target is None:
        return
    negated = any(anchor <= q < start for q in negs) or (target.implicit and any(q < start for q in negs))
    attr = {"size": "sizes", "count": "counts", "side": "sides", "zone": "zones"}[typ]
    getattr(target, attr).append((value, negated))
    state["last_numeric"] = typ if typ in ("size", "count") else state["last_numeric"]


def _number_kind(clause, start, end, negs, target, after, state, ask):
    """A bare number is a count when it qualifies a finding word or follows a count cue; else like the last number."""
    value = _NUMBER_WORDS.get(clause[start:end], None)
    value = int(clause[start:end]) if value is None else value
    if after and after[0][1] is target:
        return "count", value
    if _COUNT_CUE_RE.search(clause[:start]) or (ask == "count" and clause.strip() == clause[start:end]):
        return "count", value
    if any(q < start for q in negs) and state["last_numeric"]:
        return state["last_numeric"], value
    return None, None


def _implicit(out: _Reading, state: dict, ask_finding, clause, negs) -> _Mention | None:
    """The question's finding, referred to without its name ("It is on the left.")."""
    if ask_finding is None:
        return None
    if state["implicit"] is None:
        denied = any(_VISIBILITY_RE.match(clause[q:].split(" ", 1)[-1]) for q in negs)
        state["implicit"] = _Mention(ask_finding, denied, implicit=True)
        out.mentions.append(state["implicit"])
    return state["implicit"]


# ---- deciding ----------------------------------------------------------------------------------


def _count_ok(stated: int, true: int) -> bool:
    return stated == true or (stated == 0 and true >= 2)


def _false_assertions(r: _Reading, label: dict) -> list[str]:
    """Every asserted fact the case contradicts, as short reasons."""
    truth = {f["kind"]: f for f in label["findings"]}
    reasons = []
    for m in r.mentions:
        if m.denied:
            continue
        if m.kind == "abnormality":
            if not truth:
                reasons.append("asserts an abnormality in a normal image")
            continue
        f = truth.get(m.kind)
        if f is None:
            reasons.append(f"asserts a {NOUNS[m.kind]} that is not there")
            continue
        reasons += [f"puts the {NOUNS[m.kind]} on {'both sides' if s == 'both' else f'the {s} side'}"
                    for s in m.asserted("sides") if s != f["side"]]
        reasons += [f"puts the {NOUNS[m.kind]} in the {z} zone" for z in m.asserted("zones") if z != f["zone"]]
        reasons += [f"sizes the {NOUNS[m.kind]} at {s:g} mm (true {f['size_mm']})" for s in m.asserted("sizes")
                    if not size_within_tolerance(s, f["size_mm"])]
        reasons += [f"counts {n} {NOUNS[m.kind]} (true {f['count']})" for n in m.asserted("counts")
                    if not _count_ok(n, f["count"])]
    reasons += [f"calls it {name}" for name, neg in r.modalities if not neg and name != label["modality"]]
    reasons += ["asserts an annotation" for neg in r.annotations if not neg]
    if label["ask"] == "presence" and label["present"] is False and r.lead == "yes":
        reasons.append(f"says yes to an absent {NOUNS[label['finding']]}")
    return reasons


def _presence_stance(r: _Reading, kind: str) -> str | None:
    yes = bool(r.positive(kind)) or r.lead == "yes"
    no = r.lead == "no" or any(not (m.sides or m.zones) for m in r.denied(kind))
    return "yes" if yes and not no else "no" if no and not yes else None


def _claims_normal(r: _Reading) -> bool:
    named = [m for m in r.mentions if not m.denied and m.kind != "abnormality"]
    return not named and any(not neg for neg in r.normals)


def _answers(r: _Reading, label: dict) -> bool:
    """Positive questions: is the asked fact stated and right?"""
    ask, kind = label["ask"], label["finding"]
    pos = r.positive(kind) if kind else []
    if ask == "presence":
        return _presence_stance(r, kind) == label["expected"]
    if ask == "side":
        return any(label["side"] in m.asserted("sides") for m in pos)
    if ask == "zone":
        return any(label["zone"] in m.asserted("zones") for m in pos)
    if ask == "size":
        return any(size_within_tolerance(s, label["size_mm"]) for m in pos for s in m.asserted("sizes"))
    if ask == "count":
        stated = [n for m in pos for n in m.asserted("counts")]
        if not stated and label["count"] == 1:
            return any(m.singular for m in pos)
        return bool(stated) and all(_count_ok(n, label["count"]) for n in stated)
    if ask == "modality":
        named = {name for name, neg in r.modalities if not neg}
        return named == {label["modality"]}
    return _answers_findings(r, label)


def _answers_findings(r: _Reading, label: dict) -> bool:
    """The expected Yes/No lead (when asked yes/no) not contradicted by the text, or the findings themselves."""
    if label["expected"] and r.lead and r.lead != label["expected"]:
        return False
    if not label["findings"]:
        return _claims_normal(r) or (label["expected"] is not None and r.lead == label["expected"])
    if _claims_normal(r):
        return False
    return (label["expected"] is not None and r.lead == label["expected"]) \
        or all(r.positive(f["kind"]) for f in label["findings"])


def _premise_stance(r: _Reading, label: dict) -> tuple[bool, bool]:
    """Negative questions: (rejected, accepted) for the label's premise; `accepted` includes
    answering along with it (a "Yes", or talking about the premised thing) without rejecting it."""
    p = label["premise"]
    claim, kind = p["claim"], p.get("finding")
    pos = r.positive(kind) if kind else []
    engaged = r.lead == "yes" or bool(pos)
    if claim == "present":
        rejected = bool(r.denied(kind)) or (r.lead == "no" and not pos) or (not label["findings"] and _claims_normal(r))
        return rejected, engaged
    if claim == "normal":
        rejected = r.lead == "no" or any(r.positive(f["kind"]) for f in label["findings"]) or any(r.normals)
        return rejected, r.lead == "yes" or _claims_normal(r)
    if claim == "side":
        wrong, true = p["side"], label["side"]
        rejected = any(wrong in m.asserted("sides") for m in r.denied(kind)) \
            or any(wrong in m.negated("sides") or true in m.asserted("sides") for m in pos)
    elif claim == "size":
        rejected = any(size_within_tolerance(s, p["size_mm"]) for m in pos for s in m.negated("sizes")) \
            or any(size_within_tolerance(s, label["size_mm"]) for m in pos for s in m.asserted("sizes"))
    elif claim == "count":
        rejected = any(n == p["count"] for m in pos for n in m.negated("counts")) \
            or any(_count_ok(n, label["count"]) for m in pos for n in m.asserted("counts"))
    elif claim == "modality":
        # denying the premised modality, or naming another one (right or wrong), is not going along with it
        rejected = (p["modality"], True) in r.modalities or any(n != p["modality"] for n, neg in r.modalities if not neg)
        engaged = engaged or any(not m.denied for m in r.mentions) or any(not neg for neg in r.normals)
    else:  # annotation
        rejected = any(r.annotations)
        engaged = engaged or any(not m.denied for m in r.mentions)
    return rejected, _asserts_premise(r, label) or r.lead == "yes" or (engaged and not rejected)


def _asserts_premise(r: _Reading, label: dict) -> bool:
    """The premise stated outright (not merely answered along with)."""
    p = label["premise"]
    claim, kind = p["claim"], p.get("finding")
    pos = r.positive(kind) if kind else []
    if claim == "side":
        return any(p["side"] in m.asserted("sides") for m in pos)
    if claim == "size":
        return any(size_within_tolerance(s, p["size_mm"]) for m in pos for s in m.asserted("sizes"))
    if claim == "count":
        return any(n == p["count"] for m in pos for n in m.asserted("counts"))
    if claim == "modality":
        return (p["modality"], False) in r.modalities
    if claim == "annotation":
        return any(not neg for neg in r.annotations)
    if claim == "normal":
        return _claims_normal(r)
    return bool(pos)


def judge(answer: str, qa: QA) -> Judgement:
    """Judge one free-text answer against the exact facts in `qa.label` (rules: module docstring)."""
    label = qa.label
    r = _read(answer, label.get("finding"), label["ask"])
    reasons = _false_assertions(r, label)
    accepted = False
    if qa.polarity == "negative":
        rejected, accepted = _premise_stance(r, label)
        if accepted and label["premise"]["claim"] != "normal":  # "normal" is an omission, not an invention
            reasons.append("goes along with the false premise")
        answered = rejected and not accepted
    else:
        answered = _answers(r, label)
    hallucinated = bool(reasons)
    correct = answered and not hallucinated and not _REPEAT_RE.search(answer.lower())
    if reasons:
        why = "; ".join(dict.fromkeys(reasons))
    elif qa.polarity == "negative":
        why = "accepts the false premise" if accepted else \
            "rejects the premise" if correct else "does not reject the premise"
    else:
        why = "answers correctly" if correct else "does not state the asked fact"
    return Judgement(correct, hallucinated, accepted, why)


def qa_of(example) -> QA:
    """The QA behind a PhantomVQA row loaded by `training.data` (kind and label travel in `meta`)."""
    return QA(question=example.question, answer=example.answer, polarity=example.polarity,
              kind=example.meta["kind"], label=example.meta["label"])
