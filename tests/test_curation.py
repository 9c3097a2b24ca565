"""Curation stages: language identification, PII redaction, repeated-line removal and the URL blocklist.

The corpus is written here (short articles in English, French, German and Spanish, made up for these
tests), with planted personal data, one boilerplate line in ten documents and three documents from a
blocked domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from mtnlg_ray.data.lines import line_key
from mtnlg_ray.data.pii import luhn_valid, redact
from mtnlg_ray.data.urls import blocked_domain, read_blocklist
from mtnlg_ray.errors import InputError

ENGLISH = [
    "The river council met on Monday to discuss the new footbridge, which engineers say will carry twice the "
    "traffic of the old wooden crossing and should open before the autumn rains arrive in the valley.",
    "Farmers in the northern hills reported an early harvest this year, crediting a mild spring and careful "
    "irrigation, although several growers warned that prices at the regional market remain stubbornly low.",
    "A small museum on the harbour front has reopened after two years of repairs, with a new gallery devoted "
    "to the fishing families who built the town and a workshop where children can learn to mend nets.",
    "Researchers at the university have published a long study of city birds, finding that sparrows now nest "
    "later in the season than they did thirty years ago, probably because streets stay warm at night.",
    "The local library will extend its opening hours during the examination period, giving students quiet "
    "rooms until midnight, free tea in the reading hall and access to a growing collection of old maps.",
    "After a decade of planning, the mountain railway finally received approval to replace its ageing carriages "
    "with lighter ones that climb faster, use less power and leave more room for bicycles and luggage.",
    "Volunteers spent the weekend clearing plastic from the southern beaches, collecting more than four hundred "
    "bags of rubbish and recording every item so that scientists can trace where the waste comes from.",
    "The orchestra announced a season of free concerts in parks across the county, opening with a programme of "
    "folk dances arranged for strings and ending with a choir of schoolchildren singing by lantern light.",
    "Bakers across the island are competing this month for the title of best rye loaf, judged on crust, crumb "
    "and flavour by a panel of retired millers who have promised to taste every entry without exception.",
    "A retired teacher has donated her garden to the village as a public orchard, planting apple, pear and plum "
    "trees along the paths and asking only that the fruit be shared freely among the neighbours each year.",
    "Engineers testing a new kind of tidal turbine off the western cape say the first months went better than "
    "expected, with the machine producing steady power through storms that stopped the older designs.",
    "The town hall clock, silent since a lightning strike last winter, chimed again on Sunday after a local "
    "watchmaker spent three months rebuilding its gears by hand from drawings found in the county archive.",
    "Cyclists welcomed the opening of a coastal trail that links five fishing villages, although some walkers "
    "asked the council to add benches, shade and clear signs showing where the path crosses the main road.",
    "A survey of the old quarry found rare orchids growing on its lower terraces, and the owners have agreed to "
    "leave that part untouched while they turn the rest of the site into a swimming lake for the summer.",
    "Students from the technical college built a solar boat that crossed the bay in under an hour, beating last "
    "year's record and drawing a crowd of families who cheered from the pier as it reached the harbour.",
    "The county hospital opened a new children's ward painted by local artists, with murals of forests, whales "
    "and hot air balloons that nurses say help young patients feel calmer before their operations.",
]
FOREIGN = {
    "fr": [
        "Le conseil municipal a voté hier soir la rénovation complète de la vieille halle du marché, qui accueillera "
        "de nouveau les producteurs de la région chaque samedi matin dès le printemps prochain.",
        "Les pêcheurs du port se plaignent depuis des semaines de la hausse du prix du carburant, qui rend chaque "
        "sortie en mer plus coûteuse alors que les prises restent modestes pour la saison.",
        "Une exposition consacrée aux anciens métiers du bois ouvre ses portes au musée départemental, avec des "
        "ateliers pour les enfants et des démonstrations de sculpture tous les dimanches après-midi.",
    ],
    "de": [
        "Der Gemeinderat hat am Dienstag beschlossen, die alte Brücke über den Fluss bis zum Herbst zu erneuern, "
        "damit Radfahrer und Fußgänger die Innenstadt wieder sicher erreichen können.",
        "Im Stadtpark findet am Wochenende ein großes Fest mit Musik, Theater und regionalen Spezialitäten statt, "
        "zu dem die Veranstalter mehrere tausend Besucher aus der ganzen Umgebung erwarten.",
        "Die Bibliothek verlängert während der Prüfungszeit ihre Öffnungszeiten, damit Studierende bis Mitternacht "
        "in ruhigen Räumen lernen und die historische Kartensammlung nutzen können.",
    ],
    "es": [
        "El ayuntamiento aprobó ayer un plan para plantar mil árboles en los barrios del sur de la ciudad, donde "
        "los vecinos llevan años pidiendo más sombra y espacios verdes para los niños.",
        "Los agricultores de la comarca celebraron una cosecha abundante gracias a las lluvias de la primavera, "
        "aunque advierten que los precios en el mercado regional siguen siendo demasiado bajos.",
        "Un grupo de voluntarios limpió durante el fin de semana las playas del norte y recogió cientos de bolsas "
        "de basura que ahora estudiarán los científicos de la universidad para conocer su origen.",
    ],
}
BOILERPLATE = "Subscribe to our newsletter for the latest stories from around the region."
PII = {
    "email": "reader.letters@example-news.org",
    "phone": "(415) 555-0134",
    "ip": "203.0.113.42",
    "card": "4111 1111 1111 1111",
    "intl_phone": "+44 20 7946 0958",
    "ipv6": "2001:db8::8a2e:370:7334",
}
LOOK_ALIKES = ["2024-01-15", "version 3.11.4", "ISBN 978-3-16-148410-0", "12:30:45", "4111 1111 1111 1112"]


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """corpus.jsonl (text + url) and blocklist.txt; returns their paths."""
    rows = []
    for i, text in enumerate(ENGLISH):
        if i < 10:
            text = f"{text}\n{BOILERPLATE}"
        if i == 0:
            text += f"\nLetters to the editor: {PII['email']}, or call {PII['phone']} or {PII['intl_phone']}."
        if i == 1:
            text += f"\nThe survey server at {PII['ip']} (and {PII['ipv6']}) logged the answers."
        if i == 2:
            text += f"\nDonations by card {PII['card']} are welcome."
        if i == 3:
            text += "\nUpdated " + ", ".join(LOOK_ALIKES) + "."
        rows.append({"text": text, "url": f"https://news.example.com/story/{i}"})
    rows += [dict(rows[5]), dict(rows[5])]  # one story syndicated three times: exact dedup keeps one
    for language, texts in FOREIGN.items():
        for i, text in enumerate(texts):
            rows.append({"text": text, "url": f"https://{language}.example.net/{i}"})
    blocked = ["https://spam.example.biz/a", "http://deep.sub.spam.example.biz/b", "https://clickbait.example/c"]
    for i, url in enumerate(blocked):
        rows.append({"text": f"Story {i}: you will never believe what happened next in this small town today, "
                             f"readers say it changed everything about how they shop for shoes online.",
                     "url": url})
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    blocklist = folder / "blocklist.txt"
    blocklist.write_text("# domains we never train on\nspam.example.biz\nclickbait.example\n", encoding="utf-8")
    return corpus, blocklist


def test_pii_is_redacted_and_look_alikes_survive():
    text = " ".join(PII.values()) + " | " + " ".join(LOOK_ALIKES)
    clean, counts = redact(text)
    for value in PII.values():
        assert value not in clean
    for value in LOOK_ALIKES:
        assert value in clean
    assert counts == {"email": 1, "phone": 2, "ip": 2, "card": 1}
    assert clean.startswith("<EMAIL> <PHONE> <IP> <CARD> <PHONE> <IP>")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    # an address that ends a sentence, US numbers written with spaces
    assert redact("Server at 10.0.0.1. Call 415 555 0134 or (415) 555 0134.")[0] == \
        "Server at <IP>. Call <PHONE> or <PHONE>."
    # four-part versions and code stay: slices and Haskell's `::` are no IPv6 addresses
    code = "version 2.0.1.3, Version: 1.2.3.4, v1.2.3.4, s[::-1] + x[::2] + a[1::2], f :: Int -> Int"
    assert redact(code) == (code, {})


@pytest.mark.parametrize(("text", "expected"), [
    # an address after a word that merely ends like a version word ("ser-ver", "dri-ver", "o-ver")
    ("Connect to the server 10.0.0.1 now", "Connect to the server <IP> now"),
    ("Set the driver 192.168.0.10; moved over 172.16.0.5", "Set the driver <IP>; moved over <IP>"),
    ("Server: 10.0.0.1", "Server: <IP>"),
    # versions: after a version word, or a camel-cased ...Version, in quotes or a tag
    ('[assembly: AssemblyVersion("1.0.0.0")]', '[assembly: AssemblyVersion("1.0.0.0")]'),
    ("<version>1.2.0.0</version> ver. 1.2.3.4 release 2.0.0.1", "<version>1.2.0.0</version> ver. 1.2.3.4 release 2.0.0.1"),
    # no-break spaces (French typography), which cleaning turned into the spaces the patterns match
    ("Appelez le +33\u00a01\u00a023\u00a045\u00a067\u00a089", "Appelez le <PHONE>"),
    ("Card 4111\u00a01111\u00a01111\u00a01111, call +1\u202f415\u202f555\u202f0134", "Card <CARD>, call <PHONE>"),
    # North America's 3-3-4 with a space, then a dash
    ("Call 415 555-0134 now", "Call <PHONE> now"),
    # signed decimals are no phone numbers
    ("Dow Jones +123.45 34567.89; AAPL +1.25 120.50", "Dow Jones +123.45 34567.89; AAPL +1.25 120.50"),
    # a signed score or change and a season are no phone number; a real one after them still is
    ("goal difference +15 2023-24, then +12 2024/25; ring +44 20 7946 0958",
     "goal difference +15 2023-24, then +12 2024/25; ring <PHONE>"),
    # a local part that starts with an underscore or a letter outside ASCII
    ("write to _john@example.com or josé@example.org", "write to <EMAIL> or <EMAIL>"),
])
def test_pii_reads_addresses_phones_and_versions_as_a_reader_would(text, expected):
    assert redact(text)[0] == expected


def test_text_normalisation_keeps_words_whole_and_breaks_lines():
    from mtnlg_ray.config import CleanSection
    from mtnlg_ray.data.clean import normalize_text, quality_problem, word_pattern

    # combining marks belong to their word: a Hindi paragraph used to be rejected (mean word length 1.3)
    assert word_pattern().findall("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    hindi = ("भारत एक विशाल देश है जिसमें अनेक भाषाएँ बोली जाती हैं और यहाँ की संस्कृति बहुत पुरानी है। लोग अलग "
             "अलग त्योहार मनाते हैं और एक दूसरे के साथ मिलकर रहते हैं। गाँवों में खेती मुख्य काम है और शहरों में उद्योग बढ़ रहे हैं।")
    assert quality_problem(normalize_text(hindi), CleanSection()) is None
    # a page break, NEL and U+2028 end a line; a vertical tab is a space (they glued words together)
    assert normalize_text("End of page one.\x0cStart\x0bof page two.\x85Next\u2028line") == \
        "End of page one.\nStart of page two.\nNext\nline"


def test_decontamination_matches_evaluation_text_stored_decomposed():
    import unicodedata

    from mtnlg_ray.data.clean import normalize_text
    from mtnlg_ray.data.decontam import contaminated_spans, eval_ngrams

    item = "the quick brown café fox jumps over the lazy dog near the river bank today and tomorrow"
    grams = eval_ngrams([unicodedata.normalize("NFD", item)], 13)
    assert contaminated_spans(normalize_text(item), grams) == [(0, len(item))]


def test_blocklist_reads_urls_without_a_scheme_and_international_domains():
    from mtnlg_ray.data.urls import ascii_host

    listed = {"evil.com", ascii_host("bücher.de")}
    assert blocked_domain("evil.com/r?next=https://good.org", listed) == "evil.com"
    assert blocked_domain("//evil.com/x", listed) == "evil.com"
    assert blocked_domain("https://xn--bcher-kva.de/", listed) == blocked_domain("https://bücher.de/", listed) \
        == "xn--bcher-kva.de"
    assert blocked_domain("http://good.org/?u=https://evil.com", listed) is None


def test_blocklist_matches_domains_and_their_subdomains_only(tmp_path):
    listed = {"spam.example.biz", "clickbait.example"}
    assert blocked_domain("https://spam.example.biz/x", listed) == "spam.example.biz"
    assert blocked_domain("http://a.b.spam.example.biz", listed) == "spam.example.biz"
    # a URL that cannot be parsed is one rejected document, not a failed run
    from mtnlg_ray.data.urls import url_batch

    checked = url_batch(pa.table({"url": ["http://[::1", "https://ok.example.org/a", "https://spam.example.biz/b"]}),
                        sorted(listed))
    assert checked.column("reason").to_pylist() == ["bad_url", "", "url_blocklist"]
    assert blocked_domain("https://notspam.example.biz/x", listed) is None  # not a subdomain
    assert blocked_domain("clickbait.example/path", listed) == "clickbait.example"  # no scheme
    assert blocked_domain("https://example.biz", listed) is None
    bad = tmp_path / "bad.txt"
    bad.write_text("fine.example\nhttp://not a domain/\n")
    with pytest.raises(InputError, match=r"bad.txt:2: expected a domain"):
        read_blocklist(bad)


def test_line_keys_ignore_case_and_surrounding_space():
    assert line_key("  Subscribe to our newsletter ") == line_key("subscribe TO our newsletter")


@pytest.mark.slow  # 55-95 s of the CI budget: a whole prepare with every curation stage on
def test_one_prepare_curates_a_mixed_corpus(ray_session, tmp_path):
    """Must-show of the issue: foreign documents rejected for `language`, blocked ones for `url_blocklist`,
    every English article kept, and no planted PII or boilerplate line left in any kept text."""
    corpus, blocklist = write_corpus(tmp_path)
    out = tmp_path / "data"
    result = run_cli("data", "prepare", str(corpus), "--output", str(out), "--set", "lang.keep=[en]",
                     "--set", "pii.redact=true", "--set", "dedup.lines=true", "--set", "read.url_field=url",
                     "--set", f"filter.url_blocklist={blocklist}", "--set", "tokenizer.vocab_size=300",
                     "--set", "pack.seq_len=32", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]][:6] == ["read", "url filter", "language", "pii", "clean", "line dedup"]
    rejected = pq.read_table(out / "rejected").to_pylist()
    by_reason: dict[str, list] = {}
    for row in rejected:
        by_reason.setdefault(row["reason"], []).append(row)
    assert len(by_reason.pop("language")) == 9
    assert len(by_reason.pop("url_blocklist")) == 3
    # line dedup counts the three copies as one document, so their lines are no boilerplate
    assert len(by_reason.pop("exact_duplicate")) == 2
    assert by_reason == {}
    docs = pq.read_table(out / "docs").to_pylist()
    assert len(docs) == len(ENGLISH) and {d["language"] for d in docs} == {"en"}
    kept = "\n".join(d["text"] for d in docs)
    assert not any(value in kept for value in PII.values())
    assert "newsletter" not in kept
    assert all(value in kept for value in LOOK_ALIKES)
    assert manifest["pii_redacted"] == {"email": 1, "phone": 2, "ip": 2, "card": 1}
    assert manifest["repeated_lines_removed"] == 1


def test_a_url_field_no_document_has_is_one_line_and_exit_2(tmp_path):
    """A misspelt read.url_field gave every document an empty URL, and the blocklist blocked nothing."""
    corpus, blocklist = write_corpus(tmp_path)
    misspelt = run_cli("data", "prepare", str(corpus), "--output", str(tmp_path / "data2"), "--set", "read.url_field=URL",
                       "--set", f"filter.url_blocklist={blocklist}", "--set", "tokenizer.vocab_size=300", timeout=600)
    assert misspelt.returncode == 2, misspelt.stderr[-2000:]
    assert misspelt.stderr.strip().splitlines()[-1] == (
        "error: read.url_field: no document has a 'URL' field (or column) holding its URL; "
        "filter.url_blocklist would check nothing")


def test_curation_settings_that_cannot_work_are_one_line_and_exit_2(tmp_path):
    corpus, blocklist = write_corpus(tmp_path)
    unknown = run_cli("data", "prepare", str(corpus), "--output", str(tmp_path / "a"), "--set", "lang.keep=[en, xx]")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: lang.keep: expected ISO 639-1 codes the identifier knows "
                                      "(such as en, fr, de), got 'xx'")
    no_field = run_cli("data", "prepare", str(corpus), "--output", str(tmp_path / "b"),
                       "--set", f"filter.url_blocklist={blocklist}")
    assert no_field.returncode == 2
    assert no_field.stderr.strip() == ("error: filter.url_blocklist: set read.url_field to the field that holds "
                                       "each document's URL")


def test_a_txt_evaluation_file_is_one_item_a_line(tmp_path):
    """Short questions listed one a line were one 30-word item: none matched as the whole it is, and a
    training document holding one of them was left uncut."""
    from mtnlg_ray.config import DecontamSection
    from mtnlg_ray.data.decontam import contaminated_spans
    from mtnlg_ray.data.pipeline import _evaluation_grams

    questions = ["what is the capital city of the old kingdom", "how many legs does a spider have in total",
                 "which planet has the longest day of them all"]
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    grams = _evaluation_grams(DecontamSection(eval_files=[str(tmp_path / "questions.txt")]))
    doc = f"Quiz night. {questions[1]} Everyone laughed."
    start = doc.index(questions[1])
    assert contaminated_spans(doc, grams) == [(start, start + len(questions[1]))]  # a whole item: cut exactly
    whole = _evaluation_grams(DecontamSection(eval_files=[str(tmp_path / "questions.txt")], txt_mode="file"))
    assert contaminated_spans(doc, whole) == []  # read as one item, as before: no 13 words of it in the doc


def test_refused_evaluation_files_are_one_line_and_skips_beside_usable_ones_one_warning(tmp_path, caplog):
    """A refusal came after a per-file "skipped 1 missing_field" line: two lines where one was meant."""
    import logging

    import pytest

    from mtnlg_ray.config import DecontamSection
    from mtnlg_ray.data.pipeline import _evaluation_grams
    from mtnlg_ray.errors import InputError

    other = tmp_path / "qa.jsonl"
    other.write_text('{"question": "Which river runs through the old town of the capital city?"}\n')
    with caplog.at_level(logging.WARNING):
        with pytest.raises(InputError, match=r"no evaluation text to match \(missing_field 1\)"):
            _evaluation_grams(DecontamSection(eval_files=[str(other)]))
    assert caplog.records == []
    other.write_text(other.read_text() + '{"text": "Which river runs through the old town of the capital city?"}\n')
    with caplog.at_level(logging.WARNING):
        assert _evaluation_grams(DecontamSection(eval_files=[str(other)]))
    assert [r.getMessage() for r in caplog.records] == ["decontam.eval_files: skipped records (missing_field 1)"]


def test_a_missing_evaluation_file_names_its_key(tmp_path):
    """A missing evaluation file was reported like a missing corpus input: the user looked for it among INPUTs."""
    import pytest

    from mtnlg_ray.config import DecontamSection
    from mtnlg_ray.data.pipeline import _evaluation_grams
    from mtnlg_ray.errors import InputError

    missing = tmp_path / "evals.jsonl"
    with pytest.raises(InputError, match=r"^decontam\.eval_files: .*evals\.jsonl") as refused:
        _evaluation_grams(DecontamSection(eval_files=[str(missing)]))
    assert "\n" not in str(refused.value)
