"""The slot-error matcher (gpt2study/e2e_slots.py): each slot's realisations, paraphrases and
negations, and its agreement with the E2E cleaning paper's counts on TGen's test outputs."""

import json

import pytest
from conftest import shared_path

from gpt2study.e2e_slots import check, fewest_errors, mentions, mr_of_reference, parse_mr, slot_errors

MILL = "name[The Mill], eatType[pub], food[Italian], priceRange[high], customer rating[5 out of 5], " \
       "area[city centre], familyFriendly[no], near[Café Sicilia]"


def errors(mr: str, output: str) -> dict:
    c = check(mr, output)
    return {k: v for k, v in (("missing", c.missing), ("wrong", c.wrong), ("added", c.added),
                              ("repeated", c.repeated)) if v}


def said(output: str) -> set:
    return {(m.slot, m.value) for m in mentions(output)}


def test_parse_mr_reads_the_eight_slots():
    assert parse_mr(MILL) == {"name": "The Mill", "eatType": "pub", "food": "Italian", "priceRange": "high",
                              "customer rating": "5 out of 5", "area": "city centre", "familyFriendly": "no",
                              "near": "Café Sicilia"}


def test_an_output_that_says_everything_has_no_error():
    out = ("The Mill is an Italian pub near Café Sicilia in the city centre. It is expensive, has a "
           "customer rating of 5 out of 5 and is not family-friendly.")
    assert errors(MILL, out) == {}


def test_missing_slots_are_listed_with_their_values():
    assert errors(MILL, "The Mill is an Italian pub.") == {"missing": [
        "priceRange=high", "customer rating=5 out of 5", "area=city centre", "familyFriendly=no",
        "near=Café Sicilia"]}


@pytest.mark.parametrize("output, value", [
    ("It is family-friendly.", "yes"), ("It is family friendly.", "yes"), ("It is kid friendly.", "yes"),
    ("Children are welcome.", "yes"), ("It is good for families.", "yes"), ("It is family and kid friendly.", "yes"),
    ("It is not family-friendly.", "no"), ("It isn't child friendly.", "no"), ("No children.", "no"),
    ("It is adults only.", "no"), ("It is for adults.", "no"), ("It is a non family-friendly pub.", "no"),
    ("Children are not allowed.", "no"), ("It does not welcome kids.", "no"), ("Kids are prohibited.", "no"),
    ("It is not cheap but it is family friendly.", "yes"),
])
def test_family_friendly_and_its_negations(output, value):
    assert [v for s, v in said(output) if s == "familyFriendly"] == [value]


def test_family_friendly_said_the_wrong_way_round_is_wrong():
    mr = "name[Zizzi], familyFriendly[yes]"
    assert errors(mr, "Zizzi is kid friendly.") == {}
    assert errors(mr, "Zizzi is not kid friendly.") == {"wrong": ["familyFriendly=no (MR: yes)"]}
    assert errors(mr, "Zizzi is family friendly. Children are welcome.") == {"repeated": ["familyFriendly=yes"]}


@pytest.mark.parametrize("output, price, rating", [
    ("It has a high price range.", "high", None), ("It has a high customer rating.", None, "high"),
    ("Its prices are high and it is rated highly.", "high", "high"),
    ("It is in the high price range with a low customer rating.", "high", "low"),
    ("It has an average customer rating and a high price range.", "high", "average"),
    ("It has a high price range and an average customer rating.", "high", "average"),
    ("It is cheap.", "cheap", None), ("It is low priced.", "cheap", None), ("It costs less than £20.", "cheap", None),
    ("It costs £20-25.", "moderate", None), ("Prices are between £20 and £25.", "moderate", None),
    ("It is moderately priced.", "moderate", None), ("It is in the more than £30 price range.", "high", None),
    ("It is expensive.", "high", None), ("It has prices above average.", "high", None),
    ("It is rated 5 out of 5.", None, "high"), ("It has a five star rating.", None, "high"),
    ("It has a customer rating of 1 out of 5.", None, "low"), ("Its customer rating is 3 out of 5.", None, "average"),
    ("It is not highly rated.", None, "low"), ("It has a moderate customer rating.", None, "average"),
])
def test_price_and_rating_tell_high_from_high(output, price, rating):
    got = said(output)
    assert [v for s, v in got if s == "priceRange"] == ([price] if price else [])
    assert [v for s, v in got if s == "customer rating"] == ([rating] if rating else [])


def test_a_value_and_its_counterpart_are_one():
    assert errors("name[Zizzi], priceRange[£20-25]", "Zizzi is moderately priced.") == {}
    assert errors("name[Zizzi], priceRange[less than £20]", "Zizzi is cheap.") == {}
    assert errors("name[Zizzi], customer rating[5 out of 5]", "Zizzi has a high customer rating.") == {}
    assert errors("name[Zizzi], customer rating[5 out of 5]", "Zizzi is rated 1 out of 5.") == {
        "wrong": ["customer rating=low (MR: 5 out of 5)"]}
    assert errors("name[Zizzi], priceRange[cheap]", "Zizzi is cheap, expensive even.") == {
        "wrong": ["priceRange=high (MR: cheap)"]}


@pytest.mark.parametrize("output, value", [
    ("It is in the city centre.", "city centre"), ("It is in the centre of the city.", "city centre"),
    ("It is downtown.", "city centre"), ("It is in the city center.", "city centre"),
    ("It is in the riverside area.", "riverside"), ("It is by the river.", "riverside"),
    ("It is on the riverside.", "riverside"),
])
def test_area(output, value):
    assert [v for s, v in said(output) if s == "area"] == [value]


def test_near_x_is_not_x_as_the_name():
    mr = "name[The Mill], near[Café Sicilia]"
    assert errors(mr, "The Mill is near Café Sicilia.") == {}
    assert errors(mr, "The Mill is close to the Café Sicilia.") == {}
    assert errors(mr, "Near Café Sicilia is The Mill.") == {}
    assert errors(mr, "The Mill is a place to eat. Café Sicilia is nearby.") == {}
    assert errors(mr, "The Mill is by the river and Café Sicilia.") == {"added": ["area=riverside"]}
    assert errors(mr, "Café Sicilia is near The Mill.") == {
        "wrong": ["name=cafe sicilia (MR: The Mill)", "near=the mill (MR: Café Sicilia)"]}
    assert errors("name[The Mill]", "The Mill is near Burger King.") == {"added": ["near=burger king"]}
    assert errors(mr, "It is near Café Sicilia.") == {"missing": ["name=The Mill"]}


def test_venue_names_hide_their_words():
    # "Raja Indian Cuisine" is no Indian food, "All Bar One" no pub, "Rainbow Vegetarian Café" no coffee shop
    mr = "name[Zizzi], food[Chinese], near[Raja Indian Cuisine]"
    assert errors(mr, "Zizzi serves Chinese food near Raja Indian Cuisine.") == {}
    assert said("Zizzi is near Rainbow Vegetarian Café and All Bar One.") == {
        ("name", "zizzi"), ("near", "rainbow vegetarian cafe"), ("near", "all bar one")}


def test_eat_type():
    mr = "name[Zizzi], eatType[coffee shop]"
    assert errors(mr, "Zizzi is a coffee shop.") == {}
    assert errors(mr, "Zizzi is a café.") == {}
    assert errors(mr, "Zizzi is a coffee shop. The restaurant is cheap.") == {"added": ["priceRange=cheap"]}
    assert errors(mr, "Zizzi is a pub.") == {"wrong": ["eatType=pub (MR: coffee shop)"]}
    assert errors("name[Zizzi], eatType[pub]", "Zizzi is a pub. The pub is near the river.") == {
        "added": ["area=riverside"]}  # "the pub" refers back
    assert errors("name[Zizzi], eatType[pub]", "Zizzi is a pub. It is a pub with a view.") == {
        "repeated": ["eatType=pub"]}


def test_food():
    assert said("It serves Fast food.") == {("food", "fast food")}
    assert said("It serves British food.") == {("food", "english")}
    assert errors("name[Zizzi], food[Japanese]", "Zizzi serves sushi.") == {}
    assert errors("name[Zizzi], food[Japanese]", "Zizzi serves French food.") == {
        "wrong": ["food=french (MR: Japanese)"]}


def test_slot_error_rate_counts_over_all_slots():
    mrs = ["name[Zizzi], eatType[pub], area[riverside]", "name[Cocum], food[French]"]
    outputs = ["Zizzi is a pub in the city centre near Burger King.", "Cocum serves French food."]
    totals, checks = slot_errors(mrs, outputs)
    assert [c.errors for c in checks] == [2, 0]
    assert totals == {"SER": 2 / 5, "added": 1, "missing": 0, "wrong": 1, "repeated": 0, "slots": 5, "outputs": 2,
                      "without_error": 0.5}


def test_fewest_errors_prefers_the_better_score_among_equals():
    mr = "name[Zizzi], eatType[pub], near[Burger King]"
    assert fewest_errors(mr, ["Zizzi is a pub.", "Zizzi is a pub near Burger King.", "Zizzi is near Burger King."]) == 1
    assert fewest_errors(mr, ["Zizzi is a pub.", "Zizzi is near Burger King."]) == 0


def test_the_mr_a_training_reference_says():
    mr = "name[The Mill], eatType[pub], food[French], priceRange[cheap], area[riverside]"
    assert mr_of_reference(mr, "The Mill is a cheap French pub in the riverside area.") == mr
    # the slots it leaves out leave the MR, in the MR's own order
    assert mr_of_reference(mr, "The Mill is a pub by the river.") == "name[The Mill], eatType[pub], area[riverside]"
    assert mr_of_reference("food[Italian], name[Zizzi]", "Zizzi serves Italian food.") == "name[Zizzi], food[Italian]"
    # "restaurant" for a place without an eatType is an added slot: taught as an eatType, it made a small
    # model call pubs restaurants
    assert mr_of_reference("name[Zizzi], food[Italian]", "Zizzi is an Italian restaurant.") is None
    assert mr_of_reference(mr, "The Mill is a cheap French pub in the city centre.") is None  # wrong
    assert mr_of_reference(mr, "The Mill is a cheap French pub by the river, near Avalon.") is None  # added
    assert mr_of_reference(mr, "The Mill is a cheap French pub by the river. It is cheap.") is None  # repeated
    assert mr_of_reference("name[Zizzi]", "A nice place.") is None  # nothing of the MR said


def test_agrees_with_the_cleaning_papers_counts_on_tgen():
    """On TGen's 630 test outputs, within 0.3 points of the published script's SER and the same
    verdict (an error or none) on at least 97 % of the outputs."""
    ref = json.loads(shared_path("data/e2e/reference/slot_errors.json").read_text(encoding="utf-8"))
    rows = ref["per_output"]
    totals, checks = slot_errors([r["mr"] for r in rows], [r["output"] for r in rows])
    assert totals["slots"] == ref["totals"]["slots"] == 4352
    assert abs(totals["SER"] - ref["totals"]["SER"]) < 0.003, totals
    theirs = [r["added"] + r["missing"] + r["wrong"] + r["repeated"] > 0 for r in rows]
    agree = sum((c.errors > 0) == t for c, t in zip(checks, theirs)) / len(rows)
    assert agree >= 0.97, agree
    assert abs(totals["without_error"] - ref["totals"]["outputs_without_error"]) < 0.03
