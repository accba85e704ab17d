#!/usr/bin/env python3
"""Build ``src/atlaskv/data/fb15k237_relations.tsv``: an English noun phrase for every FB15k-237 relation.

Output columns (TSV, one header line)::

    relation_path  phrase  inverse_phrase  source

* ``phrase`` P reads as "the P of <head>" and names the tail
  (``/people/person/place_of_birth`` -> "place of birth").
* ``inverse_phrase`` Q, where one reads naturally, makes "the Q of <tail>" name the head
  (spouse -> spouse, prequel -> sequel, alumnus -> alma mater); empty otherwise.
* ``source`` is ``eval`` for the 84 relations used by the evaluation sets in ``shared/eval/fb15k*``
  (their phrase is recovered from those files, so training data and evaluation keys use the very same
  wording) and ``manual`` for the other 153, phrased by hand below.

How the ``eval`` phrases are recovered: the eval triples carry readable names and phrases but no Freebase ids.
Every FB15k-237 triple (train + valid + test) is turned into a (head name, tail name) pair with the names of
``entity2text.txt`` (a trailing "-GB" removed, whitespace collapsed, as the eval README says). For each eval
triple, the Freebase paths linking its (head, tail) names are its candidates; eval triples with exactly one
candidate path vote for (path, phrase). Each voted path takes its majority phrase; the script checks that the
agreement is 100 %, that every eval triple is explained by one of its candidate paths, and that the result has
84 paths and 78 phrases (the numbers in the eval README).

Run from the repository root (deterministic, standard library only)::

    .venv/bin/python scripts/make_fb15k_relations.py

The data folder is ``$ATLASKV_SHARED`` or ``../shared`` next to the repository.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "atlaskv" / "data" / "fb15k237_relations.tsv"
HEADER = ("relation_path", "phrase", "inverse_phrase", "source")
EVAL_SETS = ("fb15k", "fb15k-dense")
EXPECTED_EVAL_PATHS = 84
EXPECTED_EVAL_PHRASES = 78
EXPECTED_PATHS = 237

# ---------------------------------------------------------------------------------------------------------
# Phrases written by hand for the 153 relations the eval sets do not use. Many of these relations are
# one-to-many or go through a Freebase CVT node; the phrase is the most readable noun reading of the path
# as "the <phrase> of <head>" (check the head/tail direction: the key is always about the HEAD).
# ---------------------------------------------------------------------------------------------------------
MANUAL: dict[str, str] = {
    # --- awards -------------------------------------------------------------------------------------------
    "/award/award_category/disciplines_or_subjects": "subject area",
    "/award/award_category/nominees./award/award_nomination/nominated_for": "nominated work",
    "/award/award_category/winners./award/award_honor/award_winner": "winner",
    "/award/award_category/winners./award/award_honor/ceremony": "award ceremony",
    "/award/award_ceremony/awards_presented./award/award_honor/award_winner": "honoree",
    "/award/award_ceremony/awards_presented./award/award_honor/honored_for": "honored work",
    "/award/award_nominated_work/award_nominations./award/award_nomination/nominated_for": "fellow nominated work",
    "/award/award_nominee/award_nominations./award/award_nomination/award_nominee": "fellow award nominee",
    "/award/award_nominee/award_nominations./award/award_nomination/nominated_for": "nominated work",
    "/award/award_winner/awards_won./award/award_honor/award_winner": "fellow award winner",
    "/award/award_winning_work/awards_won./award/award_honor/award_winner": "award winner",
    "/award/award_winning_work/awards_won./award/award_honor/honored_for": "fellow honored work",
    "/award/hall_of_fame/inductees./award/hall_of_fame_induction/inductee": "inductee",
    "/award/ranked_item/appears_in_ranked_lists./award/ranking/list": "ranking list",
    # --- popular-culture bases ----------------------------------------------------------------------------
    "/base/americancomedy/celebrity_impressionist/celebrities_impersonated": "impersonated celebrity",
    "/base/popstra/celebrity/breakup./base/popstra/breakup/participant": "former partner",
    "/base/popstra/celebrity/canoodled./base/popstra/canoodled/participant": "fling",
    "/base/popstra/celebrity/dated./base/popstra/dated/participant": "dating partner",
    "/base/popstra/location/vacationers./base/popstra/vacation_choice/vacationer": "celebrity vacationer",
    "/base/saturdaynightlive/snl_cast_member/seasons./base/saturdaynightlive/snl_season_tenure/cast_members":
        "fellow SNL cast member",
    "/celebrities/celebrity/celebrity_friends./celebrities/friendship/friend": "celebrity friend",
    "/celebrities/celebrity/sexual_relationships./celebrities/romantic_relationship/celebrity": "romantic partner",
    "/base/x2010fifaworldcupsouthafrica/world_cup_squad/current_world_cup_squad."
    "/base/x2010fifaworldcupsouthafrica/current_world_cup_squad/current_club": "2010 World Cup squad club",
    "/broadcast/content/artist": "featured artist",
    # --- places -------------------------------------------------------------------------------------------
    "/base/aareas/schema/administrative_area/administrative_area_type": "administrative area type",
    "/base/aareas/schema/administrative_area/administrative_parent": "parent administrative area",
    "/base/aareas/schema/administrative_area/capital": "capital",
    "/base/locations/continents/countries_within": "constituent country",
    "/base/petbreeds/city_with_dogs/top_breeds./base/petbreeds/dog_city_relationship/dog_breed": "popular dog breed",
    "/location/administrative_division/first_level_division_of": "parent country",
    "/location/capital_of_administrative_division/capital_of."
    "/location/administrative_division_capital_relationship/administrative_division": "administrative division",
    "/location/country/second_level_divisions": "second-level division",
    "/location/hud_county_place/place": "corresponding place",
    "/location/hud_foreclosure_area/estimated_number_of_mortgages./measurement_unit/dated_integer/source":
        "mortgage data source",
    "/location/location/adjoin_s./location/adjoining_relationship/adjoins": "neighboring region",
    "/location/location/contains": "contained location",
    "/location/location/partially_contains": "partially contained location",
    "/location/statistical_region/gdp_nominal./measurement_unit/dated_money_value/currency": "nominal GDP currency",
    "/location/statistical_region/gdp_nominal_per_capita./measurement_unit/dated_money_value/currency":
        "nominal GDP per capita currency",
    "/location/statistical_region/gdp_real./measurement_unit/adjusted_money_value/adjustment_currency":
        "real GDP currency",
    "/location/statistical_region/gni_per_capita_in_ppp_dollars./measurement_unit/dated_money_value/currency":
        "GNI per capita currency",
    "/location/statistical_region/places_exported_to./location/imports_and_exports/exported_to": "export destination",
    "/location/statistical_region/rent50_2./measurement_unit/dated_money_value/currency": "median rent currency",
    "/travel/travel_destination/climate./travel/travel_destination_monthly_climate/month": "climate data month",
    "/travel/travel_destination/how_to_get_here./travel/transportation/mode_of_transportation":
        "mode of transportation",
    "/language/human_language/countries_spoken_in": "country of use",
    "/people/ethnicity/geographic_distribution": "geographic distribution",
    "/user/ktrueman/default_domain/international_organization/member_states": "member state",
    # --- miscellaneous topics -----------------------------------------------------------------------------
    "/base/culturalevent/event/entity_involved": "involved party",
    "/base/localfood/seasonal_month/produce_available./base/localfood/produce_availability/seasonal_months":
        "month sharing seasonal produce",
    "/base/marchmadness/ncaa_basketball_tournament/seeds./base/marchmadness/ncaa_tournament_seed/team":
        "seeded team",
    "/common/topic/webpage./common/webpage/category": "webpage category",
    "/dataworld/gardening_hint/split_to": "split-off topic",
    "/food/food/nutrients./food/nutrition_fact/nutrient": "nutrient",
    "/medicine/disease/notable_people_with_this_condition": "notable patient",
    "/medicine/disease/risk_factors": "risk factor",
    "/medicine/symptom/symptom_of": "associated condition",
    "/military/military_combatant/military_conflicts./military/military_combatant_group/combatants": "military ally",
    "/military/military_conflict/combatants./military/military_combatant_group/combatants": "combatant",
    "/user/alexander/philosophy/philosopher/interests": "philosophical interest",
    "/user/tsegaran/random/taxonomy_subject/entry./user/tsegaran/random/taxonomy_entry/taxonomy":
        "classification scheme",
    # --- business and organizations -----------------------------------------------------------------------
    "/base/schemastaging/organization_extra/phone_number./base/schemastaging/phone_sandbox/contact_category":
        "customer contact category",
    "/base/schemastaging/organization_extra/phone_number./base/schemastaging/phone_sandbox/service_language":
        "phone service language",
    "/base/schemastaging/organization_extra/phone_number./base/schemastaging/phone_sandbox/service_location":
        "phone service location",
    "/business/business_operation/assets./measurement_unit/dated_money_value/currency": "assets currency",
    "/business/business_operation/operating_income./measurement_unit/dated_money_value/currency":
        "operating income currency",
    "/business/business_operation/revenue./measurement_unit/dated_money_value/currency": "revenue currency",
    "/business/job_title/people_with_this_title./business/employment_tenure/company": "employing company",
    "/organization/endowed_organization/endowment./measurement_unit/dated_money_value/currency":
        "endowment currency",
    "/organization/non_profit_organization/registered_with./organization/non_profit_registration/registering_agency":
        "registering agency",
    "/organization/organization/child./organization/organization_relationship/child": "subsidiary",
    "/organization/role/leaders./organization/leadership/organization": "led organization",
    # --- education ----------------------------------------------------------------------------------------
    "/education/educational_degree/people_with_this_degree./education/education/institution":
        "awarding institution",
    "/education/educational_degree/people_with_this_degree./education/education/major_field_of_study":
        "field of study",
    "/education/educational_degree/people_with_this_degree./education/education/student": "degree holder",
    "/education/educational_institution/campuses": "campus",
    "/education/educational_institution/students_graduates./education/education/major_field_of_study":
        "alumni field of study",
    "/education/educational_institution/students_graduates./education/education/student": "alumnus",
    "/education/educational_institution_campus/educational_institution": "institution",
    "/education/field_of_study/students_majoring./education/education/major_field_of_study":
        "related field of study",
    "/education/field_of_study/students_majoring./education/education/student": "notable student",
    "/education/university/domestic_tuition./measurement_unit/dated_money_value/currency":
        "domestic tuition currency",
    "/education/university/fraternities_and_sororities": "fraternity or sorority",
    "/education/university/international_tuition./measurement_unit/dated_money_value/currency":
        "international tuition currency",
    "/education/university/local_tuition./measurement_unit/dated_money_value/currency": "local tuition currency",
    # --- film ---------------------------------------------------------------------------------------------
    "/film/actor/film./film/performance/film": "film",
    "/film/actor/film./film/performance/special_performance_type": "special performance type",
    "/film/film/distributors./film/film_film_distributor_relationship/film_distribution_medium":
        "distribution medium",
    "/film/film/distributors./film/film_film_distributor_relationship/region": "distribution region",
    "/film/film/dubbing_performances./film/dubbing_performance/actor": "dubbing actor",
    "/film/film/other_crew./film/film_crew_gig/film_crew_role": "crew role",
    "/film/film/personal_appearances./film/personal_film_appearance/person": "featured person",
    "/film/film/release_date_s./film/film_regional_release_date/film_regional_debut_venue": "premiere venue",
    "/film/film/release_date_s./film/film_regional_release_date/film_release_region": "release region",
    "/film/film/runtime./film/film_cut/film_release_region": "release region",
    "/film/film_distributor/films_distributed./film/film_film_distributor_relationship/film": "distributed film",
    "/film/film_set_designer/film_sets_designed": "set design credit",
    "/film/film_subject/films": "related film",
    "/film/person_or_entity_appearing_in_film/films./film/personal_film_appearance/type_of_appearance":
        "film appearance type",
    "/film/special_film_performance_type/film_performance_type./film/performance/film": "example film",
    "/media_common/netflix_genre/titles": "Netflix title",
    # --- government ---------------------------------------------------------------------------------------
    "/government/government_office_category/officeholders./government/government_position_held/jurisdiction_of_office":
        "jurisdiction",
    "/government/governmental_body/members./government/government_position_held/legislative_sessions":
        "legislative session",
    "/government/legislative_session/members./government/government_position_held/district_represented":
        "represented district",
    "/government/legislative_session/members./government/government_position_held/legislative_sessions":
        "related legislative session",
    "/government/political_party/politicians_in_this_party./government/political_party_tenure/politician":
        "party member",
    "/government/politician/government_positions_held./government/government_position_held/legislative_sessions":
        "legislative session",
    # --- people -------------------------------------------------------------------------------------------
    "/influence/influence_node/peers./influence/peer_relationship/peers": "peer",
    "/people/cause_of_death/people": "notable victim",
    "/people/ethnicity/people": "notable member",
    "/people/marriage_union_type/unions_of_this_type./people/marriage/location_of_ceremony": "ceremony location",
    "/people/person/spouse_s./people/marriage/type_of_union": "type of union",
    # --- music --------------------------------------------------------------------------------------------
    "/music/artist/contribution./music/recording_contribution/performance_role": "recording role",
    "/music/genre/artists": "artist",
    "/music/instrument/instrumentalists": "instrumentalist",
    "/music/performance_role/guest_performances./music/recording_contribution/performance_role":
        "accompanying instrument",
    "/music/performance_role/regular_performances./music/group_membership/group": "featuring band",
    "/music/performance_role/regular_performances./music/group_membership/role": "accompanying instrument",
    "/music/performance_role/track_performances./music/track_contribution/role": "accompanying instrument",
    # --- olympics -----------------------------------------------------------------------------------------
    "/olympics/olympic_games/medals_awarded./olympics/olympic_medal_honor/medal": "awarded medal",
    "/olympics/olympic_games/participating_countries": "participating country",
    "/olympics/olympic_games/sports": "Olympic sport",
    "/user/jg/default_domain/olympic_games/sports": "Olympic sport",
    "/olympics/olympic_participating_country/athletes./olympics/olympic_athlete_affiliation/olympics":
        "Olympic Games",
    "/olympics/olympic_participating_country/medals_won./olympics/olympic_medal_honor/medal": "Olympic medal",
    "/olympics/olympic_participating_country/medals_won./olympics/olympic_medal_honor/olympics":
        "medal-winning Olympic Games",
    "/olympics/olympic_sport/athletes./olympics/olympic_athlete_affiliation/country": "competing country",
    "/olympics/olympic_sport/athletes./olympics/olympic_athlete_affiliation/olympics": "Olympic Games",
    # --- sports -------------------------------------------------------------------------------------------
    "/american_football/football_team/current_roster./sports/sports_team_roster/position": "roster position",
    "/baseball/baseball_team/team_stats./baseball/baseball_team_stats/season": "baseball season",
    "/ice_hockey/hockey_team/current_roster./sports/sports_team_roster/position": "roster position",
    "/soccer/football_player/current_team./sports/sports_team_roster/team": "current team",
    "/soccer/football_team/current_roster./soccer/football_roster_position/position": "roster position",
    "/soccer/football_team/current_roster./sports/sports_team_roster/position": "roster position",
    "/sports/pro_athlete/teams./sports/sports_team_roster/team": "team",
    "/sports/professional_sports_team/draft_picks./sports/sports_league_draft_pick/draft": "draft",
    "/sports/professional_sports_team/draft_picks./sports/sports_league_draft_pick/school": "draft pick school",
    "/sports/sport/pro_athletes./sports/pro_sports_played/athlete": "professional athlete",
    "/sports/sports_league/teams./sports/sports_league_participation/team": "member team",
    "/sports/sports_league_draft/picks./sports/sports_league_draft_pick/school": "draft pick school",
    "/sports/sports_position/players./american_football/football_historical_roster_position/position_s":
        "related position",
    "/sports/sports_position/players./sports/sports_team_roster/position": "related position",
    "/sports/sports_position/players./sports/sports_team_roster/team": "team",
    "/sports/sports_team/roster./american_football/football_historical_roster_position/position_s":
        "historical roster position",
    "/sports/sports_team/roster./american_football/football_roster_position/position": "roster position",
    "/sports/sports_team/roster./baseball/baseball_roster_position/position": "roster position",
    "/sports/sports_team/roster./basketball/basketball_roster_position/position": "roster position",
    # --- television ---------------------------------------------------------------------------------------
    "/tv/non_character_role/tv_regular_personal_appearances./tv/tv_regular_personal_appearance/person":
        "TV personality",
    "/tv/tv_network/programs./tv/tv_network_duration/program": "broadcast program",
    "/tv/tv_producer/programs_produced./tv/tv_producer_term/producer_type": "producer role",
    "/tv/tv_producer/programs_produced./tv/tv_producer_term/program": "produced TV program",
    "/tv/tv_program/tv_producer./tv/tv_producer_term/producer_type": "producer role",
    "/tv/tv_writer/tv_programs./tv/tv_program_writer_relationship/tv_program": "written TV program",
}

# ---------------------------------------------------------------------------------------------------------
# Inverse phrases Q ("the Q of <tail>" names the head), for eval and manual relations alike, only where a
# natural noun exists. Relations not listed get an empty inverse.
# ---------------------------------------------------------------------------------------------------------
INVERSE: dict[str, str] = {
    # symmetric person-person relations
    "/people/person/spouse_s./people/marriage/spouse": "spouse",
    "/people/person/sibling_s./people/sibling_relationship/sibling": "sibling",
    "/base/popstra/celebrity/friendship./base/popstra/friendship/participant": "friend",
    "/base/popstra/celebrity/breakup./base/popstra/breakup/participant": "former partner",
    "/base/popstra/celebrity/canoodled./base/popstra/canoodled/participant": "fling",
    "/base/popstra/celebrity/dated./base/popstra/dated/participant": "dating partner",
    "/celebrities/celebrity/celebrity_friends./celebrities/friendship/friend": "celebrity friend",
    "/celebrities/celebrity/sexual_relationships./celebrities/romantic_relationship/celebrity": "romantic partner",
    "/influence/influence_node/peers./influence/peer_relationship/peers": "peer",
    "/award/award_winner/awards_won./award/award_honor/award_winner": "fellow award winner",
    "/award/award_nominee/award_nominations./award/award_nomination/award_nominee": "fellow award nominee",
    "/base/saturdaynightlive/snl_cast_member/seasons./base/saturdaynightlive/snl_season_tenure/cast_members":
        "fellow SNL cast member",
    "/military/military_combatant/military_conflicts./military/military_combatant_group/combatants": "military ally",
    "/location/location/adjoin_s./location/adjoining_relationship/adjoins": "neighboring region",
    # eval relations
    "/film/film/prequel": "sequel",
    "/music/genre/parent_genre": "subgenre",
    "/people/profession/specialization_of": "specialization",
    "/award/award_category/category_of": "award category",
    "/music/group_member/membership./music/group_membership/group": "band member",
    "/organization/organization_founder/organizations_founded": "founder",
    "/film/director/film": "director",
    "/film/film/produced_by": "produced film",
    "/film/film/production_companies": "produced film",
    "/film/film/music": "scored film",
    "/people/person/employment_history./business/employment_tenure/company": "employee",
    "/music/record_label/artist": "record label",
    "/organization/organization_member/member_of./organization/organization_membership/organization": "member",
    "/sports/sports_team_location/teams": "home city",
    "/location/country/capital": "country",
    "/location/us_county/county_seat": "county",
    "/award/award_nominee/award_nominations./award/award_nomination/award": "nominee",
    "/award/award_winning_work/awards_won./award/award_honor/award": "award-winning work",
    "/tv/tv_program/regular_cast./tv/regular_tv_appearance/actor": "TV show",
    "/tv/tv_program/program_creator": "created TV program",
    # manual relations
    "/award/hall_of_fame/inductees./award/hall_of_fame_induction/inductee": "hall of fame",
    "/base/americancomedy/celebrity_impressionist/celebrities_impersonated": "impersonator",
    "/base/popstra/location/vacationers./base/popstra/vacation_choice/vacationer": "vacation destination",
    "/base/aareas/schema/administrative_area/administrative_parent": "subdivision",
    "/base/locations/continents/countries_within": "continent",
    "/location/capital_of_administrative_division/capital_of."
    "/location/administrative_division_capital_relationship/administrative_division": "capital",
    "/location/country/second_level_divisions": "country",
    "/location/location/contains": "containing location",
    "/language/human_language/countries_spoken_in": "spoken language",
    "/user/ktrueman/default_domain/international_organization/member_states": "international organization",
    "/military/military_conflict/combatants./military/military_combatant_group/combatants": "military conflict",
    "/medicine/disease/notable_people_with_this_condition": "medical condition",
    "/medicine/symptom/symptom_of": "symptom",
    "/organization/organization/child./organization/organization_relationship/child": "parent organization",
    "/education/educational_degree/people_with_this_degree./education/education/student": "degree",
    "/education/educational_institution/students_graduates./education/education/student": "alma mater",
    "/education/field_of_study/students_majoring./education/education/student": "field of study",
    "/film/actor/film./film/performance/film": "actor",
    "/film/film/dubbing_performances./film/dubbing_performance/actor": "dubbed film",
    "/film/film_distributor/films_distributed./film/film_film_distributor_relationship/film": "distributor",
    "/film/film_set_designer/film_sets_designed": "set designer",
    "/film/film_subject/films": "subject",
    "/media_common/netflix_genre/titles": "Netflix genre",
    "/government/political_party/politicians_in_this_party./government/political_party_tenure/politician":
        "political party",
    "/people/cause_of_death/people": "cause of death",
    "/people/ethnicity/people": "ethnicity",
    "/music/genre/artists": "music genre",
    "/music/instrument/instrumentalists": "instrument",
    "/olympics/olympic_games/participating_countries": "Olympic Games",
    "/olympics/olympic_games/sports": "Olympic Games",
    "/user/jg/default_domain/olympic_games/sports": "Olympic Games",
    "/olympics/olympic_participating_country/athletes./olympics/olympic_athlete_affiliation/olympics":
        "participating country",
    "/sports/pro_athlete/teams./sports/sports_team_roster/team": "player",
    "/soccer/football_player/current_team./sports/sports_team_roster/team": "current player",
    "/sports/sport/pro_athletes./sports/pro_sports_played/athlete": "sport",
    "/sports/sports_league/teams./sports/sports_league_participation/team": "league",
    "/tv/tv_network/programs./tv/tv_network_duration/program": "TV network",
    "/tv/tv_producer/programs_produced./tv/tv_producer_term/program": "TV producer",
    "/tv/tv_writer/tv_programs./tv/tv_program_writer_relationship/tv_program": "TV writer",
}

# Acronyms and proper nouns allowed to keep capitals inside phrases (everything else is lower case).
_ALLOWED_CAPS = {"TV", "SNL", "GDP", "GNI", "Netflix", "Olympic", "Games", "World", "Cup"}


def shared_dir() -> Path:
    env = os.environ.get("ATLASKV_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def normalize_name(name: str) -> str:
    """Entity-name normalisation of the eval sets: collapse whitespace, drop a trailing "-GB" marker."""
    name = re.sub(r"\s+", " ", name).strip()
    if name.endswith("-GB"):
        name = name[: -len("-GB")].rstrip()
    return name


def check_phrase(phrase: str, what: str) -> None:
    if not phrase or phrase != phrase.strip() or "  " in phrase:
        raise SystemExit(f"bad {what}: {phrase!r}")
    if re.search(r"[/_\t\n.]", phrase):
        raise SystemExit(f"machine-like {what}: {phrase!r}")
    for word in re.split(r"[ -]", phrase):
        if word and word[0].isupper() and word not in _ALLOWED_CAPS:
            raise SystemExit(f"unexpected capital in {what}: {phrase!r}")


def load_names(data: Path) -> dict[str, str]:
    names = {}
    with open(data / "entity2text.txt", encoding="utf-8") as f:
        for line in f:
            mid, name = line.rstrip("\r\n").split("\t", 1)
            names[mid] = normalize_name(name)
    return names


def load_triples(data: Path) -> list[tuple[str, str, str]]:
    triples = []
    for split in ("train", "valid", "test"):
        with open(data / f"{split}.txt", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line:
                    h, r, t = line.split("\t")
                    triples.append((h, r, t))
    return triples


def derive_eval_phrases(shared: Path, names: dict[str, str], triples) -> dict[str, str]:
    pair_paths: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for h, r, t in triples:
        pair_paths[(names[h], names[t])].add(r)

    eval_triples: set[tuple[str, str, str]] = set()
    for name in EVAL_SETS:
        with open(shared / "eval" / name / "triples.tsv", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    eval_triples.add(tuple(line.split("\t")))

    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unmatched = ambiguous = 0
    for h, phrase, t in sorted(eval_triples):
        cands = pair_paths.get((h, t), set())
        if not cands:
            unmatched += 1
        elif len(cands) == 1:
            votes[next(iter(cands))][phrase] += 1
        else:
            ambiguous += 1

    mapping: dict[str, str] = {}
    total_votes = agree_votes = 0
    for path in sorted(votes):
        (phrase, n), = votes[path].most_common(1)
        tot = sum(votes[path].values())
        total_votes += tot
        agree_votes += n
        if n != tot:
            raise SystemExit(f"ambiguous eval phrase for {path}: {dict(votes[path])}")
        mapping[path] = phrase

    # every eval triple must be explained by one of its candidate paths under the derived mapping
    unexplained = [
        (h, p, t) for h, p, t in eval_triples
        if not any(mapping.get(r) == p for r in pair_paths.get((h, t), ()))
    ]
    print(f"eval triples (union of {', '.join(EVAL_SETS)}): {len(eval_triples)}")
    print(f"  matched to a single Freebase path: {len(eval_triples) - unmatched - ambiguous}"
          f"  (several candidate paths: {ambiguous}, no path: {unmatched})")
    print(f"  paths recovered: {len(mapping)}, phrases: {len(set(mapping.values()))}, "
          f"agreement {agree_votes}/{total_votes} = {agree_votes / total_votes:.1%}")
    print(f"  eval triples explained by the recovered mapping: {len(eval_triples) - len(unexplained)}"
          f"/{len(eval_triples)}")
    if unmatched or unexplained:
        raise SystemExit(f"{unmatched} eval triples unmatched, {len(unexplained)} unexplained, e.g. {unexplained[:3]}")
    if len(mapping) != EXPECTED_EVAL_PATHS or len(set(mapping.values())) != EXPECTED_EVAL_PHRASES:
        raise SystemExit("unexpected number of eval paths/phrases (see shared/eval/README.md)")
    return mapping


def main() -> None:
    shared = shared_dir()
    data = shared / "data" / "fb15k-237"
    if not data.is_dir():
        raise SystemExit(f"FB15k-237 data not found under {shared} (set ATLASKV_SHARED)")
    names = load_names(data)
    triples = load_triples(data)
    paths = sorted({r for _, r, _ in triples})
    if len(paths) != EXPECTED_PATHS:
        raise SystemExit(f"expected {EXPECTED_PATHS} relation paths, found {len(paths)}")

    eval_map = derive_eval_phrases(shared, names, triples)
    overlap = sorted(set(MANUAL) & set(eval_map))
    unknown = sorted((set(MANUAL) | set(INVERSE)) - set(paths))
    missing = sorted(set(paths) - set(MANUAL) - set(eval_map))
    if overlap or unknown or missing:
        raise SystemExit(f"manual table mismatch: in eval too {overlap}, unknown {unknown}, missing {missing}")

    rows = []
    for path in paths:
        source = "eval" if path in eval_map else "manual"
        phrase = eval_map[path] if source == "eval" else MANUAL[path]
        inverse = INVERSE.get(path, "")
        check_phrase(phrase, f"phrase of {path}")
        if inverse:
            check_phrase(inverse, f"inverse phrase of {path}")
        rows.append((path, phrase, inverse, source))

    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(HEADER) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    n_eval = sum(r[3] == "eval" for r in rows)
    print(f"wrote {OUT.relative_to(REPO)}: {len(rows)} paths ({n_eval} eval, {len(rows) - n_eval} manual), "
          f"{len({r[1] for r in rows})} distinct phrases, {sum(bool(r[2]) for r in rows)} inverse phrases")


if __name__ == "__main__":
    sys.exit(main())
