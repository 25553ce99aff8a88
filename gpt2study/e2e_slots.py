"""Does an E2E output say what its MR says? The slot error rate (SER) of an output and of a system.

An MR gives up to eight slots: name, eatType, food, priceRange, customer rating, area,
familyFriendly, near. `check(mr, output)` finds what the output says about each slot and sorts
the MR's slots into realised, missing (not said), wrong (said with another value) and repeated
(said twice), and lists the slots the output adds (said, though the MR has no such slot).
SER = (added + missing + wrong + repeated) / the MR slots, over a whole test set.

The rules, written from the E2E data (the training references and systems' outputs):
- name and near: any venue of the data set (and the MR's own), as near when a cue such as
  "near", "close to", "next to", "by" comes before it (or "nearby" after it), else as the name;
  venues are masked before the other slots are looked for ("Raja Indian Cuisine" is no food).
- a value and its counterpart are one value: cheap = less than £20, moderate = £20-25, high =
  more than £30 (price); low = 1 out of 5, average = 3 out of 5, high = 5 out of 5 (rating).
- "high", "low", "average" belong to the price when a price word is beside them ("high price
  range", "prices are high"), to the customer rating when a rating word is ("high customer
  rating", "rated highly"), and to neither otherwise.
- familyFriendly: a mention of family, kids or children, "no" when a negation ("not", "no",
  "non", "n't", "never", "unfriendly") stands in its clause near it, or "adults only".
- an eatType after "the", "this" or "that" refers back ("The pub is ...") and repeats nothing;
  the name may be said any number of times.
"""

import re
import unicodedata
from dataclasses import dataclass, field

SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
# Every name and near value of the E2E release (train, dev, test): the venues an output may speak of.
VENUES = (
    "Alimentum", "All Bar One", "Aromi", "Avalon", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Burger King",
    "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia", "Clare Hall", "Clowns", "Cocum", "Cotto",
    "Crowne Plaza Hotel", "Express by Holiday Inn", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne",
    "Midsummer House", "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch", "Strada", "Taste of Cambridge",
    "The Bakers", "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
    "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Portland Arms",
    "The Punter", "The Rice Boat", "The Six Bells", "The Sorrento", "The Twenty Two", "The Vaults", "The Waterman",
    "The Wrestlers", "Travellers Rest Beefeater", "Wildwood", "Yippee Noodle Bar", "Zizzi",
)
# Values said in two ways: each maps to one canonical value.
SAME_VALUE = {
    "priceRange": {"less than £20": "cheap", "£20-25": "moderate", "more than £30": "high"},
    "customer rating": {"1 out of 5": "low", "3 out of 5": "average", "5 out of 5": "high"},
}


def _rules(slot: str, table: list[tuple[str, str]]):
    return [(slot, value, re.compile(pattern)) for value, pattern in table]


_NUM = {"1": "low", "one": "low", "3": "average", "three": "average", "5": "high", "five": "high"}
_RATING_WORD = r"(?:rat(?:ed|ings?|es?)|review(?:ed|s)?|stars?)"
_ADJ = {"high": "high", "highly": "high", "excellent": "high", "great": "high", "good": "high", "well": "high",
        "top": "high", "low": "low", "lowly": "low", "poor": "low", "poorly": "low", "bad": "low", "badly": "low",
        "average": "average", "mediocre": "average", "moderate": "average", "moderately": "average"}
_ADJS = "|".join(sorted(_ADJ, key=len, reverse=True))
_PRICE_WORD = r"(?:priced|prices?(?: range)?|cost(?:s|ing)?)"
_POUND = r"(?:£ ?|gbp ?)?"

# (slot, value, pattern) over the normalised text: lower case, accents and venues masked.
RULES = [
    *_rules("eatType", [
        ("coffee shop", r"\bcoffee[ -]?(?:shop|house)s?\b|\bcafes?\b"),
        ("pub", r"\bpubs?\b"),
        ("restaurant", r"\brestaurants?\b|\bdiners?\b|\bbistros?\b|\bbrasseries?\b"),
    ]),
    *_rules("food", [
        ("Chinese", r"\bchinese\b"), ("English", r"\b(?:english|british|breakfast)\b"),
        ("Fast food", r"\bfast[ -]?food\b|\bburgers?\b"), ("French", r"\bfrench\b"), ("Italian", r"\bitalian\b"),
        ("Japanese", r"\bjapanese\b|\bsushi\b"), ("Indian", r"\bindian\b|\bcurry\b"),
    ]),
    *_rules("priceRange", [
        ("cheap", r"\b(?:cheap(?:ly|er|est)?|inexpensive(?:ly)?|budget)\b"),
        ("cheap", rf"\blow[ -]?(?:{_PRICE_WORD}|cost)\b"),
        ("cheap", rf"\b{_PRICE_WORD} (?:is |are )?(?:very |quite |fairly |rather )?low\b"),
        ("cheap", rf"\b(?:less|lower|cheaper) than {_POUND}20\b|\b(?:under|below|up to) {_POUND}20\b"),
        ("moderate", rf"\bmoderate(?:ly)?(?! ?-?(?:customer |consumer )?{_RATING_WORD})\b"),
        ("moderate", rf"\b(?:average|mid|medium|middle|reasonabl[ey]|fair(?:ly)?)[ -]?(?:{_PRICE_WORD}|range)\b"),
        ("moderate", rf"\b{_PRICE_WORD} (?:is |are )?(?:very |quite |fairly )?(?:average|reasonable|moderate)\b"),
        ("moderate", rf"{_POUND}20 ?(?:-|to|and) ?{_POUND}25\b"),
        ("high", rf"\b(?:above|higher than|more than|over) (?:the )?average(?! ?(?:customer )?{_RATING_WORD})"),
        ("high", r"\b(?:expensive|pricey|pricy|costly|upscale|high[ -]end|luxur(?:y|ious))\b"),
        ("high", rf"\bhigh(?:ly)?[ -]?(?:{_PRICE_WORD}|cost)\b"),
        ("high", rf"\b{_PRICE_WORD} (?:is |are )?(?:very |quite |fairly |rather )?high\b"),
        ("high", rf"\b(?:more|higher) than {_POUND}30\b|\b(?:over|above|upwards of|in excess of) {_POUND}30\b"),
        ("high", rf"{_POUND}30 ?(?:\+|or (?:more|above|over)|and (?:up|over|above))"),
    ]),
    *_rules("area", [
        ("city centre", r"\b(?:city|town)[ -]?cent(?:re|er)\b|\bcent(?:re|er) of (?:the )?(?:city|town)\b"),
        ("city centre", r"\bdowntown\b|\bcentral(?:ly)?\b|\b(?:in|at) the cent(?:re|er)\b|\bin the city\b"),
        ("riverside", r"\briver(?:side|front| side|bank)?\b|\bwaterfront\b|\bby the water\b"),
    ]),
]
# The customer rating's patterns give their value from a group (a number or an adjective).
RATING_RULES = [
    re.compile(r"\b(1|one|3|three|5|five) ?(?:-|out of|/|of) ?(?:5|five)\b"),
    re.compile(r"\b(1|one|3|three|5|five)[ -]stars?\b"),
    re.compile(r"\b(?:rat(?:ed|ing)) (?:of |at |as )?(1|one|3|three|5|five)\b"),
    re.compile(rf"\b({_ADJS})[ -]?(?:customer |consumer |user |guest |star |approval )?{_RATING_WORD}\b"),
    re.compile(rf"\b(?:{_RATING_WORD})(?: it)?(?: is| are| of| as| at|:)?(?: very| quite| rather| a| an| fairly| only)*"
               rf" ({_ADJS})\b"),
]
# A cue, and perhaps a few words and an "and" ("near the river and X"), right before a venue.
NEAR_BEFORE = re.compile(r"\b(?:near(?: to)?|nearby|close to|close by|next to|by|beside|besides|adjacent to|opposite|"
                         r"not far from|(?:around|round) the corner from|in the vicinity of|neighbou?ring|around|"
                         r"across (?:from|the (?:road|street) from)|down the (?:road|street) from|proximity to|"
                         r"(?:north|south|east|west) of|walking distance (?:of|from|to))"
                         r"(?:(?:\s+[^\s.,;]+){0,3}\s+(?:and|&))?\s+(?:the\s+)?$")
NEAR_AFTER = re.compile(r"^,?\s*(?:which\s+)?(?:is\s+|are\s+)?(?:located\s+|situated\s+)?"
                        r"(?:nearby|close ?by|near ?by)\b")
FAMILY = re.compile(r"\b(?:family|families|kids?|child|children|childrens|toddlers?|adults?)\b")
NEGATION = {"not", "no", "non", "never", "nor", "none", "unfriendly", "without", "prohibited", "banned", "forbidden",
            "unsuitable", "unwelcome"}
CLAUSE_BREAK = re.compile(r"[.,;:!?]|\b(?:and|but|although|though|while|whereas|however|yet|also)\b")


def parse_mr(mr: str) -> dict[str, str]:
    """The slots of an MR string 'name[The Mill], eatType[pub], ...' (those of the eight E2E slots)."""
    slots = {}
    for m in re.finditer(r"([^\[\],]+?)\s*\[([^\]]*)\]", mr):
        if m.group(1).strip() in SLOTS:
            slots[m.group(1).strip()] = m.group(2).strip()
    return slots


def _plain(text: str) -> str:
    """Lower case without accents, one space between words, negations spelled 'not'."""
    text = unicodedata.normalize("NFKD", text.replace("–", "-").replace("’", "'"))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"\b(?:ca|wo)n't\b", "can not", text)
    text = re.sub(r"n't\b", " not", text)
    return " ".join(text.replace("not only", "").split())


def canonical(slot: str, value: str) -> str:
    """One spelling per value: the counterpart's (see SAME_VALUE), in lower case."""
    value = value.strip()
    return SAME_VALUE.get(slot, {}).get(value, value).lower()


@dataclass
class Mention:
    slot: str
    value: str  # canonical
    start: int
    end: int
    refers_back: bool = False  # an eatType after the/this/that: not a second mention


def venue_mentions(text: str, venues) -> tuple[list[Mention], str]:
    """The venues in text (plain) as name or near mentions, and the text with each masked."""
    found: list[Mention] = []
    names = sorted({_plain(v) for v in venues}, key=len, reverse=True)  # longest first: "The Rice Boat" over "Boat"
    for venue in names:
        core = venue[4:] if venue.startswith("the ") else venue
        for m in re.finditer(rf"\b(?:the )?{re.escape(core)}\b", text):
            if any(m.start() < f.end and f.start < m.end() for f in found):
                continue
            near = NEAR_BEFORE.search(text[:m.start()]) or NEAR_AFTER.match(text[m.end():])
            found.append(Mention("near" if near else "name", venue, m.start(), m.end()))
    for f in found:  # same length, so the spans of the others stay right
        text = text[:f.start] + "#" * (f.end - f.start) + text[f.end:]
    return found, text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text)


def family_mentions(text: str) -> list[Mention]:
    """familyFriendly mentions: family words close together in a sentence form one, negated or not."""
    mentions: list[Mention] = []
    for m in FAMILY.finditer(text):
        last = mentions[-1] if mentions else None
        gap = text[last.end:m.start()] if last else ""
        if last and not re.search(r"[.;!?]", gap) and len(gap.split()) <= 3:  # "family and kid friendly"
            last.end = m.end()
            continue
        mentions.append(Mention("familyFriendly", "", m.start(), m.end()))
    for f in mentions:
        before = _words(CLAUSE_BREAK.split(text[:f.start])[-1])[-4:]
        after = _words(CLAUSE_BREAK.split(text[f.end:])[0])[:3]
        words = set(before + after + _words(text[f.start:f.end]))
        adults_only = re.match(r"adults?[ -]only", text[f.start:f.end + 6])
        f.value = "no" if words & NEGATION or adults_only or "adult" in text[f.start:f.end] else "yes"
    return mentions


def mentions(output: str, venues=VENUES) -> list[Mention]:
    """Everything an output says about the eight slots, in text order."""
    text = _plain(output)
    found, text = venue_mentions(text, venues)
    for slot, value, pattern in RULES:
        for m in pattern.finditer(text):
            back = slot == "eatType" and re.search(r"\b(?:the|this|that)\s+$", text[:m.start()]) is not None
            found.append(Mention(slot, canonical(slot, value), m.start(), m.end(), back))
    for pattern in RATING_RULES:
        for m in pattern.finditer(text):
            value = _NUM.get(m.group(1)) or _ADJ[m.group(1)]
            if value == "high" and "not" in _words(text[:m.start()])[-3:]:  # "not highly rated", "no good reviews"
                value = "low"
            found.append(Mention("customer rating", value, m.start(), m.end()))
    found += family_mentions(text)
    kept: list[Mention] = []  # of a slot's overlapping mentions, the longest
    for f in sorted(found, key=lambda f: (f.start, f.start - f.end)):
        if not any(k.slot == f.slot and f.start < k.end and k.start < f.end for k in kept):
            kept.append(f)
    return kept


@dataclass
class SlotCheck:
    """One output against its MR: the MR's slot count and the slots in error, as 'slot=value' strings."""

    slots: int
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # 'slot=said (MR: value)'
    repeated: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.added) + len(self.wrong) + len(self.repeated)


def check(mr: str | dict, output: str) -> SlotCheck:
    """Which of the MR's slots the output realises, misses, gets wrong or repeats, and which it adds."""
    slots = parse_mr(mr) if isinstance(mr, str) else mr
    venues = (*VENUES, *(slots[s] for s in ("name", "near") if s in slots))
    said: dict[str, list[Mention]] = {}
    for m in mentions(output, venues):
        said.setdefault(m.slot, []).append(m)
    result = SlotCheck(len(slots))
    for slot in SLOTS:
        got = said.get(slot, [])
        if slot not in slots:
            if got:
                result.added.append(f"{slot}={got[0].value}")
            continue
        want = canonical(slot, slots[slot] if slot != "name" and slot != "near" else _plain(slots[slot]))
        right = [m for m in got if m.value == want]
        if slot == "eatType" and right:  # "a coffee shop ... the restaurant": a word for any place to eat
            got = [m for m in got if m.value != "restaurant" or m in right]
        other = sorted({m.value for m in got if m.value != want})
        if not got:
            result.missing.append(f"{slot}={slots[slot]}")
        elif other:
            result.wrong.append(f"{slot}={', '.join(other)} (MR: {slots[slot]})")
        elif slot != "name" and sum(not m.refers_back for m in right) > 1:
            result.repeated.append(f"{slot}={slots[slot]}")
    return result


def slot_errors(mrs: list, outputs: list[str]) -> tuple[dict, list[SlotCheck]]:
    """SER and its parts over a test set (fractions and counts), and the check of every output."""
    checks = [check(mr, out) for mr, out in zip(mrs, outputs, strict=True)]
    total = {part: sum(len(getattr(c, part)) for c in checks) for part in ("added", "missing", "wrong", "repeated")}
    slots = sum(c.slots for c in checks)
    return {"SER": sum(total.values()) / max(slots, 1), **total, "slots": slots, "outputs": len(checks),
            "without_error": sum(c.errors == 0 for c in checks) / max(len(checks), 1)}, checks


def mr_of_reference(mr: str, reference: str) -> str | None:
    """The MR that a training reference says: the MR without the slots the reference leaves out; None
    when the reference says a slot with another value, adds or repeats one, or says none of the MR's."""
    slots = parse_mr(mr)
    result = check(slots, reference)
    if result.wrong or result.added or result.repeated:
        return None
    missing = {m.split("=", 1)[0] for m in result.missing}
    return ", ".join(f"{k}[{v}]" for k, v in sorted(slots.items(), key=lambda kv: SLOTS.index(kv[0]))
                     if k not in missing) or None


def fewest_errors(mr: str | dict, candidates: list[str]) -> int:
    """The index of the candidate output with the fewest slot errors against the MR; of equals, the
    first (candidates come best scored first, so ties go to the better score)."""
    slots = parse_mr(mr) if isinstance(mr, str) else mr
    errors = [check(slots, c).errors for c in candidates]
    return errors.index(min(errors))
